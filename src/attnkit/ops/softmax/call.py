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


def _zero(s):
    return torch.zeros((), dtype=s.dtype, device=s.device)
