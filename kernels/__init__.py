"""Triton kernels and their launchers, installed as `peftfast.kernels`.

Kernels take tensors and return tensors; they know nothing of configs, modules or adapter names.
Each has a plain-torch twin with the same signature in `peftfast.ops.reference`.
"""
