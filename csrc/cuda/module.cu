// minidiff._cuda: CUDA kernels, built only with MINIDIFF_CUDA=ON.
#include <pybind11/pybind11.h>

#include "common.cuh"
#include "registry.cuh"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "minidiff CUDA kernels (static cudart, sm_90a + PTX)";
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
  });
  minidiff::register_cuda_agreement(m);
  minidiff::register_cuda_int8(m);
  minidiff::register_cuda_sparse24(m);
}
