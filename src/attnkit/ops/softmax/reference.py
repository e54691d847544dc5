"""The reference backend of the softmax family: one of the three plain-PyTorch forms on float32 / float64."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ...core.record import record_backend
from ...core.validation import compute_dtype
from .call import Call
from .naive import materialized
from .recurrent import recurrent
from .streaming import streaming


def run_reference(q: Tensor, k: Tensor, v: Tensor, mask, score_mod, normalizer, scale: float, form: str,
                  return_lse: bool, return_weights: bool, layout: str, call_cls=Call,
                  positions: Optional[Tuple[Optional[int], int]] = None, **form_kw):
    """``form`` ("materialized" | "streaming" | "recurrent") on ``[B, H, L, D]`` views, computed in float32 (half
    inputs) or float64; returns ``out`` in q's dtype (and layout), plus lse / weights when asked.
    ``call_cls`` builds the :class:`Call` (multi-token attention passes its own); ``positions`` are
    ``(q_offset, kv_offset)``; ``form_kw`` goes to the streaming form (block sizes)."""
    dtype = q.dtype
    cd = compute_dtype(dtype)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    pos = {} if positions is None else dict(q_offset=positions[0], kv_offset=positions[1])
    call = call_cls(qc, kc, vc, mask, score_mod, normalizer, scale, **pos)
    weights = None
    if form == "materialized":
        out, lse, weights = materialized(call, qc, kc, vc)
    elif form == "streaming":
        out, lse = streaming(call, qc, kc, vc, **form_kw)
    else:
        out, lse = recurrent(call, qc, kc, vc)
    record_backend("reference", form)
    out = out.to(dtype)
    if layout == "bthd":
        out = out.transpose(1, 2)
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_weights:
        res += (weights,)
    return res[0] if len(res) == 1 else res
