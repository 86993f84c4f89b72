// Placeholder: filled in by the topic that owns this file.
#include "registry.cuh"

namespace minidiff {
void register_cuda_int8(pybind11::module_& m) {}
}  // namespace minidiff
