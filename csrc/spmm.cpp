// Sparse-weight x dense-activation product for minidiff.nn.SparseLinear (CPU):
//   Y (M x N) = X (M x K) W^T + b,   W (N x K) unstructured sparse.
//
// Storage: CSR over output channels (row_ptr int32 N+1, col int32 nnz, val
// float32 nnz). Why this format:
// * Magnitude pruning leaves isolated nonzeros. Blocked formats (1x4, 1x16,
//   BSR) pay for every zero inside a touched block; at 90% unstructured
//   sparsity a 1x16 block along N is all-zero with probability 0.9^16 = 19%,
//   so such blocks would be ~12% full and do 8x the useful work. CSR stores only
//   the nonzeros (8 bytes each).
// * The vector dimension is M (tokens), not K: for one output channel n,
//   Y^T[n, :] = sum_{k in row n} W[n,k] * X^T[k, :]. With X^T packed per block of
//   MB tokens (K x MB, MB = 16/32/64 floats, one L2-resident panel), every
//   nonzero costs one broadcast and MB/16 fused multiply-adds on contiguous,
//   aligned data: no gathers, and the index/weight load is amortized over MB
//   tokens. Results for 16 channels x 16 tokens are transposed in registers and
//   stored as contiguous rows of Y.
// * Each output is the fma chain over its row's nonzeros in CSR order, started
//   at 0, then + bias; every SIMD level (and the scalar path) follows that order,
//   so results are bitwise identical across levels.
// Runtime dispatch (avx512 / avx2 / scalar, capped by MINIDIFF_SIMD), threads
// over (token block, channel chunk) tasks, GIL released.
#include <immintrin.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

#define MD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define MD_AVX2 __attribute__((target("avx2,fma")))

namespace minidiff {
namespace {

enum class Level { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Level current_level() {
  const std::string s = simd_level();
  if (s == "avx512_vnni" || s == "avx512") return Level::kAvx512;
  if (s == "avx2") return Level::kAvx2;
  return Level::kScalar;
}

struct Csr {
  const int32_t* rp;
  const int32_t* ci;
  const float* val;
};

constexpr int64_t kNC = 64;  // output channels per task


// ----------------------------------------------------------------- AVX-512 ---
MD_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // u[4i + j], 128-bit lane L, holds rows 4i..4i+3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[0 + j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// X rows [0, mvalid) (row stride K) -> xt (K x MB), zero-padded rows.
MD_AVX512 void pack_avx512(const float* x, int64_t mvalid, int64_t K, int64_t MB, float* xt) {
  int64_t k0 = 0;
  for (; k0 + 16 <= K; k0 += 16)
    for (int64_t v = 0; v < MB / 16; ++v) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = 16 * v + i;
        r[i] = m < mvalid ? _mm512_loadu_ps(x + m * K + k0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(xt + (k0 + c) * MB + 16 * v, r[c]);
    }
  for (int64_t k = k0; k < K; ++k)
    for (int64_t m = 0; m < MB; ++m) xt[k * MB + m] = m < mvalid ? x[m * K + k] : 0.f;
}

// RI output channels are processed together (their nonzero loops interleaved up to
// the shortest row, then each row's tail) so RI * V independent fma chains hide
// the fma latency and the L2 latency of the X^T loads. Each row's own order of
// accumulation is unchanged.
template <int V, int RI>
MD_AVX512 void spmm_block_avx512(const float* xt, int64_t mvalid, const Csr& w, int64_t n0, int64_t n1,
                                 const float* bias, float* out, int64_t ldo) {
  constexpr int64_t MB = 16 * V;
  alignas(64) float tile[V][16][16];
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t nv = std::min<int64_t>(16, n1 - nt);
    for (int64_t nl = 0; nl < 16; nl += RI) {
      __m512 acc[RI][V];
      const float* vp[RI];
      const int32_t* cp[RI];
      int32_t len[RI];
      int32_t common = INT32_MAX;
#pragma GCC unroll 8
      for (int i = 0; i < RI; ++i) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
        const int64_t o = nl + i;
        const int64_t n = nt + o;
        const int32_t b = o < nv ? w.rp[n] : 0, e = o < nv ? w.rp[n + 1] : 0;
        vp[i] = w.val + b;
        cp[i] = w.ci + b;
        len[i] = e - b;
        common = std::min(common, len[i]);
      }
      for (int32_t t = 0; t < common; ++t) {
#pragma GCC unroll 8
        for (int i = 0; i < RI; ++i) {
          const __m512 wv = _mm512_set1_ps(vp[i][t]);
          const float* xr = xt + static_cast<int64_t>(cp[i][t]) * MB;
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16 * v), acc[i][v]);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < RI; ++i) {
        for (int32_t t = common; t < len[i]; ++t) {
          const __m512 wv = _mm512_set1_ps(vp[i][t]);
          const float* xr = xt + static_cast<int64_t>(cp[i][t]) * MB;
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16 * v), acc[i][v]);
        }
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) _mm512_store_ps(tile[v][nl + i], acc[i][v]);
      }
    }
    const __mmask16 mask = static_cast<__mmask16>(nv == 16 ? 0xFFFFu : ((1u << nv) - 1u));
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + nt) : _mm512_setzero_ps();
    for (int v = 0; v < V; ++v) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(tile[v][i]);
      transpose16(r);
      for (int i = 0; i < 16; ++i) {
        const int64_t m = 16 * v + i;
        if (m >= mvalid) break;
        _mm512_mask_storeu_ps(out + m * ldo + nt, mask, _mm512_add_ps(r[i], bv));
      }
    }
  }
}

// -------------------------------------------------------------------- AVX2 ---
MD_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], tt[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    tt[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    tt[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    tt[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    tt[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(tt[i], tt[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(tt[i], tt[4 + i], 0x31);
  }
}

MD_AVX2 void pack_avx2(const float* x, int64_t mvalid, int64_t K, int64_t MB, float* xt) {
  int64_t k0 = 0;
  for (; k0 + 8 <= K; k0 += 8)
    for (int64_t v = 0; v < MB / 8; ++v) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t m = 8 * v + i;
        r[i] = m < mvalid ? _mm256_loadu_ps(x + m * K + k0) : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(xt + (k0 + c) * MB + 8 * v, r[c]);
    }
  for (int64_t k = k0; k < K; ++k)
    for (int64_t m = 0; m < MB; ++m) xt[k * MB + m] = m < mvalid ? x[m * K + k] : 0.f;
}

template <int V, int RI>
MD_AVX2 void spmm_block_avx2(const float* xt, int64_t mvalid, const Csr& w, int64_t n0, int64_t n1,
                             const float* bias, float* out, int64_t ldo) {
  constexpr int64_t MB = 8 * V;
  alignas(32) float tile[V][8][8];
  for (int64_t nt = n0; nt < n1; nt += 8) {
    const int64_t nv = std::min<int64_t>(8, n1 - nt);
    for (int64_t nl = 0; nl < 8; nl += RI) {
      __m256 acc[RI][V];
      const float* vp[RI];
      const int32_t* cp[RI];
      int32_t len[RI];
      int32_t common = INT32_MAX;
      for (int i = 0; i < RI; ++i) {
        for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
        const int64_t o = nl + i;
        const int64_t n = nt + o;
        const int32_t b = o < nv ? w.rp[n] : 0, e = o < nv ? w.rp[n + 1] : 0;
        vp[i] = w.val + b;
        cp[i] = w.ci + b;
        len[i] = e - b;
        common = std::min(common, len[i]);
      }
      for (int32_t t = 0; t < common; ++t)
        for (int i = 0; i < RI; ++i) {
          const __m256 wv = _mm256_set1_ps(vp[i][t]);
          const float* xr = xt + static_cast<int64_t>(cp[i][t]) * MB;
          for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[i][v]);
        }
      for (int i = 0; i < RI; ++i) {
        for (int32_t t = common; t < len[i]; ++t) {
          const __m256 wv = _mm256_set1_ps(vp[i][t]);
          const float* xr = xt + static_cast<int64_t>(cp[i][t]) * MB;
          for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[i][v]);
        }
        for (int v = 0; v < V; ++v) _mm256_store_ps(tile[v][nl + i], acc[i][v]);
      }
    }
    for (int v = 0; v < V; ++v) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(tile[v][i]);
      transpose8(r);
      for (int i = 0; i < 8; ++i) {
        const int64_t m = 8 * v + i;
        if (m >= mvalid) break;
        alignas(32) float row[8];
        _mm256_store_ps(row, r[i]);
        for (int64_t j = 0; j < nv; ++j) out[m * ldo + nt + j] = row[j] + (bias ? bias[nt + j] : 0.f);
      }
    }
  }
}

// ------------------------------------------------------------------ scalar ---
void pack_scalar(const float* x, int64_t mvalid, int64_t K, int64_t MB, float* xt) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < MB; ++m) xt[k * MB + m] = m < mvalid ? x[m * K + k] : 0.f;
}

void spmm_block_scalar(const float* xt, int64_t MB, int64_t mvalid, const Csr& w, int64_t n0, int64_t n1,
                       const float* bias, float* out, int64_t ldo) {
  std::vector<float> acc(static_cast<size_t>(MB));
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int32_t p = w.rp[n], pe = w.rp[n + 1]; p < pe; ++p) {
      const float wv = w.val[p];
      const float* xr = xt + static_cast<int64_t>(w.ci[p]) * MB;
      for (int64_t m = 0; m < mvalid; ++m) acc[m] = std::fma(wv, xr[m], acc[m]);
    }
    const float b = bias ? bias[n] : 0.f;
    for (int64_t m = 0; m < mvalid; ++m) out[m * ldo + n] = acc[m] + b;
  }
}

// ------------------------------------------------------- few-token path ---
// For M <= kFewRows the token-vectorized kernel would use 1-4 of 16 lanes, so each
// row of Y is computed as dot products that vectorize over a CSR row instead:
// lane j (of 16) accumulates nonzeros start + 16 i + j as an fma chain, then the
// 16 partial sums are added in a fixed tree (j + 8, + 4, + 2, + 1), then + bias.
// The AVX-512 (gather), AVX2 (two 8-lane gathers) and scalar versions follow the
// same order, so they agree bitwise here too.
constexpr int64_t kFewRows = 4;

inline float tree16(const float* a) {
  float r8[8], r4[4], r2[2];
  for (int j = 0; j < 8; ++j) r8[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; ++j) r4[j] = r8[j] + r8[j + 4];
  for (int j = 0; j < 2; ++j) r2[j] = r4[j] + r4[j + 2];
  return r2[0] + r2[1];
}

void dot_rows_scalar(const float* x, const Csr& w, int64_t n0, int64_t n1, const float* bias, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    float acc[16] = {0.f};
    const int32_t b = w.rp[n], e = w.rp[n + 1];
    for (int32_t p = b; p < e; ++p) {
      const int j = (p - b) & 15;
      acc[j] = std::fma(w.val[p], x[w.ci[p]], acc[j]);
    }
    y[n] = tree16(acc) + (bias ? bias[n] : 0.f);
  }
}

MD_AVX2 void dot_rows_avx2(const float* x, const Csr& w, int64_t n0, int64_t n1, const float* bias, float* y) {
  alignas(32) float acc[16];
  for (int64_t n = n0; n < n1; ++n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const int32_t b = w.rp[n], e = w.rp[n + 1];
    int32_t p = b;
    for (; p + 16 <= e; p += 16) {
      const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.ci + p));
      const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.ci + p + 8));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + p), _mm256_i32gather_ps(x, i0, 4), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + p + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    _mm256_store_ps(acc, a0);
    _mm256_store_ps(acc + 8, a1);
    for (int j = 0; p < e; ++p, ++j) acc[j] = std::fma(w.val[p], x[w.ci[p]], acc[j]);
    y[n] = tree16(acc) + (bias ? bias[n] : 0.f);
  }
}

MD_AVX512 void dot_rows_avx512(const float* x, const Csr& w, int64_t n0, int64_t n1, const float* bias,
                               float* y) {
  alignas(64) float acc[16];
  for (int64_t n = n0; n < n1; ++n) {
    __m512 a = _mm512_setzero_ps();
    const int32_t b = w.rp[n], e = w.rp[n + 1];
    for (int32_t p = b; p < e; p += 16) {
      const int32_t r = std::min<int32_t>(16, e - p);
      const __mmask16 m = static_cast<__mmask16>(r == 16 ? 0xFFFFu : ((1u << r) - 1u));
      const __m512i idx = _mm512_maskz_loadu_epi32(m, w.ci + p);
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x, 4);
      a = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, w.val + p), xv, a, m);
    }
    _mm512_store_ps(acc, a);
    y[n] = tree16(acc) + (bias ? bias[n] : 0.f);
  }
}

// ------------------------------------------------------------------ driver ---
struct PackState {
  std::vector<float> buf;
  uint64_t call = 0;
  int64_t mb = -1;
};
thread_local PackState tl_pack;
std::atomic<uint64_t> g_call{0};

void spmm(Level lv, const float* x, int64_t M, int64_t K, const Csr& w, int64_t N, const float* bias,
          float* out, int threads) {
  if (M <= 0 || N <= 0) return;
  if (M <= kFewRows) {
    const int64_t grain = std::max<int64_t>(64, N * 4096 / std::max<int64_t>(w.rp[N] * M, 1));
    parallel_for(N, threads, grain, [&](int64_t nb, int64_t ne) {
      for (int64_t m = 0; m < M; ++m) {
        if (lv == Level::kAvx512) dot_rows_avx512(x + m * K, w, nb, ne, bias, out + m * N);
        else if (lv == Level::kAvx2) dot_rows_avx2(x + m * K, w, nb, ne, bias, out + m * N);
        else dot_rows_scalar(x + m * K, w, nb, ne, bias, out + m * N);
      }
    });
    return;
  }
  const int64_t lanes = lv == Level::kAvx512 ? 16 : 8;
  // Token block MB = lanes * V: V = 2 (32 tokens with AVX-512, 4 channels
  // interleaved) measured best on Zen4 for M > 16; V = 4 halves the independent fma
  // chains per nonzero and doubles the X^T panel; V = 1 (8 channels interleaved)
  // pays the index/broadcast loads per 16 tokens and was slower for K = 384 too.
  const int64_t V = M > lanes ? 2 : 1;
  const int64_t MB = lanes * V;
  const int64_t mblocks = (M + MB - 1) / MB, nchunks = (N + kNC - 1) / kNC;
  const uint64_t call = ++g_call;
  const int64_t nnz = w.rp[N];
  const int64_t work_per_task = std::max<int64_t>(1, nnz / N * kNC * MB + K * MB / 8);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / work_per_task);
  parallel_for(mblocks * nchunks, threads, grain, [&](int64_t tb, int64_t te) {
    PackState& st = tl_pack;
    if (st.buf.size() < static_cast<size_t>(K * MB)) st.buf.resize(static_cast<size_t>(K * MB));
    for (int64_t t = tb; t < te; ++t) {
      const int64_t mb = t / nchunks, c = t % nchunks;
      const int64_t m0 = mb * MB, mvalid = std::min(MB, M - m0);
      if (st.call != call || st.mb != mb) {
        const float* xs = x + m0 * K;
        if (lv == Level::kAvx512) pack_avx512(xs, mvalid, K, MB, st.buf.data());
        else if (lv == Level::kAvx2) pack_avx2(xs, mvalid, K, MB, st.buf.data());
        else pack_scalar(xs, mvalid, K, MB, st.buf.data());
        st.call = call;
        st.mb = mb;
      }
      const int64_t n0 = c * kNC, n1 = std::min(N, n0 + kNC);
      float* o = out + m0 * N;
      const float* xt = st.buf.data();
      if (lv == Level::kAvx512) {
        if (V == 2) spmm_block_avx512<2, 4>(xt, mvalid, w, n0, n1, bias, o, N);
        else spmm_block_avx512<1, 8>(xt, mvalid, w, n0, n1, bias, o, N);
      } else if (lv == Level::kAvx2) {
        if (V == 2) spmm_block_avx2<2, 4>(xt, mvalid, w, n0, n1, bias, o, N);
        else spmm_block_avx2<1, 8>(xt, mvalid, w, n0, n1, bias, o, N);
      } else {
        spmm_block_scalar(xt, MB, mvalid, w, n0, n1, bias, o, N);
      }
    }
  });
}

// Structure check before the kernel reads through the indices: row_ptr starts at 0,
// never decreases and ends at nnz; every column index lies in [0, K). O(N + nnz)
// integer reads, small next to the product's O(M nnz) multiply-adds.
void check_csr(const Csr& w, int64_t N, int64_t K, int64_t nnz) {
  if (N < 0 || K < 0 || nnz < 0) throw std::invalid_argument("spmm_csr_linear: negative size");
  if (w.rp[0] != 0 || w.rp[N] != nnz)
    throw std::invalid_argument("spmm_csr_linear: row_ptr must start at 0 and end at nnz = " + std::to_string(nnz));
  for (int64_t i = 0; i < N; ++i)
    if (w.rp[i + 1] < w.rp[i]) throw std::invalid_argument("spmm_csr_linear: row_ptr must be non-decreasing");
  uint32_t bad = 0;
  const uint32_t k = static_cast<uint32_t>(std::min<int64_t>(K, int64_t{1} << 31));  // int32 columns
  for (int64_t j = 0; j < nnz; ++j) bad |= static_cast<uint32_t>(w.ci[j]) >= k;
  if (bad) throw std::invalid_argument("spmm_csr_linear: column index outside [0, K = " + std::to_string(K) + ")");
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

void register_sparse(py::module_& m) {
  m.def(
      "spmm_csr_linear",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t row_ptr, uintptr_t col, uintptr_t val, int64_t N,
         int64_t nnz, uintptr_t bias, uintptr_t out, int threads) {
        Csr w{ptr<const int32_t>(row_ptr), ptr<const int32_t>(col), ptr<const float>(val)};
        check_csr(w, N, K, nnz);
        spmm(current_level(), ptr<const float>(x), M, K, w, N, bias ? ptr<const float>(bias) : nullptr,
             ptr<float>(out), threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Y = X W^T + b with W in CSR over output channels (int32 row_ptr/col, float32 values); raw pointers.");
}

}  // namespace minidiff
