"""2-simplicial attention (Clift et al. 2019; Roy et al. 2025, "Fast and Simplex: 2-Simplicial Attention
in Triton"): trilinear scores over pairs of keys from two key sets, each within its own window.

    A_ijk = scale · Σ_d q_id · k1_jd · k2_kd          over (j, k) with mask1(i, j) & mask2(i, k)
    P_ijk = softmax_(j,k)(A_i··)                      (jointly over the visible key pairs)
    o_i   = Σ_jk P_ijk · (v1_j ∘ v2_k)

Masks are any :mod:`attnkit.masks` masks (end-aligned for Lq != Lk); the defaults are causal
sliding windows of :data:`WINDOW1` and :data:`WINDOW2` keys (the diagonal included). Cost
O(B·H·L·w1·w2·D) with windows w1, w2 (every visible (query, j, k) triple once).

Forms: ``materialized`` builds ``[B, H, Lq, Lk1, Lk2]`` (small problems only); ``streaming`` loops
over query blocks and the (j-block, k-block) pairs that are non-empty in both masks' block maps with
an online softmax, and a custom backward recomputes each tile from the saved output and log-sum-exp
(memory O(B·H·block_q·block_k1·block_k2) beyond inputs and outputs, never O(Lq·Lk)); ``recurrent``
goes token by token, gathering only the cached keys its masks let through (O(w1·w2·D) per token).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...core import masks as M
from ...core.masks import EMPTY, FULL, Geometry, MaskLike
from ...core.record import record_backend
from ...core.validation import AUTO_DENSE_LIMIT, FORMS, check_qkv, resolve_scale
from .. import softmax as _sm

__all__ = ["simplicial_attention", "WINDOW1", "WINDOW2"]

#: default windows: keys j in (i − WINDOW1, i], keys k in (i − WINDOW2, i]
WINDOW1, WINDOW2 = 32, 8


class _Problem:
    """Validated sizes, masks and the tile computations shared by every form."""

    def __init__(self, q: Tensor, k1: Tensor, k2: Tensor, mask1: M.Mask, mask2: M.Mask, scale: float):
        self.B, self.Hq, self.Lq, self.D = q.shape
        self.Hkv, self.Lk1, self.Lk2 = k1.shape[1], k1.shape[2], k2.shape[2]
        self.G = self.Hq // self.Hkv
        self.mask1, self.mask2, self.scale = mask1, mask2, scale
        self.g1 = Geometry(self.B, self.Hq, self.Lq, self.Lk1)
        self.g2 = Geometry(self.B, self.Hq, self.Lq, self.Lk2)
        self.device = q.device
        mask1.validate(self.g1)
        mask2.validate(self.g2)

    def logits(self, qx: Tensor, k1x: Tensor, k2x: Tensor) -> Tensor:
        """``scale · Σ_d q_id k1_jd k2_kd``: ``[B,Hq,lq,D] x [B,Hkv,l1,D] x [B,Hkv,l2,D] -> [B,Hq,lq,l1,l2]``."""
        B, lq, l1, l2 = qx.shape[0], qx.shape[2], k1x.shape[2], k2x.shape[2]
        x = qx.reshape(B, self.Hkv, self.G * lq, 1, self.D) * k1x.unsqueeze(2)  # [B, Hkv, G·lq, l1, D]
        s = x @ k2x.unsqueeze(2).transpose(-1, -2)
        return (s * self.scale).view(B, self.Hq, lq, l1, l2)

    def combine(self, p: Tensor, v1x: Tensor, v2x: Tensor) -> Tensor:
        """``Σ_jk p_ijk (v1_j ∘ v2_k) = Σ_j v1_j ∘ (Σ_k p_ijk v2_k)`` -> ``[B, Hq, lq, Dv]``."""
        B, _, lq, l1, l2 = p.shape
        y = p.reshape(B, self.Hkv, self.G * lq, l1, l2) @ v2x.unsqueeze(2)  # [B, Hkv, G·lq, l1, Dv]
        return (y * v1x.unsqueeze(2)).sum(-2).view(B, self.Hq, lq, -1)

    def masks(self, rows: Tensor, cols1: Tensor, cols2: Tensor):
        """``mask1`` ``[B',H',lq,l1]`` and ``mask2`` ``[B',H',lq,l2]`` on the given rows / columns."""
        return (self.mask1.dense(self.g1, self.device, rows, cols1),
                self.mask2.dense(self.g2, self.device, rows, cols2))


def _pair_mask(m1: Tensor, m2: Tensor) -> Tensor:
    return m1.unsqueeze(-1) & m2.unsqueeze(-2)


def _dense_weights(s: Tensor, m: Tensor) -> Tensor:
    """Softmax of ``s [..., l1, l2]`` jointly over the visible (j, k); 0 where masked or the row is empty."""
    flat = s.masked_fill(~m, -math.inf).flatten(-2)
    mx = flat.amax(-1, keepdim=True).detach()
    e = torch.exp(flat - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    den = e.sum(-1, keepdim=True)
    return (e / torch.where(den > 0, den, torch.ones_like(den))).view_as(s)


def _materialized(pb: _Problem, q, k1, v1, k2, v2) -> Tensor:
    dev = pb.device
    m1, m2 = pb.masks(torch.arange(pb.Lq, device=dev), torch.arange(pb.Lk1, device=dev),
                      torch.arange(pb.Lk2, device=dev))
    p = _dense_weights(pb.logits(q, k1, k2), _pair_mask(m1, m2))
    return pb.combine(p, v1, v2)


def _recurrent(pb: _Problem, q, k1, v1, k2, v2) -> Tensor:
    """Query row i at position p_s = i + (Lk_s − Lq) sees the cached keys [0, p_s] of each set."""
    _sm.check_no_lookahead(pb.mask1, pb.g1, pb.device)
    _sm.check_no_lookahead(pb.mask2, pb.g2, pb.device)
    dev = pb.device
    outs = []
    for i in range(pb.Lq):
        n1 = min(max(i + pb.g1.offset + 1, 0), pb.Lk1)
        n2 = min(max(i + pb.g2.offset + 1, 0), pb.Lk2)
        row = torch.arange(i, i + 1, device=dev)
        m1, m2 = pb.masks(row, torch.arange(n1, device=dev), torch.arange(n2, device=dev))
        # only the keys some (batch, head) may see: the window of a sliding-window mask
        c1 = m1.flatten(0, 2).any(0).nonzero().flatten()
        c2 = m2.flatten(0, 2).any(0).nonzero().flatten()
        if c1.numel() == 0 or c2.numel() == 0:
            outs.append(q.new_zeros(pb.B, pb.Hq, 1, v1.shape[-1]))
            continue
        s = pb.logits(q[:, :, i:i + 1], k1[:, :, c1], k2[:, :, c2])
        p = _dense_weights(s, _pair_mask(m1[..., c1], m2[..., c2]))
        outs.append(pb.combine(p, v1[:, :, c1], v2[:, :, c2]))
    return torch.cat(outs, 2)


class _Plan:
    """Per query block, the (j-block, k-block) pairs non-empty in both masks' block maps."""

    def __init__(self, pb: _Problem, block_q: int, block_k1: int, block_k2: int):
        self.bq, self.b1, self.b2 = block_q, block_k1, block_k2
        maps = [m.block_map(pb.B, pb.Hq, pb.Lq, L, block_q, b, device=pb.device).state
                for m, L, b in ((pb.mask1, pb.Lk1, block_k1), (pb.mask2, pb.Lk2, block_k2))]
        self.visit = [(st != EMPTY).any(0).any(0).cpu() for st in maps]
        self.full = [(st == FULL).all(0).all(0).cpu() for st in maps]
        self.Lq, self.Lk1, self.Lk2 = pb.Lq, pb.Lk1, pb.Lk2

    def rows(self):
        for i in range(self.visit[0].shape[0]):
            yield i, i * self.bq, min((i + 1) * self.bq, self.Lq)

    def tiles(self, i: int):
        """``(j0, j1, k0, k1, full)`` for each visited pair of query block ``i``."""
        for a in self.visit[0][i].nonzero().flatten().tolist():
            for b in self.visit[1][i].nonzero().flatten().tolist():
                yield (a * self.b1, min((a + 1) * self.b1, self.Lk1), b * self.b2, min((b + 1) * self.b2, self.Lk2),
                       bool(self.full[0][i, a] and self.full[1][i, b]))


def _tile_logits(pb: _Problem, qx, k1x, k2x, r0: int, r1: int, t) -> Tensor:
    """Logits of one tile, ``-inf`` where masked: ``qx`` holds rows [r0, r1), ``k1x`` / ``k2x`` the keys
    ``t[0]:t[1]`` / ``t[2]:t[3]``; ``t[4]`` marks tiles both masks see in full."""
    s = pb.logits(qx, k1x, k2x)
    if t[4]:
        return s
    dev = pb.device
    m1, m2 = pb.masks(torch.arange(r0, r1, device=dev), torch.arange(t[0], t[1], device=dev),
                      torch.arange(t[2], t[3], device=dev))
    return s.masked_fill(~_pair_mask(m1, m2), -math.inf)


def _slices(r0: int, r1: int, t):
    """Index ranges of (q, k1, v1, k2, v2) a tile reads."""
    return [(r0, r1), (t[0], t[1]), (t[0], t[1]), (t[2], t[3]), (t[2], t[3])]


def _stream_forward(pb: _Problem, plan: _Plan, q, k1, v1, k2, v2):
    B, Hq, Dv = pb.B, pb.Hq, v1.shape[-1]
    out = q.new_empty(B, Hq, pb.Lq, Dv)
    lse = q.new_empty(B, Hq, pb.Lq)
    for i, r0, r1 in plan.rows():
        lr = r1 - r0
        m = q.new_full((B, Hq, lr, 1), -math.inf)
        l = q.new_zeros(B, Hq, lr, 1)  # noqa: E741
        acc = q.new_zeros(B, Hq, lr, Dv)
        for t in plan.tiles(i):
            qx, k1x, v1x, k2x, v2x = (x[:, :, a:b] for x, (a, b) in zip((q, k1, v1, k2, v2), _slices(r0, r1, t)))
            s = _tile_logits(pb, qx, k1x, k2x, r0, r1, t)
            m_new = torch.maximum(m, s.flatten(-2).amax(-1, keepdim=True))
            m_use = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - m_use.unsqueeze(-1))
            alpha = torch.exp(m - m_use)
            l = l * alpha + p.flatten(-2).sum(-1, keepdim=True)  # noqa: E741
            acc = acc * alpha + pb.combine(p, v1x, v2x)
            m = m_new
        m_use = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out[:, :, r0:r1] = acc / torch.where(l > 0, l, torch.ones_like(l))
        lse[:, :, r0:r1] = (torch.log(l) + m_use).squeeze(-1)
    return out, lse


def _stream_backward(pb: _Problem, plan: _Plan, q, k1, v1, k2, v2, out, lse, dout):
    """Recompute each tile: ``p = exp(A − lse)``; autograd of ``Σ dO·o_tile − Σ_i D_i Σ_jk p_ijk``
    (``D_i = dO_i·o_i``) gives ``dA = p ∘ (dP − D)`` and the value gradients of the tile."""
    inputs = (q, k1, v1, k2, v2)
    grads = [torch.zeros_like(x) for x in inputs]
    for i, r0, r1 in plan.rows():
        do = dout[:, :, r0:r1]
        Di = (do * out[:, :, r0:r1]).sum(-1, keepdim=True)
        lse_r = lse[:, :, r0:r1, None, None]
        lse_use = torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r))
        for t in plan.tiles(i):
            sl = _slices(r0, r1, t)
            with torch.enable_grad():
                xs = [x[:, :, a:b].detach().requires_grad_() for x, (a, b) in zip(inputs, sl)]
                qx, k1x, v1x, k2x, v2x = xs
                p = torch.exp(_tile_logits(pb, qx, k1x, k2x, r0, r1, t) - lse_use)
                o = pb.combine(p, v1x, v2x)
                sur = (do * o).sum() - (Di * p.flatten(-2).sum(-1, keepdim=True)).sum()
                gs = torch.autograd.grad(sur, xs)
            for acc, g, (a, b) in zip(grads, gs, sl):
                acc[:, :, a:b] += g
    return grads


class _StreamingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pb, plan, q, k1, v1, k2, v2):
        out, lse = _stream_forward(pb, plan, q, k1, v1, k2, v2)
        ctx.pb, ctx.plan = pb, plan
        ctx.save_for_backward(q, k1, v1, k2, v2, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k1, v1, k2, v2, out, lse = ctx.saved_tensors
        return (None, None, *_stream_backward(ctx.pb, ctx.plan, q, k1, v1, k2, v2, out, lse, dout))


def _check_block(name: str, b) -> int:
    if isinstance(b, bool) or not isinstance(b, int):
        raise TypeError(f"{name} must be an int, got {type(b).__name__}")
    if b < 1:
        raise ValueError(f"{name} must be >= 1, got {b}")
    return b


def simplicial_attention(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    mask1: MaskLike = M.sliding_window(WINDOW1 - 1),
    mask2: MaskLike = M.sliding_window(WINDOW2 - 1),
    scale: Optional[float] = None,
    form: str = "auto",
    layout: str = "bhtd",
    block_q: int = 16,
    block_k1: int = 32,
    block_k2: int = 16,
) -> Tensor:
    """2-simplicial attention ``o_i = Σ_jk softmax_jk(scale·Σ_d q_id k1_jd k2_kd) (v1_j ∘ v2_k)``.

    The softmax runs jointly over the key pairs (j, k) with ``mask1(i, j) & mask2(i, k)``.

    Args:
        q: ``[B, Hq, Lq, D]``; k1: ``[B, Hkv, Lk1, D]``; v1: ``[B, Hkv, Lk1, Dv]``; k2: ``[B, Hkv, Lk2, D]``;
            v2: ``[B, Hkv, Lk2, Dv]`` (``layout="bthd"``: ``[B, T, H, ·]``); GQA as in
            :func:`attnkit.attention`.
        mask1, mask2: masks over (query, key of set 1) and (query, key of set 2); default causal
            sliding windows of WINDOW1 = 32 and WINDOW2 = 8 keys. Queries are end-aligned.
        scale: defaults to 1/sqrt(D).
        form: 'materialized' (``[B, Hq, Lq, Lk1, Lk2]`` logits; small problems), 'streaming' (tiles of
            block_q x block_k1 x block_k2 skipping empty block pairs, recomputing backward), 'recurrent'
            (token by token over the visible cached keys; masks without look-ahead) or 'auto'
            (materialized when B·Hq·Lq·Lk1·Lk2 <= 2^22, else streaming).

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout; rows with no visible pair give zeros.
        Cost O(B·Hq·Lq·w1·w2·D) for windows w1, w2.
    """
    q0 = q
    q, k1, v1 = check_qkv(q0, k1, v1, layout)
    _, k2, v2 = check_qkv(q0, k2, v2, layout)
    if k1.shape[1] != k2.shape[1]:
        raise ValueError(f"k1 and k2 must have the same number of heads, got {k1.shape[1]} and {k2.shape[1]}")
    if v1.shape[-1] != v2.shape[-1]:
        raise ValueError(f"v1 and v2 must share the value dim (o = Σ p·(v1 ∘ v2)), "
                         f"got {v1.shape[-1]} and {v2.shape[-1]}")
    mask1, mask2 = M.as_mask(mask1), M.as_mask(mask2)
    scale = resolve_scale(scale, q.shape[-1])
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    blocks = [_check_block(n, b) for n, b in (("block_q", block_q), ("block_k1", block_k1), ("block_k2", block_k2))]
    B, Hq, Lq, _ = q.shape
    if form == "auto":
        form = "materialized" if B * Hq * Lq * k1.shape[2] * k2.shape[2] <= AUTO_DENSE_LIMIT else "streaming"
    dtype = q.dtype
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    xs = [x.to(cd) for x in (q, k1, v1, k2, v2)]
    pb = _Problem(xs[0], xs[1], xs[3], mask1, mask2, scale)
    if form == "materialized":
        out = _materialized(pb, *xs)
    elif form == "streaming":
        out = _StreamingFn.apply(pb, _Plan(pb, *blocks), *xs)
    else:
        out = _recurrent(pb, *xs)
    record_backend("reference", form)
    out = out.to(dtype)
    return out.transpose(1, 2) if layout == "bthd" else out
