"""The op layer: registered ``torch.ops.minidiff.*`` ops, one backend choice per call.

``ops.dispatch`` holds the one backend selector (``MINIDIFF_BACKEND`` and the
per-family ``MINIDIFF_BACKEND_<FAMILY>``), the one reading of ``TRITON_INTERPRET``
and the registration helper. CUDA tensor -> ``minidiff._cuda`` / Triton / torch on
device; CPU tensor -> ``minidiff._C``. Every op validates its arguments at its
boundary (inside the registered implementation, before native code) and has a
pure-torch float64 / exact-integer reference beside it (tests compare the two).
Eager calls and ``torch.compile`` graphs run the same registered op.

Topic modules: ``ops.cka``, ``ops.agreement``, ``ops.int8``, ``ops.sparse``,
``ops.gpu_linear``.
"""
