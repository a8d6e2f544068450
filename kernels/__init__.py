"""Triton kernels of lightning_memkit, installed as ``lightning_memkit.kernels``.

Each kernel file holds its ``@triton.jit`` functions, the launcher and the ``torch.autograd.Function``;
this package imports only ``torch`` and ``triton`` (never Lightning) so it can be read, tested with
``TRITON_INTERPRET=1`` and reused on its own. Kernel modules import triton themselves, so importing
this package never requires triton.
"""
