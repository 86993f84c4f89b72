// Placeholder: filled in by the topic that owns this file.
#include "registry.cuh"

namespace minidiff {
void register_cuda_agreement(pybind11::module_& m) {}
}  // namespace minidiff
