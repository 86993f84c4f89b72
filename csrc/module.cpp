// minidiff._C: the CPU core. Functions take raw addresses (uintptr_t) plus
// sizes; the registered ops (minidiff.ops) validate dtype, device, shape and
// contiguity before calling. Where it is cheap the entry points check again what
// they index memory with (CSR structure, layer offsets, class-index ranges, sizes)
// and throw std::invalid_argument (ValueError in Python) instead of reading or
// writing out of range.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_features.h"
#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "minidiff CPU core (C++17, runtime SIMD dispatch, GIL released in long calls)";
  m.def("simd_level", &minidiff::simd_level,
        "Highest SIMD level in use: avx512_vnni, avx512, avx2 or scalar (capped by MINIDIFF_SIMD).");
  m.def("cpu_features", [] {
    const auto& f = minidiff::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512vnni"] = f.avx512vnni;
    d["avx512bf16"] = f.avx512bf16;
    d["avxvnni"] = f.avxvnni;
    return d;
  });
  m.def("parallel_backend", &minidiff::parallel_backend,
        "Parallel backend of the CPU kernels: 'openmp' (the process's OpenMP runtime, shared with "
        "torch) or 'threadpool' (builds without GNU OpenMP).");
  minidiff::register_cka(m);
  minidiff::register_agreement(m);
  minidiff::register_int8(m);
  minidiff::register_sparse(m);
  minidiff::register_token_divergence(m);
}
