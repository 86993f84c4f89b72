// Fused token-level divergence of two language models' logits (minidiff._C).
//
// For each row (one scored token) with base logits z and variant logits w over a
// vocabulary of V entries, p = softmax(z), q = softmax(w), natural log:
//   kld         = sum_v p_v (lp_v - lq_v)            lp = z - logsumexp(z), lq likewise
//   kld_reverse = sum_v q_v (lq_v - lp_v)
//   js          = 0.5 sum_v [ -p_v g(-d_v) - q_v g(d_v) ],  d = lp - lq, g(x) = log((1 + e^x)/2)
//   entropy     = -sum_v p_v lp_v
//   top-1 of z and w (first maximum), top-5 / top-10 overlap (sets ordered by logit
//   descending, index ascending), and with a target y: lp_y, lq_y and the ranks
//   #{v : z_v > z_y}, #{v : w_v > w_y}.
// Terms with p_v = 0 (z_v = -inf) are 0; p_v > 0 = q_v makes kld +inf. With
// d_v = 0 every term is exactly 0, so identical rows give exactly 0.
//
// Per row, two passes over blocks of kBlock entries:
//  1. each block (in L1): its maxima, rank counts, a NaN/+inf check and the top-10
//     (only entries above the current 10th value are offered); then, under the running
//     maxima mz, mw, the exponentials e_v = e^(z_v - mz), f_v = e^(w_v - mw) and the
//     differences z_v - w_v, kept in a per-thread buffer, and the online sums (rescaled
//     when a maximum grows)
//       S_z = sum e, S_w = sum f, A_z = sum e (z - w), A_w = sum f (w - z), B = sum e (z - mz)
//     so that lse_z = mz + log S_z, kld = A_z / S_z - (lse_z - lse_w),
//     kld_reverse = A_w / S_w + (lse_z - lse_w), entropy = log S_z - B / S_z;
//  2. JS from the kept values (p = e_v e^(m_block - lse_z)), no exp per entry.
// That is one read of the two logit rows from memory and one exp per entry of each;
// exps and sums in float64. Identical rows give A = 0 and equal lse: exactly 0.
// JS per entry uses only p, q and |d|: with m = max(p, q), n = min(p, q) and
// L = log((1 + n/m) / 2) = 2 atanh(s), s = (n - m) / (3m + n) in [-1/3, 0],
// g(-|d|) = L and g(|d|) = |d| + L, so the pair's terms add up to -(p + q) L - n |d|.
//
// exp and atanh are branch-free float64 polynomials (below) so the passes vectorize.
// The AVX-512 path runs the entry loops as intrinsics (GCC's vectorization of the
// generic loops spills registers and masks every operation): after the first block the
// scan compares 16 float32 (8 float64) entries at a time into bit masks (rank counts by
// popcount, top-10 candidates as mask words; NaN and +inf always count as candidates,
// so no separate check per entry), and the exp and JS loops run two 8-lane chains per
// iteration. The AVX2+FMA path runs the exp and JS loops as 4-lane intrinsics (two
// chains) and the generic scan; the portable path the generic loops throughout. Picked at
// run time (csrc/cpu_features.h; MINIDIFF_SIMD caps it).
//
// Python (minidiff.ops.token_divergence) validates dtypes, shapes, contiguity and
// the target range before calling; NaN/+inf logits and rows without a finite
// entry are detected here and reported back (row, kind, which matrix) so Python
// raises a ValueError.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu_features.h"
#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

namespace minidiff {
namespace {

constexpr int64_t kBlock = 1024;
constexpr int kTop = 10;
constexpr double kInf = std::numeric_limits<double>::infinity();

#define MD_INLINE inline __attribute__((always_inline))

MD_INLINE double bits_to_double(uint64_t b) {
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}
MD_INLINE uint64_t double_to_bits(double d) {
  uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}

// e^x for x <= ~0 (the callers' arguments are log-probabilities or logits minus
// a maximum), NaN -> 0, x < -708 (incl. -inf) -> 0 (true value < 3e-308).
// n = round(16 x / ln 2) by the 1.5 * 2^52 shift, r = x - n ln 2 / 16 (Cody-Waite,
// |r| <= ln 2 / 32 = 0.0217), e^x = 2^floor(n / 16) * 2^((n mod 16) / 16) * e^r with the
// 16 powers 2^(j/16) from a table and e^r by a degree-6 polynomial (Chebyshev fit on
// |r| <= ln 2 / 32, relative error < 8e-18). Error about 1 ulp.
constexpr double kExpTable[16] = {
    1.0,                1.0442737824274138, 1.0905077326652577, 1.1387886347566916,
    1.189207115002721,  1.241857812073484,  1.2968395546510096, 1.3542555469368927,
    1.4142135623730951, 1.4768261459394993, 1.5422108254079407, 1.6104903319492543,
    1.681792830507429,  1.7562521603732995, 1.8340080864093424, 1.9152065613971474};  // 2^(j/16)
constexpr double kExpShift = 6755399441055744.0;  // 1.5 * 2^52
constexpr double kExp16Log2e = 23.083120654223414;                   // 16 / ln 2
constexpr double kExpLn2Hi16 = 6.93147180369123816490e-01 / 16;      // ln 2 / 16, high bits (exact n * hi)
constexpr double kExpLn2Lo16 = 1.90821492927058770002e-10 / 16;      // and the rest
constexpr double kExpPoly[7] = {1.0,                  1.0000000000000022,    0.5000000000000003,
                                0.16666666662844726,  0.04166666666188925,   0.008333496248686918,
                                0.0013889092532749104};  // e^r, r^0 .. r^6

MD_INLINE double exp_neg(double x) {
  if (!(x >= -708.0)) return 0.0;
  const double t = x * kExp16Log2e + kExpShift;
  const int64_t n = static_cast<int64_t>(double_to_bits(t) & ((uint64_t{1} << 52) - 1)) - (int64_t{1} << 51);
  const double nd = t - kExpShift;
  const double r = (x - nd * kExpLn2Hi16) - nd * kExpLn2Lo16;
  double pl = kExpPoly[6];
  for (int i = 5; i >= 0; --i) pl = pl * r + kExpPoly[i];
  const double scale = bits_to_double(static_cast<uint64_t>((n >> 4) + 1023) << 52);  // 2^floor(n / 16)
  return pl * kExpTable[n & 15] * scale;
}

// atanh(s) / s = 1 + x Q(x), x = s^2 in [0, 1/9] (s in [-1/3, 0]), Q a degree-8 Chebyshev
// fit of (atanh(s)/s - 1) / s^2 (relative error < 5e-15, so atanh(s)/s within 2e-16: the
// leading 1 is exact, and the error shrinks with s where the JS terms cancel).
constexpr double kAtanhQ[9] = {0.33333333333333487, 0.19999999999780063, 0.14285714338330496,
                               0.11111106278964857, 0.09091130554209872, 0.07686637438179002,
                               0.0675117123587855,  0.05161334635249541, 0.08435350330548605};

MD_INLINE double atanh_over_s(double x) {
  double q = kAtanhQ[8];
  for (int i = 7; i >= 0; --i) q = q * x + kAtanhQ[i];
  return q * x + 1.0;
}

// Top-10 (value descending, index ascending) of one row, filled in index order.
struct TopK {
  double val[kTop];
  int64_t idx[kTop];
  int n = 0;
  MD_INLINE bool wants_block(double block_max) const { return n < kTop || block_max > val[kTop - 1]; }
  MD_INLINE void push(double x, int64_t i) {
    if (n == kTop && !(x > val[kTop - 1])) return;  // ties keep the earlier (smaller) index
    if (n < kTop && !(x == x)) return;               // NaN never enters (the row is rejected anyway)
    int j = n < kTop ? n : kTop - 1;
    while (j > 0 && x > val[j - 1]) {
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
      --j;
    }
    val[j] = x;
    idx[j] = i;
    if (n < kTop) ++n;
  }
};

double overlap(const TopK& a, const TopK& b, int k, int64_t vocab) {
  const int kk = static_cast<int>(std::min<int64_t>(k, vocab));
  int shared = 0;
  for (int i = 0; i < kk && i < a.n; ++i)
    for (int j = 0; j < kk && j < b.n; ++j) shared += a.idx[i] == b.idx[j];
  return static_cast<double>(shared) / kk;
}

// Which entry loops a row runs: generic (compiler-vectorized), AVX2+FMA or AVX-512 intrinsics.
enum class Isa { kGeneric, kAvx2, kAvx512 };

struct RowArgs {
  int64_t vocab;
  const int64_t* targets;  // nullptr: none
  double* out_f;           // rows x 8
  int64_t* out_i;          // rows x 4
  int8_t* status;          // rows: 0 ok, 1 NaN/+inf in base, 2 no finite base logit, 3/4 same for variant
};


#if defined(__x86_64__) || defined(__i386__)
#define MD_AVX512_ATTR __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define MD_AVX512 MD_AVX512_ATTR __attribute__((always_inline)) inline

// exp_neg on 8 lanes, the same operations as the scalar version (x < -708 and NaN -> 0,
// and lanes outside mask k -> 0; `pos` gets the lanes whose result is > 0):
// the table lookup is one permute on the low 4 bits of t (which hold n mod 16), the
// power 2^floor(n / 16) one vscalefpd.
MD_AVX512 __m512d exp_neg8(__m512d x, __mmask8 k, __mmask8& pos) {
  const __m512d shift = _mm512_set1_pd(kExpShift);
  const __m512d t = _mm512_fmadd_pd(x, _mm512_set1_pd(kExp16Log2e), shift);
  const __m512d n = _mm512_sub_pd(t, shift);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kExpLn2Hi16), x);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kExpLn2Lo16), r);
  __m512d pl = _mm512_set1_pd(kExpPoly[6]);
  for (int i = 5; i >= 0; --i) pl = _mm512_fmadd_pd(pl, r, _mm512_set1_pd(kExpPoly[i]));
  const __m512d tab = _mm512_permutex2var_pd(_mm512_loadu_pd(kExpTable), _mm512_castpd_si512(t),
                                             _mm512_loadu_pd(kExpTable + 8));
  // the lanes with a nonzero result (at least 2^-1022 * 0.98): in k, x >= -708, not NaN
  pos = _mm512_mask_cmp_pd_mask(k, x, _mm512_set1_pd(-708.0), _CMP_GE_OQ);
  return _mm512_maskz_scalef_pd(pos, _mm512_mul_pd(pl, tab), _mm512_mul_pd(n, _mm512_set1_pd(1.0 / 16)));
}

MD_AVX512 __m512d atanh_over_s8(__m512d x) {
  __m512d q = _mm512_set1_pd(kAtanhQ[8]);
  for (int i = 7; i >= 0; --i) q = _mm512_fmadd_pd(q, x, _mm512_set1_pd(kAtanhQ[i]));
  return _mm512_fmadd_pd(q, x, _mm512_set1_pd(1.0));
}

// 8 entries from v (all lanes of mask k; the others 0) widened to double.
MD_AVX512 __m512d load8(const float* p, __mmask8 k) { return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, p)); }
MD_AVX512 __m512d load8(const double* p, __mmask8 k) { return _mm512_maskz_loadu_pd(k, p); }

// Lane counts, masks and operations of the block scan for float32 and float64 rows.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int n = 16;
  using mask = __mmask16;
};
template <>
struct Lanes<double> {
  static constexpr int n = 8;
  using mask = __mmask8;
};

MD_AVX512 __m512 loadv(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
MD_AVX512 __m512d loadv(const double* p, __mmask8 k) { return _mm512_maskz_loadu_pd(k, p); }
MD_AVX512 __m512 set1v(float x) { return _mm512_set1_ps(x); }
MD_AVX512 __m512d set1v(double x) { return _mm512_set1_pd(x); }
MD_AVX512 __m512 maxv(__m512 a, __mmask16 k, __m512 b) { return _mm512_mask_max_ps(a, k, a, b); }
MD_AVX512 __m512d maxv(__m512d a, __mmask8 k, __m512d b) { return _mm512_mask_max_pd(a, k, a, b); }
MD_AVX512 __mmask16 gtv(__mmask16 k, __m512 a, __m512 b) { return _mm512_mask_cmp_ps_mask(k, a, b, _CMP_GT_OQ); }
MD_AVX512 __mmask8 gtv(__mmask8 k, __m512d a, __m512d b) { return _mm512_mask_cmp_pd_mask(k, a, b, _CMP_GT_OQ); }
MD_AVX512 __mmask16 nlev(__mmask16 k, __m512 a, __m512 b) { return _mm512_mask_cmp_ps_mask(k, a, b, _CMP_NLE_UQ); }
MD_AVX512 __mmask8 nlev(__mmask8 k, __m512d a, __m512d b) { return _mm512_mask_cmp_pd_mask(k, a, b, _CMP_NLE_UQ); }
MD_AVX512 float hmax(__m512 a) { return _mm512_reduce_max_ps(a); }
MD_AVX512 double hmax(__m512d a) { return _mm512_reduce_max_pd(a); }

// Block scan of one logit row once its top-10 is full (the first block takes the generic
// loop in row_kernel): the block maximum, the rank count #{x > y} and the top-10
// candidates !(x <= th) against the 10th value `th` at the start of the block (the 10th
// value only rises, so an entry at or below it can never enter), one mask bit per entry
// in `cand` (16 lanes per word for float32, 8 for float64). NaN and +inf are candidates
// too: push_masks finds them, so the block needs no separate value check. Returns
// whether any entry is a candidate.
template <typename T>
MD_AVX512_ATTR bool scan_block_avx512(const T* x, int64_t b0, int64_t b1, T y, T th, uint16_t* cand,
                                      double& block_max, int64_t& rank) {
  constexpr int L = Lanes<T>::n;
  using M = typename Lanes<T>::mask;
  const auto vy = set1v(y), vth = set1v(th);
  const auto ninf = set1v(-std::numeric_limits<T>::infinity());
  auto mx = ninf, mx2 = ninf;  // two maxima: one vmaxps chain would bound the loop by its latency
  uint32_t any = 0;
  int64_t c = 0, v = b0, j = 0;
  const M all = M(~M(0));
  for (; v + 2 * L <= b1; v += 2 * L, j += 2) {
    const auto a = loadv(x + v, all), a2 = loadv(x + v + L, all);
    mx = maxv(mx, all, a);
    mx2 = maxv(mx2, all, a2);
    c += __builtin_popcount(static_cast<uint32_t>(gtv(all, a, vy))) +
         __builtin_popcount(static_cast<uint32_t>(gtv(all, a2, vy)));
    const M m = nlev(all, a, vth), m2 = nlev(all, a2, vth);
    cand[j] = m;
    cand[j + 1] = m2;
    any |= m | m2;
  }
  for (; v < b1; v += L, ++j) {
    const M k = b1 - v >= L ? all : M((uint32_t{1} << (b1 - v)) - 1);
    const auto a = loadv(x + v, k);
    mx = maxv(mx, k, a);
    c += __builtin_popcount(static_cast<uint32_t>(gtv(k, a, vy)));
    const M m = nlev(k, a, vth);
    cand[j] = m;
    any |= m;
  }
  mx = maxv(mx, all, mx2);
  block_max = static_cast<double>(hmax(mx));
  rank += c;
  return any != 0;
}

// Pass-1 exponentials of one block (see exp_block below), 8 lanes at a time, two chains.
// While this block's exps run (arithmetic on data already in L1), the same offsets of the
// next block are prefetched from memory (up to `end`, the row's end), so the stream of the
// two rows from DRAM overlaps the exps instead of stalling the next block's first pass.
struct ExpSums {
  __m512d s1, s2, a1, a2, bs;
};

template <typename T>
MD_AVX512 void exp_lanes8(__mmask8 k, const T* z, const T* w, __m512d vmz, __m512d vmw, double* ez, double* ew,
                          double* ed, ExpSums& a) {
  const __m512d x = load8(z, k), u = load8(w, k);
  const __m512d xm = _mm512_sub_pd(x, vmz);
  // 0 outside k, for NaN (x - m with m = -inf) and below e^-708
  __mmask8 pe, pf;  // e > 0, f > 0
  const __m512d e = exp_neg8(xm, k, pe);
  const __m512d f = exp_neg8(_mm512_sub_pd(u, vmw), k, pf);
  const __m512d dv = _mm512_sub_pd(x, u);
  _mm512_mask_storeu_pd(ez, k, e);
  _mm512_mask_storeu_pd(ew, k, f);
  _mm512_mask_storeu_pd(ed, k, dv);
  a.s1 = _mm512_add_pd(a.s1, e);
  a.s2 = _mm512_add_pd(a.s2, f);
  a.a1 = _mm512_mask3_fmadd_pd(e, dv, a.a1, pe);
  a.a2 = _mm512_mask3_fnmadd_pd(f, dv, a.a2, pf);
  a.bs = _mm512_mask3_fmadd_pd(e, xm, a.bs, pe);
}

template <typename T>
MD_AVX512_ATTR void exp_block_avx512(const T* z, const T* w, int64_t b0, int64_t b1, double cmz, double cmw,
                                     double* ez, double* ew, double* ed, double acc[5], int64_t end) {
  const __m512d vmz = _mm512_set1_pd(cmz), vmw = _mm512_set1_pd(cmw), zero = _mm512_setzero_pd();
  ExpSums a{zero, zero, zero, zero, zero}, a2{zero, zero, zero, zero, zero};
  int64_t v = b0;
  for (; v + 16 <= b1; v += 16) {  // two independent chains per iteration
    if (v + kBlock < end) {        // the next block, one 64-byte line per row at a time
      for (int64_t o = 0; o < 16; o += 64 / static_cast<int64_t>(sizeof(T))) {
        _mm_prefetch(reinterpret_cast<const char*>(z + v + o + kBlock), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + v + o + kBlock), _MM_HINT_T0);
      }
    }
    exp_lanes8<T>(0xFF, z + v, w + v, vmz, vmw, ez + v, ew + v, ed + v, a);
    exp_lanes8<T>(0xFF, z + v + 8, w + v + 8, vmz, vmw, ez + v + 8, ew + v + 8, ed + v + 8, a2);
  }
  for (; v < b1; v += 8) {
    const __mmask8 k = b1 - v >= 8 ? __mmask8(0xFF) : __mmask8((1u << (b1 - v)) - 1);
    exp_lanes8<T>(k, z + v, w + v, vmz, vmw, ez + v, ew + v, ed + v, a);
  }
  acc[0] = _mm512_reduce_add_pd(_mm512_add_pd(a.s1, a2.s1));
  acc[1] = _mm512_reduce_add_pd(_mm512_add_pd(a.s2, a2.s2));
  acc[2] = _mm512_reduce_add_pd(_mm512_add_pd(a.a1, a2.a1));
  acc[3] = _mm512_reduce_add_pd(_mm512_add_pd(a.a2, a2.a2));
  acc[4] = _mm512_reduce_add_pd(_mm512_add_pd(a.bs, a2.bs));
}

// Pass-2 JS terms of 8 entries (see js_block below). 1 / (3m + n) by vrcp14pd (relative
// error < 2^-14) and two Newton steps (< 2^-52): vdivpd alone would cost more than the
// rest of the loop.
MD_AVX512 void js_lanes8(__mmask8 k, const double* ez, const double* ew, const double* ed, __m512d vfz,
                         __m512d vfw, __m512d vd, __m512d& acc_l, __m512d& acc_n) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d p = _mm512_mul_pd(_mm512_maskz_loadu_pd(k, ez), vfz);
  const __m512d q = _mm512_mul_pd(_mm512_maskz_loadu_pd(k, ew), vfw);
  const __m512d ad = _mm512_and_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(k, ed), vd),
                                   _mm512_castsi512_pd(_mm512_set1_epi64(0x7FFFFFFFFFFFFFFFLL)));
  const __m512d m = _mm512_max_pd(p, q), n = _mm512_min_pd(p, q);
  const __m512d den = _mm512_fmadd_pd(_mm512_set1_pd(3.0), m, n);
  __m512d rc = _mm512_rcp14_pd(den);
  rc = _mm512_fmadd_pd(rc, _mm512_fnmadd_pd(den, rc, one), rc);
  rc = _mm512_fmadd_pd(rc, _mm512_fnmadd_pd(den, rc, one), rc);
  const __mmask8 mpos = _mm512_cmp_pd_mask(m, zero, _CMP_GT_OQ);  // s = 0 where p = q = 0
  __m512d s = _mm512_maskz_mul_pd(mpos, _mm512_sub_pd(n, m), rc);
  // 1 / den overflows for den < ~2^-1022: those (rare) lanes divide
  const __mmask8 tiny = _mm512_mask_cmp_pd_mask(mpos, m, _mm512_set1_pd(1e-290), _CMP_LT_OQ);
  if (tiny) s = _mm512_mask_div_pd(s, tiny, _mm512_sub_pd(n, m), den);
  // sum (p + q) s atanh(s)/s and sum n |d| (only where n > 0: n = 0 can meet |d| = inf)
  acc_l = _mm512_fmadd_pd(_mm512_mul_pd(_mm512_add_pd(p, q), s), atanh_over_s8(_mm512_mul_pd(s, s)), acc_l);
  acc_n = _mm512_mask3_fmadd_pd(n, ad, acc_n, _mm512_cmp_pd_mask(n, zero, _CMP_GT_OQ));
}

MD_AVX512_ATTR double js_block_avx512(int64_t b0, int64_t b1, const double* ez, const double* ew,
                                      const double* ed, double fz, double fw, double delta) {
  const __m512d vfz = _mm512_set1_pd(fz), vfw = _mm512_set1_pd(fw), vd = _mm512_set1_pd(delta);
  __m512d acc_l = _mm512_setzero_pd(), acc_n = acc_l, acc_l2 = acc_l, acc_n2 = acc_l;
  int64_t v = b0;
  for (; v + 16 <= b1; v += 16) {  // two independent chains per iteration
    js_lanes8(0xFF, ez + v, ew + v, ed + v, vfz, vfw, vd, acc_l, acc_n);
    js_lanes8(0xFF, ez + v + 8, ew + v + 8, ed + v + 8, vfz, vfw, vd, acc_l2, acc_n2);
  }
  for (; v < b1; v += 8) {
    const __mmask8 k = b1 - v >= 8 ? __mmask8(0xFF) : __mmask8((1u << (b1 - v)) - 1);
    js_lanes8(k, ez + v, ew + v, ed + v, vfz, vfw, vd, acc_l, acc_n);
  }
  return -2.0 * _mm512_reduce_add_pd(_mm512_add_pd(acc_l, acc_l2)) - _mm512_reduce_add_pd(_mm512_add_pd(acc_n, acc_n2));
}
#endif

// Per-thread scratch of one row: the pass-1 exponentials of both rows (relative to the
// running maximum of their block), the logit differences and each block's running maxima.
struct Scratch {
  // written before read in every row: left uninitialized (zeroing 3 x 8 x vocab bytes would
  // cost as much as a few rows' work in a short call)
  std::unique_ptr<double[]> ez, ew, ed;  // ed: z - w (exact for float32 logits)
  std::vector<double> bmz, bmw;
  std::vector<uint16_t> cand_z, cand_w;  // one block's top-10 candidate masks (AVX-512 scan)
  explicit Scratch(int64_t vocab)
      : ez(new double[static_cast<size_t>(vocab)]), ew(new double[static_cast<size_t>(vocab)]),
        ed(new double[static_cast<size_t>(vocab)]),
        bmz(static_cast<size_t>((vocab + kBlock - 1) / kBlock)), bmw(bmz.size()),
        cand_z(kBlock / 8), cand_w(kBlock / 8) {}
};

// Rescale an online sum when the running maximum grows from m_old to m_new:
// c = e^(m_old - m_new); a sum that underflows to c = 0 holds only zero-weight terms
// (p = 0), so it becomes 0 (not inf * 0 = NaN).
MD_INLINE double rescale(double s, double c) { return c > 0.0 ? s * c : 0.0; }

// Pass 1 of one block [b0, b1) under the running maxima cmz, cmw: stores z_v - w_v,
// e_v = e^(z_v - cmz), f_v = e^(w_v - cmw) (0 where the running maximum is -inf and
// x - m is NaN) and returns the block's sum e, sum f, sum e (z - w), -sum f (z - w) and
// sum e (z - cmz), each term 0 where its weight is 0 (z = -inf: z - w is -inf or NaN).
template <typename T>
MD_INLINE void exp_block_generic(const T* z, const T* w, int64_t b0, int64_t b1, double cmz, double cmw,
                                 double* ez, double* ew, double* ed, double acc[5]) {
  double s1 = 0.0, s2 = 0.0, a1 = 0.0, a2 = 0.0, bs = 0.0;
#pragma omp simd reduction(+ : s1, s2, a1, a2, bs)
  for (int64_t v = b0; v < b1; ++v) {
    const double x = static_cast<double>(z[v]);
    const double u = static_cast<double>(w[v]);
    const double xm = x - cmz;
    double e = exp_neg(xm);
    double f = exp_neg(u - cmw);
    e = e > 0.0 ? e : 0.0;
    f = f > 0.0 ? f : 0.0;
    const double dv = x - u;  // exact for float32 inputs
    ez[v] = e;
    ew[v] = f;
    ed[v] = dv;
    s1 += e;
    s2 += f;
    a1 += e > 0.0 ? e * dv : 0.0;
    a2 += f > 0.0 ? -(f * dv) : 0.0;
    bs += e > 0.0 ? e * xm : 0.0;
  }
  acc[0] = s1;
  acc[1] = s2;
  acc[2] = a1;
  acc[3] = a2;
  acc[4] = bs;
}

// Pass 2 of one block: sum over v of 2 x the JS term, p = e_v fz, q = f_v fw,
// d = lp - lq = (z - w) - delta. With m = max(p, q), n = min(p, q) and
// L = log((1 + n/m) / 2) = log1p(u), u = -(m - n) / (2m) in [-1/2, 0], computed as
// 2 atanh(u / (2 + u)) with u / (2 + u) = (n - m) / (3m + n) (one division), the pair's
// terms -p g(-d) - q g(d), g(x) = log((1 + e^x) / 2), add up to -(p + q) L - n |d|
// (the n |d| term only where n > 0: n = 0 can meet |d| = inf).
MD_INLINE double js_block_generic(int64_t b0, int64_t b1, const double* ez, const double* ew, const double* ed,
                                  double fz, double fw, double delta) {
  double jl = 0.0, jn = 0.0;
#pragma omp simd reduction(+ : jl, jn)
  for (int64_t v = b0; v < b1; ++v) {
    const double p = ez[v] * fz;
    const double q = ew[v] * fw;
    const double d = ed[v] - delta;
    const double m = std::max(p, q);
    const double n = std::min(p, q);
    const double sv = m > 0.0 ? (n - m) / (3.0 * m + n) : 0.0;
    jl += (p + q) * sv * atanh_over_s(sv * sv);
    jn += n > 0.0 ? n * std::fabs(d) : 0.0;
  }
  return -2.0 * jl - jn;
}

#if defined(__x86_64__) || defined(__i386__)
// ---- AVX2 + FMA: the same entry loops on 4 lanes (no masks: full vectors of 8 entries,
//      two chains, and the generic loops for a block's last < 8 entries)
#define MD_AVX2_ATTR __attribute__((target("avx2,fma")))
#define MD_AVX2 MD_AVX2_ATTR __attribute__((always_inline)) inline

MD_AVX2 __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
MD_AVX2 __m256d load4(const double* p) { return _mm256_loadu_pd(p); }

// exp_neg on 4 lanes, the same operations as the scalar version; `pos` gets all-ones in
// the lanes whose result is > 0 (x >= -708, not NaN), the others are 0. 2^floor(n / 16)
// from the bits of t: they hold 0x4338000000000000 + n, a multiple of 16 plus n, so a
// logical shift by 4 leaves floor(n / 16) in the bits that reach the exponent field.
MD_AVX2 __m256d exp_neg4(__m256d x, __m256d& pos) {
  const __m256d shift = _mm256_set1_pd(kExpShift);
  const __m256d t = _mm256_fmadd_pd(x, _mm256_set1_pd(kExp16Log2e), shift);
  const __m256d n = _mm256_sub_pd(t, shift);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kExpLn2Hi16), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kExpLn2Lo16), r);
  __m256d pl = _mm256_set1_pd(kExpPoly[6]);
  for (int i = 5; i >= 0; --i) pl = _mm256_fmadd_pd(pl, r, _mm256_set1_pd(kExpPoly[i]));
  const __m256i tb = _mm256_castpd_si256(t);
  const __m256d tab = _mm256_i64gather_pd(kExpTable, _mm256_and_si256(tb, _mm256_set1_epi64x(15)), 8);
  const __m256i sb = _mm256_slli_epi64(_mm256_add_epi64(_mm256_srli_epi64(tb, 4), _mm256_set1_epi64x(1023)), 52);
  pos = _mm256_cmp_pd(x, _mm256_set1_pd(-708.0), _CMP_GE_OQ);
  return _mm256_and_pd(_mm256_mul_pd(_mm256_mul_pd(pl, tab), _mm256_castsi256_pd(sb)), pos);
}

MD_AVX2 __m256d atanh_over_s4(__m256d x) {
  __m256d q = _mm256_set1_pd(kAtanhQ[8]);
  for (int i = 7; i >= 0; --i) q = _mm256_fmadd_pd(q, x, _mm256_set1_pd(kAtanhQ[i]));
  return _mm256_fmadd_pd(q, x, _mm256_set1_pd(1.0));
}

struct ExpSums4 {
  __m256d s1, s2, a1, a2, bs;
};

template <typename T>
MD_AVX2 void exp_lanes4(const T* z, const T* w, __m256d vmz, __m256d vmw, double* ez, double* ew, double* ed,
                        ExpSums4& a) {
  const __m256d x = load4(z), u = load4(w);
  const __m256d xm = _mm256_sub_pd(x, vmz);
  __m256d pe, pf;
  const __m256d e = exp_neg4(xm, pe);
  const __m256d f = exp_neg4(_mm256_sub_pd(u, vmw), pf);
  const __m256d dv = _mm256_sub_pd(x, u);
  _mm256_storeu_pd(ez, e);
  _mm256_storeu_pd(ew, f);
  _mm256_storeu_pd(ed, dv);
  a.s1 = _mm256_add_pd(a.s1, e);
  a.s2 = _mm256_add_pd(a.s2, f);
  // each term only where its weight is > 0 (e = 0 can meet z - w = -inf)
  a.a1 = _mm256_fmadd_pd(e, _mm256_and_pd(dv, pe), a.a1);
  a.a2 = _mm256_fnmadd_pd(f, _mm256_and_pd(dv, pf), a.a2);
  a.bs = _mm256_fmadd_pd(e, _mm256_and_pd(xm, pe), a.bs);
}

MD_AVX2 double hsum4(__m256d a, __m256d b) {
  const __m256d s = _mm256_add_pd(a, b);
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

template <typename T>
MD_AVX2_ATTR void exp_block_avx2(const T* z, const T* w, int64_t b0, int64_t b1, double cmz, double cmw,
                                 double* ez, double* ew, double* ed, double acc[5], int64_t end) {
  const __m256d vmz = _mm256_set1_pd(cmz), vmw = _mm256_set1_pd(cmw), zero = _mm256_setzero_pd();
  ExpSums4 a{zero, zero, zero, zero, zero}, a2{zero, zero, zero, zero, zero};
  int64_t v = b0;
  for (; v + 8 <= b1; v += 8) {
    if (v + kBlock < end) {
      _mm_prefetch(reinterpret_cast<const char*>(z + v + kBlock), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + v + kBlock), _MM_HINT_T0);
    }
    exp_lanes4<T>(z + v, w + v, vmz, vmw, ez + v, ew + v, ed + v, a);
    exp_lanes4<T>(z + v + 4, w + v + 4, vmz, vmw, ez + v + 4, ew + v + 4, ed + v + 4, a2);
  }
  double tail[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  if (v < b1) exp_block_generic<T>(z, w, v, b1, cmz, cmw, ez, ew, ed, tail);
  acc[0] = hsum4(a.s1, a2.s1) + tail[0];
  acc[1] = hsum4(a.s2, a2.s2) + tail[1];
  acc[2] = hsum4(a.a1, a2.a1) + tail[2];
  acc[3] = hsum4(a.a2, a2.a2) + tail[3];
  acc[4] = hsum4(a.bs, a2.bs) + tail[4];
}

// JS terms of 4 entries (see js_block_generic); s by a true division (AVX2 has no
// double-precision reciprocal estimate), 0 where p = q = 0.
MD_AVX2 void js_lanes4(const double* ez, const double* ew, const double* ed, __m256d vfz, __m256d vfw, __m256d vd,
                       __m256d& acc_l, __m256d& acc_n) {
  const __m256d zero = _mm256_setzero_pd();
  const __m256d p = _mm256_mul_pd(_mm256_loadu_pd(ez), vfz);
  const __m256d q = _mm256_mul_pd(_mm256_loadu_pd(ew), vfw);
  const __m256d ad = _mm256_andnot_pd(_mm256_set1_pd(-0.0), _mm256_sub_pd(_mm256_loadu_pd(ed), vd));
  const __m256d m = _mm256_max_pd(p, q), n = _mm256_min_pd(p, q);
  const __m256d s = _mm256_and_pd(_mm256_div_pd(_mm256_sub_pd(n, m), _mm256_fmadd_pd(_mm256_set1_pd(3.0), m, n)),
                                  _mm256_cmp_pd(m, zero, _CMP_GT_OQ));
  acc_l = _mm256_fmadd_pd(_mm256_mul_pd(_mm256_add_pd(p, q), s), atanh_over_s4(_mm256_mul_pd(s, s)), acc_l);
  // n |d| only where n > 0: n = 0 can meet |d| = inf
  acc_n = _mm256_add_pd(acc_n, _mm256_and_pd(_mm256_mul_pd(n, ad), _mm256_cmp_pd(n, zero, _CMP_GT_OQ)));
}

MD_AVX2_ATTR double js_block_avx2(int64_t b0, int64_t b1, const double* ez, const double* ew, const double* ed,
                                  double fz, double fw, double delta) {
  const __m256d vfz = _mm256_set1_pd(fz), vfw = _mm256_set1_pd(fw), vd = _mm256_set1_pd(delta);
  __m256d acc_l = _mm256_setzero_pd(), acc_n = acc_l, acc_l2 = acc_l, acc_n2 = acc_l;
  int64_t v = b0;
  for (; v + 8 <= b1; v += 8) {
    js_lanes4(ez + v, ew + v, ed + v, vfz, vfw, vd, acc_l, acc_n);
    js_lanes4(ez + v + 4, ew + v + 4, ed + v + 4, vfz, vfw, vd, acc_l2, acc_n2);
  }
  const double tail = v < b1 ? js_block_generic(v, b1, ez, ew, ed, fz, fw, delta) : 0.0;
  return -2.0 * hsum4(acc_l, acc_l2) - hsum4(acc_n, acc_n2) + tail;
}
#endif

template <typename T, Isa kIsa>
MD_INLINE void exp_block(const T* z, const T* w, int64_t b0, int64_t b1, double cmz, double cmw, double* ez,
                         double* ew, double* ed, double acc[5], int64_t end) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (kIsa == Isa::kAvx512) return exp_block_avx512<T>(z, w, b0, b1, cmz, cmw, ez, ew, ed, acc, end);
  if constexpr (kIsa == Isa::kAvx2) return exp_block_avx2<T>(z, w, b0, b1, cmz, cmw, ez, ew, ed, acc, end);
#endif
  (void)end;
  exp_block_generic<T>(z, w, b0, b1, cmz, cmw, ez, ew, ed, acc);
}

template <Isa kIsa>
MD_INLINE double js_block(int64_t b0, int64_t b1, const double* ez, const double* ew, const double* ed, double fz,
                          double fw, double delta) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (kIsa == Isa::kAvx512) return js_block_avx512(b0, b1, ez, ew, ed, fz, fw, delta);
  if constexpr (kIsa == Isa::kAvx2) return js_block_avx2(b0, b1, ez, ew, ed, fz, fw, delta);
#endif
  return js_block_generic(b0, b1, ez, ew, ed, fz, fw, delta);
}

// Offers the entries of x[b0, b1) to the top-10 in index order. Once the list is full
// only entries above its current 10th value can enter: each run of kSub entries is
// compared with that value in one vectorized pass (a bit mask), and only the entries of
// the mask are offered (push re-checks against the rising threshold). The threshold is
// a T value widened to double, so the comparison in T is exact.
constexpr int64_t kSub = 32;
template <typename T>
MD_INLINE void push_block(TopK& tk, const T* x, int64_t b0, int64_t b1) {
  int64_t v0 = b0;
  for (; tk.n < kTop && v0 < b1; ++v0) tk.push(static_cast<double>(x[v0]), v0);  // the row's first entries
  for (int64_t s0 = v0; s0 < b1; s0 += kSub) {
    const int64_t s1 = std::min(b1, s0 + kSub);
    const T th = static_cast<T>(tk.val[kTop - 1]);
    uint32_t m = 0;
#pragma omp simd reduction(| : m)
    for (int64_t v = s0; v < s1; ++v) m |= static_cast<uint32_t>(x[v] > th) << (v - s0);
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      tk.push(static_cast<double>(x[s0 + j]), s0 + j);
    }
  }
}

// Offers the entries whose bit is set in the scan's candidate masks (one word per
// 16 float32 / 8 float64 entries of [b0, b1)) to the top-10, in index order. Returns
// true (and stops) at a NaN or +inf entry: the row is invalid.
template <typename T>
MD_INLINE bool push_masks(TopK& tk, const T* x, int64_t b0, int64_t b1, const uint16_t* masks) {
  constexpr int64_t lanes = sizeof(T) == 4 ? 16 : 8;
  const int64_t words = (b1 - b0 + lanes - 1) / lanes;
  for (int64_t j0 = 0; j0 < words; j0 += 4) {
    uint64_t four = 0;  // candidates are rare: skip four empty words at a time
    std::memcpy(&four, masks + j0, sizeof(uint16_t) * static_cast<size_t>(std::min<int64_t>(4, words - j0)));
    if (!four) continue;
    for (int64_t j = j0; j < std::min(words, j0 + 4); ++j) {
      uint32_t m = masks[j];
      const int64_t v0 = b0 + j * lanes;
      while (m) {
        const int b = __builtin_ctz(m);
        m &= m - 1;
        const T a = x[v0 + b];
        if (!(a < std::numeric_limits<T>::infinity())) return true;
        tk.push(static_cast<double>(a), v0 + b);
      }
    }
  }
  return false;
}

template <typename T, Isa kIsa>
MD_INLINE void row_kernel(const T* z, const T* w, int64_t r, const RowArgs& a, Scratch& sc) {
  const int64_t V = a.vocab;
  const bool has_t = a.targets != nullptr;
  const int64_t y = has_t ? a.targets[r] : 0;
  const T zy = has_t ? z[y] : T(0);
  const T wy = has_t ? w[y] : T(0);
  const T tinf = std::numeric_limits<T>::infinity();
  // running maxima; S = sum e^(x - m), A = sum e^(z - mz) (z - w), B = sum e^(z - mz) (z - mz)
  double mz = -kInf, mw = -kInf, sz = 0.0, sw = 0.0, az = 0.0, aw = 0.0, bz = 0.0;
  int64_t rank_z = 0, rank_w = 0;
  int bad_z = 0, bad_w = 0;
  TopK tz, tw;
  double* ez = sc.ez.get();
  double* ew = sc.ew.get();

  // ---- pass 1: block maxima, ranks, top-10, value check; then the block's exps
  //      (stored for pass 2) and the online sums
  for (int64_t b0 = 0, bi = 0; b0 < V; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    double blk_z, blk_w;
#if defined(__x86_64__) || defined(__i386__)
    if (kIsa == Isa::kAvx512 && tz.n == kTop && tw.n == kTop) {
      const bool any_z = scan_block_avx512<T>(z, b0, b1, zy, static_cast<T>(tz.val[kTop - 1]),
                                              sc.cand_z.data(), blk_z, rank_z);
      const bool any_w = scan_block_avx512<T>(w, b0, b1, wy, static_cast<T>(tw.val[kTop - 1]),
                                              sc.cand_w.data(), blk_w, rank_w);
      if (any_z) bad_z |= push_masks<T>(tz, z, b0, b1, sc.cand_z.data());
      if (any_w) bad_w |= push_masks<T>(tw, w, b0, b1, sc.cand_w.data());
      if (bad_z | bad_w) continue;  // the row is rejected; skip the arithmetic
    } else
#endif
    {
      T xz = -tinf, xw = -tinf;
      int fz = 0, fw = 0;
      int32_t cz = 0, cw = 0;
#pragma omp simd reduction(max : xz, xw) reduction(| : fz, fw) reduction(+ : cz, cw)
      for (int64_t v = b0; v < b1; ++v) {
        const T x = z[v];
        const T u = w[v];
        xz = std::max(xz, x);
        xw = std::max(xw, u);
        fz |= !(x < tinf);  // NaN or +inf
        fw |= !(u < tinf);
        cz += x > zy;
        cw += u > wy;
      }
      blk_z = static_cast<double>(xz);
      blk_w = static_cast<double>(xw);
      bad_z |= fz;
      bad_w |= fw;
      rank_z += cz;
      rank_w += cw;
      if (bad_z | bad_w) continue;  // the row is rejected; skip the arithmetic
      if (tz.wants_block(blk_z)) push_block(tz, z, b0, b1);
      if (tw.wants_block(blk_w)) push_block(tw, w, b0, b1);
    }
    if (blk_z > mz) {
      if (sz > 0.0) {
        const double c = exp_neg(mz - blk_z);
        bz = rescale(bz + (mz - blk_z) * sz, c);
        sz = rescale(sz, c);
        az = rescale(az, c);
      }
      mz = blk_z;
    }
    if (blk_w > mw) {
      if (sw > 0.0) {
        const double c = exp_neg(mw - blk_w);
        sw = rescale(sw, c);
        aw = rescale(aw, c);
      }
      mw = blk_w;
    }
    sc.bmz[bi] = mz;
    sc.bmw[bi] = mw;
    double acc[5];
    exp_block<T, kIsa>(z, w, b0, b1, mz, mw, ez, ew, sc.ed.get(), acc, V);
    sz += acc[0];
    sw += acc[1];
    az += acc[2];
    aw += acc[3];
    bz += acc[4];
  }
  int8_t st = 0;
  if (bad_z) st = 1;
  else if (bad_w) st = 3;  // checked before the maxima: a flagged block skipped their update
  else if (mz == -kInf) st = 2;
  else if (mw == -kInf) st = 4;
  a.status[r] = st;
  double* of = a.out_f + r * 8;
  int64_t* oi = a.out_i + r * 4;
  if (st) {
    std::fill(of, of + 8, 0.0);
    std::fill(oi, oi + 4, int64_t{0});
    return;
  }
  const double log_sz = std::log(sz), log_sw = std::log(sw);
  const double lse_z = mz + log_sz;
  const double lse_w = mw + log_sw;
  const double delta = lse_z - lse_w;  // lp - lq = (z - w) - delta

  // ---- pass 2: JS from the stored exponentials, p = e_v e^(m_b - lse)
  double js = 0.0;
  for (int64_t b0 = 0, bi = 0; b0 < V; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    const double fz = exp_neg(sc.bmz[bi] - lse_z), fw = exp_neg(sc.bmw[bi] - lse_w);
    js += js_block<kIsa>(b0, b1, ez, ew, sc.ed.get(), fz, fw, delta);
  }
  const double kl = az / sz - delta;
  const double klr = aw / sw + delta;
  of[0] = kl;
  of[1] = klr;
  of[2] = 0.5 * js;
  of[3] = log_sz - bz / sz;
  of[4] = overlap(tz, tw, 5, V);
  of[5] = overlap(tz, tw, 10, V);
  of[6] = has_t ? static_cast<double>(zy) - lse_z : 0.0;
  of[7] = has_t ? static_cast<double>(wy) - lse_w : 0.0;
  oi[0] = tz.idx[0];
  oi[1] = tw.idx[0];
  oi[2] = has_t ? rank_z : 0;
  oi[3] = has_t ? rank_w : 0;
}

template <typename T>
void rows_portable(const T* z, const T* w, int64_t r0, int64_t r1, const RowArgs& a) {
  Scratch sc(a.vocab);
  for (int64_t r = r0; r < r1; ++r) row_kernel<T, Isa::kGeneric>(z + r * a.vocab, w + r * a.vocab, r, a, sc);
}

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
MD_AVX512_ATTR void rows_avx512(const T* z, const T* w, int64_t r0, int64_t r1, const RowArgs& a) {
  Scratch sc(a.vocab);
  for (int64_t r = r0; r < r1; ++r) row_kernel<T, Isa::kAvx512>(z + r * a.vocab, w + r * a.vocab, r, a, sc);
}

template <typename T>
MD_AVX2_ATTR void rows_avx2(const T* z, const T* w, int64_t r0, int64_t r1, const RowArgs& a) {
  Scratch sc(a.vocab);
  for (int64_t r = r0; r < r1; ++r) row_kernel<T, Isa::kAvx2>(z + r * a.vocab, w + r * a.vocab, r, a, sc);
}
#endif

std::string select_path(const std::string& requested) {
  if (requested != "auto") return requested;
  const std::string level = simd_level();
  if (level == "avx512" || level == "avx512_vnni") return "avx512";
  if (level == "avx2") return "avx2";
  return "portable";
}

template <typename T>
void run_rows(const T* z, const T* w, int64_t r0, int64_t r1, const RowArgs& a, const std::string& path) {
#if defined(__x86_64__) || defined(__i386__)
  if (path == "avx512") return rows_avx512<T>(z, w, r0, r1, a);
  if (path == "avx2") return rows_avx2<T>(z, w, r0, r1, a);
#endif
  rows_portable<T>(z, w, r0, r1, a);
}

// Returns (row, kind, which): row = -1 when every row was valid; otherwise the first
// invalid row, kind 1 (NaN/+inf) or 2 (no finite logit), which 0 (base) or 1 (variant).
std::tuple<int64_t, int, int> token_divergence(uintptr_t base, uintptr_t variant, bool is64, int64_t rows,
                                               int64_t vocab, uintptr_t targets, uintptr_t out_f,
                                               uintptr_t out_i, int threads, const std::string& path_req) {
  if (rows <= 0) return {-1, 0, 0};
  const std::string path = select_path(path_req);
  if (path != "avx512" && path != "avx2" && path != "portable")
    throw std::invalid_argument("path must be auto, avx512, avx2 or portable");
  std::vector<int8_t> status(static_cast<size_t>(rows), 0);
  RowArgs a{vocab, reinterpret_cast<const int64_t*>(targets), reinterpret_cast<double*>(out_f),
            reinterpret_cast<int64_t*>(out_i), status.data()};
  parallel_for(rows, threads, 1, [&](int64_t r0, int64_t r1) {
    if (is64)
      run_rows<double>(reinterpret_cast<const double*>(base), reinterpret_cast<const double*>(variant), r0, r1,
                       a, path);
    else
      run_rows<float>(reinterpret_cast<const float*>(base), reinterpret_cast<const float*>(variant), r0, r1, a,
                      path);
  });
  for (int64_t r = 0; r < rows; ++r) {
    const int s = status[static_cast<size_t>(r)];
    if (s) return {r, s == 1 || s == 3 ? 1 : 2, s >= 3 ? 1 : 0};
  }
  return {-1, 0, 0};
}

}  // namespace

void register_token_divergence(py::module_& m) {
  m.def("token_divergence", &token_divergence, py::arg("base"), py::arg("variant"), py::arg("is64"),
        py::arg("rows"), py::arg("vocab"), py::arg("targets"), py::arg("out_f"), py::arg("out_i"),
        py::arg("threads"), py::arg("path") = "auto", py::call_guard<py::gil_scoped_release>(),
        "Fused per-row token divergence of two contiguous (rows, vocab) float32/float64 logit "
        "matrices (targets: int64 (rows,) address or 0). Writes float64 out_f (rows, 8): kld, "
        "kld_reverse, js, entropy_base, top5_overlap, top10_overlap, logp_base, logp_variant and "
        "int64 out_i (rows, 4): top1_base, top1_variant, rank_base, rank_variant. Returns (row, kind, "
        "which): row -1 when all rows are valid, else the first row with NaN/+inf (kind 1) or no "
        "finite logit (kind 2) in base (which 0) or variant (which 1). path: auto, avx512, avx2, "
        "portable.");
}

}  // namespace minidiff
