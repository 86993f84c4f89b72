#include "cpu_features.h"

#include <cstdlib>
#include <string>

namespace minidiff {

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2");
    r.fma = __builtin_cpu_supports("fma");
    r.avx512f = __builtin_cpu_supports("avx512f");
    r.avx512bw = __builtin_cpu_supports("avx512bw");
    r.avx512vl = __builtin_cpu_supports("avx512vl");
    r.avx512vnni = __builtin_cpu_supports("avx512vnni");
    r.avx512bf16 = __builtin_cpu_supports("avx512bf16");
    r.avxvnni = __builtin_cpu_supports("avxvnni");
#endif
    return r;
  }();
  return f;
}

static int level_rank(const std::string& s) {
  if (s == "avx512_vnni") return 3;
  if (s == "avx512") return 2;
  if (s == "avx2") return 1;
  return 0;
}

std::string simd_level() {
  const CpuFeatures& f = cpu_features();
  std::string hw = "scalar";
  if (f.avx2 && f.fma) hw = "avx2";
  if (f.avx512f && f.avx512bw && f.avx512vl) hw = "avx512";
  if (hw == "avx512" && f.avx512vnni) hw = "avx512_vnni";
  if (const char* cap = std::getenv("MINIDIFF_SIMD")) {
    std::string c(cap);
    // Unknown names rank as scalar, the safe choice.
    if (!c.empty() && level_rank(c) < level_rank(hw)) return level_rank(c) == 0 ? std::string("scalar") : c;
  }
  return hw;
}

}  // namespace minidiff
