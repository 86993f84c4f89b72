"""Triton kernels, installed as ``minidiff.kernels``.

They run on CUDA tensors; on CPU machines tests run them under
``TRITON_INTERPRET=1`` (set before these modules are imported). Nothing here
imports models or files: kernels take tensors and return tensors. Each module
holds one topic: ``agreement``, ``cka``, ``int8_matmul``, ``sparse24``.
"""
