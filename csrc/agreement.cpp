// Prediction agreement counts for N models x M examples (minidiff._C).
//
// With nbits = 0 only both_right is counted (flips / error sets need no planes).
//
// Pairwise counts. Each block of examples is transposed into bit-planes: for
// model i and bit b of the class index, plane[i][b] holds bit b of p_i(x) for
// 64 examples per word. Then, per pair (i, j),
//     disagree(i, j)   = popcount( OR_b (plane[i][b] XOR plane[j][b]) )
//     both_right(i, j) = popcount( right[i] AND right[j] )
// where right[i] is the bitset of examples model i gets right (pred == label).
// One 512-bit step covers 512 examples with nbits XOR/OR, one VPOPCNTQ and one
// add, so the pair loop costs about M * nbits / 512 vector ops per pair; the
// transposition reads the predictions once. both_right(i, i) is model i's
// number of correct predictions, from which flips and error-set Jaccard follow
// (python/minidiff/agreement.py).
//
// Kernels: AVX-512F/BW + VPOPCNTDQ (selected at run time), a scalar path with
// the POPCNT instruction, and a portable scalar path (MINIDIFF_SIMD=scalar).
// All give identical integer counts; padding bits past M are zero in every
// plane and in `right`, so they never count.
//
// Populations (Hooker et al. 2019/2020): per-example modal label and Taxicab
// distance between two populations' label histograms, computed per example
// with an O(K) scratch histogram (no M x C matrix).
//
// Python (minidiff.ops.agreement) validates dtype (int32/int64), contiguity,
// shapes and labels before any pointer reaches this file. The range of the
// predictions is checked here, block by block as each block is first read
// (then encoded from L2), so 256 MB of predictions cross memory once; the
// counting never indexes memory by a class value, so a bad value cannot crash
// it, and Python raises the ValueError when the returned (min, max) is out of
// range. The population functions index histograms by class value: their
// inputs are range-checked in Python first (agreement_minmax).
#include <atomic>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <utility>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MINIDIFF_X86 1
#endif

#include "cpu_features.h"
#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

namespace minidiff {
namespace {

enum class Path { kPortable = 0, kPopcnt = 1, kAvx512 = 2 };

bool has_vpopcntdq() {
#ifdef MINIDIFF_X86
  static const bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vpopcntdq") != 0;
  }();
  return v;
#else
  return false;
#endif
}

bool has_popcnt() {
#ifdef MINIDIFF_X86
  static const bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt") != 0;
  }();
  return v;
#else
  return false;
#endif
}

Path select_path() {
  const std::string level = simd_level();  // honours the MINIDIFF_SIMD cap
  if ((level == "avx512" || level == "avx512_vnni") && has_vpopcntdq()) return Path::kAvx512;
  if (level != "scalar" && has_popcnt()) return Path::kPopcnt;
  return Path::kPortable;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::kAvx512: return "avx512_vpopcntdq";
    case Path::kPopcnt: return "popcnt";
    default: return "portable";
  }
}

// ---- encoding: a block of examples -> bit-planes ---------------------------
// planes layout for one block: [model][bit][word], words = block_words.
// right layout: [model][word].

template <typename T>
void encode_block_scalar(const T* preds, const T* labels, int64_t n_models, int64_t m_total,
                         int64_t m0, int64_t m_len, int nbits, int64_t block_words,
                         uint64_t* planes, uint64_t* right) {
  const int64_t plane_stride = block_words;
  const int64_t model_stride = static_cast<int64_t>(nbits) * block_words;
  std::memset(planes, 0, sizeof(uint64_t) * n_models * model_stride);
  if (right) std::memset(right, 0, sizeof(uint64_t) * n_models * block_words);
  for (int64_t i = 0; i < n_models; ++i) {
    const T* row = preds + i * m_total + m0;
    uint64_t* pl = planes + i * model_stride;
    uint64_t* rt = right ? right + i * block_words : nullptr;
    for (int64_t e = 0; e < m_len; ++e) {
      const uint64_t v = static_cast<uint64_t>(row[e]);
      const int64_t w = e >> 6;
      const uint64_t bit = uint64_t(1) << (e & 63);
      for (int b = 0; b < nbits; ++b)
        if ((v >> b) & 1u) pl[b * plane_stride + w] |= bit;
      if (rt && row[e] == labels[m0 + e]) rt[w] |= bit;
    }
  }
}

inline uint64_t popcount_portable(uint64_t x) {
  // SWAR popcount: no dependence on the POPCNT instruction.
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return (x * 0x0101010101010101ULL) >> 56;
}

// Pair loop over one encoded block, upper triangle (j >= i) only.
template <bool kUsePopcntInsn>
inline __attribute__((always_inline)) uint64_t pc64(uint64_t x) {
  if constexpr (kUsePopcntInsn) return static_cast<uint64_t>(__builtin_popcountll(x));
  else return popcount_portable(x);
}

// always_inline so that the popcnt-targeted wrapper compiles it with POPCNT.
template <bool kUsePopcntInsn>
inline __attribute__((always_inline)) void pairs_block_scalar(int64_t n_models, int nbits, int64_t block_words, const uint64_t* planes,
                        const uint64_t* right, int64_t* disagree, int64_t* both_right) {
  const int64_t model_stride = static_cast<int64_t>(nbits) * block_words;
  for (int64_t i = 0; i < n_models; ++i) {
    const uint64_t* pi = planes + i * model_stride;
    for (int64_t j = i + 1; j < n_models && nbits > 0; ++j) {
      const uint64_t* pj = planes + j * model_stride;
      uint64_t count = 0;
      for (int64_t w = 0; w < block_words; ++w) {
        uint64_t x = 0;
        for (int b = 0; b < nbits; ++b) x |= pi[b * block_words + w] ^ pj[b * block_words + w];
        count += pc64<kUsePopcntInsn>(x);
      }
      disagree[i * n_models + j] += static_cast<int64_t>(count);
    }
    if (right) {
      const uint64_t* ri = right + i * block_words;
      for (int64_t j = i; j < n_models; ++j) {
        const uint64_t* rj = right + j * block_words;
        uint64_t count = 0;
        for (int64_t w = 0; w < block_words; ++w) count += pc64<kUsePopcntInsn>(ri[w] & rj[w]);
        both_right[i * n_models + j] += static_cast<int64_t>(count);
      }
    }
  }
}

#ifdef MINIDIFF_X86
#define MD_POPCNT __attribute__((target("popcnt")))
#else
#define MD_POPCNT
#endif
MD_POPCNT void pairs_block_popcnt(int64_t n_models, int nbits,
                                                          int64_t block_words,
                                                          const uint64_t* planes,
                                                          const uint64_t* right, int64_t* disagree,
                                                          int64_t* both_right) {
  pairs_block_scalar<true>(n_models, nbits, block_words, planes, right, disagree, both_right);
}

#ifdef MINIDIFF_X86
#define MD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vpopcntdq,popcnt")))

// One 64-bit word of every plane per 64 examples: the examples are loaded as
// 4 (int32) or 8 (int64) vectors, and for each class bit one VPTESTM per vector
// gives that bit of 16 or 8 examples.
template <typename T>
MD_AVX512 inline uint64_t test_word(const __m512i* v, __m512i bitmask) {
  uint64_t word = 0;
  if constexpr (sizeof(T) == 4) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
      word |= static_cast<uint64_t>(_mm512_test_epi32_mask(v[q], bitmask)) << (16 * q);
  } else {
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q)
      word |= static_cast<uint64_t>(_mm512_test_epi64_mask(v[q], bitmask)) << (8 * q);
  }
  return word;
}

template <typename T>
MD_AVX512 inline uint64_t eq_word(const __m512i* v, const __m512i* y) {
  uint64_t word = 0;
  if constexpr (sizeof(T) == 4) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
      word |= static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(v[q], y[q])) << (16 * q);
  } else {
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q)
      word |= static_cast<uint64_t>(_mm512_cmpeq_epi64_mask(v[q], y[q])) << (8 * q);
  }
  return word;
}

// Truncate 64 examples (values < 2**8 resp. 2**16, so truncation is exact) to
// 64 bytes in example order, resp. 2 x 32 uint16.
template <typename T>
MD_AVX512 inline __m512i narrow8(const __m512i* v) {
  if constexpr (sizeof(T) == 4) {
    __m512i out = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(v[0]));
    out = _mm512_inserti32x4(out, _mm512_cvtepi32_epi8(v[1]), 1);
    out = _mm512_inserti32x4(out, _mm512_cvtepi32_epi8(v[2]), 2);
    return _mm512_inserti32x4(out, _mm512_cvtepi32_epi8(v[3]), 3);
  } else {
    __m128i q[4];
    for (int k = 0; k < 4; ++k)
      q[k] = _mm_unpacklo_epi64(_mm512_cvtepi64_epi8(v[2 * k]), _mm512_cvtepi64_epi8(v[2 * k + 1]));
    __m512i out = _mm512_castsi128_si512(q[0]);
    out = _mm512_inserti32x4(out, q[1], 1);
    out = _mm512_inserti32x4(out, q[2], 2);
    return _mm512_inserti32x4(out, q[3], 3);
  }
}

template <typename T>
MD_AVX512 inline void narrow16(const __m512i* v, __m512i* out) {
  if constexpr (sizeof(T) == 4) {
    for (int k = 0; k < 2; ++k)
      out[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(v[2 * k])),
                                  _mm512_cvtepi32_epi16(v[2 * k + 1]), 1);
  } else {
    for (int k = 0; k < 2; ++k) {
      __m512i o = _mm512_castsi128_si512(_mm512_cvtepi64_epi16(v[4 * k]));
      o = _mm512_inserti32x4(o, _mm512_cvtepi64_epi16(v[4 * k + 1]), 1);
      o = _mm512_inserti32x4(o, _mm512_cvtepi64_epi16(v[4 * k + 2]), 2);
      out[k] = _mm512_inserti32x4(o, _mm512_cvtepi64_epi16(v[4 * k + 3]), 3);
    }
  }
}

template <typename T>
MD_AVX512 void encode_block_avx512(const T* preds, const T* labels, int64_t n_models,
                                   int64_t m_total, int64_t m0, int64_t m_len, int nbits,
                                   int64_t block_words, uint64_t* planes, uint64_t* right) {
  constexpr int kVecs = 64 / (64 / static_cast<int>(sizeof(T)));  // vectors per 64 examples
  constexpr int kLanes = 64 / static_cast<int>(sizeof(T));
  const int64_t model_stride = static_cast<int64_t>(nbits) * block_words;
  const int64_t full_words = m_len / 64;
  for (int64_t i = 0; i < n_models; ++i) {
    const T* row = preds + i * m_total + m0;
    uint64_t* pl = planes + i * model_stride;
    uint64_t* rt = right ? right + i * block_words : nullptr;
    std::memset(pl, 0, sizeof(uint64_t) * model_stride);
    if (rt) std::memset(rt, 0, sizeof(uint64_t) * block_words);
    for (int64_t w = 0; w < full_words; ++w) {
      __m512i v[kVecs];
      for (int q = 0; q < kVecs; ++q)
        v[q] = _mm512_loadu_si512(reinterpret_cast<const void*>(row + 64 * w + kLanes * q));
      if (nbits <= 8) {
        // Class indices fit a byte: truncate to 64 bytes, one VPTESTMB per bit.
        const __m512i bytes = narrow8<T>(v);
        for (int b = 0; b < nbits; ++b)
          pl[b * block_words + w] = _mm512_test_epi8_mask(bytes, _mm512_set1_epi8(static_cast<char>(1 << b)));
      } else if (nbits <= 16) {
        __m512i words[2];
        narrow16<T>(v, words);
        for (int b = 0; b < nbits; ++b) {
          const __m512i bit = _mm512_set1_epi16(static_cast<short>(1 << b));
          pl[b * block_words + w] = static_cast<uint64_t>(_mm512_test_epi16_mask(words[0], bit)) |
                                    (static_cast<uint64_t>(_mm512_test_epi16_mask(words[1], bit)) << 32);
        }
      } else {
        for (int b = 0; b < nbits; ++b) {
          const __m512i bitmask = sizeof(T) == 4 ? _mm512_set1_epi32(1 << b) : _mm512_set1_epi64(int64_t(1) << b);
          pl[b * block_words + w] = test_word<T>(v, bitmask);
        }
      }
      if (rt) {
        __m512i y[kVecs];
        for (int q = 0; q < kVecs; ++q)
          y[q] = _mm512_loadu_si512(reinterpret_cast<const void*>(labels + m0 + 64 * w + kLanes * q));
        rt[w] = eq_word<T>(v, y);
      }
    }
    for (int64_t e = full_words * 64; e < m_len; ++e) {  // tail, scalar
      const uint64_t val = static_cast<uint64_t>(row[e]);
      const uint64_t bit = uint64_t(1) << (e & 63);
      for (int b = 0; b < nbits; ++b)
        if ((val >> b) & 1u) pl[b * block_words + (e >> 6)] |= bit;
      if (rt && row[e] == labels[m0 + e]) rt[e >> 6] |= bit;
    }
  }
}

// block_words is a multiple of 8 here (one zmm = 8 words = 512 examples).
// Four j's share each load of model i's planes (5 loads per 4 pairs instead of 8).
MD_AVX512 void pairs_block_avx512(int64_t n_models, int nbits, int64_t block_words,
                                  const uint64_t* planes, const uint64_t* right, int64_t* disagree,
                                  int64_t* both_right) {
  const int64_t model_stride = static_cast<int64_t>(nbits) * block_words;
  for (int64_t i = 0; i < n_models; ++i) {
    const uint64_t* pi = planes + i * model_stride;
    int64_t j = i + 1;
    for (; j + 4 <= n_models && nbits > 0; j += 4) {
      const uint64_t* pj0 = planes + j * model_stride;
      const uint64_t* pj1 = pj0 + model_stride;
      const uint64_t* pj2 = pj1 + model_stride;
      const uint64_t* pj3 = pj2 + model_stride;
      __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t w = 0; w < block_words; w += 8) {
        __m512i x0 = _mm512_setzero_si512(), x1 = x0, x2 = x0, x3 = x0;
        for (int b = 0; b < nbits; ++b) {
          const int64_t off = b * block_words + w;
          const __m512i a = _mm512_loadu_si512(pi + off);
          x0 = _mm512_ternarylogic_epi64(x0, a, _mm512_loadu_si512(pj0 + off), 0xF6);  // x | (a ^ c)
          x1 = _mm512_ternarylogic_epi64(x1, a, _mm512_loadu_si512(pj1 + off), 0xF6);
          x2 = _mm512_ternarylogic_epi64(x2, a, _mm512_loadu_si512(pj2 + off), 0xF6);
          x3 = _mm512_ternarylogic_epi64(x3, a, _mm512_loadu_si512(pj3 + off), 0xF6);
        }
        acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(x0));
        acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(x1));
        acc2 = _mm512_add_epi64(acc2, _mm512_popcnt_epi64(x2));
        acc3 = _mm512_add_epi64(acc3, _mm512_popcnt_epi64(x3));
      }
      disagree[i * n_models + j] += _mm512_reduce_add_epi64(acc0);
      disagree[i * n_models + j + 1] += _mm512_reduce_add_epi64(acc1);
      disagree[i * n_models + j + 2] += _mm512_reduce_add_epi64(acc2);
      disagree[i * n_models + j + 3] += _mm512_reduce_add_epi64(acc3);
    }
    for (; j < n_models && nbits > 0; ++j) {
      const uint64_t* pj = planes + j * model_stride;
      __m512i acc = _mm512_setzero_si512();
      for (int64_t w = 0; w < block_words; w += 8) {
        __m512i x = _mm512_setzero_si512();
        for (int b = 0; b < nbits; ++b) {
          const __m512i a = _mm512_loadu_si512(pi + b * block_words + w);
          const __m512i c = _mm512_loadu_si512(pj + b * block_words + w);
          x = _mm512_ternarylogic_epi64(x, a, c, 0xF6);
        }
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
      }
      disagree[i * n_models + j] += _mm512_reduce_add_epi64(acc);
    }
    if (right) {
      const uint64_t* ri = right + i * block_words;
      for (int64_t jj = i; jj < n_models; ++jj) {
        const uint64_t* rj = right + jj * block_words;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t w = 0; w < block_words; w += 8)
          acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(
                                          _mm512_loadu_si512(ri + w), _mm512_loadu_si512(rj + w))));
        both_right[i * n_models + jj] += _mm512_reduce_add_epi64(acc);
      }
    }
  }
}
#endif  // MINIDIFF_X86

// ---- range check ------------------------------------------------------------
// min and max of a contiguous int32/int64 buffer, so Python can validate class
// indices at memory speed before the counting kernels run (torch.aminmax is
// several times slower on CPU).
template <typename T>
std::pair<int64_t, int64_t> minmax_scalar(const T* p, int64_t n) {
  T lo = p[0], hi = p[0];
  for (int64_t k = 1; k < n; ++k) {
    lo = std::min(lo, p[k]);
    hi = std::max(hi, p[k]);
  }
  return {static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
}

#ifdef MINIDIFF_X86
__attribute__((target("avx512f"))) std::pair<int64_t, int64_t> minmax_avx512_i32(const int32_t* p,
                                                                                 int64_t n) {
  __m512i lo = _mm512_set1_epi32(p[0]), hi = lo;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p + k));
    lo = _mm512_min_epi32(lo, v);
    hi = _mm512_max_epi32(hi, v);
  }
  int64_t l = _mm512_reduce_min_epi32(lo), h = _mm512_reduce_max_epi32(hi);
  for (; k < n; ++k) {
    l = std::min<int64_t>(l, p[k]);
    h = std::max<int64_t>(h, p[k]);
  }
  return {l, h};
}

__attribute__((target("avx512f"))) std::pair<int64_t, int64_t> minmax_avx512_i64(const int64_t* p,
                                                                                 int64_t n) {
  __m512i lo = _mm512_set1_epi64(p[0]), hi = lo;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p + k));
    lo = _mm512_min_epi64(lo, v);
    hi = _mm512_max_epi64(hi, v);
  }
  int64_t l = _mm512_reduce_min_epi64(lo), h = _mm512_reduce_max_epi64(hi);
  for (; k < n; ++k) {
    l = std::min<int64_t>(l, p[k]);
    h = std::max<int64_t>(h, p[k]);
  }
  return {l, h};
}
#endif

std::pair<int64_t, int64_t> minmax(uintptr_t ptr, bool is64, int64_t n, int threads) {
  if (n <= 0) throw std::invalid_argument("minmax: empty input");
  const bool avx512 = select_path() == Path::kAvx512;
  const int64_t grain = int64_t(1) << 20;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (n + grain - 1) / grain)));
  std::vector<std::pair<int64_t, int64_t>> res(parts);
  parallel_for(parts, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part) {
      const int64_t s = n * part / parts, t = n * (part + 1) / parts;
#ifdef MINIDIFF_X86
      if (avx512) {
        res[part] = is64 ? minmax_avx512_i64(reinterpret_cast<const int64_t*>(ptr) + s, t - s)
                         : minmax_avx512_i32(reinterpret_cast<const int32_t*>(ptr) + s, t - s);
        continue;
      }
#endif
      res[part] = is64 ? minmax_scalar(reinterpret_cast<const int64_t*>(ptr) + s, t - s)
                       : minmax_scalar(reinterpret_cast<const int32_t*>(ptr) + s, t - s);
    }
  });
  std::pair<int64_t, int64_t> out = res[0];
  for (const auto& r : res) {
    out.first = std::min(out.first, r.first);
    out.second = std::max(out.second, r.second);
  }
  return out;
}

template <typename T>
std::pair<int64_t, int64_t> minmax_span(const T* p, int64_t n, bool avx512) {
#ifdef MINIDIFF_X86
  if (avx512) {
    if constexpr (sizeof(T) == 4) return minmax_avx512_i32(reinterpret_cast<const int32_t*>(p), n);
    else return minmax_avx512_i64(reinterpret_cast<const int64_t*>(p), n);
  }
#endif
  return minmax_scalar(p, n);
}

// Words per block: a multiple of 8 (one zmm), sized so that one block's input
// rows and planes for all models stay within ~768 KiB (L2), 8 to 64 words.
int64_t pick_block_words(int64_t n_models, int plane_bits, int64_t elem_size, int64_t m) {
  const int64_t per_word = n_models * ((plane_bits + 1) * 8 + 64 * elem_size);
  int64_t bw = (768 * 1024) / std::max<int64_t>(per_word, 1);
  bw = std::max<int64_t>(8, std::min<int64_t>(64, bw)) / 8 * 8;
  const int64_t words_needed = (m + 63) / 64;
  const int64_t rounded = (words_needed + 7) / 8 * 8;
  return std::min(bw, std::max<int64_t>(8, rounded));
}

inline int bit_length(int64_t v) { return v > 0 ? 64 - __builtin_clzll(static_cast<uint64_t>(v)) : 0; }

// nbits > 0: that many planes; 0: both_right only; -1: per block, from the block's
// maximum. Every block is range-checked (0 <= value <= max_value) as it is first
// read, before it is encoded (the second read then comes from L2), so the data
// crosses memory once. An out-of-range block is not counted; the returned
// (min, max) over all predictions lets the caller raise.
template <typename T>
std::pair<int64_t, int64_t> pair_counts_impl(const T* preds, const T* labels, int64_t n_models,
                                             int64_t m, int nbits, int64_t max_value,
                                             int64_t* disagree, int64_t* both_right, int threads,
                                             Path path) {
  const int max_bits = std::max(1, std::min<int>(8 * sizeof(T) - 1, bit_length(max_value)));
  const int plane_bits = nbits >= 0 ? nbits : max_bits;
  const int64_t bw = pick_block_words(n_models, plane_bits, sizeof(T), m);
  const int64_t block_examples = bw * 64;
  const int64_t n_blocks = (m + block_examples - 1) / block_examples;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n_blocks)));
  const int64_t nn = n_models * n_models;
  std::vector<int64_t> local_d(static_cast<size_t>(parts) * nn, 0);
  std::vector<int64_t> local_r(labels ? static_cast<size_t>(parts) * nn : 0, 0);
  std::vector<std::pair<int64_t, int64_t>> local_range(parts, {INT64_MAX, INT64_MIN});

  parallel_for(parts, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<uint64_t> planes(static_cast<size_t>(n_models) * std::max(plane_bits, 1) * bw);
    std::vector<uint64_t> right(labels ? static_cast<size_t>(n_models) * bw : 0);
    for (int64_t p = p_begin; p < p_end; ++p) {
      int64_t* d = local_d.data() + p * nn;
      int64_t* r = labels ? local_r.data() + p * nn : nullptr;
      auto& range = local_range[p];
      const int64_t b0 = n_blocks * p / parts, b1 = n_blocks * (p + 1) / parts;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * block_examples;
        const int64_t len = std::min(block_examples, m - m0);
        int64_t lo = INT64_MAX, hi = INT64_MIN;
        for (int64_t i = 0; i < n_models; ++i) {
          const auto mm = minmax_span(preds + i * m + m0, len, path == Path::kAvx512);
          lo = std::min(lo, mm.first);
          hi = std::max(hi, mm.second);
        }
        range.first = std::min(range.first, lo);
        range.second = std::max(range.second, hi);
        if (lo < 0 || hi > max_value) continue;  // the caller raises
        const int nb = nbits >= 0 ? nbits : std::max(1, bit_length(hi));
        uint64_t* rt = labels ? right.data() : nullptr;
#ifdef MINIDIFF_X86
        if (path == Path::kAvx512) {
          encode_block_avx512<T>(preds, labels, n_models, m, m0, len, nb, bw, planes.data(), rt);
          pairs_block_avx512(n_models, nb, bw, planes.data(), rt, d, r);
          continue;
        }
#endif
        encode_block_scalar<T>(preds, labels, n_models, m, m0, len, nb, bw, planes.data(), rt);
        if (path == Path::kPopcnt)
          pairs_block_popcnt(n_models, nb, bw, planes.data(), rt, d, r);
        else
          pairs_block_scalar<false>(n_models, nb, bw, planes.data(), rt, d, r);
      }
    }
  });

  // Reduce the per-part counts and mirror the upper triangle.
  for (int64_t k = 0; k < nn; ++k) {
    int64_t s = 0, t = 0;
    for (int p = 0; p < parts; ++p) {
      s += local_d[p * nn + k];
      if (labels) t += local_r[p * nn + k];
    }
    disagree[k] = s;
    if (labels) both_right[k] = t;
  }
  for (int64_t i = 0; i < n_models; ++i) {
    disagree[i * n_models + i] = 0;
    for (int64_t j = i + 1; j < n_models; ++j) {
      disagree[j * n_models + i] = disagree[i * n_models + j];
      if (labels) both_right[j * n_models + i] = both_right[i * n_models + j];
    }
  }
  std::pair<int64_t, int64_t> out = local_range[0];
  for (const auto& rg : local_range) {
    out.first = std::min(out.first, rg.first);
    out.second = std::max(out.second, rg.second);
  }
  return out;
}

std::pair<int64_t, int64_t> pair_counts(uintptr_t preds, uintptr_t labels, bool is64,
                                        int64_t n_models, int64_t m, int nbits, int64_t max_value,
                                        uintptr_t disagree, uintptr_t both_right, int threads,
                                        const std::string& force_path) {
  if (n_models <= 0 || m <= 0) throw std::invalid_argument("pair_counts: empty input");
  if (nbits < -1 || nbits > 63) throw std::invalid_argument("pair_counts: nbits must be in [-1, 63]");
  if (nbits == 0 && !labels) throw std::invalid_argument("pair_counts: nbits = 0 needs labels");
  if (max_value < 0) throw std::invalid_argument("pair_counts: max_value must be >= 0");
  if (nbits > 0 && bit_length(max_value) > nbits)
    throw std::invalid_argument("pair_counts: max_value needs more than nbits bits");
  Path path = select_path();
  if (force_path == "portable") path = Path::kPortable;
  else if (force_path == "popcnt") path = has_popcnt() ? Path::kPopcnt : Path::kPortable;
  else if (!force_path.empty() && force_path != "auto")
    throw std::invalid_argument("pair_counts: unknown path " + force_path);
  auto* d = reinterpret_cast<int64_t*>(disagree);
  auto* r = labels ? reinterpret_cast<int64_t*>(both_right) : nullptr;
  if (is64)
    return pair_counts_impl<int64_t>(reinterpret_cast<const int64_t*>(preds),
                                     labels ? reinterpret_cast<const int64_t*>(labels) : nullptr,
                                     n_models, m, nbits, max_value, d, r, threads, path);
  if (max_value > INT32_MAX) max_value = INT32_MAX;
  return pair_counts_impl<int32_t>(reinterpret_cast<const int32_t*>(preds),
                                   labels ? reinterpret_cast<const int32_t*>(labels) : nullptr,
                                   n_models, m, nbits, max_value, d, r, threads, path);
}

// ---- populations -----------------------------------------------------------
constexpr int64_t kPopBlock = 256;  // examples per transposed block

// Copies preds[:, m0:m0+len] (row-major K x M) to buf (len x K) so that one
// example's K predictions are contiguous. Returns false when a value lies outside
// [0, c): the caller then skips the block (its histograms are indexed by value)
// and reports the error after the parallel region.
template <typename T>
bool transpose_block(const T* preds, int64_t k, int64_t m, int64_t m0, int64_t len, int64_t c, int64_t* buf) {
  uint64_t bad = 0;
  for (int64_t r = 0; r < k; ++r) {
    const T* row = preds + r * m + m0;
    for (int64_t e = 0; e < len; ++e) {
      const int64_t v = static_cast<int64_t>(row[e]);
      bad |= static_cast<uint64_t>(v) >= static_cast<uint64_t>(c);
      buf[e * k + r] = v;
    }
  }
  return bad == 0;
}

void throw_out_of_range(const char* fn) {
  throw std::invalid_argument(std::string(fn) + ": class index outside [0, num_classes)");
}

template <typename T>
bool modal_impl(const T* preds, int64_t k, int64_t m, int64_t c, int64_t* out, int threads) {
  const int64_t n_blocks = (m + kPopBlock - 1) / kPopBlock;
  std::atomic<bool> ok{true};
  parallel_for(n_blocks, threads, 4, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> buf(static_cast<size_t>(kPopBlock * k));
    std::vector<int32_t> hist(static_cast<size_t>(c), 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kPopBlock, len = std::min(kPopBlock, m - m0);
      if (!transpose_block(preds, k, m, m0, len, c, buf.data())) {
        ok.store(false, std::memory_order_relaxed);
        continue;
      }
      for (int64_t e = 0; e < len; ++e) {
        const int64_t* labs = buf.data() + e * k;
        int32_t best_count = 0;
        int64_t best = 0;
        for (int64_t r = 0; r < k; ++r) {
          const int64_t lab = labs[r];
          const int32_t cnt = ++hist[lab];
          if (cnt > best_count || (cnt == best_count && lab < best)) {
            best_count = cnt;
            best = lab;
          }
        }
        for (int64_t r = 0; r < k; ++r) hist[labs[r]] = 0;
        out[m0 + e] = best;
      }
    }
  });
  return ok.load();
}

// sum_c |h_c * Kb - h_b * Kc| over classes, divided once by Kb * Kc: equal to
// sum_c |h_c / Kc - h_b / Kb| with a single rounding.
template <typename TB, typename TC>
bool cie_impl(const TB* base, int64_t kb, const TC* comp, int64_t kc, int64_t m, int64_t c,
              double* out, int threads) {
  const int64_t n_blocks = (m + kPopBlock - 1) / kPopBlock;
  std::atomic<bool> ok{true};
  parallel_for(n_blocks, threads, 4, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> bbuf(static_cast<size_t>(kPopBlock * kb)), cbuf(static_cast<size_t>(kPopBlock * kc));
    std::vector<int64_t> hb(static_cast<size_t>(c), 0), hc(static_cast<size_t>(c), 0);
    const double denom = static_cast<double>(kb) * static_cast<double>(kc);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kPopBlock, len = std::min(kPopBlock, m - m0);
      const bool good_b = transpose_block(base, kb, m, m0, len, c, bbuf.data());
      const bool good_c = transpose_block(comp, kc, m, m0, len, c, cbuf.data());
      if (!good_b || !good_c) {
        ok.store(false, std::memory_order_relaxed);
        continue;
      }
      for (int64_t e = 0; e < len; ++e) {
        const int64_t* lb = bbuf.data() + e * kb;
        const int64_t* lc = cbuf.data() + e * kc;
        for (int64_t r = 0; r < kb; ++r) ++hb[lb[r]];
        for (int64_t r = 0; r < kc; ++r) ++hc[lc[r]];
        int64_t total = 0;  // each class is visited once: its counts are zeroed after use
        for (int64_t r = 0; r < kb; ++r) {
          const int64_t lab = lb[r];
          total += std::llabs(hc[lab] * kb - hb[lab] * kc);
          hb[lab] = hc[lab] = 0;
        }
        for (int64_t r = 0; r < kc; ++r) {
          const int64_t lab = lc[r];
          total += std::llabs(hc[lab] * kb - hb[lab] * kc);
          hb[lab] = hc[lab] = 0;
        }
        out[m0 + e] = static_cast<double>(total) / denom;
      }
    }
  });
  return ok.load();
}

// hist[x][c] = #{r : preds[r][x] == c} into a zeroed int32 (M x C) buffer;
// each thread owns whole rows of hist, so no atomics.
template <typename T>
bool histogram_impl(const T* preds, int64_t k, int64_t m, int64_t c, int32_t* hist, int threads) {
  const int64_t n_blocks = (m + kPopBlock - 1) / kPopBlock;
  std::atomic<bool> ok{true};
  parallel_for(n_blocks, threads, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kPopBlock, len = std::min(kPopBlock, m - m0);
      for (int64_t r = 0; r < k; ++r) {
        const T* row = preds + r * m + m0;
        for (int64_t e = 0; e < len; ++e) {
          const int64_t v = static_cast<int64_t>(row[e]);
          if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(c)) {  // never index outside the row
            ok.store(false, std::memory_order_relaxed);
            continue;
          }
          ++hist[(m0 + e) * c + v];
        }
      }
    }
  });
  return ok.load();
}

void label_histogram(uintptr_t preds, bool is64, int64_t k, int64_t m, int64_t c, uintptr_t hist,
                     int threads) {
  if (k <= 0 || m <= 0 || c <= 0) throw std::invalid_argument("label_histogram: empty input");
  auto* h = reinterpret_cast<int32_t*>(hist);
  const bool ok = is64 ? histogram_impl(reinterpret_cast<const int64_t*>(preds), k, m, c, h, threads)
                       : histogram_impl(reinterpret_cast<const int32_t*>(preds), k, m, c, h, threads);
  if (!ok) throw_out_of_range("label_histogram");
}

void modal_labels(uintptr_t preds, bool is64, int64_t k, int64_t m, int64_t c, uintptr_t out,
                  int threads) {
  if (k <= 0 || m <= 0 || c <= 0) throw std::invalid_argument("modal_labels: empty input");
  auto* o = reinterpret_cast<int64_t*>(out);
  const bool ok = is64 ? modal_impl(reinterpret_cast<const int64_t*>(preds), k, m, c, o, threads)
                       : modal_impl(reinterpret_cast<const int32_t*>(preds), k, m, c, o, threads);
  if (!ok) throw_out_of_range("modal_labels");
}

void cie_scores(uintptr_t base, bool base64, int64_t kb, uintptr_t comp, bool comp64, int64_t kc,
                int64_t m, int64_t c, uintptr_t out, int threads) {
  if (kb <= 0 || kc <= 0 || m <= 0 || c <= 0) throw std::invalid_argument("cie_scores: empty input");
  auto* o = reinterpret_cast<double*>(out);
  bool ok;
  if (base64 && comp64)
    ok = cie_impl(reinterpret_cast<const int64_t*>(base), kb, reinterpret_cast<const int64_t*>(comp), kc, m, c, o, threads);
  else if (base64)
    ok = cie_impl(reinterpret_cast<const int64_t*>(base), kb, reinterpret_cast<const int32_t*>(comp), kc, m, c, o, threads);
  else if (comp64)
    ok = cie_impl(reinterpret_cast<const int32_t*>(base), kb, reinterpret_cast<const int64_t*>(comp), kc, m, c, o, threads);
  else
    ok = cie_impl(reinterpret_cast<const int32_t*>(base), kb, reinterpret_cast<const int32_t*>(comp), kc, m, c, o, threads);
  if (!ok) throw_out_of_range("cie_scores");
}

}  // namespace

void register_agreement(py::module_& m) {
  m.def("agreement_minmax", &minmax, py::arg("ptr"), py::arg("is64"), py::arg("numel"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "(min, max) of a contiguous int32/int64 buffer of numel > 0 elements.");
  m.def("agreement_path", [] { return std::string(path_name(select_path())); },
        "Kernel the pairwise agreement counts use: avx512_vpopcntdq, popcnt or portable.");
  m.def("agreement_pair_counts", &pair_counts, py::arg("preds"), py::arg("labels"), py::arg("is64"),
        py::arg("n_models"), py::arg("m"), py::arg("nbits"), py::arg("max_value"), py::arg("disagree"),
        py::arg("both_right"), py::arg("threads"), py::arg("path") = "auto",
        py::call_guard<py::gil_scoped_release>(),
        "Pairwise counts over contiguous (N, M) int32/int64 predictions: disagree[i, j] = "
        "#{p_i != p_j}; with labels (address != 0), both_right[i, j] = #{p_i == y and p_j == y}. "
        "Outputs are (N, N) int64 buffers. nbits: planes per class index (-1: per block from "
        "its max; 0: skip the disagreement counts, left 0). Returns (min, max) of preds; when "
        "outside [0, max_value] the counts are incomplete and the caller must raise.");
  m.def("agreement_modal_labels", &modal_labels, py::arg("preds"), py::arg("is64"), py::arg("k"),
        py::arg("m"), py::arg("num_classes"), py::arg("out"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>(),
        "Most frequent label per example over K rows (ties: smallest label) into int64 out[M].");
  m.def("agreement_label_histogram", &label_histogram, py::arg("preds"), py::arg("is64"),
        py::arg("k"), py::arg("m"), py::arg("num_classes"), py::arg("hist"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>(),
        "Adds label counts of (K, M) predictions into a zeroed int32 (M, C) buffer.");
  m.def("agreement_cie_scores", &cie_scores, py::arg("base"), py::arg("base64"), py::arg("kb"),
        py::arg("comp"), py::arg("comp64"), py::arg("kc"), py::arg("m"), py::arg("num_classes"),
        py::arg("out"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "Taxicab distance between normalized label histograms per example into float64 out[M].");
}

}  // namespace minidiff
