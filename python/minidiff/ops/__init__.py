"""The dispatch layer: one function per op, choosing a backend per call.

CUDA tensor -> ``minidiff._cuda`` / Triton / torch on device; CPU tensor ->
``minidiff._C``. Every op has a pure-torch float64 reference beside it (tests
compare the two). Ops are registered with ``torch.library.custom_op`` plus a
fake implementation so they trace under ``torch.compile``.

Topic modules: ``ops.cka``, ``ops.agreement``, ``ops.int8``, ``ops.sparse``.
"""
