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
// Per row, two passes:
//  1. blocks of kBlock entries (in L1): block maxima, online logsumexp (the running
//     sum is rescaled when the maximum grows), rank counts, a NaN/+inf flag, and
//     top-10 insertion for the rare blocks whose maximum beats the current 10th;
//  2. over the row again (now in L2): p, q, the KLDs, JS and entropy.
// That is one read of the two logit rows from memory; exps and sums in float64.
// JS per entry uses only p, q and |d|: with m = max(p, q) and
// L = log1p(-|p - q| / (2 m)) = log((1 + min/max) / 2), g(-|d|) = L and g(|d|) = |d| + L.
//
// exp and log1p are branch-free float64 polynomials (below) so the passes
// vectorize; kernels are compiled for AVX-512 and AVX2+FMA with target attributes
// and picked at run time (csrc/cpu_features.h), plus a portable build.
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
#include <string>
#include <tuple>
#include <vector>

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
// a maximum), NaN -> NaN, x < -708 (incl. -inf) -> 0 (true value < 3e-308).
// n = round(x / ln 2) by the 1.5 * 2^52 shift, r = x - n ln 2 (Cody-Waite,
// |r| <= 0.347), e^r by its Taylor series to r^13 (truncation < 2e-17 relative),
// times 2^n built in the exponent bits. Error about 1 ulp.
MD_INLINE double exp_neg(double x) {
  const double kShift = 6755399441055744.0;  // 1.5 * 2^52
  const double kLog2e = 1.4426950408889634;
  const double kLn2Hi = 6.93147180369123816490e-01;
  const double kLn2Lo = 1.90821492927058770002e-10;
  double t = x * kLog2e + kShift;
  const uint64_t tb = double_to_bits(t);
  const double n = t - kShift;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double pl = 1.0 / 6227020800.0;  // 1/13!
  pl = pl * r + 1.0 / 479001600.0;
  pl = pl * r + 1.0 / 39916800.0;
  pl = pl * r + 1.0 / 3628800.0;
  pl = pl * r + 1.0 / 362880.0;
  pl = pl * r + 1.0 / 40320.0;
  pl = pl * r + 1.0 / 5040.0;
  pl = pl * r + 1.0 / 720.0;
  pl = pl * r + 1.0 / 120.0;
  pl = pl * r + 1.0 / 24.0;
  pl = pl * r + 1.0 / 6.0;
  pl = pl * r + 0.5;
  pl = pl * r + 1.0;
  pl = pl * r + 1.0;
  const double scale = bits_to_double((tb + 1023) << 52);  // low bits of tb hold n
  const double res = pl * scale;
  return x < -708.0 ? 0.0 : res;
}

// 2 atanh(s) = log((1 + s) / (1 - s)) for s in [-1/3, 0] by its series
// 2 (s + s^3/3 + s^5/5 + ...), 18 terms (truncation < 1e-18).
MD_INLINE double two_atanh_small(double s) {
  const double s2 = s * s;
  double pl = 1.0 / 35.0;
  pl = pl * s2 + 1.0 / 33.0;
  pl = pl * s2 + 1.0 / 31.0;
  pl = pl * s2 + 1.0 / 29.0;
  pl = pl * s2 + 1.0 / 27.0;
  pl = pl * s2 + 1.0 / 25.0;
  pl = pl * s2 + 1.0 / 23.0;
  pl = pl * s2 + 1.0 / 21.0;
  pl = pl * s2 + 1.0 / 19.0;
  pl = pl * s2 + 1.0 / 17.0;
  pl = pl * s2 + 1.0 / 15.0;
  pl = pl * s2 + 1.0 / 13.0;
  pl = pl * s2 + 1.0 / 11.0;
  pl = pl * s2 + 1.0 / 9.0;
  pl = pl * s2 + 1.0 / 7.0;
  pl = pl * s2 + 1.0 / 5.0;
  pl = pl * s2 + 1.0 / 3.0;
  pl = pl * s2 + 1.0;
  return 2.0 * s * pl;
}

// Top-10 (value descending, index ascending) of one row, filled in index order.
struct TopK {
  double val[kTop];
  int64_t idx[kTop];
  int n = 0;
  MD_INLINE double threshold() const { return n < kTop ? -kInf : val[kTop - 1]; }
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

struct RowArgs {
  int64_t vocab;
  const int64_t* targets;  // nullptr: none
  double* out_f;           // rows x 8
  int64_t* out_i;          // rows x 4
  int8_t* status;          // rows: 0 ok, 1 NaN/+inf in base, 2 no finite base logit, 3/4 same for variant
};

template <typename T>
MD_INLINE void row_kernel(const T* z, const T* w, int64_t r, const RowArgs& a) {
  const int64_t V = a.vocab;
  const bool has_t = a.targets != nullptr;
  const int64_t y = has_t ? a.targets[r] : 0;
  const double zy = has_t ? static_cast<double>(z[y]) : 0.0;
  const double wy = has_t ? static_cast<double>(w[y]) : 0.0;
  double mz = -kInf, mw = -kInf, sz = 0.0, sw = 0.0;
  int64_t rank_z = 0, rank_w = 0;
  int bad_z = 0, bad_w = 0;
  TopK tz, tw;

  // ---- pass 1: block maxima, online logsumexp, ranks, top-10, value check
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    double bz = -kInf, bw = -kInf;
    int fz = 0, fw = 0;
    int64_t cz = 0, cw = 0;
#pragma omp simd reduction(max : bz, bw) reduction(| : fz, fw) reduction(+ : cz, cw)
    for (int64_t v = b0; v < b1; ++v) {
      const double x = static_cast<double>(z[v]);
      const double u = static_cast<double>(w[v]);
      bz = std::max(bz, x);
      bw = std::max(bw, u);
      fz |= !(x < kInf);  // NaN or +inf
      fw |= !(u < kInf);
      cz += x > zy;
      cw += u > wy;
    }
    bad_z |= fz;
    bad_w |= fw;
    rank_z += cz;
    rank_w += cw;
    if (fz | fw) continue;  // the row is rejected; skip the arithmetic
    if (tz.wants_block(bz))
      for (int64_t v = b0; v < b1; ++v) tz.push(static_cast<double>(z[v]), v);
    if (tw.wants_block(bw))
      for (int64_t v = b0; v < b1; ++v) tw.push(static_cast<double>(w[v]), v);
    if (bz > mz) {
      if (sz > 0.0) sz *= exp_neg(mz - bz);
      mz = bz;
    }
    if (bw > mw) {
      if (sw > 0.0) sw *= exp_neg(mw - bw);
      mw = bw;
    }
    if (mz == -kInf && mw == -kInf) continue;
    double az = 0.0, aw = 0.0;
    const double cmz = mz, cmw = mw;
#pragma omp simd reduction(+ : az, aw)
    for (int64_t v = b0; v < b1; ++v) {
      az += exp_neg(static_cast<double>(z[v]) - cmz);
      aw += exp_neg(static_cast<double>(w[v]) - cmw);
    }
    // a block of -inf under a -inf running maximum gives NaN terms: it adds nothing
    sz += cmz == -kInf ? 0.0 : az;
    sw += cmw == -kInf ? 0.0 : aw;
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
  const double lse_z = mz + std::log(sz);
  const double lse_w = mw + std::log(sw);

  // ---- pass 2: KLD both ways, JS, entropy
  double kl = 0.0, klr = 0.0, js = 0.0, ent = 0.0;
#pragma omp simd reduction(+ : kl, klr, js, ent)
  for (int64_t v = 0; v < V; ++v) {
    const double lp = static_cast<double>(z[v]) - lse_z;
    const double lq = static_cast<double>(w[v]) - lse_w;
    const double p = exp_neg(lp);
    const double q = exp_neg(lq);
    const double d = lp - lq;
    const double m = std::max(p, q);
    const double ad = std::fabs(d);
    // L = log1p(u), u = -|p - q| / (2m) in [-1/2, 0], as 2 atanh(u / (2 + u)) with
    // u / (2 + u) = -(m - n) / (3m + n), n = min(p, q): one division
    const double n = std::min(p, q);
    const double L = two_atanh_small(m > 0.0 ? (n - m) / (3.0 * m + n) : 0.0);
    const double gp = p >= q ? L : ad + L;  // g(-d)
    const double gq = p >= q ? ad + L : L;  // g(d)
    kl += p > 0.0 ? p * d : 0.0;
    klr += q > 0.0 ? -q * d : 0.0;
    ent += p > 0.0 ? -p * lp : 0.0;
    js += (p > 0.0 ? -p * gp : 0.0) + (q > 0.0 ? -q * gq : 0.0);
  }
  of[0] = kl;
  of[1] = klr;
  of[2] = 0.5 * js;
  of[3] = ent;
  of[4] = overlap(tz, tw, 5, V);
  of[5] = overlap(tz, tw, 10, V);
  of[6] = has_t ? zy - lse_z : 0.0;
  of[7] = has_t ? wy - lse_w : 0.0;
  oi[0] = tz.idx[0];
  oi[1] = tw.idx[0];
  oi[2] = has_t ? rank_z : 0;
  oi[3] = has_t ? rank_w : 0;
}

template <typename T>
void rows_portable(const T* z, const T* w, int64_t r0, int64_t r1, const RowArgs& a) {
  for (int64_t r = r0; r < r1; ++r) row_kernel<T>(z + r * a.vocab, w + r * a.vocab, r, a);
}

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void rows_avx512(
    const T* z, const T* w, int64_t r0, int64_t r1, const RowArgs& a) {
  for (int64_t r = r0; r < r1; ++r) row_kernel<T>(z + r * a.vocab, w + r * a.vocab, r, a);
}

template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* z, const T* w, int64_t r0, int64_t r1,
                                                   const RowArgs& a) {
  for (int64_t r = r0; r < r1; ++r) row_kernel<T>(z + r * a.vocab, w + r * a.vocab, r, a);
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
