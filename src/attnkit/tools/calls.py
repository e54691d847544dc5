"""Calling a catalog variant and comparing what comes out: shared by ``attnkit bench`` and ``attnkit check``.

:func:`first` is the output of a call that may also return weights or state; :func:`leaves` the tensors a backward
pass differentiates; :func:`rel_err` is ``‖x − ref‖ / ‖ref‖`` in float64 and :data:`TOLERANCE` its bound per dtype.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

__all__ = ["first", "leaves", "rel_err", "TOLERANCE"]

#: relative-error tolerance ‖x − ref‖ / ‖ref‖ by dtype (reference computed at float64)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def first(out):
    """The output tensor of a variant call (the first item when it returns a tuple or list)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def leaves(inputs: Dict[str, Any]) -> List[torch.Tensor]:
    """Floating tensors of an inputs dict and learnable parameters of its modules."""
    out = []
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out.append(v)
        elif isinstance(v, torch.nn.Module):
            out += [p for p in v.parameters() if p.requires_grad]
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (NaN anywhere counts as infinite error)."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)
