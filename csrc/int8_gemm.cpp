// int8 Linear kernels for minidiff.nn.Int8Linear (CPU).
//
// W8A8: Y = (q_x W_q^T) * s_x[m] * s_w[n] + b[n], where q_x is the per-token
// (per-row) symmetric int8 quantization of X, done here in the same native call
// (absmax per row, s_x = absmax / 127, q = round-half-even(x / s_x) clamped to
// [-127, 127]), the product is exact int32, and the scales and bias are applied
// in the epilogue of the GEMM (float32 out). One call per Linear, GIL released.
//
// Weight layout (prepared once in Python, minidiff.ops.int8.pack_weight):
//   W (N x K int8) is padded to Np = ceil(N/64)*64 rows and Kp = ceil(K/4)*4
//   columns with zeros and stored as panels of 64 output channels:
//   packed[p][k4][j][t] = W[64 p + j][4 k4 + t]  (p < Np/64, k4 < Kp/4, j < 64, t < 4)
//   so one k4 step of a panel is 256 contiguous bytes = four zmm registers, each
//   holding 16 output channels x 4 consecutive k: exactly the operand that
//   vpdpbusd (AVX-512 VNNI) multiplies against a broadcast 4-byte group of X.
//
// Signedness: vpdpbusd multiplies unsigned bytes by signed bytes. Activations are
// stored as u = q + 128 (0..254), and the kernel subtracts 128 * colsum(W)[n]:
//   sum_k (q_k + 128) w_k - 128 sum_k w_k = sum_k q_k w_k      (exact in int32).
// Padding columns have w = 0 and u = 128 (q = 0), so they add nothing.
// Overflow: |sum (q+128) w| <= K * 254 * 127 < 2^31 for K <= 66000 (checked in Python).
//
// Levels (runtime dispatch, capped by MINIDIFF_SIMD): avx512_vnni (vpdpbusd),
// avx2 (vpmaddwd on bytes widened to int16, exact), scalar. All three compute
// the same integer sums and the same float epilogue, fma(float(acc), s_x*s_w, b),
// so outputs are bitwise identical across levels.
#include <immintrin.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

#define MD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define MD_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define MD_AVX2 __attribute__((target("avx2,fma")))

namespace minidiff {
namespace {

constexpr int64_t kNR = 64;   // panel width (output channels)
constexpr int kMR = 6;        // rows per VNNI micro-kernel (6 x 4 zmm accumulators)
constexpr int64_t kMC = 96;   // rows per task (block of X kept in L2 while a panel streams)

enum class Level { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kVnni = 3 };

Level current_level() {
  const std::string s = simd_level();
  if (s == "avx512_vnni") return Level::kVnni;
  if (s == "avx512") return Level::kAvx512;
  if (s == "avx2") return Level::kAvx2;
  return Level::kScalar;
}

// ---------------------------------------------------------------------------
// Per-row activation quantization: u[k] = clamp(rint(x[k] / s), -127, 127) + 128.
// Rows holding NaN/Inf get s = NaN (their outputs become NaN, as a float Linear's
// would); all-zero rows (or rows whose absmax/127 underflows to 0) get s = 0.
// ---------------------------------------------------------------------------
inline float finish_scale(float amax, float poison) {
  if (poison != poison) return std::numeric_limits<float>::quiet_NaN();
  return amax / 127.0f;
}

void quant_row_scalar(const float* x, int64_t K, int64_t Kp, uint8_t* u, float* scale) {
  float amax = 0.f, poison = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::fabs(x[k]);
    amax = v > amax ? v : amax;
    poison += x[k] * 0.f;  // NaN when any element is NaN or +-Inf
  }
  float s = finish_scale(amax, poison);
  *scale = s;
  if (!(s > 0.f)) {  // zero, underflowed or NaN: q = 0
    std::memset(u, 128, static_cast<size_t>(Kp));
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    float q = std::nearbyint(x[k] / s);
    q = std::min(127.f, std::max(-127.f, q));
    u[k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
  }
  for (int64_t k = K; k < Kp; ++k) u[k] = 128;
}

MD_AVX2 void quant_row_avx2(const float* x, int64_t K, int64_t Kp, uint8_t* u, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  __m256 vmax = zero, vpo = zero;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    vpo = _mm256_add_ps(vpo, _mm256_mul_ps(v, zero));
  }
  alignas(32) float m8[8], p8[8];
  _mm256_store_ps(m8, vmax);
  _mm256_store_ps(p8, vpo);
  float amax = 0.f, poison = 0.f;
  for (int i = 0; i < 8; ++i) {
    amax = m8[i] > amax ? m8[i] : amax;
    poison += p8[i];
  }
  for (; k < K; ++k) {
    float v = std::fabs(x[k]);
    amax = v > amax ? v : amax;
    poison += x[k] * 0.f;
  }
  float s = finish_scale(amax, poison);
  *scale = s;
  if (!(s > 0.f)) {
    std::memset(u, 128, static_cast<size_t>(Kp));
    return;
  }
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127), off = _mm256_set1_epi32(128);
  alignas(32) int32_t q8[8];
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i qi = _mm256_add_epi32(_mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(q))), off);
    _mm256_store_si256(reinterpret_cast<__m256i*>(q8), qi);
    for (int i = 0; i < 8; ++i) u[k + i] = static_cast<uint8_t>(q8[i]);
  }
  for (; k < K; ++k) {
    float q = std::nearbyint(x[k] / s);
    q = std::min(127.f, std::max(-127.f, q));
    u[k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
  }
  for (k = K; k < Kp; ++k) u[k] = 128;
}

MD_AVX512 void quant_row_avx512(const float* x, int64_t K, int64_t Kp, uint8_t* u, float* scale) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 vmax = zero, vpo = zero;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    vpo = _mm512_add_ps(vpo, _mm512_mul_ps(v, zero));
  }
  if (k < K) {
    __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    vpo = _mm512_add_ps(vpo, _mm512_mul_ps(v, zero));
  }
  float s = finish_scale(_mm512_reduce_max_ps(vmax), _mm512_reduce_add_ps(vpo));
  *scale = s;
  if (!(s > 0.f)) {
    std::memset(u, 128, static_cast<size_t>(Kp));
    return;
  }
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
  for (k = 0; k < K; k += 16) {
    int64_t n = std::min<int64_t>(16, K - k);
    __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i qi = _mm512_add_epi32(_mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(q))), off);
    _mm512_mask_cvtepi32_storeu_epi8(u + k, m, qi);
  }
  for (k = K; k < Kp; ++k) u[k] = 128;
}

void quantize_rows(Level lv, const float* x, int64_t M, int64_t K, int64_t Kp, uint8_t* u, float* scale,
                   int threads) {
  int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  parallel_for(M, threads, grain, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = x + m * K;
      uint8_t* ur = u + m * Kp;
      if (lv >= Level::kAvx512) quant_row_avx512(xr, K, Kp, ur, scale + m);
      else if (lv == Level::kAvx2) quant_row_avx2(xr, K, Kp, ur, scale + m);
      else quant_row_scalar(xr, K, Kp, ur, scale + m);
    }
  });
}

// ---------------------------------------------------------------------------
// GEMM micro-kernels. Each computes rows [m0, m0+mr) x one 64-wide panel and
// applies the epilogue. Epilogue inputs are padded to Np (no masked loads).
// ---------------------------------------------------------------------------
struct Epi {
  const int32_t* corr;   // 128 * colsum, padded, at the panel's first channel
  const float* wscale;   // padded, at the panel's first channel
  const float* bias;     // padded (zeros when the layer has no bias)
  const float* ascale;   // at row m0 (nullptr: int32 output)
  float* outf;           // at (m0, n0)
  int32_t* outi;         // at (m0, n0)
  int64_t ldo;           // N
  int64_t nvalid;        // valid channels in this panel (1..64)
};

inline void epi_scalar(const int32_t* acc /* mr x 64 */, int mr, const Epi& e) {
  for (int r = 0; r < mr; ++r)
    for (int64_t j = 0; j < e.nvalid; ++j) {
      int32_t v = acc[r * kNR + j] - e.corr[j];
      if (e.outi) {
        e.outi[r * e.ldo + j] = v;
      } else {
        float s = e.ascale[r] * e.wscale[j];
        e.outf[r * e.ldo + j] = std::fma(static_cast<float>(v), s, e.bias[j]);
      }
    }
}

void ukr_scalar(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k4n, int mr, const Epi& e) {
  int32_t acc[kMR * kNR];
  for (int r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < kNR; ++j) acc[r * kNR + j] = 0;
    const uint8_t* ar = a + r * lda;
    for (int64_t k4 = 0; k4 < k4n; ++k4) {
      const int8_t* bk = b + k4 * 256;
      const uint8_t* ak = ar + 4 * k4;
      for (int64_t j = 0; j < kNR; ++j) {
        const int8_t* bj = bk + 4 * j;
        acc[r * kNR + j] += int32_t(ak[0]) * bj[0] + int32_t(ak[1]) * bj[1] + int32_t(ak[2]) * bj[2] +
                            int32_t(ak[3]) * bj[3];
      }
    }
  }
  epi_scalar(acc, mr, e);
}

// AVX2: widen bytes to int16 and use vpmaddwd (exact; vpmaddubsw would saturate).
// One ymm of weights = 4 channels x 4 k as int16; vpmaddwd against the row's 4
// activations (as int16, repeated) gives 2 partial sums per channel.
MD_AVX2 void ukr_avx2(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k4n, int mr, const Epi& e) {
  alignas(32) int32_t acc[kMR * kNR];
  for (int r0 = 0; r0 < mr; r0 += 2) {
    const int rr = std::min(2, mr - r0);
    for (int64_t j0 = 0; j0 < kNR; j0 += 16) {
      __m256i c[2][4];
      for (int r = 0; r < 2; ++r)
        for (int q = 0; q < 4; ++q) c[r][q] = _mm256_setzero_si256();
      for (int64_t k4 = 0; k4 < k4n; ++k4) {
        const int8_t* bk = b + k4 * 256 + 4 * j0;
        __m256i w[4];
        for (int q = 0; q < 4; ++q)
          w[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 16 * q)));
        for (int r = 0; r < rr; ++r) {
          int32_t a4;
          std::memcpy(&a4, a + (r0 + r) * lda + 4 * k4, 4);
          __m256i av = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(a4)));
          for (int q = 0; q < 4; ++q) c[r][q] = _mm256_add_epi32(c[r][q], _mm256_madd_epi16(av, w[q]));
        }
      }
      for (int r = 0; r < rr; ++r)
        for (int q = 0; q < 4; ++q) {
          alignas(32) int32_t t[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(t), c[r][q]);
          for (int i = 0; i < 4; ++i) acc[(r0 + r) * kNR + j0 + 4 * q + i] = t[2 * i] + t[2 * i + 1];
        }
    }
  }
  epi_scalar(acc, mr, e);
}

template <int MR>
MD_VNNI void ukr_vnni(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k4n, const Epi& e) {
  __m512i c[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < k4n; ++k4) {
    const int8_t* bk = b + k4 * 256;
    const __m512i b0 = _mm512_loadu_si512(bk), b1 = _mm512_loadu_si512(bk + 64);
    const __m512i b2 = _mm512_loadu_si512(bk + 128), b3 = _mm512_loadu_si512(bk + 192);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + 4 * k4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], av, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], av, b1);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], av, b2);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], av, b3);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const int64_t nv = std::min<int64_t>(16, e.nvalid - 16 * j);
    if (nv <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>(nv == 16 ? 0xFFFFu : ((1u << nv) - 1u));
    const __m512i corr = _mm512_loadu_si512(e.corr + 16 * j);
    if (e.outi) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        _mm512_mask_storeu_epi32(e.outi + r * e.ldo + 16 * j, mask, _mm512_sub_epi32(c[r][j], corr));
    } else {
      const __m512 ws = _mm512_loadu_ps(e.wscale + 16 * j), bs = _mm512_loadu_ps(e.bias + 16 * j);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 s = _mm512_mul_ps(_mm512_set1_ps(e.ascale[r]), ws);
        const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(c[r][j], corr));
        _mm512_mask_storeu_ps(e.outf + r * e.ldo + 16 * j, mask, _mm512_fmadd_ps(f, s, bs));
      }
    }
  }
}

MD_VNNI void ukr_vnni_dispatch(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k4n, int mr,
                               const Epi& e) {
  switch (mr) {
    case 6: ukr_vnni<6>(a, lda, b, k4n, e); break;
    case 5: ukr_vnni<5>(a, lda, b, k4n, e); break;
    case 4: ukr_vnni<4>(a, lda, b, k4n, e); break;
    case 3: ukr_vnni<3>(a, lda, b, k4n, e); break;
    case 2: ukr_vnni<2>(a, lda, b, k4n, e); break;
    default: ukr_vnni<1>(a, lda, b, k4n, e); break;
  }
}

// u: M x Kp activation bytes (q + 128); wp: packed weights; colsum: N int32.
// Exactly one of (ascale, outf) / outi is used.
void gemm_u8s8(Level lv, const uint8_t* u, int64_t M, int64_t Kp, const int8_t* wp, int64_t N,
               const int32_t* colsum, const float* wscale, const float* bias, const float* ascale,
               float* outf, int32_t* outi, int threads) {
  const int64_t Np = (N + kNR - 1) / kNR * kNR, panels = Np / kNR, k4n = Kp / 4;
  std::vector<int32_t> corr(static_cast<size_t>(Np), 0);
  std::vector<float> ws(static_cast<size_t>(Np), 0.f), bs(static_cast<size_t>(Np), 0.f);
  for (int64_t n = 0; n < N; ++n) {
    corr[n] = 128 * colsum[n];
    if (wscale) ws[n] = wscale[n];
    if (bias) bs[n] = bias[n];
  }
  const int64_t mblocks = (M + kMC - 1) / kMC;
  const int64_t tasks = mblocks * panels;
  // at least ~256k multiply-adds per chunk so tiny layers do not pay for threads
  const int64_t per_task = std::min<int64_t>(M, kMC) * kNR * std::max<int64_t>(Kp, 1);
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / per_task);
  parallel_for(tasks, threads, grain, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t mb = t / panels, p = t % panels;
      const int64_t m0 = mb * kMC, m1 = std::min(M, m0 + kMC), n0 = p * kNR;
      const int8_t* bp = wp + p * k4n * 256;
      for (int64_t m = m0; m < m1; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
        Epi e{corr.data() + n0, ws.data() + n0, bs.data() + n0,
              ascale ? ascale + m : nullptr,
              outf ? outf + m * N + n0 : nullptr,
              outi ? outi + m * N + n0 : nullptr,
              N, std::min<int64_t>(kNR, N - n0)};
        const uint8_t* a = u + m * Kp;
        if (lv == Level::kVnni) ukr_vnni_dispatch(a, Kp, bp, k4n, mr, e);
        else if (lv >= Level::kAvx2) ukr_avx2(a, Kp, bp, k4n, mr, e);
        else ukr_scalar(a, Kp, bp, k4n, mr, e);
      }
    }
  });
}

// A reusable per-calling-thread scratch buffer (workers only see the pointer).
template <typename T>
T* scratch(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}
thread_local std::vector<uint8_t> tl_u8;
thread_local std::vector<float> tl_f32;

// ---------------------------------------------------------------------------
// Weight-only int8 (W8A32): Y = X (W_q * s_w)^T + b. This kernel serves small
// M (decode-like, memory bound: it reads 1 byte per weight instead of 4); the
// Python layer uses dequantize + sgemm for large M, where the GEMM dominates.
// Rows of W are read in their natural N x K int8 layout.
// ---------------------------------------------------------------------------
constexpr int kWoMR = 4;

void wo_rows_scalar(const float* x, int64_t mr, int64_t K, const int8_t* w, float s, float b, float* y,
                    int64_t ldy) {
  for (int64_t r = 0; r < mr; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * K + k], static_cast<float>(w[k]), acc);
    y[r * ldy] = std::fma(acc, s, b);
  }
}

MD_AVX2 void wo_rows_avx2(const float* x, int64_t mr, int64_t K, const int8_t* w, float s, float b, float* y,
                          int64_t ldy) {
  __m256 acc[kWoMR];
  for (int r = 0; r < kWoMR; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    int64_t w8;
    std::memcpy(&w8, w + k, 8);
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(w8)));
    for (int r = 0; r < kWoMR; ++r)
      if (r < mr) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), wv, acc[r]);
  }
  for (int r = 0; r < mr; ++r) {
    alignas(32) float t[8];
    _mm256_store_ps(t, acc[r]);
    float a = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (int64_t kk = k; kk < K; ++kk) a = std::fma(x[r * K + kk], static_cast<float>(w[kk]), a);
    y[r * ldy] = std::fma(a, s, b);
  }
}

template <int MR>
MD_AVX512 void wo_rows_avx512_t(const float* x, int64_t K, const int8_t* w, float s, float b, float* y,
                                int64_t ldy) {
  __m512 acc[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 wv =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k), wv, acc[r]);
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + k)));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + r * K + k), wv, acc[r]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) y[r * ldy] = std::fma(_mm512_reduce_add_ps(acc[r]), s, b);
}

MD_AVX512 void wo_rows_avx512(const float* x, int64_t mr, int64_t K, const int8_t* w, float s, float b,
                              float* y, int64_t ldy) {
  switch (mr) {
    case 4: wo_rows_avx512_t<4>(x, K, w, s, b, y, ldy); break;
    case 3: wo_rows_avx512_t<3>(x, K, w, s, b, y, ldy); break;
    case 2: wo_rows_avx512_t<2>(x, K, w, s, b, y, ldy); break;
    default: wo_rows_avx512_t<1>(x, K, w, s, b, y, ldy); break;
  }
}

void weight_only_small_m(Level lv, const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                         const float* wscale, const float* bias, float* y, int threads) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K * M, 1));
  parallel_for(N, threads, grain, [&](int64_t nb, int64_t ne) {
    for (int64_t m0 = 0; m0 < M; m0 += kWoMR) {
      const int64_t mr = std::min<int64_t>(kWoMR, M - m0);
      for (int64_t n = nb; n < ne; ++n) {
        const float b = bias ? bias[n] : 0.f;
        const float* xr = x + m0 * K;
        float* yr = y + m0 * N + n;
        if (lv >= Level::kAvx512) wo_rows_avx512(xr, mr, K, w + n * K, wscale[n], b, yr, N);
        else if (lv == Level::kAvx2) wo_rows_avx2(xr, mr, K, w + n * K, wscale[n], b, yr, N);
        else wo_rows_scalar(xr, mr, K, w + n * K, wscale[n], b, yr, N);
      }
    }
  });
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Defensive: sizes that would turn the loops' pointer arithmetic negative, or null
// operands. Shapes, dtypes and devices are validated by minidiff.ops.int8.
void check_args(const char* fn, int64_t M, int64_t K, int64_t N, std::initializer_list<uintptr_t> ptrs) {
  if (M < 0 || K < 0 || N < 0) throw std::invalid_argument(std::string(fn) + ": negative size");
  for (uintptr_t p : ptrs)
    if (!p && M > 0) throw std::invalid_argument(std::string(fn) + ": null operand");
}

}  // namespace

void register_int8(py::module_& m) {
  auto gil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "int8_quantize_rows",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t q, uintptr_t scale, int threads) {
        // q: M x K int8 (signed), scale: M float32
        check_args("int8_quantize_rows", M, K, 0, {x, q, scale});
        Level lv = current_level();
        const int64_t Kp = (K + 3) / 4 * 4;
        uint8_t* u = scratch(tl_u8, static_cast<size_t>(M * Kp));
        quantize_rows(lv, ptr<const float>(x), M, K, Kp, u, ptr<float>(scale), threads);
        int8_t* qo = ptr<int8_t>(q);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t k = 0; k < K; ++k) qo[r * K + k] = static_cast<int8_t>(int(u[r * Kp + k]) - 128);
      },
      gil, "Per-row symmetric int8 quantization of a float32 (M x K) matrix (raw pointers).");
  m.def(
      "int8_gemm_s32",
      [](uintptr_t a, int64_t M, int64_t K, uintptr_t wp, int64_t N, uintptr_t colsum, uintptr_t out,
         int threads) {
        // a: M x K int8; out: M x N int32 = a @ W^T exactly.
        check_args("int8_gemm_s32", M, K, N, {a, wp, colsum, out});
        Level lv = current_level();
        const int64_t Kp = (K + 3) / 4 * 4;
        uint8_t* u = scratch(tl_u8, static_cast<size_t>(M * Kp));
        const int8_t* as = ptr<const int8_t>(a);
        for (int64_t r = 0; r < M; ++r) {
          for (int64_t k = 0; k < K; ++k) u[r * Kp + k] = static_cast<uint8_t>(int(as[r * K + k]) + 128);
          for (int64_t k = K; k < Kp; ++k) u[r * Kp + k] = 128;
        }
        gemm_u8s8(lv, u, M, Kp, ptr<const int8_t>(wp), N, ptr<const int32_t>(colsum), nullptr, nullptr,
                  nullptr, nullptr, ptr<int32_t>(out), threads);
      },
      gil, "Exact int8 x int8 -> int32 GEMM against packed weights (raw pointers).");
  m.def(
      "int8_linear_w8a8",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t wp, int64_t N, uintptr_t colsum, uintptr_t wscale,
         uintptr_t bias, uintptr_t out, int threads) {
        check_args("int8_linear_w8a8", M, K, N, {x, wp, colsum, wscale, out});
        Level lv = current_level();
        const int64_t Kp = (K + 3) / 4 * 4;
        uint8_t* u = scratch(tl_u8, static_cast<size_t>(M * Kp));
        float* as = scratch(tl_f32, static_cast<size_t>(M));
        quantize_rows(lv, ptr<const float>(x), M, K, Kp, u, as, threads);
        gemm_u8s8(lv, u, M, Kp, ptr<const int8_t>(wp), N, ptr<const int32_t>(colsum), ptr<const float>(wscale),
                  bias ? ptr<const float>(bias) : nullptr, as, ptr<float>(out), nullptr, threads);
      },
      gil, "W8A8 Linear: per-token quantization + int8 GEMM + scale/bias epilogue, float32 out.");
  m.def(
      "int8_linear_weight_only",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t w, int64_t N, uintptr_t wscale, uintptr_t bias,
         uintptr_t out, int threads) {
        check_args("int8_linear_weight_only", M, K, N, {x, w, wscale, out});
        weight_only_small_m(current_level(), ptr<const float>(x), M, K, ptr<const int8_t>(w), N,
                            ptr<const float>(wscale), bias ? ptr<const float>(bias) : nullptr,
                            ptr<float>(out), threads);
      },
      gil, "Weight-only int8 Linear (int8 N x K weights, float32 activations), float32 out.");
  m.attr("INT8_PANEL") = kNR;
}

}  // namespace minidiff
