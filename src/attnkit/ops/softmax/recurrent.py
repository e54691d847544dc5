"""The recurrent form: token by token over a growing KV cache (the decoding path; masks must not look ahead)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.masks import Geometry, Mask, causal
from .call import Call, poison_rows
from .naive import _dense_rows


def check_no_lookahead(mask: Mask, g: Geometry, device) -> None:
    """ValueError unless every visible key is at or before its query (needed for decoding)."""
    bm = (mask & ~causal).block_map(g.B, g.H, g.Lq, g.Lk, 256, 256, device=device, q_offset=g.q_off,
                                    kv_offset=g.kv_off)
    if bm.num_empty != bm.state.numel():
        raise ValueError(f"the recurrent form needs a mask without look-ahead (every visible key at or before "
                         f"its query, e.g. causal, sliding_window(left, 0), chunked(1), prefix-free); got {mask!r}. "
                         "Use form='materialized' or 'streaming' for this mask")


def _empty_lse(call: Call, q: Tensor) -> Tensor:
    """lse of one query row with no visible key: the sink logit where there is one (NaN where it is not finite:
    the row's weights are undefined), else -inf."""
    norm = call.normalizer
    sink = norm.sink_logits(call.Hq, q) if norm.family == "softmax" else None
    if sink is None:
        return q.new_full((call.B, call.Hq, 1), -math.inf)
    sink = torch.where(torch.isfinite(sink), sink, math.nan)
    return sink.expand(call.B, call.Hq, 1, 1).reshape(call.B, call.Hq, 1)


def _connected_zeros(q: Tensor, k: Tensor, v: Tensor, shape) -> Tensor:
    """Exact zeros of ``shape`` that stay in the autograd graph of q, k, v (zero gradients, never NaN: a select,
    not a product), so an output whose rows all see no key can still be backpropagated."""
    off = torch.zeros((), dtype=torch.bool, device=q.device)
    z = sum(torch.where(off, t.reshape(-1)[:1], 0).sum() for t in (q, k, v))
    return q.new_zeros(shape) + z


def recurrent(call: Call, q: Tensor, k: Tensor, v: Tensor):
    """Token by token: query row i (position p = i + Lk − Lq) attends over a cache of keys [0, p].

    Returns ``(out, lse or None)``. Memory O(Lk) per step; this is the decoding path.
    """
    check_no_lookahead(call.mask, call.geom, call.device)
    call.inspect(q, k, v)
    off = call.geom.offset  # key j is at or before row i iff j <= i + off
    outs, lses = [], []
    for i in range(call.Lq):
        n_keys = min(max(i + off + 1, 0), call.Lk)
        if n_keys == 0:  # an empty cache: zeros (NaN with a non-finite sink), and lse = log(exp(sink)) or -inf
            lse = _empty_lse(call, q)
            outs.append(poison_rows(_connected_zeros(q, k, v, (call.B, call.Hq, 1, call.Dv)), lse))
            lses.append(lse)
            continue
        o, lse, _ = _dense_rows(call, q, k, v, i, i + 1, n_keys)
        outs.append(o)
        lses.append(lse)
    lse = torch.cat(lses, -1) if call.normalizer.family == "softmax" else None
    return torch.cat(outs, 2), lse
