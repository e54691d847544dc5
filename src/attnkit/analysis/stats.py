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
query blocks × the mask's non-empty key blocks; partial tiles cut to the columns some row sees) with online
softmax in base 2: scores ``s·log2(e)``, ``e_j = 2^{s_j − r}`` against a per-row reference ``r`` (0 while the
row's running max stays within ±16, else the max; the sums are rescaled by ``2^{r_old − r_new}`` when it moves);
the entropy uses ``H = ln z − ln 2 · Σ_j e_j (s_j − r) / z``, ``z = Σ e_j``, exact in one pass. Top-k keys come
from few candidates per tile (:class:`_TopK`). Relaxed softmax (``(1 − γ) softmax + γ / n``) needs the final
log-normalizer inside every weight: it takes two passes (the first computes the log-sum-exp). Elementwise
normalizers (sigmoid, ReLU, ReLU², none) and the implicit maps of linear rules (:mod:`attnkit.analysis.linear_maps`)
give exact weights per tile and use ``H = log Z − Σ_j |p_j| log |p_j| / Z``, ``Z = Σ_j |p_j|``. Memory:
O(threads·B·H·block_q·block_k) beyond the inputs; query tiles run on ``threads`` CPU threads.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence, Union

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
LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)
#: the softmax walk subtracts nothing from rows whose running max (base 2) is within ±REF_BAND (see _walk_rows)
REF_BAND = 16.0


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
        self._keys = torch.zeros(0, dtype=dtype, device=device)

    def queries(self, r0: int, r1: int) -> Tensor:
        """Positions of query rows ``[r0, r1)`` minus the first key's ``[lr]``; minus ``c0`` more: relative to a
        tile's first key (small numbers near the tile: sums of weight × position keep their precision)."""
        return torch.arange(r0 + self.q0 - self.k0, r1 + self.q0 - self.k0, device=self.device, dtype=self.dtype)

    def keys(self, lc: int) -> Tensor:
        """Key offsets ``0 .. lc − 1`` within a tile (one tensor, sliced)."""
        k = self._keys
        if k.shape[0] < lc:  # threads of the walk may race here: each returns a slice of its own tensor
            k = self._keys = torch.arange(lc, device=self.device, dtype=self.dtype)
        return k[:lc]


class _TopK:
    """Exact top-k keys of each row of a query tile, merged from few candidates per tile (no sort of whole tiles).

    The running top-k of every row is kept sorted (``key, col, w``: ``[n, k]``); its k-th key is a lower bound
    ``thr`` of the row's k-th key so far, raised (until every row holds k keys) by a lower bound of the k-th
    largest of the tile's column-group maxima (:func:`_kth_from_below`: k keys of the row are at least that). A key
    below the bound is not among the k largest, so only members ``>= thr`` of column groups whose maximum
    (:func:`group_max`) is ``>= thr`` are kept; once there are about as many as rows they are merged into the rows
    they touch by one small per-row sort (the bound lags by the tiles since). A tile where most groups qualify
    (ties, adversarial order) gives its own top-k instead, from the members of its k groups of largest maximum
    (they hold its k largest keys). Ties may be broken either way. Keys ``<= floor`` (masked: −inf for scores, −1
    for ``|p|``) are never listed."""

    def __init__(self, K: int, n: int, like: Tensor):
        self.K, self.n = K, n
        self.key = like.new_full((n, K), -math.inf)
        self.col = torch.full((n, K), -1, dtype=torch.long, device=like.device)
        self.w = like.new_zeros(n, K)
        self.thr: Optional[Tensor] = None  # max(k-th key, the smallest key above the floor)
        self.full = False  # every row holds K keys
        self.parts: list = []
        self.pending = 0

    def add(self, key: Tensor, g: Tensor, c0: int, floor: float, weight: Optional[Tensor] = None) -> None:
        """A tile: ``key [..., lc]`` (contiguous; rows flattened to ``n``), ``g = group_max(key)``, ``weight`` the
        values to report for the chosen keys (exact paths; else 0), columns offset by ``c0``."""
        K, n, lc = self.K, self.n, key.shape[-1]
        k2, g2 = key.reshape(n, lc), g.reshape(n, -1)
        G = g2.shape[1]
        if self.thr is None:
            f = torch.full((n,), floor, dtype=key.dtype, device=key.device)
            self.thr = torch.nextafter(f, torch.full_like(f, math.inf))
        thr = self.thr
        if G >= K and not self.full:  # a bound from the tile itself: the K-th largest group maximum, from below
            thr = torch.maximum(thr, _kth_from_below(g2, K, BISECT_STEPS))
        hit = (g2 >= thr[:, None]).nonzero()
        if hit.shape[0] == 0:
            return
        if hit.shape[0] > n * G // 2:  # most groups (ties, adversarial order): the tile's own top-k
            S = lc // G
            if G > K:
                gi = g2.topk(K, -1).indices  # [n, K]
                v = k2.view(n, S, G).gather(2, gi[:, None, :].expand(n, S, K)).view(n, S * K)
                v, j = v.topk(K, -1)
                col = gi.gather(1, j % K) + G * (j // K)
            else:
                v, col = k2.topk(min(K, lc), -1)
            i, t = (v >= thr[:, None]).nonzero().unbind(1)
            rows, col, v = i, col[i, t], v[i, t]
        else:  # members of group gi of row r: columns gi, gi + G, gi + 2G, ...
            r, gi = hit.unbind(1)
            v = k2.view(n, lc // G, G)[r, :, gi]  # [m, lc / G]
            i, t = (v >= thr[r][:, None]).nonzero().unbind(1)
            rows, col, v = r[i], gi[i] + G * t, v[i, t]
        w = None if weight is None else weight.reshape(n, lc)[rows, col]
        self.parts.append((rows, col + c0, v, w))
        self.pending += rows.shape[0]
        if self.pending >= n:
            self._merge()

    def _merge(self) -> None:
        """Merge the pending candidates into the running top-k of the rows they touch."""
        K, parts = self.K, self.parts
        if not parts:
            return
        rows, col, v, w = (None if x[0] is None else torch.cat(x) if len(x) > 1 else x[0] for x in zip(*parts))
        self.parts, self.pending = [], 0
        if len(parts) > 1:  # rows ascending (each tile's candidates already are)
            order = rows.argsort(stable=True)
            rows, col, v = rows[order], col[order], v[order]
            w = None if w is None else w[order]
        u, counts = torch.unique_consecutive(rows, return_counts=True)
        slot = torch.repeat_interleave(torch.arange(u.shape[0], device=u.device), counts)
        pos = K + torch.arange(rows.shape[0], device=u.device) - (counts.cumsum(0) - counts)[slot]
        width = K + int(counts.max())
        keys = self.key.new_full((u.shape[0], width), -math.inf)
        cols = self.col.new_full((u.shape[0], width), -1)
        keys[:, :K], cols[:, :K] = self.key[u], self.col[u]
        keys[slot, pos], cols[slot, pos] = v, col
        top, order = keys.sort(-1, descending=True)
        order = order[:, :K]
        self.key[u], self.col[u] = top[:, :K], cols.gather(1, order)
        self.thr[u] = torch.maximum(self.thr[u], top[:, K - 1])
        self.full = bool(torch.isfinite(self.key[:, -1]).all())
        if w is not None:
            ws = self.w.new_zeros(u.shape[0], width)
            ws[:, :K] = self.w[u]
            ws[slot, pos] = w
            self.w[u] = ws.gather(1, order)

    def result(self, shape):
        """``(index, key, weight)``, each ``shape + (K,)``, keys descending; −1 / −inf / 0 past the listed keys."""
        self._merge()
        K = self.K
        return self.col.view(*shape, K), self.key.view(*shape, K), self.w.view(*shape, K)


def _kth_from_below(g: Tensor, K: int, steps: int) -> Tensor:
    """A lower bound of the K-th largest entry of each row of ``g [n, G]`` (``G >= K``): at least K entries of the
    row are ``>=`` it. Start: the smallest of the maxima of K disjoint sets of columns (``j, j + K, ...``); then
    ``steps`` rounds of bisection towards the row maximum, keeping a bound that K entries reach (a per-row sort or
    top-k costs a microsecond per row on CPU; these are a few elementwise passes over ``g``)."""
    sets = g[:, :g.shape[1] // K * K]
    while sets.shape[1] >= 2 * K:  # halve by elementwise maxima (small reductions are slow on CPU)
        h = sets.shape[1] // K // 2 * K
        mx = torch.maximum(sets[:, :h], sets[:, h:2 * h])
        sets = mx if 2 * h == sets.shape[1] else torch.cat([mx, sets[:, 2 * h:]], 1)
    lo, hi = sets.amin(1), g.amax(1)
    for _ in range(steps):
        mid = lo * 0.5 + hi * 0.5
        ok = (g >= mid[:, None]).sum(1) >= K
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


#: rounds of bisection of :func:`_kth_from_below`
BISECT_STEPS = 5
#: columns per group of the top-k candidates (:func:`group_max`)
GROUP = 16


def group_max(x: Tensor) -> Tensor:
    """Maxima of strided column groups ``[..., lc] -> [..., lc / GROUP]``: entry ``j`` is the largest of columns
    ``j, j + G, j + 2G, ...`` (``G = lc / GROUP``; a reduction over a strided axis, as fast as a row maximum).
    ``x`` itself (groups of one column) when ``lc`` is not a multiple of ``GROUP`` or is smaller than ``2·GROUP``."""
    lc = x.shape[-1]
    if lc % GROUP or lc < 2 * GROUP:
        return x
    return x.unflatten(-1, (GROUP, lc // GROUP)).amax(-2)


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

    @property
    def wants_groups(self) -> bool:
        """Whether :meth:`topk_softmax` uses column-group maxima (:func:`group_max`)."""
        return self.spec.topk > 0

    def fork(self) -> "RowStatsSink":
        """A sink for another thread of the walk: its own per-tile sums, the same outputs (disjoint rows)."""
        other = object.__new__(RowStatsSink)
        other.spec, other.geo, other.out = self.spec, self.geo, self.out
        return other

    # -- a query tile ---------------------------------------------------------------------------
    def begin(self, r0: int, r1: int, like: Tensor) -> None:
        B, H = like.shape[0], like.shape[1]
        lr = r1 - r0
        z = like.new_zeros(B, H, lr)
        self.r0, self.r1 = r0, r1
        self.z, self.wx, self.sink, self.win, self.dist, self.signed = (z, z.clone(), z.clone(), z.clone(),
                                                                         z.clone(), z.clone())
        self.top = _TopK(self.spec.topk, B * H * lr, like) if self.spec.topk else None
        self.pq = self.geo.queries(r0, r1)

    def rescale(self, alpha: Tensor, dm: Tensor) -> None:
        """Running max moved: sums of ``e = 2^{x}`` scale by ``alpha``; ``Σ e·x`` also shifts by ``dm``
        (``m_old − m_new``). ``alpha, dm``: ``[B, H, lr]``."""
        self.wx = alpha * (self.wx + dm * self.z)
        for name in ("z", "sink", "win", "dist"):
            setattr(self, name, getattr(self, name) * alpha)

    def features(self, w: Tensor, zt: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """Add a tile of non-negative weights ``w [B, H, lr, lc]`` (0 at masked keys) with row sums ``zt`` to the
        z, sink, window and distance sums. Columns where every query is on one side of the key take
        ``Σ w |Δ| = ±(P_q Σ w − Σ w·P_k)`` (a matrix-vector product); only the band of columns between the
        tile's first and last query, and the band within the window of some query, need ``|Δ|`` per pair."""
        g, sp = self.geo, self.spec
        pq, pk = self.pq - c0, g.keys(c1 - c0)
        lc = c1 - c0
        q_lo = r0 + g.q0 - g.k0 - c0  # the first and last query's position relative to the tile's first key
        q_hi = q_lo + (r1 - r0) - 1
        a = min(lc, max(0, q_lo + 1))  # columns [0, a): keys at or before every query
        b = max(a, min(lc, q_hi))  # columns [b, lc): keys at or after every query
        if a > 0:
            self.dist += pq * (zt if a == lc else w[..., :a].sum(-1)) - torch.matmul(w[..., :a], pk[:a])
        if b < lc:
            self.dist += torch.matmul(w[..., b:], pk[b:]) - pq * (zt if b == 0 else w[..., b:].sum(-1))
        if a < b:
            self.dist += torch.linalg.vecdot(w[..., a:b], (pq[:, None] - pk[None, a:b]).abs_())
        self.z += zt
        W = sp.window
        wa, wb = max(0, q_lo - W + 1), min(lc, q_hi + W)  # columns within the window of some query
        if max(abs(q_lo - (lc - 1)), abs(q_hi)) < W:  # every pair
            self.win += zt
        elif wa < wb:
            d = (pq[:, None] - pk[None, wa:wb]).abs_()
            self.win += torch.linalg.vecdot(w[..., wa:wb], (d < W).to(w.dtype))
        n_in = min(c1, sp.sink_tokens - g.k0) - c0  # sink keys (positions < n) in this tile
        if n_in > 0:
            self.sink += w[..., :n_in].sum(-1)

    # -- the two kinds of tiles ---------------------------------------------------------------------
    def add_softmax(self, x: Tensor, e: Tensor, zt: Tensor, r0, r1, c0, c1) -> None:
        """``e = 2^{x}`` (0 where masked) with row sums ``zt``, ``x = s·log2(e) − m`` in base-2 units (finite;
        consumed: the last reader of the tile multiplies it in place)."""
        self.features(e, zt, r0, r1, c0, c1)
        self.wx += x.mul_(e).sum(-1)

    def topk_softmax(self, s: Tensor, g: Tensor, c0: int) -> None:
        """A tile's scores ``s`` (base 2, −inf where masked) and their :func:`group_max` ``g`` (``s`` itself when
        no sink :attr:`wants_groups`)."""
        if self.top is not None:
            self.top.add(s, g, c0, -math.inf)

    def add_exact(self, p: Tensor, r0, r1, c0, c1, visible: Optional[Tensor]) -> None:
        """Exact weights ``p`` of a tile (0 where masked); ``visible`` the tile's mask or None (all visible)."""
        w = p.abs()
        self.signed += p.sum(-1)
        self.wx += torch.special.xlogy(w, w).sum(-1)
        self.features(w, w.sum(-1), r0, r1, c0, c1)
        if self.top is not None:
            key = w if visible is None else torch.where(visible, w, w.new_full((), -1.0))
            self.top.add(key.contiguous(), group_max(key), c0, -1.0, p)

    def end(self, row_scale: Optional[Tensor] = None, lse2: Optional[Tensor] = None,
            mass: Optional[Tensor] = None) -> None:
        """Close the query tile. Softmax: ``row_scale = 2^{m − lse2}`` (what turns ``e`` into weights), the row's
        log-normalizer in base 2 ``lse2`` (Σ e·x, the running max and the top-k keys are in base 2 too) and its
        ``mass``. Exact paths: an optional ``row_scale`` (a per-row normalizer applied after the walk, e.g.
        normalized linear attention); their mass is the signed sum."""
        r0, r1, o = self.r0, self.r1, self.out
        z = self.z
        ok = z > 0
        zs = torch.where(ok, z, torch.ones_like(z))
        nan = torch.full_like(z, math.nan)
        o["valid"][:, :, r0:r1] = ok
        plogp = self.wx * LN2 if lse2 is not None else self.wx  # Σ e·x in nats
        o["entropy"][:, :, r0:r1] = torch.where(ok, torch.log(zs) - plogp / zs, nan)
        for name, acc in (("sink", self.sink), ("window", self.win), ("distance", self.dist)):
            o[name][:, :, r0:r1] = torch.where(ok, acc / zs, nan)
        scale = torch.ones_like(z) if row_scale is None or lse2 is not None else row_scale
        o["mass"][:, :, r0:r1] = self.signed * scale if mass is None else mass
        if self.top is not None:
            idx, key, w = self.top.result(z.shape)
            if lse2 is not None:  # softmax: the keys are base-2 scores, the weights 2^{s − lse2}
                w = torch.exp2(key - lse2[..., None])
            else:
                w = w * scale[..., None]
            got = idx >= 0
            o["topk_index"][:, :, r0:r1] = idx
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

    def topk_softmax(self, s, g, c0) -> None:
        pass

    def add_exact(self, p, r0, r1, c0, c1, visible) -> None:
        self._add(p, c0, c1)

    def end(self, row_scale: Optional[Tensor] = None, lse2: Optional[Tensor] = None,
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

def _scores(call: Call, q: Tensor, k: Tensor, r0, r1, c0, c1, Lk, unit: float = 1.0,
            scratch: Optional[dict] = None) -> Tensor:
    """Scores of a tile times ``unit`` (``log2(e)``: base-2 units for the softmax walk), contiguous; in
    ``scratch`` (reused between tiles) where the product is plain."""
    qa, ka, kb = call.halo(r0, r1, c0, c1, Lk)
    if type(call) is Call and call.score_mod is None:  # scale and unit folded into the product (one pass fewer)
        B, G, lr, lc = call.B, call.G, r1 - r0, c1 - c0
        q3 = q[:, :, r0:r1].reshape(B * call.Hkv, G * lr, -1)
        k3 = k[:, :, c0:c1].reshape(B * call.Hkv, lc, -1)
        shape = (q3.shape[0], G * lr, lc)
        out = q3.new_empty(shape) if scratch is None else _buffer(scratch, "s", shape, q3)
        s = torch.baddbmm(out, q3, k3.transpose(1, 2), beta=0.0, alpha=call.scale * unit, out=out)
        return s.view(B, call.Hq, lr, lc)
    s = call.scores(q[:, :, qa:r1], k[:, :, ka:kb], r0, r1, c0, c1, qa, ka)
    return s.mul_(unit) if unit != 1.0 else s


def _buffer(scratch: dict, name: str, shape, like: Tensor) -> Tensor:
    """A contiguous tensor of ``shape`` kept in ``scratch`` for the next tile (on CPU a fresh tile-sized
    allocation costs page faults: a sixth of the walk's time)."""
    n = math.prod(shape)
    b = scratch.get(name)
    if b is None or b.numel() < n or b.dtype != like.dtype or b.device != like.device:
        b = scratch[name] = like.new_empty(n)
    return b[:n].view(shape)


def walk_softmax(call: Call, q: Tensor, k: Tensor, sinks: Sequence, block_q: int, block_k: int,
                 row_scale: Optional[Tensor] = None, threads: Optional[int] = None) -> None:
    """Feed every non-empty tile of ``call``'s map to ``sinks`` (:class:`RowStatsSink`, :class:`BlockSink`).

    Softmax normalizers (plain, sink logit, off-by-one): one pass with online rescaling, in base 2 (scores times
    ``log2(e)``, ``e = 2^{s − r}``: the same weights, a cheaper exponential); relaxed softmax: a first pass for the
    log-sum-exp, then exact weights; elementwise normalizers: exact weights in one pass, times
    ``row_scale [B, H, Lq]`` when given (bidirectional normalized linear attention).

    ``threads=None``: one Python thread, torch's intra-op threads as the caller set them. ``threads=n``: query
    tiles are shared out to ``n`` Python threads (heaviest first; with ``n > 1`` each has its own :meth:`fork` of
    every sink), each with one intra-op thread (set for the duration of the call, then restored): no OpenMP
    barrier per operation, so a core taken by another process slows the walk instead of stalling it.
    """
    plan = _Plan(call, block_q, block_k)
    norm = call.normalizer
    lse_all = _lse_pass(call, q, k, plan) if norm.family == "softmax" and norm.gamma > 0 else None
    tiles = list(plan.rows(call.Lq))
    if threads is None:
        scratch: dict = {}
        for t in tiles:
            _walk_rows(call, q, k, sinks, plan, *t, lse_all, row_scale, scratch)
        return
    tiles.sort(key=lambda t: -int(plan.visit[t[0]].sum()))
    queue, lock = iter(tiles), threading.Lock()
    grad = torch.is_grad_enabled()

    def work(own):
        mine, scratch = [sk.fork() for sk in sinks] if own else sinks, {}
        with torch.set_grad_enabled(grad):
            while True:
                with lock:
                    t = next(queue, None)
                if t is None:
                    return
                _walk_rows(call, q, k, mine, plan, *t, lse_all, row_scale, scratch)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1 or len(tiles) < 2:
            work(False)
        else:
            with ThreadPoolExecutor(threads) as ex:
                for f in [ex.submit(work, True) for _ in range(threads)]:
                    f.result()
    finally:
        torch.set_num_threads(n)


def _walk_rows(call: Call, q: Tensor, k: Tensor, sinks: Sequence, plan: _Plan, i: int, r0: int, r1: int,
               lse_all: Optional[Tensor], row_scale: Optional[Tensor], scratch: dict) -> None:
    """One query tile (rows ``[r0, r1)``) of :func:`walk_softmax`; ``scratch`` holds tile buffers reused by the
    next tile (the sinks must not keep references to the tiles they are given).

    Online softmax in base 2 with a per-row reference ``ref`` (``e = 2^{s − ref}``): 0 while the row's running
    max lies within ±:data:`REF_BAND` (no subtraction pass at all when every row is there), else the running max;
    the sums are rescaled by ``2^{ref_old − ref_new}`` when it moves (never above 1 for a row that has keys)."""
    norm, Lk = call.normalizer, call.Lk
    online = norm.family == "softmax" and lse_all is None
    like = q.new_empty(call.B, call.Hq, 1)
    for sk in sinks:
        sk.begin(r0, r1, like)
    if online:
        groups = any(getattr(sk, "wants_groups", False) for sk in sinks)  # column-group maxima for a top-k
        m = q.new_full((call.B, call.Hq, r1 - r0), -math.inf)
        ref, zero_ref = torch.zeros_like(m), True
        z = torch.zeros_like(m)
    for j, c0, c1, is_full in plan.cols(i, Lk):
        mb = None
        if not is_full:
            mb, c0, c1 = _trim(call.mask_block(r0, r1, c0, c1), c0, c1)
            if mb is None:
                continue
        s = _scores(call, q, k, r0, r1, c0, c1, Lk, LOG2E if online else 1.0, scratch if online else None)
        if not online:
            p = _exact_weights(call, s, mb, r0, r1, lse_all)
            for sk in sinks:
                sk.add_exact(p, r0, r1, c0, c1, mb)
            continue
        if mb is not None:  # an additive 0 / −inf bias on the (small) mask: one fast broadcast add
            s = s.add_(torch.zeros(mb.shape, dtype=s.dtype, device=s.device).masked_fill_(~mb, -math.inf))
        g = group_max(s) if groups else s
        for sk in sinks:
            sk.topk_softmax(s, g, c0)
        m_old, m = m, torch.maximum(m, g.amax(-1))
        if not (zero_ref and float(torch.nan_to_num(m, neginf=0.0).abs().amax()) <= REF_BAND):
            ref_new = torch.where(torch.isfinite(m) & (m.abs() > REF_BAND), m, torch.zeros_like(m))
            if bool((ref_new != ref).any()):
                alpha, dm = torch.exp2(ref - ref_new), ref - ref_new
                alpha = torch.where(torch.isfinite(m_old), alpha, torch.zeros_like(alpha))  # rows without keys: 0
                for sk in sinks:
                    sk.rescale(alpha, dm)
                z = z * alpha
                ref = ref_new
            zero_ref = not bool(ref.any())
        x = s if zero_ref else s.sub_(ref[..., None])
        e = torch.exp2(x, out=_buffer(scratch, "e", x.shape, x))
        if mb is not None:  # masked: x = −inf, e = 0; a finite x keeps e·x = 0 there (no 0·∞)
            x = x.clamp_(min=torch.finfo(x.dtype).min)
        zt = e.sum(-1)
        z = z + zt
        for sk in sinks:
            sk.add_softmax(x, e, zt, r0, r1, c0, c1)
    if not online:
        for sk in sinks:
            sk.end(None if row_scale is None else row_scale[:, :, r0:r1])
        return
    log_keys = torch.where(z > 0, (torch.log2(torch.where(z > 0, z, torch.ones_like(z))) + ref) * LN2,
                           torch.full_like(z, -math.inf))  # natural log of Σ over keys of e^{s}
    sink = norm.sink_logits(call.Hq, q)
    lse = log_keys if sink is None else torch.logaddexp(log_keys, sink[..., 0].expand_as(log_keys))
    lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    mass = torch.exp(log_keys - lse_f)
    lse2 = lse_f * LOG2E
    for sk in sinks:
        sk.end(torch.exp2(ref - lse2), lse2, mass)


def _trim(mb: Tensor, c0: int, c1: int):
    """A partial tile cut to its columns that some row sees (rounded out to whole :data:`GROUP` s): ``(mask, c0,
    c1)``, or ``(None, c0, c1)`` when no pair of the tile is visible."""
    cols = mb.reshape(-1, mb.shape[-1]).any(0).nonzero()
    if cols.shape[0] == 0:
        return None, c0, c1
    lc, a, b = c1 - c0, int(cols[0]), int(cols[-1]) + 1
    if b - a == lc:
        return mb, c0, c1
    if b - a >= 2 * GROUP and (b - a) % GROUP:  # whole groups keep the top-k's grouping (see group_max)
        b = min(lc, a + -(-(b - a) // GROUP) * GROUP)
        a = max(0, b - -(-(b - a) // GROUP) * GROUP)
    return mb[..., a:b], c0 + a, c0 + b


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
                    block_k: Optional[int] = None, threads: Optional[int] = None) -> RowStats:
    """Exact row statistics of the softmax-family map ``p = normalizer(score_mod(scale · q kᵀ))`` over the
    visible keys, in one streaming pass (two for relaxed softmax); memory O(threads·B·H·block_q·block_k).

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (``layout="bthd"``: ``[B, T, H, D]``; GQA as in
    :func:`attnkit.attention`, whose mask / score_mod / normalizer / scale / offsets these are). Statistics
    are computed in float32 (float64 for float64 inputs). See the module docstring for what each one means.
    ``threads``: CPU cores of the walk (default ``torch.get_num_threads()``): that many Python threads with one
    intra-op thread each (see :func:`walk_softmax`); ignored on other devices.
    """
    spec = StatSpec(sink_tokens, window, topk)
    call, qc, kc = _problem(q, k, mask, score_mod, normalizer, scale, layout, q_offset, kv_offset)
    bq, bk = _blocks(block_q, block_k)
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    sink = RowStatsSink(call.B, call.Hq, call.Lq, spec, _Geo(call.geom.q0, call.geom.k0, call.cdtype, qc.device))
    with torch.no_grad():
        walk_softmax(call, qc, kc, [sink], bq, bk, threads=threads if qc.device.type == "cpu" else None)
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
