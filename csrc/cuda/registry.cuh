#pragma once
#include <pybind11/pybind11.h>

namespace minidiff {
void register_cuda_agreement(pybind11::module_& m);  // csrc/cuda/agreement.cu
void register_cuda_int8(pybind11::module_& m);       // csrc/cuda/int8_gemm.cu
void register_cuda_sparse24(pybind11::module_& m);   // csrc/cuda/sparse24.cu
}  // namespace minidiff
