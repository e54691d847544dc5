"""The materialized form: the whole ``[B, Hq, Lq, Lk]`` score matrix at once (slow, exact, returns the weights;
the float64 ground truth of every other form and kernel)."""
from __future__ import annotations

from torch import Tensor

from .call import Call, dense_weights


def materialized(call: Call, q: Tensor, k: Tensor, v: Tensor):
    """The whole score matrix at once. Returns ``(out, lse or None, weights [B, Hq, Lq, Lk])``."""
    return _dense_rows(call, q, k, v, 0, call.Lq, call.Lk)


def _dense_rows(call: Call, q, k, v, r0: int, r1: int, k_end: int):
    qa, ka, kb = call.halo(r0, r1, 0, k_end, k_end)
    s = call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, 0, k_end, qa, ka)
    p, lse = dense_weights(call, s, call.mask_block(r0, r1, 0, k_end), r0, r1)
    return call.pv(p, v[:, :, :k_end]), lse, p
