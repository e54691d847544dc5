"""Softmax-family attention in plain PyTorch: the three forms of one function.

    s_ij = score_mod(scale · q_i·k_j, b, h, i, j)        (positions aligned to the end, see masks)
    p_ij = normalizer(s_i·)_j  over keys with mask(b, h, i, j)
    o_i  = Σ_j p_ij v_j

Forms (identical results, tested against each other):

* :func:`materialized` — the full ``[B, H, Lq, Lk]`` score matrix; can return the weights.
* :func:`streaming` — query blocks × non-empty key blocks with online softmax (Rabe & Staats,
  "Self-attention does not need O(n²) memory"); a custom backward recomputes each block, so
  memory is O(block_q · block_k) beyond inputs and outputs, in forward and backward.
* :func:`recurrent` — token by token over a growing KV cache (masks must not look ahead).

Shapes: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]``; query head ``h`` reads
key/value head ``h // (Hq // Hkv)`` without copying K/V. Half-precision inputs are computed in
float32; float64 stays float64.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, Geometry, Mask, causal, index_grid
from ..normalizers import Normalizer, Softmax
from ..scores import Idx, ScoreMod


class Call:
    """One attention problem after validation: sizes, pieces and the shared per-row counts.

    Subclasses change how a block of scores is computed (multi-token attention convolves the
    score map, reading ``halo_q`` earlier query rows and ``halo_k`` neighbouring key columns).
    """

    halo_q: int = 0
    halo_k: Tuple[int, int] = (0, 0)

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, score_mod: Optional[ScoreMod],
                 normalizer: Normalizer, scale: float, q_offset: Optional[int] = None, kv_offset: int = 0):
        self.B, self.Hq, self.Lq, self.D = q.shape
        self.Hkv, self.Lk, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.mask, self.score_mod, self.normalizer, self.scale = mask, score_mod, normalizer, scale
        self.geom = Geometry(self.B, self.Hq, self.Lq, self.Lk, q_offset, kv_offset)
        self.device = q.device
        self.cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask.validate(self.geom)
        if score_mod is not None:
            score_mod.validate(self.Hq)
        normalizer.validate(self.Hq)
        need = (score_mod is not None and score_mod.needs_counts) or normalizer.needs_counts
        self.counts = (mask.row_counts(self.B, self.Hq, self.Lq, self.Lk, device=self.device, q_offset=q_offset,
                                       kv_offset=kv_offset).to(self.cdtype) if need else None)

    # -- pieces of a block ------------------------------------------------------------------
    def idx(self, r0: int, r1: int, c0: int, c1: int) -> Idx:
        dev = self.device
        b, h, q, kv = index_grid(self.geom, dev, torch.arange(r0, r1, device=dev), torch.arange(c0, c1, device=dev))
        n = None if self.counts is None else self.counts[:, :, r0:r1, None]
        return Idx(b, h, q, kv, n, self.Lq, self.Lk, self.Hq, q0=self.geom.q0, k0=self.geom.k0)

    def mask_block(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        dev = self.device
        return self.mask.dense(self.geom, dev, torch.arange(r0, r1, device=dev), torch.arange(c0, c1, device=dev))

    def dot(self, qx: Tensor, kx: Tensor) -> Tensor:
        """scale · q kᵀ for q rows ``[B, Hq, lr, D]`` and keys ``[B, Hkv, lc, D]`` -> ``[B, Hq, lr, lc]``."""
        B, lr, lc = qx.shape[0], qx.shape[2], kx.shape[2]
        s = qx.reshape(B, self.Hkv, self.G * lr, -1) @ kx.transpose(-1, -2)
        return (s * self.scale).view(B, self.Hq, lr, lc)

    def scores(self, qx: Tensor, kx: Tensor, r0: int, r1: int, c0: int, c1: int, qa: int, ka: int) -> Tensor:
        """Scores of rows [r0, r1) x columns [c0, c1); ``qx`` holds rows from ``qa``, ``kx`` keys from ``ka``."""
        s = self.dot(qx, kx)
        if self.score_mod is not None:
            s = self.score_mod(s, self.idx(r0, r1, c0, c1))
        return s

    def halo(self, r0: int, r1: int, c0: int, c1: int, k_end: int):
        """Row / column ranges a block reads: ``(qa, ka, kb)``."""
        return max(0, r0 - self.halo_q), max(0, c0 - self.halo_k[0]), min(k_end, c1 + self.halo_k[1])

    # -- products with V, grouped heads without copying K/V -------------------------------------
    def pv(self, p: Tensor, vx: Tensor) -> Tensor:
        B, _, lr, lc = p.shape
        return (p.reshape(B, self.Hkv, self.G * lr, lc) @ vx).view(B, self.Hq, lr, -1)

    def dp(self, do: Tensor, vx: Tensor) -> Tensor:
        """dO vᵀ: ``[B, Hq, lr, Dv] x [B, Hkv, lc, Dv] -> [B, Hq, lr, lc]``."""
        B, _, lr, _ = do.shape
        return (do.reshape(B, self.Hkv, self.G * lr, -1) @ vx.transpose(-1, -2)).view(B, self.Hq, lr, -1)

    def ptv(self, p: Tensor, do: Tensor) -> Tensor:
        """pᵀ dO summed over the query heads of each KV head -> ``[B, Hkv, lc, Dv]``."""
        B, _, lr, lc = p.shape
        return p.reshape(B, self.Hkv, self.G * lr, lc).transpose(-1, -2) @ do.reshape(B, self.Hkv, self.G * lr, -1)

    def params(self) -> List[Tensor]:
        """Learnable tensors of the score mod and normalizer (excluding the sink logit)."""
        out = []
        for mod in (self.score_mod, self.normalizer):
            if mod is not None:
                out += [t for t in _tensors(mod) if t.requires_grad and t is not self.sink_param()]
        return out

    def sink_param(self) -> Optional[Tensor]:
        n = self.normalizer
        if isinstance(n, Softmax) and isinstance(n.sink, Tensor) and n.sink.requires_grad:
            return n.sink
        return None


def _tensors(module) -> List[Tensor]:
    """Tensor attributes of a module tree (parameters and plain tensors alike), deduplicated."""
    seen, out = set(), []
    for m in module.modules():
        for t in list(m._parameters.values()) + [x for x in vars(m).values() if isinstance(x, Tensor)]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Weights of a dense block (materialized and recurrent forms)
# ---------------------------------------------------------------------------------------------

def dense_weights(call: Call, s: Tensor, m: Tensor, r0: int, r1: int):
    """Normalized weights ``p`` (0 where masked) and lse (softmax family) of a block holding whole rows."""
    norm = call.normalizer
    if norm.family == "softmax":
        sink = norm.sink_logits(call.Hq, s)
        sm = s.masked_fill(~m, -math.inf)
        mx = sm.amax(-1, keepdim=True).detach()
        if sink is not None:
            mx = torch.maximum(mx, sink.detach().expand_as(mx))
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = torch.exp(sm - mx)
        denom = e.sum(-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink - mx)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        lse = (torch.log(denom) + mx).squeeze(-1)
        if norm.gamma > 0:
            n = call.counts[:, :, r0:r1, None]
            p = (1 - norm.gamma) * p + norm.gamma * m.to(p.dtype) / n.clamp(min=1)
        return p, lse
    w = torch.where(m, norm.f(s, call.Lk), torch.zeros((), dtype=s.dtype, device=s.device))
    if norm.divide_by_count:
        w = w / call.counts[:, :, r0:r1, None].clamp(min=1)
    return w, None


def materialized(call: Call, q: Tensor, k: Tensor, v: Tensor):
    """The whole score matrix at once. Returns ``(out, lse or None, weights [B, Hq, Lq, Lk])``."""
    return _dense_rows(call, q, k, v, 0, call.Lq, call.Lk)


def _dense_rows(call: Call, q, k, v, r0: int, r1: int, k_end: int):
    qa, ka, kb = call.halo(r0, r1, 0, k_end, k_end)
    s = call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, 0, k_end, qa, ka)
    p, lse = dense_weights(call, s, call.mask_block(r0, r1, 0, k_end), r0, r1)
    return call.pv(p, v[:, :, :k_end]), lse, p


# ---------------------------------------------------------------------------------------------
# Recurrent form
# ---------------------------------------------------------------------------------------------

def check_no_lookahead(mask: Mask, g: Geometry, device) -> None:
    """ValueError unless every visible key is at or before its query (needed for decoding)."""
    bm = (mask & ~causal).block_map(g.B, g.H, g.Lq, g.Lk, 256, 256, device=device, q_offset=g.q_off,
                                    kv_offset=g.kv_off)
    if bm.num_empty != bm.state.numel():
        raise ValueError(f"the recurrent form needs a mask without look-ahead (every visible key at or before "
                         f"its query, e.g. causal, sliding_window(left, 0), chunked(1), prefix-free); got {mask!r}. "
                         "Use form='materialized' or 'streaming' for this mask")


def _empty_lse(call: Call, q: Tensor) -> Tensor:
    """lse of one query row with no visible key: the sink logit where there is one, else -inf."""
    norm = call.normalizer
    sink = norm.sink_logits(call.Hq, q) if norm.family == "softmax" else None
    if sink is None:
        return q.new_full((call.B, call.Hq, 1), -math.inf)
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
    off = call.geom.offset  # key j is at or before row i iff j <= i + off
    outs, lses = [], []
    for i in range(call.Lq):
        n_keys = min(max(i + off + 1, 0), call.Lk)
        if n_keys == 0:  # an empty cache: zeros, and lse = log(exp(sink)) or -inf
            outs.append(_connected_zeros(q, k, v, (call.B, call.Hq, 1, call.Dv)))
            lses.append(_empty_lse(call, q))
            continue
        o, lse, _ = _dense_rows(call, q, k, v, i, i + 1, n_keys)
        outs.append(o)
        lses.append(lse)
    lse = torch.cat(lses, -1) if call.normalizer.family == "softmax" else None
    return torch.cat(outs, 2), lse


# ---------------------------------------------------------------------------------------------
# Streaming form
# ---------------------------------------------------------------------------------------------

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


def _zero(s):
    return torch.zeros((), dtype=s.dtype, device=s.device)


def _stream_forward(call: Call, plan: _Plan, q, k, v):
    norm = call.normalizer
    soft = norm.family == "softmax"
    B, Hq, Lq, Lk, Dv = call.B, call.Hq, call.Lq, call.Lk, call.Dv
    out = q.new_empty(B, Hq, Lq, Dv)
    lse = q.new_empty(B, Hq, Lq) if soft else None
    o_soft = q.new_empty(B, Hq, Lq, Dv) if soft and norm.gamma > 0 else None
    for i, r0, r1 in plan.rows(Lq):
        lr = r1 - r0
        acc = q.new_zeros(B, Hq, lr, Dv)
        acc_u = q.new_zeros(B, Hq, lr, Dv) if o_soft is not None else None
        if soft:
            sink = norm.sink_logits(Hq, q)
            m = (sink.expand(B, Hq, lr, 1).clone() if sink is not None else q.new_full((B, Hq, lr, 1), -math.inf))
            l = q.new_full((B, Hq, lr, 1), 1.0 if sink is not None else 0.0)  # noqa: E741
        for j, c0, c1, is_full in plan.cols(i, Lk):
            qa, ka, kb = call.halo(r0, r1, c0, c1, Lk)
            s = call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, c0, c1, qa, ka)
            mb = None if is_full else call.mask_block(r0, r1, c0, c1)
            vx = v[:, :, c0:c1]
            if soft:
                if mb is not None:
                    s = s.masked_fill(~mb, -math.inf)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                m_use = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                p = torch.exp(s - m_use)
                alpha = torch.exp(m - m_use)
                l = l * alpha + p.sum(-1, keepdim=True)  # noqa: E741
                acc = acc * alpha + call.pv(p, vx)
                m = m_new
                if acc_u is not None:
                    u = torch.ones_like(s) if mb is None else mb.to(s.dtype).expand_as(s)
                    acc_u += call.pv(u.contiguous(), vx)
            else:
                w = norm.f(s, Lk)
                if mb is not None:
                    w = torch.where(mb, w, _zero(w))
                acc += call.pv(w, vx)
        if soft:
            m_use = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            o = acc / torch.where(l > 0, l, torch.ones_like(l))
            lse[:, :, r0:r1] = (torch.log(l) + m_use).squeeze(-1)
            if o_soft is not None:
                o_soft[:, :, r0:r1] = o
                n = call.counts[:, :, r0:r1, None].clamp(min=1)
                o = (1 - norm.gamma) * o + norm.gamma * acc_u / n
        else:
            o = acc
            if norm.divide_by_count:
                o = o / call.counts[:, :, r0:r1, None].clamp(min=1)
        out[:, :, r0:r1] = o
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
    for i, r0, r1 in plan.rows(Lq):
        do = dout[:, :, r0:r1]
        if soft:
            dos = do * (1 - gamma)
            D = (dos * (o_soft if o_soft is not None else out)[:, :, r0:r1]).sum(-1, keepdim=True)
            lse_r = lse[:, :, r0:r1, None]
            lse_use = torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r))
            dl = dlse[:, :, r0:r1, None] if dlse is not None else 0.0
            if dsink is not None:
                p_sink = torch.exp(norm.sink_logits(call.Hq, q) - lse_use) * torch.isfinite(lse_r)
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
            dv[:, :, c0:c1] += call.ptv(pv_w.contiguous(), do)
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


#: default tile of the streaming form (query rows, key columns); see :func:`streaming_blocks`
STREAMING_BLOCKS = [512, 512]


@contextlib.contextmanager
def streaming_blocks(block_q: int, block_k: int):
    """Temporarily change the streaming form's default tile (e.g. small odd tiles in checks)."""
    old = list(STREAMING_BLOCKS)
    STREAMING_BLOCKS[:] = [block_q, block_k]
    try:
        yield
    finally:
        STREAMING_BLOCKS[:] = old


def streaming(call: Call, q: Tensor, k: Tensor, v: Tensor, block_q: Optional[int] = None,
              block_k: Optional[int] = None):
    """Online-softmax form over (block_q x block_k) tiles, skipping empty tiles of the mask.

    Returns ``(out, lse or None)``; memory O(B·H·block_q·block_k) in forward and backward.
    """
    block_q = STREAMING_BLOCKS[0] if block_q is None else block_q
    block_k = STREAMING_BLOCKS[1] if block_k is None else block_k
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_q}, {block_k}")
    plan = _Plan(call, block_q, block_k)
    _check_declared_params(call, q, k)
    tensors = call.params()
    sink_t = call.sink_param()
    if sink_t is not None:
        tensors = tensors + [sink_t]
    out, lse = _StreamingFn.apply(call, plan, q, k, v, *tensors)
    return out, (lse if call.normalizer.family == "softmax" else None)
