"""Context parallelism for the softmax family: ring attention and all-gather attention over torch.distributed.

Every rank holds a shard of one sequence (:class:`~attnkit.distributed.shard.ShardLayout`: contiguous or zigzag)
for q, k and v. Rank ``r`` needs, for its query rows, the keys of every rank whose piece its mask can see.

**Ring** (``strategy="ring"``). At step ``t`` rank ``r`` holds the K/V block of rank ``s = r − t`` and sends it on
to ``r + 1`` while it computes (``batch_isend_irecv``, overlapped). For every pair (local query piece ``i``, piece
``j`` of block ``s``) that the mask's block map says is not empty it calls :func:`attnkit.attention` with the
pieces' global positions (``q_offset``, ``kv_offset``) and merges the partial results:

* softmax family: ``(o_j, lse_j)`` by log-sum-exp, ``lse = log Σ_j e^{lse_j}``, ``o = Σ_j e^{lse_j − lse} o_j``
  (a row with no visible key: ``lse = −inf``, zeros); a sink logit σ (softmax_sink, off-by-one) is added once at
  the end, ``lse ← log(e^lse + e^σ)``, ``o ← o · e^{lse_keys − lse}``;
* sigmoid, none: plain sums ``o = Σ_j o_j``; relu, relu²: each call divides by its own visible-key count
  ``c_j``, so ``o = Σ_j o_j · max(c_j, 1) / n`` with ``n`` the row's global count.

A block travels only as far as some rank needs it: block ``s`` stops at distance ``t_max(s)``, the largest ``t``
for which rank ``s + t`` sees it, and the ring runs ``max_s t_max(s)`` steps (a sliding window narrower than a
piece runs one step; a causal mask with contiguous shards ``n − 1``). Backward runs the same ring again: each
rank recomputes its pairs (``torch.autograd.grad`` of the per-pair call with the merged statistics: for softmax
``dO_j = e^{lse_j − lse} dO`` and ``dlse_j = e^{lse_j − lse} (dO·(o_j − o) + dlse)``), keeps dq, and adds its
dk/dv to an accumulator that travels with the block and returns to the block's owner from its last stop.

**All-gather** (``strategy="allgather"``): K and V are all-gathered (differentiable) and each local query piece
runs one call over the key range its mask can see. Cheaper for short sequences (one collective, no per-step
merges) and exact for every normalizer and score mod, including relaxed softmax and Scalable-Softmax, which
need the whole row at once and which the ring refuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import attnkit
from attnkit import masks as M
from attnkit import normalizers as N
from attnkit import scores as S

from .comm import P2P, Group, all_gather_stack, check_group, connect as _connect, tag
from .shard import ShardLayout

__all__ = ["context_parallel_attention", "RingPlan", "STRATEGIES"]

STRATEGIES = ("ring", "allgather")
WHAT = "context_parallel_attention"


# ------------------------------------------------------------------------------------------------
# The plan: which (query piece, key piece) pairs each rank computes, how far each block travels
# ------------------------------------------------------------------------------------------------

def _map_block(chunk: int, exact: bool) -> int:
    """Block size of the visibility map: the piece itself for masks with exact bounds, else the largest divisor
    of the piece <= 256 (undecided blocks are then refined element-wise on small tiles)."""
    if exact:
        return chunk
    return max(d for d in range(1, min(chunk, 256) + 1) if chunk % d == 0)


def chunk_visibility(mask: M.Mask, B: int, H: int, layout: ShardLayout) -> Tuple[Tensor, Tensor]:
    """``(visible, full)``, each ``[nc, nc]`` bool over the global pieces of ``layout.chunk`` tokens: whether any
    query of piece ``a`` sees any key of piece ``b`` (for some batch and head), and whether every query sees every
    key (for all of them). Exact: from :meth:`Mask.block_map` of the whole sequence."""
    c, T = layout.chunk, layout.total
    blk = _map_block(c, mask.exact_bounds)
    st = mask.block_map(B, H, T, T, blk, blk).state
    nc, m = T // c, c // blk
    vis = (st != M.EMPTY).any(0).any(0).view(nc, m, nc, m).any(3).any(1)
    full = (st == M.FULL).all(0).all(0).view(nc, m, nc, m).all(3).all(1)
    return vis, full


@dataclass
class RingPlan:
    """Per rank ``r`` and block owner ``s``: ``pairs[r][s]`` = the (local query piece, piece of block ``s``)
    index pairs with at least one visible key; ``t_max[s]`` = how many hops block ``s`` travels."""

    layout: ShardLayout
    pairs: List[List[List[Tuple[int, int]]]]
    t_max: List[int]
    full_pairs: set

    @classmethod
    def build(cls, mask: M.Mask, B: int, H: int, layout: ShardLayout) -> "RingPlan":
        n, c = layout.world_size, layout.chunk
        vis, full = chunk_visibility(mask, B, H, layout)
        segs = [layout.segments(r) for r in range(n)]
        pairs = [[[(i, j) for i, (qs, _) in enumerate(segs[r]) for j, (ks, _) in enumerate(segs[s])
                   if bool(vis[qs // c, ks // c])] for s in range(n)] for r in range(n)]
        t_max = [max([t for t in range(n) if pairs[(s + t) % n][s]], default=0) for s in range(n)]
        full_pairs = {(r, s, i, j) for r in range(n) for s in range(n) for i, j in pairs[r][s]
                      if bool(full[segs[r][i][0] // c, segs[s][j][0] // c])}
        return cls(layout, pairs, t_max, full_pairs)

    def is_full(self, r: int, s: int, i: int, j: int) -> bool:
        """Whether every query of the pair sees every key (the call then needs no mask)."""
        return (r, s, i, j) in self.full_pairs

    @property
    def steps(self) -> int:
        """Number of ring steps after the local one."""
        return max(self.t_max)

    def holds(self, rank: int, t: int) -> bool:
        """Whether ``rank`` holds block ``rank − t`` at step ``t``."""
        return t <= self.t_max[(rank - t) % self.layout.world_size]

    def pair_fraction(self) -> float:
        """Fraction of (rank, block) combinations that compute something."""
        n = self.layout.world_size
        return sum(bool(self.pairs[r][s]) for r in range(n) for s in range(n)) / n ** 2


# ------------------------------------------------------------------------------------------------
# One call's settings, shared by every rank and the single-GPU simulation
# ------------------------------------------------------------------------------------------------

def _learnable(mods) -> List[Tensor]:
    """Tensors requiring grad held by score mods / normalizers (parameters and plain tensor attributes)."""
    seen, out = set(), []
    for mod in mods:
        if mod is None:
            continue
        for m in mod.modules():
            ts = list(m._parameters.values()) + [x for x in vars(m).values() if isinstance(x, Tensor)]
            for t in ts:
                if t is not None and t.requires_grad and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


class Spec:
    """The attention function of one context-parallel call and how partial results merge.

    ``merge`` is ``"lse"`` (softmax family), ``"sum"`` (sigmoid, none) or ``"count"`` (relu, relu²: weights are
    divided by the global visible-key count).
    """

    def __init__(self, mask, score_mod, normalizer, scale, backend: str, layout: ShardLayout, strategy: str):
        self.layout = layout
        mask = M.as_mask(mask)
        if layout.seq_len is not None and layout.seq_len < layout.total:
            mask = mask & M.sinks(layout.seq_len)  # keys at padded positions >= seq_len are invisible
        self.mask = mask
        self.score_mod = S.as_score_mod(score_mod)
        norm = N.as_normalizer(normalizer)
        self.user_norm = norm
        self.scale, self.backend, self.strategy = scale, backend, strategy
        self.sink: Optional[Tensor] = None
        if norm.family == "softmax":
            if strategy == "ring" and norm.gamma > 0:
                raise ValueError("relaxed softmax mixes in γ/n over the whole row (n = visible keys), which partial "
                                 "ring results cannot merge; use strategy='allgather' (exact for every normalizer)")
            self.merge = "lse"
            self.sink = norm.sink
            self.step_norm = N.softmax() if strategy == "ring" else norm
        else:
            self.merge = "count" if norm.divide_by_count and strategy == "ring" else "sum"
            if norm.name == "sigmoid" and norm.bias is None:  # the default −log Lk must use the global length
                norm = N.sigmoid(-math.log(layout.length))
            self.step_norm = norm
        if strategy == "ring" and self.score_mod is not None and self.score_mod.needs_counts:
            raise ValueError("a score mod that needs each row's visible-key count (Scalable-Softmax) sees only one "
                             "block per ring step; use strategy='allgather' (exact for every score mod)")
        self.params = _learnable([self.score_mod, self.step_norm])
        self.sink_param = self.sink if isinstance(self.sink, Tensor) and self.sink.requires_grad else None

    def call(self, q: Tensor, k: Tensor, v: Tensor, q_pos: int, k_pos: int, full: bool = False):
        """One attention call of query rows at positions ``q_pos + i`` over keys at ``k_pos + j``:
        ``(o, lse)`` for the softmax family, ``(o, None)`` otherwise. ``full``: every query sees every key; without
        a score mod the positions then do not matter and the call runs unmasked (no mask tiles to evaluate)."""
        soft = self.merge == "lse"
        if full and self.score_mod is None:
            res = attnkit.attention(q, k, v, normalizer=self.step_norm, scale=self.scale, backend=self.backend,
                                    return_lse=soft)
        else:
            res = attnkit.attention(q, k, v, mask=self.mask, score_mod=self.score_mod, normalizer=self.step_norm,
                                    scale=self.scale, backend=self.backend, return_lse=soft, q_offset=q_pos,
                                    kv_offset=k_pos)
        return res if soft else (res, None)

    def counts(self, B: int, H: int, Lq: int, Lk: int, q_pos: int, k_pos: int, device) -> Tensor:
        """Visible keys per row ``[B', H', Lq, 1]`` of one call (float, for the relu merge)."""
        c = self.mask.row_counts(B, H, Lq, Lk, device=device, q_offset=q_pos, kv_offset=k_pos)
        return c.unsqueeze(-1)

    def sink_logits(self, H: int, like: Tensor) -> Optional[Tensor]:
        """σ as ``[1, H, 1]`` (or ``[1, 1, 1]``) in ``like``'s dtype, or None."""
        if self.sink is None:
            return None
        s = self.sink.to(device=like.device, dtype=like.dtype)
        return s.view(1, -1, 1) if s.dim() == 1 else s.view(1, 1, 1)


def _exp_rel(a: Tensor, m: Tensor) -> Tensor:
    """``exp(a − m)``, 0 where ``m`` is −inf (a row with nothing visible)."""
    fin = torch.isfinite(m)
    return torch.where(fin, torch.exp(a - torch.where(fin, m, torch.zeros_like(m))), torch.zeros_like(a))


class Acc:
    """Running merge of the partial results of one local query piece."""

    def __init__(self, spec: Spec, B: int, H: int, L: int, Dv: int, cd, device):
        self.spec = spec
        self.o = torch.zeros(B, H, L, Dv, dtype=cd, device=device)
        self.lse = torch.full((B, H, L), -math.inf, dtype=cd, device=device) if spec.merge == "lse" else None

    def add(self, o: Tensor, lse: Optional[Tensor], factor: Optional[Tensor] = None) -> None:
        o = o.to(self.o.dtype)
        if self.lse is None:
            self.o += o if factor is None else o * factor
            return
        lse = lse.to(self.o.dtype)
        new = torch.logaddexp(self.lse, lse)
        self.o = self.o * _exp_rel(self.lse, new)[..., None] + o * _exp_rel(lse, new)[..., None]
        self.lse = new

    def finish(self, H: int) -> Tuple[Tensor, Optional[Tensor]]:
        """``(o, lse)`` with the sink logit counted once."""
        if self.lse is None:
            return self.o, None
        sink = self.spec.sink_logits(H, self.o)
        if sink is None:
            return self.o, self.lse
        lse = torch.logaddexp(self.lse, sink.expand_as(self.lse))
        return self.o * _exp_rel(self.lse, lse)[..., None], lse


# ------------------------------------------------------------------------------------------------
# The ring
# ------------------------------------------------------------------------------------------------

def _offsets(segs: Sequence[Tuple[int, int]]) -> List[int]:
    out, o = [], 0
    for _, n in segs:
        out.append(o)
        o += n
    return out


class Ring:
    """The forward and backward ring of one call on rank ``g.rank`` (the per-block compute is also what the
    single-GPU simulation times and what :func:`attnkit.distributed.sim.run_ranks` replays in one process)."""

    def __init__(self, spec: Spec, plan: RingPlan, g: Group, k: Tensor, v: Tensor):
        self.spec, self.plan, self.g = spec, plan, g
        self.rank, self.n = g.rank, g.world_size
        lay = plan.layout
        self.segs = [lay.segments(r) for r in range(self.n)]
        self.offs = [_offsets(s) for s in self.segs]
        # every rank's block has this rank's shape (checked across ranks before the ring)
        self.kshape, self.vshape, self.dtype, self.device = tuple(k.shape), tuple(v.shape), k.dtype, k.device
        self._factors: Dict[Tuple[int, int, int], Tensor] = {}
        self._n_glob: List[Tensor] = []
        #: recompute=False: the forward keeps each pair's autograd graph (and with it every K/V block it saw) and
        #: the backward differentiates those instead of recomputing; K/V then do not travel again
        self.keep = False
        self.saved: Dict[Tuple[int, int, int], tuple] = {}

    # -- pieces ------------------------------------------------------------------------------------
    def rows(self, i: int) -> slice:
        """Local rows of query piece ``i``."""
        a = self.offs[self.rank][i]
        return slice(a, a + self.segs[self.rank][i][1])

    def cols(self, s: int, j: int) -> slice:
        """Rows of piece ``j`` inside block ``s``."""
        a = self.offs[s][j]
        return slice(a, a + self.segs[s][j][1])

    def _empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def factor(self, B: int, H: int, s: int, i: int, j: int) -> Optional[Tensor]:
        """relu merge: ``max(c, 1) / max(n, 1)`` per row of query piece ``i`` against piece ``j`` of block ``s``
        (``c`` the pair's visible keys, ``n`` the row's over the whole sequence)."""
        if self.spec.merge != "count":
            return None
        key = (s, i, j)
        if key not in self._factors:
            if not self._n_glob:
                for qp, Lq in self.segs[self.rank]:
                    c = self.spec.counts(B, H, Lq, self.plan.layout.total, qp, 0, self.device)
                    self._n_glob.append(c.clamp(min=1))
            (qp, Lq), (kp, Lk) = self.segs[self.rank][i], self.segs[s][j]
            c = self.spec.counts(B, H, Lq, Lk, qp, kp, self.device).clamp(min=1)
            self._factors[key] = c.double() / self._n_glob[i].double()
        return self._factors[key]

    def new_accs(self, q: Tensor, cd) -> List[Acc]:
        B, H = q.shape[:2]
        return [Acc(self.spec, B, H, L, self.vshape[-1], cd, q.device) for _, L in self.segs[self.rank]]

    # -- compute on one block --------------------------------------------------------------------------
    def forward_block(self, q: Tensor, kv: Tuple[Tensor, Tensor], s: int, accs: List[Acc]) -> None:
        """Merge the partial results of this rank's query pieces against block ``s`` into ``accs``."""
        B, H = q.shape[:2]
        r = self.rank
        for i, j in self.plan.pairs[r][s]:
            if self.keep:
                with torch.enable_grad():
                    o, lse = self._pair(q, kv, s, i, j)
                o, lse = o.detach(), None if lse is None else lse.detach()
            else:
                cj = self.cols(s, j)
                o, lse = self.spec.call(q[:, :, self.rows(i)], kv[0][:, :, cj], kv[1][:, :, cj],
                                        self.segs[r][i][0], self.segs[s][j][0], self.plan.is_full(r, s, i, j))
            f = self.factor(B, H, s, i, j)
            accs[i].add(o, lse, None if f is None else f.to(accs[i].o.dtype))

    def _pair(self, q, kv, s, i, j):
        """The pair's call on leaf views that require grad; the graph is kept in ``saved``."""
        r, cj = self.rank, self.cols(s, j)
        qx = q[:, :, self.rows(i)].detach().requires_grad_()
        kx = kv[0][:, :, cj].detach().requires_grad_()
        vx = kv[1][:, :, cj].detach().requires_grad_()
        o, lo = self.spec.call(qx, kx, vx, self.segs[r][i][0], self.segs[s][j][0], self.plan.is_full(r, s, i, j))
        self.saved[(s, i, j)] = (qx, kx, vx, o, lo)
        return o, lo

    def backward_block(self, q, kv, s, out, lse, dout, dlse, dq, dparams, params, cd) -> Tuple[Tensor, Tensor]:
        """This rank's share of dk, dv of block ``s`` (adds its dq and parameter gradients in place): the
        per-pair call (recomputed, or its graph kept by the forward) differentiated with the merged statistics."""
        r, spec = self.rank, self.spec
        B, H = q.shape[:2]
        dk, dv = self._zeros(self.kshape, cd), self._zeros(self.vshape, cd)
        for i, j in self.plan.pairs[r][s]:
            rows, cj = self.rows(i), self.cols(s, j)
            with torch.enable_grad():
                if (s, i, j) not in self.saved:
                    self._pair(q, kv, s, i, j)
                qx, kx, vx, o, lo = self.saved.pop((s, i, j))
                do = dout[:, :, rows].to(cd)
                if spec.merge == "lse":
                    w = _exp_rel(lo.to(cd), lse[:, :, rows])
                    dl = (do * (o.to(cd) - out[:, :, rows])).sum(-1)
                    if dlse is not None:
                        dl = dl + dlse[:, :, rows]
                    outs, grads_out = (o, lo), ((w[..., None] * do).to(o.dtype), (w * dl).to(lo.dtype))
                else:
                    f = self.factor(B, H, s, i, j)
                    outs, grads_out = (o,), ((do if f is None else do * f.to(cd)).to(o.dtype),)
                grads = torch.autograd.grad(outs, [qx, kx, vx] + params, grads_out, allow_unused=True)
            for acc, gr in ((dq[:, :, rows], grads[0]), (dk[:, :, cj], grads[1]), (dv[:, :, cj], grads[2])):
                if gr is not None:
                    acc += gr
            for acc, gp in zip(dparams, grads[3:]):
                if gp is not None:
                    acc += gp
        return dk, dv

    # -- the ring ----------------------------------------------------------------------------------------
    def _post_kv(self, p2p: P2P, cur, t: int):
        """Queue the K/V transfers between step ``t`` and ``t + 1``; returns the buffers of the block that
        arrives (None when none does)."""
        r, plan = self.rank, self.plan
        if t + 1 <= plan.t_max[(r - t) % self.n]:  # the block I hold goes on to r + 1
            p2p.send(cur[0], r + 1, tag(t, 0))
            p2p.send(cur[1], r + 1, tag(t, 1))
        if plan.holds(r, t + 1):  # block r − t − 1 reaches me at step t + 1
            return (p2p.recv(self._empty(self.kshape, self.dtype), r - 1, tag(t, 0)),
                    p2p.recv(self._empty(self.vshape, self.dtype), r - 1, tag(t, 1)))
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        r, n, plan = self.rank, self.n, self.plan
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        accs = self.new_accs(q, cd)
        cur = (k.contiguous(), v.contiguous())
        p2p = P2P(self.g, WHAT)
        for t in range(plan.steps + 1):
            nxt = self._post_kv(p2p, cur, t) if n > 1 else None
            pending = p2p.start(t)  # sends / receives run while this step computes
            try:
                if plan.holds(r, t):
                    self.forward_block(q, cur, (r - t) % n, accs)
            except BaseException:
                pending.drain()
                raise
            pending.wait()
            cur = nxt
        return finish(accs, q.shape[1], self.spec)

    def backward(self, q, k, v, out, lse, dout, dlse, params):
        """Ring backward: K/V travel as in forward; each block's dk/dv accumulator travels with it (sent one step
        later, overlapping the next compute) and goes home to the block's owner from its last stop."""
        r, n, plan = self.rank, self.n, self.plan
        cd = out.dtype
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dparams = [torch.zeros_like(p, dtype=cd) for p in params]
        dk_own = dv_own = None
        cur = None if self.keep else (k.contiguous(), v.contiguous())
        p2p = P2P(self.g, WHAT)
        pend = None  # (dk, dv, destination, tag kind) completed at the previous step
        for t in range(plan.steps + 2):
            s = (r - t) % n
            holds = t <= plan.steps and plan.holds(r, t)
            nxt = acc_in = own_in = None
            if n > 1:
                nxt = self._post_kv(p2p, cur, t) if t <= plan.steps and not self.keep else None
                if pend is not None:
                    p2p.send(pend[0], pend[2], tag(t, pend[3]))
                    p2p.send(pend[1], pend[2], tag(t, pend[3] + 1))
                if holds and t >= 1:  # block s's accumulator arrives from r − 1
                    acc_in = (p2p.recv(self._zeros(self.kshape, cd), r - 1, tag(t, 2)),
                              p2p.recv(self._zeros(self.vshape, cd), r - 1, tag(t, 3)))
                if plan.t_max[r] >= 1 and t == plan.t_max[r] + 1:  # my block's gradient comes home
                    src = r + plan.t_max[r]
                    own_in = (p2p.recv(self._zeros(self.kshape, cd), src, tag(t, 4)),
                              p2p.recv(self._zeros(self.vshape, cd), src, tag(t, 5)))
            pending = p2p.start(t)
            pend = None
            dkv = None
            try:
                if holds and plan.pairs[r][s]:
                    dkv = self.backward_block(q, cur, s, out, lse, dout, dlse, dq, dparams, params, cd)
            except BaseException:
                pending.drain()
                raise
            pending.wait()
            if holds:
                dk_b, dv_b = dkv if dkv is not None else (self._zeros(self.kshape, cd), self._zeros(self.vshape, cd))
                if acc_in is not None:
                    dk_b, dv_b = dk_b + acc_in[0], dv_b + acc_in[1]
                if t < plan.t_max[s]:
                    pend = (dk_b, dv_b, r + 1, 2)
                elif t == 0:
                    dk_own, dv_own = dk_b, dv_b
                else:  # last stop: home to the owner
                    pend = (dk_b, dv_b, s, 4)
            if own_in is not None:
                dk_own, dv_own = own_in
            cur = nxt
        return dq, dk_own, dv_own, dparams


def finish(accs: List[Acc], H: int, spec: Spec) -> Tuple[Tensor, Optional[Tensor]]:
    """Concatenate the merged pieces: ``(out [B,H,L,Dv], lse [B,H,L] or None)`` in the compute dtype."""
    parts = [a.finish(H) for a in accs]
    out = torch.cat([p[0] for p in parts], 2)
    return out, (torch.cat([p[1] for p in parts], 2) if spec.merge == "lse" else None)


class _RingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring: Ring, q, k, v, *params):
        with torch.no_grad():
            out, lse = ring.forward(q, k, v)
        ctx.ring = ring
        if lse is None:
            lse = out.new_zeros(0)
            ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, *params)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *params = ctx.saved_tensors
        ring = ctx.ring
        spec = ring.spec
        if dlse is not None and dlse.numel() == 0:
            dlse = None
        sink_p = spec.sink_param
        step_params = [p for p in params if p is not sink_p]
        cd = out.dtype  # dk/dv accumulators travel in the compute dtype (float32 for half inputs)
        dq, dk, dv, dps = ring.backward(q, k, v, out, lse if spec.merge == "lse" else None, dout,
                                        None if dlse is None else dlse.to(cd), step_params)
        grads, it = [], iter(dps)
        for p in params:
            if p is sink_p:
                g = _sink_grad(spec, out, lse, dout, dlse, q.shape[1])
            else:
                g = next(it)
            grads.append(g.to(dtype=p.dtype, device=p.device))
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *grads)


def _sink_grad(spec: Spec, out, lse, dout, dlse, H: int) -> Tensor:
    """dσ = Σ_rows e^{σ − lse} (dlse − dO·O) (the sink logit enters every row's denominator once)."""
    sink = spec.sink_logits(H, out)
    w = torch.exp(sink - lse)  # lse >= σ: finite
    g = -(dout.to(out.dtype) * out).sum(-1)
    if dlse is not None:
        g = g + dlse.to(out.dtype)
    d = (w * g).sum(-1)  # [B, H]
    return d.sum(0) if spec.sink.dim() == 1 else d.sum()


# ------------------------------------------------------------------------------------------------
# All-gather attention
# ------------------------------------------------------------------------------------------------

def _allgather(spec: Spec, plan: RingPlan, g: Group, q: Tensor, k: Tensor, v: Tensor):
    """K and V gathered in global order; one call per local query piece over the key range it can see."""
    from .shard import inverse_permutation

    lay = plan.layout
    r, n, c = g.rank, g.world_size, lay.chunk
    D = k.shape[-1]
    KV = torch.cat(all_gather_stack(torch.cat([k, v], -1), g).unbind(0), 2)  # one collective, rank-major
    K, V = KV[..., :D], KV[..., D:]
    if lay.load_balance is not None:
        inv = inverse_permutation(lay.permutation(k.device))
        K, V = K.index_select(2, inv), V.index_select(2, inv)
    soft = spec.merge == "lse"
    outs, lses, off = [], [], 0
    for i, (qp, Lq) in enumerate(lay.segments(r)):
        qi = q[:, :, off:off + Lq]
        off += Lq
        starts = [lay.segments(s)[j][0] for s in range(n) for ii, j in plan.pairs[r][s] if ii == i]
        if not starts:  # no visible key anywhere: zeros, lse = the sink logit or −inf
            cd = torch.float64 if q.dtype == torch.float64 else torch.float32
            B, H = q.shape[:2]
            outs.append(_connect(q.new_zeros(B, H, Lq, v.shape[-1]), KV))  # joins the backward all-reduce
            sink = spec.sink_logits(H, torch.empty(0, dtype=cd, device=q.device))
            lses.append(torch.full((B, H, Lq), -math.inf, dtype=cd, device=q.device) if sink is None
                        else sink.expand(B, H, Lq))
            continue
        lo, hi = min(starts), max(starts) + c
        o = attnkit.attention(qi, K[:, :, lo:hi], V[:, :, lo:hi], mask=spec.mask, score_mod=spec.score_mod,
                              normalizer=spec.step_norm, scale=spec.scale, backend=spec.backend, return_lse=soft,
                              q_offset=qp, kv_offset=lo)
        if soft:
            o, lse = o
            lses.append(lse)
        outs.append(o)
    return torch.cat(outs, 2), (torch.cat(lses, 2) if soft else None)


# ------------------------------------------------------------------------------------------------
# The public call
# ------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_tensors(q, k, v, layout: str):
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'[B, H, T, D]' if layout == 'bhtd' else '[B, T, H, D]'}, "
                             f"layout={layout!r}), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float64/float32/bfloat16/float16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout == "bthd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.shape[2] != k.shape[2] or k.shape[2] != v.shape[2]:
        raise ValueError(f"each rank holds the same positions for q, k and v (self-attention shards): local lengths "
                         f"must match, got q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}, v "
                         f"{v.shape[1]})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[3]} and {k.shape[3]}")
    return q, k, v


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    mask: M.MaskLike = None,
    score_mod=None,
    normalizer="softmax",
    scale: Optional[float] = None,
    backend: str = "auto",
    strategy: str = "ring",
    layout: str = "bhtd",
    load_balance: Optional[str] = "zigzag",
    seq_len: Optional[int] = None,
    return_lse: bool = False,
    recompute: bool = True,
    check: bool = True,
):
    """Softmax-family attention over a sequence sharded across the ranks of ``group``.

    Every rank passes its shard (``[B, H, L, D]`` or ``[B, L, H, D]`` with ``layout="bthd"``; the same ``L`` on
    every rank) of q, k, v, laid out by :class:`~attnkit.distributed.ShardLayout` (``load_balance="zigzag"``:
    pieces ``r`` and ``2n−1−r`` of ``2n``; None: piece ``r`` of ``n``; see :func:`attnkit.distributed.shard`).
    ``mask``, ``score_mod`` and ``normalizer`` describe the whole sequence of ``n·L`` positions, exactly as for
    :func:`attnkit.attention` on the unsharded tensors (document ids must cover the padded length:
    :func:`~attnkit.distributed.pad_cu_seqlens`). ``seq_len``: the true length when the shards are padded (keys
    at positions ``>= seq_len`` are masked). ``strategy``: ``"ring"`` (K/V blocks passed around, memory
    O(L)) or ``"allgather"`` (K/V gathered, one call per piece; every normalizer). ``check``: compare shapes and
    settings across ranks first (one small collective) so a mismatched shard or a rank's bad argument raises on
    every rank instead of hanging. ``recompute`` (ring): the backward recomputes each pair's forward, memory
    O(L) per rank; False keeps every pair's graph from the forward (memory O(n·L): every K/V block), so the
    backward neither recomputes nor passes K/V again (only the dk/dv accumulators travel). Learnable score-mod /
    normalizer tensors get this rank's share of their gradient (sum them over the group, as DDP/FSDP do for
    parameters). Every rank must run backward through the call (its ring is a collective).

    Returns this rank's output shard (q's dtype and layout), plus the log-sum-exp ``[B, H, L]`` of its rows with
    ``return_lse`` (softmax family).
    """
    g = Group.of(group)
    err, sig, spec, plan = None, {}, None, None
    try:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        qb, kb, vb = _check_tensors(q, k, v, layout)
        B, H, L, D = qb.shape
        lay = ShardLayout(g.world_size, L, load_balance, seq_len)
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        spec = Spec(mask, score_mod, normalizer, scale, backend, lay, strategy)
        if return_lse and spec.merge != "lse":
            raise ValueError(f"return_lse needs a softmax-family normalizer, got {spec.user_norm.name!r}")
        plan = RingPlan.build(spec.mask, B, H, lay)
        sig = dict(q=tuple(qb.shape), k=tuple(kb.shape), v=tuple(vb.shape), dtype=str(q.dtype),
                   device=q.device.type, layout=layout, load_balance=load_balance, seq_len=seq_len,
                   strategy=strategy, mask=repr(spec.mask), normalizer=spec.user_norm.name,
                   score_mod=repr(spec.score_mod), scale=scale, backend=backend, recompute=recompute)
    except Exception as e:  # shared with every rank by check_group, then raised everywhere
        err = e
    if check:
        check_group(g, WHAT, sig, err)
    elif err is not None:
        raise err
    if strategy == "allgather":
        out, lse = _allgather(spec, plan, g, qb, kb, vb)
    else:
        ring = Ring(spec, plan, g, kb, vb)
        ring.keep = not recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (qb, kb, vb))
        out, lse = _RingFn.apply(ring, qb, kb, vb, *(spec.params + ([spec.sink_param] if spec.sink_param is not None
                                                                     else [])))
        if spec.merge != "lse":
            lse = None
    out = out.to(q.dtype)
    if layout == "bthd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
