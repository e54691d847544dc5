"""Validation shared by every entry point: q/k/v shapes and dtypes, scale, positions, form names, deprecated names."""
from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional, Tuple

import torch
from torch import Tensor

#: forms of the softmax family's reference backend (``auto`` picks one)
FORMS = ("auto", "materialized", "streaming", "recurrent")
BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: problems with at most this many score entries run materialized under form="auto"
AUTO_DENSE_LIMIT = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference forms compute half-precision inputs in float32 and keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def deprecated_name(what: str, name, aliases: Mapping[str, str], stacklevel: int = 3):
    """``aliases[name]`` (an old name's new one) with a DeprecationWarning naming the new name; else ``name``."""
    if isinstance(name, str) and name in aliases:
        new = aliases[name]
        warnings.warn(f"{what} {name!r} is deprecated: it is now called {new!r}", DeprecationWarning,
                      stacklevel=stacklevel)
        return new
    return name


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``, else ValueError naming them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_qkv(q: Tensor, k: Tensor, v: Tensor, layout: str = "bhtd") -> Tuple[Tensor, Tensor, Tensor]:
    """Validate q/k/v and return them in ``[B, H, T, D]`` layout (views, no copies)."""
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "[B, H, T, D]" if layout == "bhtd" else "[B, T, H, D]"
            raise ValueError(f"{name} must be 4-D {want} (layout={layout!r}), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float64/float32/bfloat16/float16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout == "bthd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA/MQA")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must share the head dim, got {D} and {k.shape[3]}")
    if B == 0 or Hq == 0:
        raise ValueError(f"attention needs a batch and heads (B >= 1, H >= 1), got q of shape {tuple(q.shape)}")
    if Lq == 0 or k.shape[2] == 0 or D == 0 or v.shape[3] == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return q, k, v


def resolve_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_positions(q_offset, kv_offset) -> Optional[Tuple[Optional[int], int]]:
    """``(q_offset, kv_offset)`` validated, or None for the default placement."""
    for name, val in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            raise TypeError(f"{name} must be an int{' or None' if name == 'q_offset' else ''}, got {val!r}")
    if kv_offset is None:
        raise TypeError("kv_offset must be an int, got None")
    if q_offset is None and kv_offset == 0:
        return None
    return q_offset, kv_offset
