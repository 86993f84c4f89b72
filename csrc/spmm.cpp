// Placeholder: filled in by the topic that owns this file.
#include "registry.h"

namespace minidiff {
void register_sparse(pybind11::module_& m) {}
}  // namespace minidiff
