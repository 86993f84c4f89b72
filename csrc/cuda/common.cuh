// Shared helpers for minidiff._cuda. Kernels receive raw device addresses,
// sizes and the caller's CUDA stream (cudaStream_t passed as an integer);
// nothing here links libtorch.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>

#define MINIDIFF_CUDA_CHECK(expr)                                                   \
  do {                                                                              \
    cudaError_t err__ = (expr);                                                     \
    if (err__ != cudaSuccess)                                                       \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err__) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));     \
  } while (0)

namespace minidiff {
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace minidiff
