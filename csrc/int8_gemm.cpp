// Placeholder: filled in by the topic that owns this file.
#include "registry.h"

namespace minidiff {
void register_int8(pybind11::module_& m) {}
}  // namespace minidiff
