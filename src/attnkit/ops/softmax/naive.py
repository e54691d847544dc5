"""The materialized form: the whole ``[B, Hq, Lq, Lk]`` score matrix at once (slow, exact, returns the weights;
the float64 ground truth of every other form and kernel)."""
from __future__ import annotations

import torch
from torch import Tensor

from .call import Call, dense_weights, nan_for_inf, poison_rows


def materialized(call: Call, q: Tensor, k: Tensor, v: Tensor):
    """The whole score matrix at once. Returns ``(out, lse or None, weights [B, Hq, Lq, Lk])``.

    Differentiable to any order (plain autograd); non-finite values follow :mod:`attnkit.ops.softmax.call`."""
    call.inspect(q, k, v)
    return _dense_rows(call, q, k, v, 0, call.Lq, call.Lk)


def _dense_rows(call: Call, q, k, v, r0: int, r1: int, k_end: int):
    """Rows [r0, r1) over keys [0, k_end) (``call.inspect`` has run). The product with V sums visible keys only
    where v is non-finite or a gradient may come back (a non-finite dO row then reaches only the keys it sees)."""
    qa, ka, kb = call.halo(r0, r1, 0, k_end, k_end)
    s = call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, 0, k_end, qa, ka)
    m = call.mask_block(r0, r1, 0, k_end)
    p, lse = dense_weights(call, s, m, r0, r1)
    vx = v[:, :, :k_end]
    grad = torch.is_grad_enabled() and (p.requires_grad or vx.requires_grad)
    out = call.pv(p, vx, m if grad or not call.finite_v else None)
    return nan_for_inf(poison_rows(out, lse)), lse, p
