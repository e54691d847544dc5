"""The ring's schedule in one process: a replay of every rank (for tests) and a timing simulation on one GPU.

:func:`run_ranks` replays the ring of ``n`` ranks in one process with the same per-block code as the real ring
(:meth:`Ring.forward_block` / :meth:`Ring.backward_block`) and returns global outputs and gradients.

:func:`simulate_softmax` / :func:`simulate_linear` time each rank's work on one device and predict the scaling:

* softmax, ring step ``t`` of rank ``r``: the attention calls of its query pieces against a *copy* of the K/V
  block of rank ``r − t`` (a fresh buffer, as a received block would be), merges included, measured alone and
  with a device copy of the block's bytes running on a side stream (the HBM traffic a transfer adds);
* the transfer of the block to the next rank: ``latency + bytes / link_bw`` with ``link_bw`` the NVLink bandwidth
  per direction (H200 datasheet: 900 GB/s bidirectional per GPU, 450 GB/s each way) times ``link_efficiency``;
* a step takes ``max over ranks of max(compute, transfer)`` (transfers overlap compute; ranks meet at every
  step), the call ``Σ_t step_t``; efficiency ``t_1 / (n · t_n)`` with ``t_1`` the one-GPU call on the whole
  sequence, measured;
* backward: the same ring with the recompute-and-differentiate per pair, and dk/dv accumulators (compute dtype)
  travelling with the blocks, plus one final hop home.
* linear rules: each rank runs its pieces with the ``Dk`` extra value columns of the state map, then one
  all-gather of ``(P, S⁰)`` (``(n − 1)`` hops of one rank's bytes) and a small correction matmul.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import attnkit
from attnkit import masks as M

from ._compat import linear_name
from .comm import Group
from .ring import Ring, RingPlan, Spec, finish
from .shard import ShardLayout, inverse_permutation

__all__ = ["run_ranks", "simulate_softmax", "simulate_linear", "Timer", "NVLINK_H200_PER_DIRECTION"]

#: NVIDIA H200 SXM datasheet: NVLink 900 GB/s per GPU, bidirectional; a ring step sends and receives at once
NVLINK_H200_PER_DIRECTION = 450e9


# ------------------------------------------------------------------------------------------------
# Replay of every rank in one process
# ------------------------------------------------------------------------------------------------

def run_ranks(q: Tensor, k: Tensor, v: Tensor, *, world_size: int, mask=None, score_mod=None, normalizer="softmax",
              scale: Optional[float] = None, backend: str = "auto", load_balance: Optional[str] = "zigzag",
              seq_len: Optional[int] = None, dout: Optional[Tensor] = None, dlse: Optional[Tensor] = None):
    """The ring of ``world_size`` ranks replayed in one process on global ``[B, H, T, D]`` tensors (``T`` the
    padded length). Returns ``(out, lse, grads)`` in global order (``seq_len`` rows), ``grads = (dq, dk, dv,
    dparams)`` when ``dout`` (global, ``seq_len`` rows) is given."""
    B, H, T, D = q.shape
    lay = ShardLayout(world_size, T // world_size, load_balance, seq_len)
    if lay.total != T:
        raise ValueError(f"T={T} must be a multiple of world_size (x2 for zigzag); pad with attnkit.distributed.shard")
    spec = Spec(mask, score_mod, normalizer, 1.0 / math.sqrt(D) if scale is None else scale, backend, lay, "ring")
    plan = RingPlan.build(spec.mask, B, H, lay)
    pos = [lay.positions(r, q.device) for r in range(world_size)]
    sh = lambda x, r: x.index_select(2, pos[r])  # noqa: E731
    rings = [Ring(spec, plan, Group(None, r, world_size), sh(k, r), sh(v, r)) for r in range(world_size)]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for r, ring in enumerate(rings):
        accs = ring.new_accs(sh(q, r), cd)
        for t in range(plan.steps + 1):
            s = (r - t) % world_size
            if plan.holds(r, t):
                ring.forward_block(sh(q, r), (sh(k, s), sh(v, s)), s, accs)
        o, lse = finish(accs, H, spec)
        outs.append(o)
        lses.append(lse)
    inv = inverse_permutation(lay.permutation(q.device))[:lay.length]
    glob = lambda parts: None if parts[0] is None else torch.cat(parts, 2).index_select(2, inv)  # noqa: E731
    out, lse = glob(outs), glob(lses)
    if dout is None:
        return out, lse, None
    pad = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], T - x.shape[2], *x.shape[3:])], 2)  # noqa: E731
    dout_p = pad(dout.to(cd))
    dlse_p = None if dlse is None else pad(dlse.to(cd))
    outs_p = [o for o in outs]
    dq = torch.zeros(B, H, T, D, dtype=cd, device=q.device)
    dk = torch.zeros(*k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(*v.shape, dtype=cd, device=q.device)
    dparams = [torch.zeros_like(p, dtype=cd) for p in spec.params]
    for r, ring in enumerate(rings):
        dq_r = torch.zeros(B, H, lay.local_len, D, dtype=cd, device=q.device)
        for t in range(plan.steps + 1):
            s = (r - t) % world_size
            if plan.holds(r, t) and plan.pairs[r][s]:
                dk_b, dv_b = ring.backward_block(sh(q, r), (sh(k, s), sh(v, s)), s, outs_p[r], lses[r],
                                                 dout_p.index_select(2, pos[r]),
                                                 None if dlse_p is None else dlse_p.index_select(2, pos[r]),
                                                 dq_r, dparams, spec.params, cd)
                dk.index_add_(2, pos[s], dk_b)
                dv.index_add_(2, pos[s], dv_b)
        dq.index_copy_(2, pos[r], dq_r)
    return out, lse, (dq[:, :, :lay.length], dk[:, :, :lay.length], dv[:, :, :lay.length], dparams)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

class Timer:
    """Median wall time of a function: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device, warmup: int = 1, reps: int = 3):
        self.device = torch.device(device)
        self.warmup, self.reps = warmup, reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], side: Optional[Callable[[], object]] = None) -> float:
        """Seconds per call of ``fn``; ``side`` (optional) is launched on a second stream at the same time."""
        for _ in range(self.warmup):
            self._once(fn, side)
        return statistics.median(self._once(fn, side) for _ in range(self.reps))

    def _once(self, fn, side) -> float:
        self.sync()
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            if side is not None:
                side()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if side is not None:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                side()
        fn()
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _translation_invariant(mask: M.Mask) -> bool:
    """Masks whose visibility depends only on ``kv − q`` (then a partial pair's cost depends only on that)."""
    return all(leaf.kind in ("full", "causal", "sliding_window", "dilated") for leaf in mask.leaves())


def _pair_key(plan: RingPlan, r: int, s: int, invariant: bool):
    lay = plan.layout
    key = []
    for i, j in plan.pairs[r][s]:
        (qp, lq), (kp, lk) = lay.segments(r)[i], lay.segments(s)[j]
        if plan.is_full(r, s, i, j):
            key.append(("full", lq, lk))
        else:
            key.append(("partial", lq, lk, qp - kp) if invariant else ("partial", lq, lk, qp, kp))
    return tuple(sorted(key))


def link_time(nbytes: float, bw: float, latency: float) -> float:
    return 0.0 if nbytes == 0 else latency + nbytes / bw


def simulate_softmax(T: int, world_size: int, *, B: int = 1, Hq: int = 16, Hkv: int = 16, D: int = 128,
                     dtype=torch.bfloat16, device="cuda", mask=None, score_mod=None, normalizer="softmax",
                     load_balance: Optional[str] = "zigzag", backend: str = "auto", backward: bool = False,
                     link_bw: float = NVLINK_H200_PER_DIRECTION, link_efficiency: float = 1.0,
                     latency: float = 20e-6, timer: Optional[Timer] = None, t1=None) -> Dict:
    """Predicted time of one context-parallel call (forward, or forward + backward) on ``world_size`` GPUs from
    per-step timings on this device. ``t1``: the one-GPU times (:func:`time_one_gpu_softmax`) if already measured.

    Forward+backward is predicted for both backward modes: ``t_n`` recomputes each pair (``recompute=True``, K/V
    travel again with the dk/dv accumulators), ``t_n_kept`` keeps the forward's graphs (``recompute=False``: per
    step the backward cell minus the forward cell, only the accumulators travel).
    """
    timer = timer or Timer(device)
    n = world_size
    lay = ShardLayout.for_sequence(T, n, load_balance)
    spec = Spec(mask, score_mod, normalizer, 1.0 / math.sqrt(D), backend, lay, "ring")
    plan = RingPlan.build(spec.mask, B, Hq, lay)
    L = lay.local_len
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    cuda = torch.device(device).type == "cuda"
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, Hq, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D)
    peer_k, peer_v = mk(B, Hkv, L, D), mk(B, Hkv, L, D)  # the block a peer would send
    kv_bytes = 2 * k.numel() * k.element_size()
    acc_bytes = 2 * k.numel() * (8 if cd == torch.float64 else 4)
    out = torch.randn(B, Hq, L, D, device=device, dtype=cd)  # merged statistics of the backward (values do not
    lse = torch.randn(B, Hq, L, device=device, dtype=cd) + math.log(L)  # change the cost)
    dout = torch.randn(B, Hq, L, D, device=device, dtype=dtype)
    src = torch.empty(kv_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    side = (lambda: dst.copy_(src)) if cuda else None  # a transfer's HBM traffic next to the compute
    invariant = _translation_invariant(spec.mask)
    cache: Dict[tuple, Dict[str, float]] = {}
    cells: Dict[Tuple[int, int], Dict[str, float]] = {}
    for r in range(n):
        ring = Ring(spec, plan, Group(None, r, n), k, v)
        for t in range(plan.steps + 1):
            s = (r - t) % n
            if not (plan.holds(r, t) and plan.pairs[r][s]):
                continue
            key = _pair_key(plan, r, s, invariant) if invariant else (r, s)
            if key not in cache:
                blk = (peer_k.clone(), peer_v.clone())  # a fresh buffer, as a received block
                fwd = lambda ring=ring, blk=blk, s=s: ring.forward_block(q, blk, s, ring.new_accs(q, cd))  # noqa
                c = dict(fwd=timer(fwd), fwd_copy=timer(fwd, side) if cuda else None)
                if backward:
                    def bwd(ring=ring, blk=blk, s=s):
                        dq = torch.zeros(q.shape, dtype=cd, device=device)
                        ring.backward_block(q, blk, s, out, lse, dout, None, dq, [], [], cd)
                    c.update(bwd=timer(bwd), bwd_copy=timer(bwd, side) if cuda else None)
                cache[key] = c
            cells[(r, t)] = cache[key]
    bw = link_bw * link_efficiency

    def ring_time(phase: str, kv: bool, acc: bool, minus_fwd: bool = False) -> List[float]:
        """Per ring step: max over ranks of max(compute, transfer); compute next to a copy when it transfers."""
        steps = []
        for t in range(plan.steps + (2 if acc else 1)):
            worst = 0.0
            for r in range(n):
                sends_kv = kv and t <= plan.steps and t + 1 <= plan.t_max[(r - t) % n]
                # the accumulator of the block held at t − 1 moves on (or home) during step t
                sends_acc = (acc and 1 <= t <= plan.steps + 1 and plan.holds(r, t - 1)
                             and not (t == 1 and plan.t_max[r] == 0))
                nbytes = (kv_bytes if sends_kv else 0) + (acc_bytes if sends_acc else 0)
                c = cells.get((r, t))
                comp = 0.0
                if c is not None:
                    comp = c[phase + "_copy"] if nbytes and c[phase + "_copy"] is not None else c[phase]
                    if minus_fwd:
                        comp = max(comp - c["fwd"], 0.0)
                worst = max(worst, comp, link_time(nbytes, bw, latency))
            steps.append(worst)
        return steps

    fwd_steps = ring_time("fwd", kv=True, acc=False)
    t_n = sum(fwd_steps)
    res = dict(world_size=n, T=T, backward=backward, fwd_steps=fwd_steps)
    if backward:
        bwd_steps = ring_time("bwd", kv=True, acc=True)
        kept_steps = ring_time("bwd", kv=False, acc=True, minus_fwd=True)
        res.update(bwd_steps=bwd_steps, t_n_kept=t_n + sum(kept_steps))
        t_n += sum(bwd_steps)
    if t1 is None:
        t1 = time_one_gpu_softmax(T, B=B, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, device=device, mask=mask,
                                  score_mod=score_mod, normalizer=normalizer, backend=backend, backward=backward,
                                  timer=timer)
    copy = timer(lambda: src.clone())  # the block's bytes copied on this device (read + write)
    eff = lambda t1x, tn: None if not tn else t1x / (n * tn)  # noqa: E731
    comp_max = [max((c["fwd"] for (r, tt), c in cells.items() if tt == t), default=0.0) for t in range(len(fwd_steps))]
    res.update(t1=t1["same"], t1_best=t1["best"], t1_all=t1, t_n=t_n, efficiency=eff(t1["same"], t_n),
               efficiency_vs_best=eff(t1["best"], t_n), kv_bytes=kv_bytes, link_s=link_time(kv_bytes, bw, latency),
               local_copy_s=copy, link_bw=bw, ring_steps=plan.steps, pair_fraction=plan.pair_fraction(),
               distinct_cells=len(cache),
               comm_bound_steps=sum(1 for st, c in zip(fwd_steps, comp_max) if st > c * 1.0001))
    if backward:
        res.update(efficiency_kept=eff(t1["same"], res["t_n_kept"]))
    return res


def time_one_gpu_softmax(T: int, *, B, Hq, Hkv, D, dtype, device, mask, score_mod, normalizer, backend, backward,
                         timer: Timer) -> Dict[str, float]:
    """The one-GPU call on the whole sequence: ``same`` = the code path of one rank (``return_lse=True``, as the
    ring's calls; the fused kernels), ``best`` = plain :func:`attnkit.attention` (``auto`` may pick cuDNN)."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=backward)  # noqa: E731
    q, k, v = mk(B, Hq, T, D), mk(B, Hkv, T, D), mk(B, Hkv, T, D)

    def fn(lse: bool):
        o = attnkit.attention(q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer, backend=backend,
                              return_lse=lse)
        o = o[0] if lse else o
        if backward:
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    soft = attnkit.normalizers.as_normalizer(normalizer).family == "softmax"
    same = timer(lambda: fn(soft))
    best = timer(lambda: fn(False)) if soft else same
    return dict(same=same, best=best)


def simulate_linear(T: int, world_size: int, *, rule: str, B: int = 1, H: int = 16, D: int = 128,
                    dtype=torch.bfloat16, device="cuda", backward: bool = False, chunk_size: int = 64,
                    link_bw: float = NVLINK_H200_PER_DIRECTION, link_efficiency: float = 1.0,
                    latency: float = 20e-6, timer: Optional[Timer] = None, t1: Optional[float] = None,
                    load_balance: Optional[str] = None) -> Dict:
    """Predicted time of :func:`context_parallel_linear_attention` on ``world_size`` GPUs: each rank's pieces with
    the ``Dk`` extra value columns (timed here), the all-gather of ``(P, S⁰)`` and the correction ``Q S_in``."""
    timer = timer or Timer(device)
    n = world_size
    lay = ShardLayout.for_sequence(T, n, load_balance)
    segs = lay.segments(0)
    args = lambda L, extra: _linear_inputs(rule, B, H, L, D, dtype, device, backward, extra)  # noqa: E731

    def local():
        total = 0.0
        for _, Lp in segs:
            q, k, v, kw = args(Lp, D)
            init = torch.cat([torch.zeros(B, H, D, D, device=device), torch.eye(D, device=device).expand(B, H, D, D)],
                             -1)

            def fn(q=q, k=k, v=v, kw=kw, init=init):
                o, S = attnkit.linear_attention(q, k, v, rule=rule, chunk_size=chunk_size, initial_state=init,
                                                output_final_state=True, **kw)
                corr = o[..., :D].float() + o[..., D:].float() @ S[..., :D]
                if backward:
                    leaves = [x for x in (q, k, v, *kw.values()) if isinstance(x, Tensor) and x.requires_grad]
                    torch.autograd.grad((corr, S), leaves, (torch.ones_like(corr), torch.ones_like(S)))
            total += timer(fn)
        return total

    t_local = local()
    state_bytes = len(segs) * B * H * D * 2 * D * 4  # (P, S⁰) in float32
    gathers = 2 if backward else 1  # forward all-gather, backward all-reduce / reduce-scatter
    t_comm = gathers * (n - 1) * link_time(state_bytes, link_bw * link_efficiency, latency)
    t_n = t_local + t_comm
    if t1 is None:
        q, k, v, kw = args(T, 0)

        def full():
            o, _ = attnkit.linear_attention(q, k, v, rule=rule, chunk_size=chunk_size, **kw)
            if backward:
                leaves = [x for x in (q, k, v, *kw.values()) if isinstance(x, Tensor) and x.requires_grad]
                torch.autograd.grad(o, leaves, torch.ones_like(o))
        t1 = timer(full)
        del q, k, v, kw
    return dict(world_size=n, T=T, backward=backward, rule=rule, t1=t1, t_n=t_n, t_local=t_local, t_comm=t_comm,
                efficiency=t1 / (n * t_n), state_bytes=state_bytes)


def _linear_inputs(rule: str, B: int, H: int, L: int, D: int, dtype, device, grad: bool, extra_cols: int):
    """Random inputs of a gated rule: q, k (L2-normalized for delta rules), v with ``extra_cols`` zero columns,
    log gates and betas."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q, k = mk(B, H, L, D), mk(B, H, L, D)
    v = torch.cat([mk(B, H, L, D), torch.zeros(B, H, L, extra_cols, device=device, dtype=dtype)], -1)
    kw = {}
    spec = linear_name("RULES")[rule]
    if spec.gate == "scalar":
        kw["gate"] = -torch.rand(B, H, L, device=device) * 0.1
    elif spec.gate == "channel":
        kw["gate"] = -torch.rand(B, H, L, D, device=device) * 0.1
    if spec.delta:
        kw["beta"] = torch.rand(B, H, L, device=device)
        kw["qk_l2norm"] = True
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
        for name in ("gate", "beta"):
            if name in kw:
                kw[name].requires_grad_()
    return q, k, v, kw
