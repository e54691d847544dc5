"""Fused Triton kernels of the linear / recurrent family (issue 12).

* :func:`chunk` — chunkwise-parallel forward and backward (autograd) of every additive and delta rule.
* :func:`fused_recurrent` — token by token (decode steps, and forward + backward of short sequences).

Both take canonical tensors ``[B, H, T, D]`` (any strides) after the caller's feature map; the scale and the
``qk_l2norm`` of the delta rules are fused. They run on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
"""
from .chunkwise import NORMALIZE_EPS, chunk
from .recurrent import fused_recurrent

__all__ = ["chunk", "fused_recurrent", "NORMALIZE_EPS"]
