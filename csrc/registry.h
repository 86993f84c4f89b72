// Each csrc/<topic>.cpp file binds its own functions into minidiff._C through
// one register_* function, so topics never edit each other's files.
#pragma once

#include <pybind11/pybind11.h>

namespace minidiff {
void register_cka(pybind11::module_& m);        // csrc/cka.cpp
void register_agreement(pybind11::module_& m);  // csrc/agreement.cpp
void register_int8(pybind11::module_& m);       // csrc/int8_gemm.cpp
void register_sparse(pybind11::module_& m);     // csrc/spmm.cpp
void register_token_divergence(pybind11::module_& m);  // csrc/token_divergence.cpp
}  // namespace minidiff
