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

Non-finite values (the same in every form and in the fused kernels). Every sum runs over visible pairs only:
a value that a row cannot see (NaN / ±inf in k or v at a masked key, in q or dO of a row that sees no key)
changes nothing, in the output or in any gradient. A row that sees one:

* its *weights are undefined* when a visible score ``s_ij`` (after the score mods) is NaN or +inf (softmax
  family; −inf is weight 0, as a mask), a visible weight ``f(s_ij)`` is non-finite (elementwise normalizers),
  or the head's sink logit is non-finite: then every output entry of the row is NaN, and so is its lse (a
  non-finite sink logit makes every row of its head NaN, rows without a visible key included);
* otherwise output entry ``(i, d)`` is NaN iff a visible key ``j`` has a non-finite ``v_jd``; every other entry
  (and the lse) equals the computation without the non-finite values, exactly.

Outputs are never ±inf from non-finite inputs: such an entry is NaN. Gradients are the usual formulas with each
sum over visible pairs (dq_i = Σ_j ds_ij k_j, dk_j = Σ_i ds_ij q_i, dv_j = Σ_i p_ij dO_i over pairs with
mask(i, j)), so a non-finite value reaches exactly the gradients a visible pair connects it to: e.g. under a
softmax a row with a NaN output entry has a non-finite dq and gives a non-finite dk to every key it sees (through
Σ dO·O), a row with undefined weights also a non-finite dv; NaN or ±inf there is not specified. One
simplification: in the streaming form and the kernels the sink logit's gradient takes nothing from a row whose
output is exactly zero (e.g. one without a visible key), whatever its dO; the materialized and recurrent forms
apply that to rows without a visible key only.
Products of non-finite operands go through :func:`sum_visible` / :func:`at_visible` (selects, never a
multiplication by a 0/1 mask); inputs that are all finite take the plain path, bit for bit as before.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...core.masks import Geometry, Mask, index_grid
from ...core.normalizers import Normalizer, Softmax
from ...core.scores import Idx, ScoreMod


class Call:
    """One attention problem after validation: sizes, pieces and the shared per-row counts.

    Subclasses change how a block of scores is computed (multi-token attention convolves the
    score map, reading ``halo_q`` earlier query rows and ``halo_k`` neighbouring key columns).
    """

    halo_q: int = 0
    halo_k: Tuple[int, int] = (0, 0)
    #: whether q and k (``finite_qk``) and v (``finite_v``) hold only finite values; set by :meth:`inspect`. A form
    #: takes the exact path for non-finite inputs (products over visible pairs only) where one is False.
    finite_qk: bool = True
    finite_v: bool = True

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

    def inspect(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Record whether the inputs are all finite (one reduction and host sync per tensor). Under
        torch.compile (no host sync, no data-dependent branch) the exact path is taken unconditionally."""
        if torch.compiler.is_compiling():
            self.finite_qk = self.finite_v = False
            return
        self.finite_qk = bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())
        self.finite_v = bool(torch.isfinite(v).all())

    # -- pieces of a block ------------------------------------------------------------------
    def idx(self, r0: int, r1: int, c0: int, c1: int) -> Idx:
        dev = self.device
        b, h, q, kv = index_grid(self.geom, dev, torch.arange(r0, r1, device=dev), torch.arange(c0, c1, device=dev))
        n = None if self.counts is None else self.counts[:, :, r0:r1, None]
        return Idx(b, h, q, kv, n, self.Lq, self.Lk, self.Hq, q0=self.geom.q0, k0=self.geom.k0)

    def mask_block(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        dev = self.device
        return self.mask.dense(self.geom, dev, torch.arange(r0, r1, device=dev), torch.arange(c0, c1, device=dev))

    def grouped(self, vis: Tensor) -> Tensor:
        """A visibility block ``[B', H', lr, lc]`` (B', H' may be 1) as the rows of the grouped products,
        broadcastable to ``[B, Hkv, G·lr, lc]`` (query head ``h = hk·G + g``, row ``g·lr + i``)."""
        if self.G == 1:
            return vis
        Bm, Hm, lr, lc = vis.shape
        if Hm == 1:
            return vis.repeat(1, 1, self.G, 1)
        return vis.reshape(Bm, self.Hkv, self.G * lr, lc)

    def dot(self, qx: Tensor, kx: Tensor, vis: Optional[Tensor] = None) -> Tensor:
        """scale · q kᵀ for q rows ``[B, Hq, lr, D]`` and keys ``[B, Hkv, lc, D]`` -> ``[B, Hq, lr, lc]``;
        with ``vis`` (``[B', H', lr, lc]``) 0 at hidden pairs, whose q / k values reach no gradient."""
        B, lr, lc = qx.shape[0], qx.shape[2], kx.shape[2]
        a, b = qx.reshape(B, self.Hkv, self.G * lr, -1), kx.transpose(-1, -2)
        s = a @ b if vis is None else at_visible(a, b, self.grouped(vis))
        return (s * self.scale).view(B, self.Hq, lr, lc)

    def scores(self, qx: Tensor, kx: Tensor, r0: int, r1: int, c0: int, c1: int, qa: int, ka: int) -> Tensor:
        """Scores of rows [r0, r1) x columns [c0, c1); ``qx`` holds rows from ``qa``, ``kx`` keys from ``ka``.
        With non-finite q or k (:meth:`inspect`) hidden pairs score 0 and pass nothing back to q, k."""
        s = self.dot(qx, kx, None if self.finite_qk else self.mask_block(r0, r1, c0, c1))
        if self.score_mod is not None:
            s = self.score_mod(s, self.idx(r0, r1, c0, c1))
        return s

    def halo(self, r0: int, r1: int, c0: int, c1: int, k_end: int):
        """Row / column ranges a block reads: ``(qa, ka, kb)``."""
        return max(0, r0 - self.halo_q), max(0, c0 - self.halo_k[0]), min(k_end, c1 + self.halo_k[1])

    # -- products with V, grouped heads without copying K/V -------------------------------------
    def pv(self, p: Tensor, vx: Tensor, vis: Optional[Tensor] = None) -> Tensor:
        """p V: ``[B, Hq, lr, lc] x [B, Hkv, lc, Dv] -> [B, Hq, lr, Dv]``; with ``vis`` a sum over visible keys
        only (:func:`sum_visible`: NaN where a visible value is non-finite; dV sums visible rows only)."""
        B, _, lr, lc = p.shape
        a = p.reshape(B, self.Hkv, self.G * lr, lc)
        out = a @ vx if vis is None else sum_visible(a, vx, self.grouped(vis))
        return out.view(B, self.Hq, lr, -1)

    def dp(self, do: Tensor, vx: Tensor) -> Tensor:
        """dO vᵀ: ``[B, Hq, lr, Dv] x [B, Hkv, lc, Dv] -> [B, Hq, lr, lc]``."""
        B, _, lr, _ = do.shape
        return (do.reshape(B, self.Hkv, self.G * lr, -1) @ vx.transpose(-1, -2)).view(B, self.Hq, lr, -1)

    def ptv(self, p: Tensor, do: Tensor, vis: Optional[Tensor] = None) -> Tensor:
        """pᵀ dO summed over the query heads of each KV head -> ``[B, Hkv, lc, Dv]``; with ``vis`` over visible
        rows only (non-finite dO rows reach only the keys they see)."""
        B, _, lr, lc = p.shape
        a = p.reshape(B, self.Hkv, self.G * lr, lc).transpose(-1, -2)
        b = do.reshape(B, self.Hkv, self.G * lr, -1)
        return a @ b if vis is None else sum_visible(a, b, self.grouped(vis).transpose(-1, -2))

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
# Products over visible pairs only: non-finite values at hidden pairs reach nothing, in any order of derivative
# ---------------------------------------------------------------------------------------------

def _sum_visible(a: Tensor, b: Tensor, vis: Tensor) -> Tensor:
    """Values of :func:`sum_visible`."""
    a = torch.where(vis, a, 0)
    bad = ~torch.isfinite(b)
    if not torch.compiler.is_compiling() and not bool(bad.any()):  # compiled: no host sync, the exact path always
        return a @ b
    hit = (vis.to(a.dtype) @ bad.to(a.dtype)) > 0  # a visible pair meets a non-finite b[k, n]
    return torch.where(hit, math.nan, a @ torch.where(bad, 0, b))


class _SumVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, vis):
        ctx.save_for_backward(a, b, vis)
        return _sum_visible(a, b, vis)

    @staticmethod
    def backward(ctx, dc):
        a, b, vis = ctx.saved_tensors
        da = at_visible(dc, b.transpose(-1, -2), vis) if ctx.needs_input_grad[0] else None
        db = sum_visible(a.transpose(-1, -2), dc, vis.transpose(-1, -2)) if ctx.needs_input_grad[1] else None
        return da, db, None


class _AtVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, vis):
        ctx.save_for_backward(a, b, vis)
        return torch.where(vis, a @ b, 0)

    @staticmethod
    def backward(ctx, dc):
        a, b, vis = ctx.saved_tensors
        da = sum_visible(dc, b.transpose(-1, -2), vis) if ctx.needs_input_grad[0] else None
        db = (sum_visible(dc.transpose(-1, -2), a, vis.transpose(-1, -2)).transpose(-1, -2)
              if ctx.needs_input_grad[1] else None)
        return da, db, None


def sum_visible(a: Tensor, b: Tensor, vis: Tensor) -> Tensor:
    """``C[m, n] = Σ_{k: vis[m, k]} a[m, k]·b[k, n]`` (``a [..., M, K]``, ``b [..., K, N]``, ``vis`` bool
    broadcastable to ``a``): entries of ``a`` at hidden pairs are ignored, and ``C[m, n]`` is NaN iff a visible
    ``k`` has a non-finite ``b[k, n]`` (or the sum meets a non-finite visible ``a[m, k]``); a non-finite ``b[k, n]``
    that only hidden pairs read changes nothing. Differentiable to any order with the same rule
    (``da = at_visible(dC, bᵀ, vis)``, ``db = sum_visible(aᵀ, dC, visᵀ)``); selects, no 0/1 multiplications."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SumVisible.apply(a, b, vis)
    return _sum_visible(a, b, vis)


def at_visible(a: Tensor, b: Tensor, vis: Tensor) -> Tensor:
    """``C[m, n] = Σ_k a[m, k]·b[k, n]`` where ``vis[m, n]``, 0 elsewhere: the floating-point product at visible
    pairs (non-finite operands give what IEEE arithmetic gives), and hidden pairs pass no gradient back, so a
    non-finite row of ``a`` or column of ``b`` reaches only the gradients of the pairs that see it."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _AtVisible.apply(a, b, vis)
    return torch.where(vis, a @ b, 0)


class _NaNForInf(torch.autograd.Function):
    """±inf -> NaN (outputs are NaN, never ±inf, where a non-finite value reaches them); gradient passes as is."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(torch.isinf(x), math.nan, x)

    @staticmethod
    def backward(ctx, g):
        return g


def nan_for_inf(x: Tensor) -> Tensor:
    """``x`` with ±inf entries replaced by NaN (the gradient flows through unchanged)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _NaNForInf.apply(x)
    return torch.where(torch.isinf(x), math.nan, x)


# ---------------------------------------------------------------------------------------------
# Weights of a dense block (materialized and recurrent forms)
# ---------------------------------------------------------------------------------------------

def dense_weights(call: Call, s: Tensor, m: Tensor, r0: int, r1: int):
    """Normalized weights ``p`` (0 where masked) and lse (softmax family) of a block holding whole rows.

    Softmax family: a row whose weights are undefined (a visible NaN / +inf score or a non-finite sink logit)
    gets NaN weights at its visible keys and a NaN lse (the caller makes its output NaN: see
    :func:`poison_rows`); the NaN is added to the denominator, so it reaches the gradients too."""
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
        undefined = ~torch.isfinite(denom)  # NaN: a visible NaN score; inf: a visible +inf score
        if sink is not None:
            undefined = undefined | ~torch.isfinite(sink.detach())
        denom = denom + torch.where(undefined, math.nan, 0.0)
        p = torch.where(m, e / torch.where(denom == 0, 1.0, denom), 0.0)
        lse = (torch.log(denom) + mx).squeeze(-1)
        if norm.gamma > 0:
            n = call.counts[:, :, r0:r1, None]
            p = (1 - norm.gamma) * p + norm.gamma * m.to(p.dtype) / n.clamp(min=1)
        return p, lse
    w = torch.where(m, norm.f(s, call.Lk), torch.zeros((), dtype=s.dtype, device=s.device))
    if norm.divide_by_count:
        w = w / call.counts[:, :, r0:r1, None].clamp(min=1)
    return w, None


def poison_rows(out: Tensor, lse: Optional[Tensor]) -> Tensor:
    """``out [B, H, lr, Dv]`` with the rows whose weights are undefined (lse NaN: see :func:`dense_weights`) set
    to NaN, rows without a visible key included; the NaN is added, so gradients flow as before."""
    if lse is None:
        return out
    return out + torch.where(torch.isnan(lse), math.nan, 0.0)[..., None]


def _zero(s):
    return torch.zeros((), dtype=s.dtype, device=s.device)
