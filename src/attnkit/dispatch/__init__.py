"""attnkit.dispatch: the public operations and their backend choice — the fused kernels or SDPA where they compute
exactly the requested function, else the reference forms of :mod:`attnkit.ops` — with a record of what ran."""
from .softmax import attention, varlen_attention
from .differential import differential_attention
from .linear import linear_attention, linear_step

__all__ = ["attention", "varlen_attention", "differential_attention", "linear_attention", "linear_step"]
