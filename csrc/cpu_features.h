// Run-time CPU feature detection. Kernels compiled with
// __attribute__((target("..."))) are only called when these return true.
#pragma once

#include <string>

namespace minidiff {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
  bool avxvnni = false;
};

const CpuFeatures& cpu_features();

// Highest SIMD level usable by this process: "avx512_vnni", "avx512", "avx2", "scalar".
// The environment variable MINIDIFF_SIMD caps it (e.g. MINIDIFF_SIMD=avx2), which
// is how tests check that every level gives identical integer results.
std::string simd_level();

}  // namespace minidiff
