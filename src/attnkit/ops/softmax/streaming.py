"""The streaming form: query blocks × non-empty key blocks with online softmax (Rabe & Staats, "Self-attention
does not need O(n²) memory"); a custom backward recomputes each block, so memory is O(block_q · block_k) beyond
inputs and outputs, in forward and backward. First-order gradients only: a backward that builds a graph
(``create_graph=True``) raises, since its recomputed blocks are not differentiable again.

Non-finite values follow :mod:`attnkit.ops.softmax.call`: with finite inputs the blocks are the plain products
(FULL tiles are visible everywhere, so nothing can leak there); a non-finite q, k, v (checked once per call) or
dO (once per backward) sends the PARTIAL tiles' products through ``sum_visible`` / ``at_visible``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...core.masks import EMPTY, FULL
from ..utils.tiles import reference_tiles
from .call import Call, _zero


class _Plan:
    """Which key blocks each query block visits, and which need no element mask."""

    def __init__(self, call: Call, block_q: int, block_k: int):
        g = call.geom
        bm = call.mask.block_map(call.B, call.Hq, call.Lq, call.Lk, block_q, block_k, device=call.device,
                                 q_offset=g.q_off, kv_offset=g.kv_off)
        st = bm.state
        self.block_q, self.block_k = block_q, block_k
        self.visit = (st != EMPTY).any(0).any(0).cpu()  # [nq, nk]
        self.full = (st == FULL).all(0).all(0).cpu()

    def rows(self, Lq: int):
        for i in range(self.visit.shape[0]):
            yield i, i * self.block_q, min((i + 1) * self.block_q, Lq)

    def cols(self, i: int, Lk: int):
        for j in self.visit[i].nonzero().flatten().tolist():
            yield j, j * self.block_k, min((j + 1) * self.block_k, Lk), bool(self.full[i, j])


def _stream_forward(call: Call, plan: _Plan, q, k, v):
    norm = call.normalizer
    soft = norm.family == "softmax"
    B, Hq, Lq, Lk, Dv = call.B, call.Hq, call.Lq, call.Lk, call.Dv
    out = q.new_empty(B, Hq, Lq, Dv)
    lse = q.new_empty(B, Hq, Lq) if soft else None
    o_soft = q.new_empty(B, Hq, Lq, Dv) if soft and norm.gamma > 0 else None
    sink = norm.sink_logits(Hq, q) if soft else None
    for i, r0, r1 in plan.rows(Lq):
        lr = r1 - r0
        acc = q.new_zeros(B, Hq, lr, Dv)
        acc_u = q.new_zeros(B, Hq, lr, Dv) if o_soft is not None else None
        if soft:
            m = (sink.expand(B, Hq, lr, 1).clone() if sink is not None else q.new_full((B, Hq, lr, 1), -math.inf))
            l = q.new_full((B, Hq, lr, 1), 1.0 if sink is not None else 0.0)  # noqa: E741
        for j, c0, c1, is_full in plan.cols(i, Lk):
            qa, ka, kb = call.halo(r0, r1, c0, c1, Lk)
            s = call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, c0, c1, qa, ka)
            mb = None if is_full else call.mask_block(r0, r1, c0, c1)
            vx = v[:, :, c0:c1]
            vis = None if call.finite_v else mb  # non-finite values: products over visible keys only
            if soft:
                if mb is not None:
                    s = s.masked_fill(~mb, -math.inf)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                m_use = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                p = torch.exp(s - m_use)
                alpha = torch.exp(m - m_use)
                l = l * alpha + p.sum(-1, keepdim=True)  # noqa: E741
                acc = acc * alpha + call.pv(p, vx, vis)
                m = m_new
                if acc_u is not None:
                    u = torch.ones_like(s) if mb is None else mb.to(s.dtype).expand_as(s)
                    acc_u += call.pv(u.contiguous(), vx, vis)
            else:
                w = norm.f(s, Lk)
                if mb is not None:
                    w = torch.where(mb, w, _zero(w))
                acc += call.pv(w, vx, vis)
        if soft:
            m_use = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            o = acc / torch.where(l > 0, l, torch.ones_like(l))
            lse_r = torch.log(l) + m_use
            # weights undefined (a visible NaN / +inf score, a non-finite sink logit): the whole row is NaN
            undefined = ~torch.isfinite(l) if sink is None else ~torch.isfinite(l) | ~torch.isfinite(sink)
            o = torch.where(undefined, math.nan, o)
            lse[:, :, r0:r1] = torch.where(undefined, math.nan, lse_r).squeeze(-1)
            if o_soft is not None:
                o_soft[:, :, r0:r1] = o
                n = call.counts[:, :, r0:r1, None].clamp(min=1)
                o = (1 - norm.gamma) * o + norm.gamma * acc_u / n
        else:
            o = acc
            if norm.divide_by_count:
                o = o / call.counts[:, :, r0:r1, None].clamp(min=1)
        out[:, :, r0:r1] = torch.where(torch.isinf(o), math.nan, o)  # never ±inf: NaN where non-finite
    return out, lse, o_soft


def _stream_backward(call: Call, plan: _Plan, q, k, v, out, lse, o_soft, dout, dlse, params):
    norm = call.normalizer
    soft = norm.family == "softmax"
    gamma = norm.gamma if soft else 0.0
    Lq, Lk = call.Lq, call.Lk
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dparams = [torch.zeros_like(p, dtype=call.cdtype) for p in params]
    sink_t = call.sink_param()
    dsink = torch.zeros(call.B, call.Hq, device=q.device, dtype=call.cdtype) if sink_t is not None else None
    finite_do = bool(torch.isfinite(dout).all())
    for i, r0, r1 in plan.rows(Lq):
        do = dout[:, :, r0:r1]
        if soft:
            dos = do * (1 - gamma)
            o_r = (o_soft if o_soft is not None else out)[:, :, r0:r1]
            # Σ dO·O; 0 for a row whose output is exactly zero (no visible key), whatever its dO (as the kernels)
            D = torch.where((o_r == 0).all(-1, keepdim=True), 0.0, (dos * o_r).sum(-1, keepdim=True))
            lse_r = lse[:, :, r0:r1, None]
            # rows without a visible key (-inf) use 0; NaN (undefined weights) stays, so their p is NaN where visible
            lse_use = torch.where(torch.isneginf(lse_r), torch.zeros_like(lse_r), lse_r)
            dl = dlse[:, :, r0:r1, None] if dlse is not None else 0.0
            if dsink is not None:
                p_sink = torch.where(torch.isfinite(lse_r), torch.exp(norm.sink_logits(call.Hq, q) - lse_use), 0.0)
                dsink += (p_sink * (dl - D)).sum((-1, -2))
        n = call.counts[:, :, r0:r1, None].clamp(min=1) if call.counts is not None else None
        for j, c0, c1, is_full in plan.cols(i, Lk):
            qa, ka, kb = call.halo(r0, r1, c0, c1, Lk)
            vx = v[:, :, c0:c1]
            with torch.enable_grad():
                qx = q[:, :, qa:r1].detach().requires_grad_()
                kx = k[:, :, ka:kb].detach().requires_grad_()
                s = call.scores(qx, kx, r0, r1, c0, c1, qa, ka)
                mb = None if is_full else call.mask_block(r0, r1, c0, c1)
                if soft:
                    if mb is not None:
                        s = s.masked_fill(~mb, -math.inf)
                    p = torch.exp(s - lse_use)
                    if mb is not None:  # exactly 0 where hidden, also in a row whose lse is NaN
                        p = torch.where(mb, p, _zero(p))
                    g = call.dp(dos, vx) - D + dl
                    pv_w = p.detach() * (1 - gamma)
                    if gamma > 0:
                        u = torch.ones_like(s) if mb is None else mb.to(s.dtype).expand_as(s)
                        pv_w = pv_w + gamma * u / n
                else:
                    p = norm.f(s, Lk)
                    if mb is not None:
                        p = torch.where(mb, p, _zero(p))
                    if norm.divide_by_count:
                        p = p / n
                    g = call.dp(do, vx)
                    pv_w = p.detach()
                grads = torch.autograd.grad(p, [qx, kx] + params, g, allow_unused=True)
            dv[:, :, c0:c1] += call.ptv(pv_w.contiguous(), do, None if finite_do or mb is None else mb)
            if grads[0] is not None:
                dq[:, :, qa:r1] += grads[0]
            if grads[1] is not None:
                dk[:, :, ka:kb] += grads[1]
            for acc, gp in zip(dparams, grads[2:]):
                if gp is not None:
                    acc += gp
    if dsink is not None:
        dsink = dsink.sum(0) if sink_t.dim() == 1 else dsink.sum()
    return dq, dk, dv, dparams, dsink


class _StreamingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, plan, q, k, v, *params):
        out, lse, o_soft = _stream_forward(call, plan, q, k, v)
        ctx.call, ctx.plan, ctx.n_params = call, plan, len(params)
        ctx.save_for_backward(q, k, v, out, lse, o_soft, *params)
        if lse is None:
            lse = q.new_zeros(0)
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # create_graph=True: the recomputed blocks below would not be differentiable
            raise NotImplementedError(
                "double backward (create_graph=True, e.g. a gradient penalty) is not supported by "
                "form='streaming' (also what form='auto' picks for large problems); use form='materialized' or "
                "form='recurrent', which support higher-order gradients")
        q, k, v, out, lse, o_soft, *tensors = ctx.saved_tensors
        call = ctx.call
        sink_t = call.sink_param()
        params = [t for t in tensors if t is not sink_t]
        if dlse is not None and dlse.numel() == 0:
            dlse = None
        dq, dk, dv, dparams, dsink = _stream_backward(call, ctx.plan, q, k, v, out, lse, o_soft,
                                                      dout.contiguous(), dlse, params)
        grads, it = [], iter(dparams)
        for t in tensors:
            g = dsink if t is sink_t else next(it)
            grads.append(None if g is None else g.to(device=t.device, dtype=t.dtype))
        return (None, None, dq, dk, dv, *grads)


def _check_declared_params(call: Call, q: Tensor, k: Tensor) -> None:
    """The custom backward differentiates only declared tensors: refuse undeclared learnable ones."""
    if not torch.is_grad_enabled():
        return
    with torch.enable_grad():
        s = call.scores(q[:, :, :1].detach(), k[:, :, :1].detach(), 0, 1, 0, 1, 0, 0)
    declared = call.params()
    ids = {id(t) for t in declared}
    stop = {t.grad_fn for t in declared if t.grad_fn is not None}
    stack, seen = [s.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn in stop:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in ids:
            raise ValueError("a score mod uses a tensor that requires grad but is not declared; pass learnable "
                             "tensors of a pointwise mod as pointwise(fn, params=[...]) so every form can "
                             f"differentiate them (undeclared tensor of shape {tuple(var.shape)})")
        stack.extend(f for f, _ in fn.next_functions)


def streaming(call: Call, q: Tensor, k: Tensor, v: Tensor, block_q: Optional[int] = None,
              block_k: Optional[int] = None):
    """Online-softmax form over (block_q x block_k) tiles, skipping empty tiles of the mask.

    Returns ``(out, lse or None)``; memory O(B·H·block_q·block_k) in forward and backward.
    """
    tiles = reference_tiles()
    block_q = tiles[0] if block_q is None else block_q
    block_k = tiles[1] if block_k is None else block_k
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_q}, {block_k}")
    plan = _Plan(call, block_q, block_k)
    _check_declared_params(call, q, k)
    call.inspect(q, k, v)
    tensors = call.params()
    sink_t = call.sink_param()
    if sink_t is not None:
        tensors = tensors + [sink_t]
    out, lse = _StreamingFn.apply(call, plan, q, k, v, *tensors)
    return out, (lse if call.normalizer.family == "softmax" else None)
