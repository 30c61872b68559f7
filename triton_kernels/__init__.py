"""Triton kernels of pyvq, installed as ``pyvq.triton_kernels``.

Only ``@triton.jit`` kernels and launch-grid helpers live here; the ops that
launch them (``torch.library.triton_op`` + ``wrap_triton``) are in
``pyvq/ops``. Importing this package never imports Triton, so pyvq works on
machines without it.
"""
