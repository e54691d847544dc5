"""Exact row statistics of attention maps in one streaming pass: no ``Lq × Lk`` tensor is ever built.

Row ``i`` of a map has weights ``p_ij`` over its visible keys ``j`` (query at position ``P_i``, key at ``P_j``,
positions as in :mod:`attnkit.masks`). With ``π_ij = |p_ij| / Σ_j |p_ij|`` (the row as a distribution over keys;
``π = p`` for softmax):

=============  =================================================================================================
``mass``       ``Σ_j p_ij``: 1 for softmax rows, ``1 − p_sink`` with a sink logit / off-by-one, anything for
               sigmoid / ReLU / none / linear maps (their weights are not a distribution: mass is their scale)
``entropy``    ``H_i = −Σ_j π_ij log π_ij`` in nats (the shape of the row; ``log n`` = uniform over n keys)
``sink``       ``Σ_{P_j < n_sink} π_ij``: the share of the row's weight on the first ``n_sink`` positions
``window``     ``Σ_{|P_i − P_j| < w} π_ij``: the share on the ``w`` nearest positions (causal: the w latest keys)
``distance``   ``Σ_j π_ij |P_i − P_j|``: mean attention distance
``topk``       the ``k`` keys of largest ``|p_ij|``: ``topk_index`` (−1 past the visible keys), ``topk_weight``
               (``p_ij``, signed; 0 past the visible keys)
=============  =================================================================================================

Rows with no visible key, or whose weights are all 0, have ``valid = False``, ``mass = 0`` and NaN for the
shares, entropy and distance (a mean over nothing). Shares are taken of the weight on *keys*: the probability
a sink logit takes is ``1 − mass``.

The walk (:func:`walk_softmax`) visits the same tiles as the streaming form (``attnkit.ops.softmax.streaming``:
query blocks × the mask's non-empty key blocks) with online softmax: per row a running max ``m``, and every
accumulated sum is rescaled by ``e^{m_old − m_new}`` when it grows; the entropy uses
``H = log z − Σ_j e_j (s_j − m) / z`` with ``e_j = e^{s_j − m}``, ``z = Σ e_j``, exact in one pass. Relaxed
softmax (``(1 − γ) softmax + γ / n``) needs the final log-normalizer inside every weight: it takes two passes
(the first computes the log-sum-exp). Elementwise normalizers (sigmoid, ReLU, ReLU², none) and the implicit
maps of linear rules (:mod:`attnkit.analysis.linear_maps`) give exact weights per tile and use
``H = log Z − Σ_j |p_j| log |p_j| / Z``, ``Z = Σ_j |p_j|``. Memory: O(B·H·block_q·block_k) beyond the inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.masks import MaskLike, as_mask
from ..core.normalizers import Normalizer, as_normalizer
from ..core.scores import ScoreMod, as_score_mod
from ..core.validation import check_positions, check_qkv, compute_dtype, resolve_scale
from ..ops.softmax import Call
from ..ops.softmax.streaming import _Plan

__all__ = ["RowStats", "StatSpec", "attention_stats", "map_stats", "walk_softmax", "RowStatsSink", "BlockSink",
           "head_summary"]

#: default tiles of the statistics walk (query rows, key columns): large tiles amortize Python per tile
DEFAULT_BLOCKS = (256, 1024)


@dataclass(frozen=True)
class StatSpec:
    """Which statistics: ``sink_tokens`` (n of the sink share), ``window`` (w of the window share), ``topk`` (k)."""

    sink_tokens: int = 4
    window: int = 64
    topk: int = 8

    def __post_init__(self):
        for name in ("sink_tokens", "window", "topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "window" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'window' else 0}, got {v!r}")


@dataclass
class RowStats:
    """Per-row statistics ``[B, H, Lq]`` (top-k ``[B, H, Lq, k]``); see the module docstring for definitions."""

    mass: Tensor
    entropy: Tensor
    sink: Tensor
    window: Tensor
    distance: Tensor
    valid: Tensor
    topk_index: Tensor
    topk_weight: Tensor
    spec: StatSpec

    def tensors(self) -> Dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}

    def heads(self) -> Dict[str, Tensor]:
        """Means over valid rows per (batch, head): ``{name: [B, H]}`` (see :func:`head_summary`)."""
        return head_summary(self)


def head_summary(st: RowStats) -> Dict[str, Tensor]:
    """Per-head means over the valid rows of ``mass, entropy, sink, window, distance`` -> ``[B, H]`` each
    (NaN for a head without a valid row), plus ``rows``: the number of valid rows."""
    v = st.valid.to(st.entropy.dtype)
    n = v.sum(-1)
    out = {}
    for name in ("mass", "entropy", "sink", "window", "distance"):
        x = torch.where(st.valid, getattr(st, name), torch.zeros_like(st.entropy))
        out[name] = x.sum(-1) / n  # 0 / 0 = NaN where no row is valid
    out["rows"] = n
    return out


# ---------------------------------------------------------------------------------------------
# Consumers of tiles: row statistics and block sums
# ---------------------------------------------------------------------------------------------

class _Geo:
    """Positions of the rows and columns of tiles: query row i at ``q0 + i``, key j at ``k0 + j``."""

    def __init__(self, q0: int, k0: int, dtype, device):
        self.q0, self.k0, self.dtype, self.device = q0, k0, dtype, device

    def rel(self, r0: int, r1: int, c0: int, c1: int):
        """Query positions minus the tile's first key position ``[lr]`` and key offsets ``[lc]`` (small numbers
        near the tile: sums of weight × position keep their precision)."""
        base = self.k0 + c0
        pq = torch.arange(r0 + self.q0 - base, r1 + self.q0 - base, device=self.device, dtype=self.dtype)
        pk = torch.arange(0, c1 - c0, device=self.device, dtype=self.dtype)
        return pq, pk


class RowStatsSink:
    """Accumulates :class:`RowStats` over the tiles of a walk (one query tile at a time)."""

    def __init__(self, B: int, H: int, Lq: int, spec: StatSpec, geo: _Geo):
        self.spec, self.geo = spec, geo
        dt, dev = geo.dtype, geo.device
        nan = torch.full((B, H, Lq), math.nan, dtype=dt, device=dev)
        self.out = dict(mass=torch.zeros(B, H, Lq, dtype=dt, device=dev), entropy=nan, sink=nan.clone(),
                        window=nan.clone(), distance=nan.clone(),
                        valid=torch.zeros(B, H, Lq, dtype=torch.bool, device=dev),
                        topk_index=torch.full((B, H, Lq, spec.topk), -1, dtype=torch.long, device=dev),
                        topk_weight=torch.zeros(B, H, Lq, spec.topk, dtype=dt, device=dev))

    # -- a query tile ---------------------------------------------------------------------------
    def begin(self, r0: int, r1: int, like: Tensor) -> None:
        B, H = like.shape[0], like.shape[1]
        lr = r1 - r0
        z = like.new_zeros(B, H, lr)
        self.r0, self.r1 = r0, r1
        self.z, self.wx, self.sink, self.win, self.dist, self.signed = (z, z.clone(), z.clone(), z.clone(),
                                                                         z.clone(), z.clone())
        k = self.spec.topk
        self.tk_key = like.new_full((B, H, lr, k), -math.inf)
        self.tk_idx = torch.full((B, H, lr, k), -1, dtype=torch.long, device=like.device)
        self.tk_w = like.new_zeros(B, H, lr, k)

    def rescale(self, alpha: Tensor, dm: Tensor) -> None:
        """Running max moved: sums of ``e = e^{s − m}`` scale by ``alpha``; ``Σ e (s − m)`` also shifts by ``dm``
        (``m_old − m_new``). ``alpha, dm``: ``[B, H, lr]``."""
        self.wx = alpha * (self.wx + dm * self.z)
        for name in ("z", "sink", "win", "dist"):
            setattr(self, name, getattr(self, name) * alpha)

    def topk(self, key: Tensor, c0: int, tmax: Tensor, p: Optional[Tensor] = None) -> None:
        """Merge a tile's keys into the running top-k: ``key`` orders the keys (the score for softmax, ``|p|``
        else; masked keys −inf / −1), ``tmax`` its row maxima (a tile whose maxima do not beat any row's k-th key
        is skipped), ``p`` the weights (exact paths)."""
        K = self.spec.topk
        if K == 0 or not bool((tmax > self.tk_key[..., -1]).any()):
            return
        v, j = key.topk(min(K, key.shape[-1]), -1)
        allv = torch.cat([self.tk_key, v], -1)
        nv, sel = allv.topk(K, -1)
        self.tk_key = nv
        self.tk_idx = torch.cat([self.tk_idx, j + c0], -1).gather(-1, sel)
        if p is not None:
            self.tk_w = torch.cat([self.tk_w, p.gather(-1, j)], -1).gather(-1, sel)

    def features(self, w: Tensor, zt: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """Add a tile of non-negative weights ``w [B, H, lr, lc]`` (0 at masked keys) with row sums ``zt`` to the
        z, sink, window and distance sums."""
        g, sp = self.geo, self.spec
        pq, pk = g.rel(r0, r1, c0, c1)
        lc = c1 - c0
        # the tile's range of q − k over all pairs
        dlo, dhi = float(pq[0]) - (lc - 1), float(pq[-1])
        if dlo >= 0 or dhi <= 0:  # every key on one side of every query: Σ w |Δ| from Σ w and Σ w·k
            swk = torch.matmul(w, pk)
            dist = pq * zt - swk if dlo >= 0 else swk - pq * zt
            d = None
        else:
            d = (pq[:, None] - pk[None, :]).abs_()
            dist = torch.linalg.vecdot(w, d)
        self.z += zt
        self.dist += dist
        amin = 0.0 if dlo <= 0 <= dhi else min(abs(dlo), abs(dhi))
        amax = max(abs(dlo), abs(dhi))
        if amax < sp.window:
            self.win += zt
        elif amin < sp.window:
            if d is None:
                d = (pq[:, None] - pk[None, :]).abs_()
            self.win += torch.linalg.vecdot(w, (d < sp.window).to(w.dtype))
        n_in = min(c1, sp.sink_tokens - g.k0) - c0  # sink keys (positions < n) in this tile
        if n_in > 0:
            self.sink += w[..., :n_in].sum(-1)

    # -- the two kinds of tiles ---------------------------------------------------------------------
    def add_softmax(self, x: Tensor, e: Tensor, zt: Tensor, r0, r1, c0, c1) -> None:
        """``e = e^{s − m}`` (0 where masked) with row sums ``zt``, ``x = s − m`` (finite; consumed: the last
        reader of the tile multiplies it in place)."""
        self.features(e, zt, r0, r1, c0, c1)
        self.wx += x.mul_(e).sum(-1)

    def topk_softmax(self, s: Tensor, c0: int, tmax: Tensor) -> None:
        self.topk(s, c0, tmax)

    def add_exact(self, p: Tensor, r0, r1, c0, c1, visible: Optional[Tensor]) -> None:
        """Exact weights ``p`` of a tile (0 where masked); ``visible`` the tile's mask or None (all visible)."""
        w = p.abs()
        self.signed += p.sum(-1)
        self.wx += torch.special.xlogy(w, w).sum(-1)
        self.features(w, w.sum(-1), r0, r1, c0, c1)
        if self.spec.topk:
            key = w if visible is None else torch.where(visible, w, w.new_full((), -1.0))
            self.topk(key, c0, key.amax(-1), p)

    def end(self, row_scale: Optional[Tensor] = None, lse: Optional[Tensor] = None,
            mass: Optional[Tensor] = None) -> None:
        """Close the query tile. Softmax: ``row_scale = e^{m − lse}`` (what turns ``e`` into weights), the row's
        log-normalizer ``lse`` and its ``mass``. Exact paths: an optional ``row_scale`` (a per-row normalizer
        applied after the walk, e.g. normalized linear attention); their mass is the signed sum."""
        r0, r1, o = self.r0, self.r1, self.out
        z = self.z
        ok = z > 0
        zs = torch.where(ok, z, torch.ones_like(z))
        nan = torch.full_like(z, math.nan)
        o["valid"][:, :, r0:r1] = ok
        o["entropy"][:, :, r0:r1] = torch.where(ok, torch.log(zs) - self.wx / zs, nan)
        for name, acc in (("sink", self.sink), ("window", self.win), ("distance", self.dist)):
            o[name][:, :, r0:r1] = torch.where(ok, acc / zs, nan)
        scale = torch.ones_like(z) if row_scale is None or lse is not None else row_scale
        o["mass"][:, :, r0:r1] = self.signed * scale if mass is None else mass
        if self.spec.topk:
            got = self.tk_idx >= 0
            if lse is not None:  # softmax: the keys are scores, the weights e^{s − lse}
                got = got & torch.isfinite(self.tk_key)
                w = torch.exp(torch.where(got, self.tk_key, torch.zeros_like(self.tk_key)) - lse[..., None])
            else:
                got = got & (self.tk_key >= 0)
                w = self.tk_w * scale[..., None]
            o["topk_index"][:, :, r0:r1] = torch.where(got, self.tk_idx, torch.full_like(self.tk_idx, -1))
            o["topk_weight"][:, :, r0:r1] = torch.where(got, w, torch.zeros_like(w))

    def result(self) -> RowStats:
        return RowStats(spec=self.spec, **self.out)


class BlockSink:
    """Exact block means of the map: ``out[b, h, I, J] = mean_{i ∈ I, j ∈ J} p_ij`` over row blocks of ``rs`` rows
    and column blocks of ``cs`` columns (the last ones shorter; masked entries count as 0)."""

    def __init__(self, B: int, H: int, Lq: int, Lk: int, rs: int, cs: int, geo: _Geo):
        self.Lq, self.Lk, self.rs, self.cs, self.geo = Lq, Lk, rs, cs, geo
        self.nr, self.nc = -(-Lq // rs), -(-Lk // cs)
        self.out = torch.zeros(B, H, self.nr, self.nc, dtype=geo.dtype, device=geo.device)

    def begin(self, r0: int, r1: int, like: Tensor) -> None:
        self.r0, self.r1 = r0, r1
        self.acc = like.new_zeros(like.shape[0], like.shape[1], r1 - r0, self.nc)

    def rescale(self, alpha: Tensor, dm: Tensor) -> None:
        self.acc *= alpha[..., None]

    def _add(self, w: Tensor, c0: int, c1: int) -> None:
        """Column sums of a tile into its column blocks: a partial first block, whole blocks, a partial last."""
        cs = self.cs
        head = min(c1, -(-c0 // cs) * cs) - c0
        if head > 0:
            self.acc[..., c0 // cs] += w[..., :head].sum(-1)
        a = c0 + max(head, 0)
        nfull = (c1 - a) // cs
        if nfull:
            off = a - c0
            self.acc[..., a // cs:a // cs + nfull] += w[..., off:off + nfull * cs].unflatten(-1, (nfull, cs)).sum(-1)
        tail = a + nfull * cs
        if tail < c1:
            self.acc[..., tail // cs] += w[..., tail - c0:].sum(-1)

    def add_softmax(self, x, e, zt, r0, r1, c0, c1) -> None:
        self._add(e, c0, c1)

    def topk_softmax(self, s, c0, tmax) -> None:
        pass

    def add_exact(self, p, r0, r1, c0, c1, visible) -> None:
        self._add(p, c0, c1)

    def end(self, row_scale: Optional[Tensor] = None, lse: Optional[Tensor] = None,
            mass: Optional[Tensor] = None) -> None:
        acc = self.acc if row_scale is None else self.acc * row_scale[..., None]
        rows = torch.arange(self.r0, self.r1, device=acc.device) // self.rs
        self.out.index_add_(2, rows, acc)

    def result(self) -> Tensor:
        dev, dt = self.out.device, self.out.dtype
        rn = torch.full((self.nr,), float(self.rs), dtype=dt, device=dev)
        rn[-1] = self.Lq - self.rs * (self.nr - 1)
        cn = torch.full((self.nc,), float(self.cs), dtype=dt, device=dev)
        cn[-1] = self.Lk - self.cs * (self.nc - 1)
        return self.out / (rn[:, None] * cn[None, :])


# ---------------------------------------------------------------------------------------------
# The softmax-family walk
# ---------------------------------------------------------------------------------------------

def _scores(call: Call, q: Tensor, k: Tensor, r0, r1, c0, c1, Lk) -> Tensor:
    qa, ka, kb = call.halo(r0, r1, c0, c1, Lk)
    if type(call) is Call and call.score_mod is None:  # scale folded into the product (one pass fewer)
        B, G, lr, lc = call.B, call.G, r1 - r0, c1 - c0
        q3 = q[:, :, r0:r1].reshape(B * call.Hkv, G * lr, -1)
        k3 = k[:, :, c0:c1].reshape(B * call.Hkv, lc, -1)
        s = torch.baddbmm(q3.new_empty(()).expand(q3.shape[0], G * lr, lc), q3, k3.transpose(1, 2), beta=0.0,
                          alpha=call.scale)
        return s.view(B, call.Hq, lr, lc)
    return call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, c0, c1, qa, ka)


def walk_softmax(call: Call, q: Tensor, k: Tensor, sinks: Sequence, block_q: int, block_k: int,
                 row_scale: Optional[Tensor] = None) -> None:
    """Feed every non-empty tile of ``call``'s map to ``sinks`` (:class:`RowStatsSink`, :class:`BlockSink`).

    Softmax normalizers (plain, sink logit, off-by-one): one pass with online rescaling; relaxed softmax: a first
    pass for the log-sum-exp, then exact weights; elementwise normalizers: exact weights in one pass, times
    ``row_scale [B, H, Lq]`` when given (bidirectional normalized linear attention).
    """
    norm = call.normalizer
    plan = _Plan(call, block_q, block_k)
    Lq, Lk = call.Lq, call.Lk
    soft = norm.family == "softmax"
    lse_all = _lse_pass(call, q, k, plan) if soft and norm.gamma > 0 else None
    for i, r0, r1 in plan.rows(Lq):
        like = q.new_empty(call.B, call.Hq, 1)
        for sk in sinks:
            sk.begin(r0, r1, like)
        if soft and lse_all is None:
            m = q.new_full((call.B, call.Hq, r1 - r0), -math.inf)
            m_use = torch.zeros_like(m)
            z = torch.zeros_like(m)
        for j, c0, c1, is_full in plan.cols(i, Lk):
            s = _scores(call, q, k, r0, r1, c0, c1, Lk)
            mb = None if is_full else call.mask_block(r0, r1, c0, c1)
            if soft and lse_all is None:
                if mb is not None:  # an additive 0 / −inf bias on the (small) mask: one fast broadcast add
                    s = s.add_(torch.zeros(mb.shape, dtype=s.dtype, device=s.device).masked_fill_(~mb, -math.inf))
                tmax = s.amax(-1)
                for sk in sinks:
                    sk.topk_softmax(s, c0, tmax)
                m_new = torch.maximum(m, tmax)
                mu_new = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                if bool((mu_new != m_use).any()):
                    alpha, dm = torch.exp(m_use - mu_new), m_use - mu_new
                    alpha = torch.where(torch.isfinite(m), alpha, torch.zeros_like(alpha))
                    for sk in sinks:
                        sk.rescale(alpha, dm)
                    z = z * alpha
                m, m_use = m_new, mu_new
                x = s.sub_(m_use[..., None])
                e = torch.exp(x)
                if mb is not None:  # masked: x = −inf, e = 0; a finite x keeps e·x = 0 there (no 0·∞)
                    x = x.clamp_(min=torch.finfo(x.dtype).min)
                zt = e.sum(-1)
                z = z + zt
                for sk in sinks:
                    sk.add_softmax(x, e, zt, r0, r1, c0, c1)
            else:
                p = _exact_weights(call, s, mb, r0, r1, lse_all)
                for sk in sinks:
                    sk.add_exact(p, r0, r1, c0, c1, mb)
        if soft and lse_all is None:
            log_keys = torch.where(z > 0, torch.log(torch.where(z > 0, z, torch.ones_like(z))) + m_use,
                                   torch.full_like(z, -math.inf))
            sink = norm.sink_logits(call.Hq, q)
            lse = log_keys if sink is None else torch.logaddexp(log_keys, sink[..., 0].expand_as(log_keys))
            lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            mass = torch.exp(log_keys - lse_f)
            for sk in sinks:
                sk.end(torch.exp(m_use - lse_f), lse_f, mass)
        else:
            for sk in sinks:
                sk.end(None if row_scale is None else row_scale[:, :, r0:r1])


def _lse_pass(call: Call, q: Tensor, k: Tensor, plan) -> Tensor:
    """Log-sum-exp of every row over its visible keys (relaxed softmax's first pass), ``[B, H, Lq]``."""
    out = q.new_empty(call.B, call.Hq, call.Lq)
    for i, r0, r1 in plan.rows(call.Lq):
        m = q.new_full((call.B, call.Hq, r1 - r0, 1), -math.inf)
        z = torch.zeros_like(m)
        for j, c0, c1, is_full in plan.cols(i, call.Lk):
            s = _scores(call, q, k, r0, r1, c0, c1, call.Lk)
            if not is_full:
                s = s.masked_fill(~call.mask_block(r0, r1, c0, c1), -math.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            mu = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            mo = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            z = z * torch.exp(mo - mu) * torch.isfinite(m) + torch.exp(s - mu).sum(-1, keepdim=True)
            m = m_new
        mu = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out[:, :, r0:r1] = (torch.log(z) + mu).squeeze(-1)
    return out


def _exact_weights(call: Call, s: Tensor, mb: Optional[Tensor], r0: int, r1: int, lse: Optional[Tensor]) -> Tensor:
    """Weights of a tile for normalizers that need no running max: elementwise, or relaxed softmax given the lse."""
    norm = call.normalizer
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if norm.family == "softmax":  # relaxed: (1 − γ) e^{s − lse} + γ / n over visible keys
        l_r = lse[:, :, r0:r1, None]
        l_r = torch.where(torch.isfinite(l_r), l_r, torch.zeros_like(l_r))
        sm = s if mb is None else s.masked_fill(~mb, -math.inf)
        n = call.counts[:, :, r0:r1, None].clamp(min=1)
        vis = torch.ones((), dtype=s.dtype, device=s.device) if mb is None else mb.to(s.dtype)
        return (1 - norm.gamma) * torch.exp(sm - l_r) + norm.gamma * vis / n
    w = norm.f(s, call.Lk)
    if mb is not None:
        w = torch.where(mb, w, zero)
    if norm.divide_by_count:
        w = w / call.counts[:, :, r0:r1, None].clamp(min=1)
    return w


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def _problem(q, k, mask, score_mod, normalizer, scale, layout, q_offset, kv_offset):
    q, k, _ = check_qkv(q, k, k, layout)
    cd = compute_dtype(q.dtype)
    qc, kc = q.to(cd), k.to(cd)
    pos = check_positions(q_offset, kv_offset)
    kw = {} if pos is None else dict(q_offset=pos[0], kv_offset=pos[1])
    call = Call(qc, kc, kc, as_mask(mask), as_score_mod(score_mod), as_normalizer(normalizer),
                resolve_scale(scale, q.shape[-1]), **kw)
    return call, qc, kc


def _blocks(block_q: Optional[int], block_k: Optional[int]):
    bq = DEFAULT_BLOCKS[0] if block_q is None else block_q
    bk = DEFAULT_BLOCKS[1] if block_k is None else block_k
    for name, b in (("block_q", bq), ("block_k", bk)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    return bq, bk


def attention_stats(q: Tensor, k: Tensor, *, mask: MaskLike = None,
                    score_mod: Union[ScoreMod, Sequence[ScoreMod], None] = None,
                    normalizer: Union[str, Normalizer] = "softmax", scale: Optional[float] = None,
                    layout: str = "bhtd", q_offset: Optional[int] = None, kv_offset: int = 0, sink_tokens: int = 4,
                    window: int = 64, topk: int = 8, block_q: Optional[int] = None,
                    block_k: Optional[int] = None) -> RowStats:
    """Exact row statistics of the softmax-family map ``p = normalizer(score_mod(scale · q kᵀ))`` over the
    visible keys, in one streaming pass (two for relaxed softmax); memory O(B·H·block_q·block_k).

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (``layout="bthd"``: ``[B, T, H, D]``; GQA as in
    :func:`attnkit.attention`, whose mask / score_mod / normalizer / scale / offsets these are). Statistics
    are computed in float32 (float64 for float64 inputs). See the module docstring for what each one means.
    """
    spec = StatSpec(sink_tokens, window, topk)
    call, qc, kc = _problem(q, k, mask, score_mod, normalizer, scale, layout, q_offset, kv_offset)
    bq, bk = _blocks(block_q, block_k)
    sink = RowStatsSink(call.B, call.Hq, call.Lq, spec, _Geo(call.geom.q0, call.geom.k0, call.cdtype, qc.device))
    with torch.no_grad():
        walk_softmax(call, qc, kc, [sink], bq, bk)
    return sink.result()


def map_stats(weights: Tensor, *, visible: Optional[Tensor] = None, q_offset: Optional[int] = None,
              kv_offset: int = 0, sink_tokens: int = 4, window: int = 64, topk: int = 8) -> RowStats:
    """The same statistics from a given map ``weights [B, H, Lq, Lk]`` (a materialized map, a captured Hugging Face
    map, a linear rule's matrix). ``visible [B', H', Lq, Lk]`` bool marks the keys each row may see (default
    all; it matters for top-k only: a masked key is never listed). Positions as in :mod:`attnkit.masks`."""
    if not isinstance(weights, Tensor) or weights.dim() != 4 or not weights.is_floating_point():
        got = f"{weights.dtype} {tuple(weights.shape)}" if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating tensor [B, H, Lq, Lk], got {got}")
    spec = StatSpec(sink_tokens, window, topk)
    B, H, Lq, Lk = weights.shape
    pos = check_positions(q_offset, kv_offset)
    k0 = 0 if pos is None else pos[1]
    q0 = k0 + Lk - Lq if pos is None or pos[0] is None else pos[0]
    w = weights.detach().to(compute_dtype(weights.dtype))
    if visible is not None:
        if visible.dtype != torch.bool or visible.dim() != 4:
            raise ValueError(f"visible must be a bool tensor [B', H', Lq, Lk], got {visible.dtype} "
                             f"{tuple(visible.shape)}")
        visible = visible.expand(B, H, Lq, Lk)
        w = torch.where(visible, w, torch.zeros((), dtype=w.dtype, device=w.device))
    sink = RowStatsSink(B, H, Lq, spec, _Geo(q0, k0, w.dtype, w.device))
    sink.begin(0, Lq, w)
    sink.add_exact(w, 0, Lq, 0, Lk, visible)
    sink.end()
    return sink.result()
