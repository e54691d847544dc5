"""Launchers and the autograd Function of the fused softmax-family kernels.

The host does little per call and never waits for the GPU:

* everything that depends only on the call's signature (mask, score mods, normalizer, sizes, dtype,
  device, whether gradients are needed) is built once into a :class:`Problem` kept in an LRU cache:
  kernel switches, parameter buffers, block lists, tuned configurations and the constant parts of every
  launch's arguments. A repeated call reads strides, allocates its outputs and launches;
* after a phase's first launch its compiled kernel is called directly (Triton's argument binding and
  cache lookup skipped), keyed by what Triton specializes on that can still vary: strides, dtypes and
  the 16-byte alignment of the tensors that come with the call;
* parameter values that may change between calls (learnable tensors, tensors on the inputs' device) are
  re-read on every call with device-side copies; numbers and small CPU tensors are part of the cache
  key and copied to the device once.

One forward launch; two backward launches (delta, then dK/dV and dQ in one grid; three where they run apart).
Differential attention (``diff``) runs both of its maps in the same launches (:func:`differential`).
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from ...core.keys import changes as _changes
from ...core.masks import Geometry
from . import plan as P
from ..utils import tuning
from .triton.bwd import attn_bwd, attn_bwd_pre
from .triton.fwd import attn_fwd
from .triton.mods import identity_mod

#: fill outputs with NaN before the kernels write them (tests set this to catch unwritten elements)
POISON = os.environ.get("ATTNKIT_POISON", "0") == "1"
LN2 = math.log(2.0)
#: run dK/dV and dQ as two launches even where one would do (A/B timing, tests)
SPLIT_BWD = os.environ.get("ATTNKIT_SPLIT_BWD", "0") == "1"
#: cached Problems (LRU)
MAX_PROBLEMS = 256


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _empty(*shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_dummies = {}


def _dummy(device, dtype) -> Tensor:
    """A one-element placeholder for pointer arguments a kernel variant never reads (cached)."""
    key = (str(device), dtype)
    if key not in _dummies:
        _dummies[key] = torch.zeros(1, dtype=dtype, device=device)
    return _dummies[key]


def _aligned(*ts: Tensor) -> Tuple[bool, ...]:
    return tuple(t.data_ptr() % 16 == 0 for t in ts)


class Phase:
    """One kernel launch of a Problem: its configuration, block-list arguments, grid and constexpr switches.

    The first launch of each specialization ``sig`` goes through Triton's JIT (compile or cache lookup);
    later ones call the compiled kernel with all arguments in signature order.
    """

    def __init__(self, kernel, cfg: tuning.Config, grid: Tuple[int, int, int], cx: dict, lists: tuple):
        self.kernel, self.cfg, self.grid, self.cx, self.lists = kernel, cfg, grid, cx, lists
        self.compiled: Dict[tuple, object] = {}
        self.tail: Optional[tuple] = None

    def launch(self, sig: tuple, args: tuple) -> None:
        kern = self.compiled.get(sig)
        if kern is not None:
            kern[self.grid](*args, *self.tail)
            return
        kern = self.kernel[self.grid](*args, **self.cx, num_warps=self.cfg.warps, num_stages=self.cfg.stages)
        if kern is not None and not tuning.interpreting():
            if self.tail is None:
                params = self.kernel.params
                n = len(params) - len(self.cx)
                if len(args) != n or any(p.is_constexpr for p in params[:n]):
                    return  # not the layout the direct launch assumes: keep using the JIT path
                self.tail = tuple(self.cx[p.name] for p in params[n:])
            self.compiled[sig] = kern


class Problem:
    """Everything one call signature needs (see the module doc); built once, reused by every later call."""

    def __init__(self, mask, score_mod, normalizer, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int,
                 scale: float, dtype: torch.dtype, device: torch.device, need_grad: bool, diff: bool = False,
                 pos=P.DEFAULT_POS):
        self.keep = (mask, score_mod, normalizer)  # the objects the cache key names by identity stay alive
        self.B, self.Hq, self.Hkv, self.Lq, self.Lk, self.D, self.Dv = B, Hq, Hkv, Lq, Lk, D, Dv
        self.scale, self.dtype, self.device = scale, dtype, device
        self.diff = diff  # differential attention: q / k hold two maps of head dim D each
        self.need_grad = need_grad
        self.pos = pos  # (q_offset, kv_offset) as given; the kernels take the positions of row 0 and key 0
        g = Geometry(B, Hq, Lq, Lk, *pos)
        self.q0, self.k0 = g.q0, g.k0
        self.mp = P.mask_plan(mask, B, device)
        self.mods = P.mod_plan(score_mod, Hq, need_grad)
        self.norm = P.norm_plan(normalizer, Lk)
        self.G = Hq // Hkv
        self.acc_t = torch.float64 if dtype == torch.float64 else torch.float32
        self.need_counts = self.mods.needs_counts or self.norm.needs_counts
        dummy_f, dummy_i = _dummy(device, self.acc_t), _dummy(device, torch.int32)
        self.dummy_f, self.dummy_i = dummy_f, dummy_i
        rb = self.mods.relbias
        self.rbl, self.rb_off = (P.relbias_lut(rb, Lq, Lk, device, self.q0, self.k0) if rb is not None
                                 else (dummy_i, 0))
        self.learnable: List[P.Learnable] = self.mods.learnable + self.norm.learnable
        self.learnable_tensors = [lr.tensor for lr in self.learnable]
        values = [v for _, v in self.mods.values] + [self.norm.value] + ([rb.table] if rb is not None else [])
        self.dynamic = any(_changes(t) for t in values)
        self._const: Dict[int, Tensor] = {}
        self._static_buffers = None if self.dynamic else self._param_buffers()
        # the constant parts of the kernels' shared arguments (see :meth:`common`)
        if self.need_counts:
            counts = P.row_counts(mask, B, Hq, Lq, Lk, device, pos)
            Bp, Hp, _ = counts.shape
            cnt = (counts, Hp * Lq if Bp > 1 else 0, Lq if Hp > 1 else 0)
        else:
            cnt = (dummy_f, 0, 0)
        mp = self.mp
        if mp.mode == P.MODE_BITMAP:
            bmp = P.bitmap(mask, B, Hq, Lq, Lk, device, pos)
            Bp, Hp, nq, nk = bmp.lut.shape
            bm = (bmp.bits, bmp.lut, Hp * nq * nk if Bp > 1 else 0, nq * nk if Hp > 1 else 0, nk)
        else:
            bm = (dummy_i, dummy_i, 0, 0, 1)
        self._c0 = (*cnt, mp.maskp if mp.maskp is not None else dummy_i,
                    mp.maskd if mp.maskd is not None else dummy_i, *bm)
        self._c1 = (float(self.norm.gamma), Hq, self.G, Lq, Lk, self.q0, self.k0, D, Dv, float(scale))
        self.phases: Dict[object, Phase] = {}
        self.split_bwd: Optional[bool] = True if SPLIT_BWD else None  # None: not decided yet

    # -- parameter buffers ----------------------------------------------------------------------
    def _value(self, t) -> Tensor:
        """Per-head ``[Hq]`` device copy of a parameter value; constant ones are copied to the device once."""
        if _changes(t):
            return P.per_head(t, self.Hq, self.device, self.acc_t)
        c = self._const.get(id(t))  # t stays alive: the mod / normalizer plans hold it
        if c is None:
            c = self._const[id(t)] = P.per_head(t, self.Hq, self.device, self.acc_t).contiguous()
        return c

    def _param_buffers(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(modf [4, Hq], relative-bias table, normalizer value [Hq])`` on the device, from the current values."""
        if self.mods.values:
            modf = torch.zeros(4, self.Hq, dtype=self.acc_t, device=self.device)
            for slot, value in self.mods.values:
                modf[slot] = self._value(value)
        else:
            modf = self.dummy_f
        rb = self.mods.relbias
        rbt = (rb.table.detach().to(device=self.device, dtype=self.acc_t).contiguous() if rb is not None
               else self.dummy_f)
        normf = self._value(self.norm.value).contiguous() if self.norm.value is not None else self.dummy_f
        return modf, rbt, normf

    def buffers(self) -> Tuple[Tensor, Tensor, Tensor]:
        """This call's parameter buffers (rebuilt only when a value may have changed since the last call)."""
        return self._static_buffers if self._static_buffers is not None else self._param_buffers()

    def common(self, bufs, lam: Tensor) -> tuple:
        """Arguments shared by every kernel, after the block lists (``lam``: λ per head, differential only)."""
        modf, rbt, normf = bufs
        return self._c0 + (modf, rbt, self.rbl, self.rb_off, normf, lam) + self._c1

    # -- kernel switches --------------------------------------------------------------------------
    def constexprs(self, backward: bool) -> dict:
        fns = [f or identity_mod for f in self.mods.fns]
        c = dict(MASK_MODE=self.mp.mode, MASK_LEAVES=self.mp.leaves, N_LEAVES=self.mp.n_leaves, MASK_TT=self.mp.tt,
                 MODS=self.mods.packed, PW0=fns[0], PW1=fns[1], PW2=fns[2], PW3=fns[3],
                 NORM=self.norm.code, HAS_SINK=self.norm.has_sink, RELAXED=self.norm.gamma > 0, DIFF=self.diff,
                 COUNTS=int(self.mods.needs_counts) | 2 * int(self.norm.needs_counts),
                 FAST_TANH=self.fast_tanh, ACC=self.acc_tl,
                 DOT_PREC=self.dot_prec, BD=_pow2(self.D), BDV=_pow2(self.Dv),
                 EVEN_D=_pow2(self.D) == self.D, EVEN_DV=_pow2(self.Dv) == self.Dv)
        if backward:
            dfns = [f or identity_mod for f in self.mods.dfns]
            c.update(DPW0=dfns[0], DPW1=dfns[1], DPW2=dfns[2], DPW3=dfns[3])
        else:
            c.update(SCALE_NEG=self.scale < 0)
        return c

    @property
    def acc_tl(self):
        return tl.float64 if self.acc_t == torch.float64 else tl.float32

    @property
    def dot_prec(self):
        """float32 inputs: 3xTF32 tensor-core products (~fp32 accuracy); float64 (interpreter): exact."""
        return {torch.float64: "ieee", torch.float32: "tf32x3"}.get(self.dtype)

    @property
    def fast_tanh(self) -> bool:
        return (self.device.type == "cuda" and not tuning.interpreting()
                and self.dtype in (torch.float16, torch.bfloat16))

    def _key(self):
        norm = "softmax" if self.norm.softmax else "elementwise"
        if self.norm.gamma > 0:
            norm = "relaxed"
        if self.diff:
            norm = "differential"
        return (self.device, self.D, self.Dv, self.dtype, self.mp.kind, norm, self.mods.packed != 0)

    # -- phases -----------------------------------------------------------------------------------
    def _lists(self, cfg: tuning.Config, transpose: bool) -> tuple:
        return P.block_lists(self.mp, self.B, self.Hq, self.Lq, self.Lk, cfg.BM, cfg.BN, transpose,
                             self.device, self.pos).args()

    def _phase_parts(self, name: str, cfg, extra: dict):
        """``(kernel, grid, constexprs, list arguments)`` of phase ``name`` at configuration ``cfg``: "fwd",
        "dkdv" or "dq" (one :class:`tuning.Config`), or "bwd" (dK/dV and dQ in one launch; ``cfg`` the pair)."""
        if name == "fwd":
            grid = (triton.cdiv(self.Lq, cfg.BM), self.B * self.Hq, 1)
            return attn_fwd, grid, dict(self.constexprs(False), BM=cfg.BM, BN=cfg.BN), self._lists(cfg, False)
        c1, c2 = cfg if name == "bwd" else (cfg if name == "dkdv" else None, cfg if name == "dq" else None)
        nkv = triton.cdiv(self.Lk, c1.BN) if c1 else 0
        nq = self.G * triton.cdiv(self.Lq, c2.BM) if c2 else 0
        none = (self.dummy_i, self.dummy_i, 0, 0, 1)
        largs = (self._lists(c1, True) if c1 else none) + (self._lists(c2, False) if c2 else none)
        cx = dict(self.constexprs(True), PHASE={"dkdv": 0, "dq": 1, "bwd": 2}[name],
                  BM1=c1.BM if c1 else 16, BN1=c1.BN if c1 else 16, BM2=c2.BM if c2 else 16,
                  BN2=c2.BN if c2 else 16, PGRAD=False, NBP=1)
        if c2:
            cx.update(extra)
        return attn_bwd, (nkv + nq, self.B * self.Hkv, 1), cx, largs

    def _config(self, name: str, make_args, extra: dict):
        def runner(cfg):
            kernel, grid, cx, largs = self._phase_parts(name, cfg, extra)
            args = make_args(largs, cx)
            return lambda: kernel[grid](*args, **cx, num_warps=cfg.warps, num_stages=cfg.stages)
        return tuning.config(name, *self._key(), runner)

    def phase(self, key, name: str, make_args: Callable[[tuple, dict], tuple], extra: Optional[dict] = None,
              ) -> Phase:
        """The Phase ``key`` of kernel phase ``name``: tuned (or looked up) on first use, then cached.

        ``make_args(list arguments, constexprs)`` returns the launch's runtime arguments (used by autotuning).
        "bwd" takes the choices of "dkdv" and "dq" (each tuned on its own)."""
        ph = self.phases.get(key)
        if ph is not None:
            return ph
        extra = extra or {}
        if name == "bwd":
            cfg = (self._config("dkdv", make_args, {}), self._config("dq", make_args, extra))
        else:
            cfg = self._config(name, make_args, extra)
        kernel, grid, cx, largs = self._phase_parts(name, cfg, extra)
        ph = self.phases[key] = Phase(kernel, cfg[0] if name == "bwd" else cfg, grid, cx, largs)
        return ph

    def split_backward(self, make_args, extra: dict) -> bool:
        """Whether dK/dV and dQ run as two launches: only when their tile choices need different warps or
        pipeline stages (a launch has one of each), when forced (``ATTNKIT_SPLIT_BWD=1``), or after the
        one-launch build ran out of resources."""
        if self.split_bwd is None:
            c1 = self._config("dkdv", make_args, {})
            c2 = self._config("dq", make_args, extra)
            self.split_bwd = (c1.warps, c1.stages) != (c2.warps, c2.stages)
        return self.split_bwd

    def run(self, key, name: str, sig: tuple, make_args, extra: Optional[dict] = None) -> Phase:
        """Launch phase ``key``; on an out-of-resources compile step down (fewer stages, then smaller
        blocks) and remember the working choice for the shape class ("bwd" re-raises: :func:`backward` then runs
        dK/dV and dQ as two launches)."""
        ph = self.phase(key, name, make_args, extra)
        while True:
            try:
                ph.launch(sig, make_args(ph.lists, ph.cx))
                return ph
            except OutOfResources:
                cfg = _smaller(ph.cfg)
                if cfg is None or name == "bwd":
                    raise
                tuning.remember(name, *self._key(), cfg)
                kernel, grid, cx, largs = self._phase_parts(name, cfg, extra or {})
                ph = self.phases[key] = Phase(kernel, cfg, grid, cx, largs)


def _smaller(cfg: tuning.Config) -> Optional[tuning.Config]:
    """The next configuration to try when ``cfg`` needs more shared memory than the GPU has."""
    if cfg.stages > 1:
        return tuning.Config(cfg.BM, cfg.BN, cfg.warps, cfg.stages - 1)
    if max(cfg.BM, cfg.BN) > 16:
        return tuning.Config(max(16, cfg.BM // 2), max(16, cfg.BN // 2), cfg.warps, 2)
    return None


# ---------------------------------------------------------------------------------------------
# forward / backward launches
# ---------------------------------------------------------------------------------------------

def forward(pb: Problem, bufs, q: Tensor, k: Tensor, v: Tensor, lam: Tensor):
    """Returns ``(out [B,Hq,Lq,Dv] in q's dtype, base-2 lse or None, o_soft or None)``.

    lse is ``[B,Hq,Lq]`` (``[2,B,Hq,Lq]``, one per map, for differential attention); ``o_soft`` is the softmax
    part of relaxed softmax, or map 2's output ``O2`` for differential attention."""
    B, Hq, Lq, Dv, dev = pb.B, pb.Hq, pb.Lq, pb.Dv, pb.device
    out = _empty(B, Hq, Lq, Dv, dtype=q.dtype, device=dev)
    lse = _empty(1 + pb.diff, B, Hq, Lq, dtype=pb.acc_t, device=dev) if pb.norm.softmax else pb.dummy_f
    has_os = pb.norm.gamma > 0 or pb.diff
    osoft = _empty(B, Hq, Lq, Dv, dtype=q.dtype, device=dev) if has_os else pb.dummy_f
    head = (q, k, v, out, lse, osoft, *q.stride(), *k.stride(), *v.stride())
    tail = pb.common(bufs, lam)
    sig = (q.stride(), k.stride(), v.stride(), k.dtype, v.dtype, _aligned(q, k, v, lam, *bufs))
    pb.run("fwd", "fwd", sig, lambda largs, cx: head + largs + tail)
    if pb.norm.softmax and not pb.diff:
        lse = lse[0]
    return out, (lse if pb.norm.softmax else None), (osoft if has_os else None)


def backward(pb: Problem, bufs, q, k, v, lam, out, lse, osoft, dout, dlse, want_params: bool):
    """Returns ``dq, dk, dv``, the per-role parameter partial sums ``(part, rbpart)`` and ``delta``
    (``[2,B,Hq,Lq]`` for differential attention: map 1's delta, then ``Σ dO·O2``)."""
    B, Hq, Hkv, Lq, Lk, D, Dv, dev = pb.B, pb.Hq, pb.Hkv, pb.Lq, pb.Lk, pb.D, pb.Dv, pb.device
    delta = torch.empty(1 + pb.diff, B, Hq, Lq, dtype=pb.acc_t, device=dev) if pb.norm.softmax else pb.dummy_f
    if pb.norm.softmax:
        ph = pb.phases.get(("pre", dlse is not None))
        if ph is None:
            ph = pb.phases[("pre", dlse is not None)] = Phase(
                attn_bwd_pre, tuning.Config(64, 64, 4, 3), (triton.cdiv(Lq, 64), B * Hq, 1),
                dict(HAS_DLSE=dlse is not None, DIFF=pb.diff, ACC=pb.acc_tl, BM=64, BDV=_pow2(Dv)), ())
        o_used = osoft if pb.norm.gamma > 0 else out
        ph.launch((dout.stride(), dout.dtype, _aligned(dout, lam, *([dlse] if dlse is not None else []))),
                  (o_used, osoft if pb.diff else pb.dummy_f, dout, dlse if dlse is not None else pb.dummy_f, delta,
                   lam, Lq, Dv, 1.0 - pb.norm.gamma, *dout.stride(), Hq))
    if lse is None:
        lse = pb.dummy_f
    dqk = D * (1 + pb.diff)
    dk = _empty(B, Hkv, Lk, dqk, dtype=q.dtype, device=dev)
    dv = _empty(B, Hkv, Lk, Dv, dtype=q.dtype, device=dev)
    dq = _empty(B, Hq, Lq, dqk, dtype=q.dtype, device=dev)
    pgrad = want_params and any(lr.role in ("mod", "relbias", "nbias") for lr in pb.learnable)
    nbp = 1
    if pgrad and any(lr.role == "relbias" for lr in pb.learnable):
        nbp = triton.next_power_of_2(pb.mods.relbias.num_buckets)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    sig = (q.stride(), k.stride(), v.stride(), dout.stride(), k.dtype, v.dtype, dout.dtype,
           _aligned(q, k, v, dout, lam, *bufs))
    tail = pb.common(bufs, lam)
    d = pb.dummy_f
    holder = {}

    def bwd_args(largs, cx):
        nq = -(-Lq // cx["BM2"])
        dq_programs = cx["PHASE"] != 0
        part = torch.empty(B * Hq * nq * 8, dtype=pb.acc_t, device=dev) if pgrad and dq_programs else d
        rbpart = torch.empty(B * Hq * nq * nbp, dtype=pb.acc_t, device=dev) if nbp > 1 and dq_programs else d
        if dq_programs:
            holder.update(part=part, rbpart=rbpart, nprog=nq)
        return (q, k, v, dout, lse, delta, dq, dk, dv, part, rbpart) + strides + largs + tail

    extra = dict(PGRAD=pgrad, NBP=nbp)
    if not pb.split_backward(bwd_args, extra):
        try:
            pb.run(("bwd", pgrad, nbp), "bwd", sig, bwd_args, extra)
        except OutOfResources:
            pb.split_bwd = True
    if pb.split_bwd:
        pb.run("dkdv", "dkdv", sig, bwd_args)
        pb.run(("dq", pgrad, nbp), "dq", sig, bwd_args, extra)
    part = holder["part"].view(B, Hq, holder["nprog"], 8) if pgrad else None
    rbpart = holder["rbpart"].view(B, Hq, holder["nprog"], nbp) if nbp > 1 else None
    return dq, dk, dv, part, rbpart, delta


def _grad_like(g: Tensor, t: Tensor) -> Tensor:
    """A parameter's gradient in its own shape, dtype and device (a scalar parameter sums per-head partials;
    a parameter kept on the CPU while q is on the GPU gets its gradient on the CPU)."""
    g = g.sum() if t.numel() == 1 else g
    return g.reshape(t.shape).to(device=t.device, dtype=t.dtype)


class FusedAttention(torch.autograd.Function):
    """``(out, base-2 lse)`` of the fused kernels; differentiable in q, k, v and the learnable parameters."""

    @staticmethod
    def forward(ctx, pb: Problem, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, *params: Tensor):
        bufs = pb.buffers()
        out, lse2, osoft = forward(pb, bufs, q, k, v, lam)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient
        ctx.pb, ctx.bufs = pb, bufs
        ctx.save_for_backward(q, k, v, lam, out, lse2, osoft)
        if lse2 is None:
            lse2 = q.new_zeros(0)
            ctx.mark_non_differentiable(lse2)
        return out, lse2

    @staticmethod
    def backward(ctx, dout: Tensor, dlse2: Optional[Tensor]):
        refuse_double_backward()
        q, k, v, lam, out, lse2, osoft = ctx.saved_tensors
        dq, dk, dv, dlam, grads = gradients(ctx.pb, ctx.bufs, q, k, v, lam, out, lse2, osoft, dout, dlse2,
                                            ctx.needs_input_grad[4], ctx.needs_input_grad[5:])
        return (None, dq, dk, dv, dlam, *grads)


def refuse_double_backward() -> None:
    """A backward that runs with grad mode on (``create_graph=True``, e.g. a gradient penalty) would return first-order
    gradients detached from the graph, silently dropping the second-order term: refuse it."""
    if torch.is_grad_enabled():
        raise RuntimeError("double backward (create_graph=True) is not supported by the fused attention kernels "
                           "(backend='triton', or 'auto' on CUDA); use backend='reference' with form='materialized', "
                           "whose plain-PyTorch backward is differentiable")


def gradients(pb: Problem, bufs, q, k, v, lam, out, lse2, osoft, dout, dlse2, want_lam: bool, want_params):
    """``(dq, dk, dv, dλ, [d param])`` of one fused call from its saved tensors; ``dout`` / ``dlse2`` may be None
    (that output was not used). ``want_params[i]``: whether ``pb.learnable[i]`` needs its gradient."""
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dlse = None
    if dlse2 is not None and dlse2.numel() and pb.norm.softmax:
        dlse = (dlse2 * (1.0 / LN2)).contiguous()  # gradient with respect to the natural-log lse
    dq, dk, dv, part, rbpart, delta = backward(pb, bufs, q, k, v, lam, out, lse2, osoft, dout, dlse,
                                               any(want_params))
    dlam = -delta[1].sum((0, 2)) if pb.diff and want_lam else None  # dL/dλ_h = −Σ dO·O2
    if not pb.diff:
        delta = delta[0] if pb.norm.softmax else delta
    grads = []
    for lr, want in zip(pb.learnable, want_params):
        if not want:
            grads.append(None)
            continue
        t = lr.tensor
        if lr.role == "mod":
            g = part[..., lr.slot].sum((0, 2))
        elif lr.role == "nbias":
            g = part[..., 4].sum((0, 2))
        elif lr.role == "relbias":
            nb = pb.mods.relbias.num_buckets
            g = rbpart.sum((0, 2))[:, :nb].t()  # [NB, Hq]
        else:  # sink: dL/dσ_h = Σ_rows exp(σ_h − lse) · (−delta)
            lse = lse2 * LN2
            sink = P.per_head(t, pb.Hq, pb.device, pb.acc_t).view(1, -1, 1)
            finite = torch.isfinite(lse)
            p_sink = torch.where(finite, torch.exp(sink - torch.where(finite, lse, torch.zeros_like(lse))),
                                 torch.zeros_like(lse))
            g = (p_sink * (-delta)).sum((0, 2))
        grads.append(_grad_like(g, t))
    return dq, dk, dv, dlam, grads


_problems: "OrderedDict[tuple, Problem]" = OrderedDict()
_problems_lock = threading.Lock()
_mask_keys = None


def _mask_key(mask) -> object:
    """:meth:`Mask.key` (equal masks share one Problem), else the object's identity and the versions of the tensors
    it holds (an in-place update of a document's ids gives a new Problem). Masks that hold no tensor are keyed once."""
    global _mask_keys
    if _mask_keys is None:
        import weakref
        _mask_keys = weakref.WeakKeyDictionary()
    k = _mask_keys.get(mask)
    if k is not None:
        return k
    version = mask.version()
    s = mask.key()
    k = ("s", s) if s is not None else ("id", id(mask), version)
    if not version:
        _mask_keys[mask] = k
    return k


def problem(q: Tensor, k: Tensor, v: Tensor, mask, score_mod, normalizer, scale: float, need_grad: bool,
            diff: bool = False, pos=P.DEFAULT_POS) -> Problem:
    """The cached Problem of this call signature (validated and built on first use); ``diff``: q and k hold the
    two maps of differential attention in the halves of their head dim."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    return _problem(mask, score_mod, normalizer, B, Hq, Hkv, Lq, Lk, D // 2 if diff else D, Dv, scale, q.dtype,
                    q.device, need_grad, diff, pos)


def _problem(mask, score_mod, normalizer, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int,
             scale: float, dtype: torch.dtype, device: torch.device, need_grad: bool, diff: bool,
             pos=P.DEFAULT_POS) -> Problem:
    key = (_mask_key(mask), P.mods_key(score_mod), P.norm_key(normalizer), B, Hq, Hkv, Lq, Lk, D, Dv, scale,
           dtype, device, need_grad, diff, pos)
    pb = _problems.get(key)
    if pb is not None:
        _problems.move_to_end(key)
        return pb
    if score_mod is not None:
        score_mod.validate(Hq)
    normalizer.validate(Hq)
    mask.validate(Geometry(B, Hq, Lq, Lk, *pos))
    pb = Problem(mask, score_mod, normalizer, B, Hq, Hkv, Lq, Lk, D, Dv, scale, dtype, device, need_grad, diff, pos)
    if diff and not (pb.norm.softmax and not pb.norm.has_sink and pb.norm.gamma == 0):
        raise P.Unsupported("differential attention with a normalizer other than plain softmax")
    with _problems_lock:
        _problems[key] = pb
        while len(_problems) > MAX_PROBLEMS:
            _problems.popitem(last=False)
    return pb


def _grad_problem(pb: Problem) -> Problem:
    """``pb``, or its twin built for gradients when only a learnable score-mod / normalizer parameter needs one
    (q, k, v frozen): the gradient plan checks what the backward needs (e.g. a pointwise mod's derivative)."""
    if pb.need_grad or not torch.is_grad_enabled() or not any(t.requires_grad for t in pb.learnable_tensors):
        return pb
    return _problem(*pb.keep, pb.B, pb.Hq, pb.Hkv, pb.Lq, pb.Lk, pb.D, pb.Dv, pb.scale, pb.dtype, pb.device, True,
                    pb.diff, pb.pos)


def attention(q: Tensor, k: Tensor, v: Tensor, mask, score_mod, normalizer, scale: float,
              need_grad: bool, want_lse: bool = True, pos=P.DEFAULT_POS) -> Tuple[Tensor, Optional[Tensor]]:
    """Run the fused kernels on ``[B, H, L, D]`` tensors (views allowed); raises ``plan.Unsupported``.
    ``pos = (q_offset, kv_offset)`` places the queries and keys (:class:`attnkit.masks.Geometry`).

    Returns ``(out, lse)`` with the natural-log lse for softmax-family normalizers when ``want_lse``."""
    pb = _grad_problem(problem(q, k, v, mask, score_mod, normalizer, scale, need_grad, pos=pos))
    if pb.need_grad:
        out, lse2 = FusedAttention.apply(pb, q, k, v, pb.dummy_f, *pb.learnable_tensors)
    else:  # nothing to differentiate: skip the autograd Function's bookkeeping (host time per call)
        out, lse2, _ = forward(pb, pb.buffers(), q, k, v, pb.dummy_f)
    if not (pb.norm.softmax and want_lse):
        return out, None
    return out, lse2 * LN2


def differential(q: Tensor, k: Tensor, v: Tensor, lam, mask, score_mod, scale: float, need_grad: bool) -> Tensor:
    """Differential attention ``out_h = softmax(q1 k1ᵀ) V − λ_h·softmax(q2 k2ᵀ) V`` in one set of launches.

    ``q [B,Hq,Lq,2d]``, ``k [B,Hkv,Lk,2d]`` (maps in the halves of the head dim), ``v [B,Hkv,Lk,Dv]``; ``lam`` a
    float or a tensor of one value or ``[Hq]`` (differentiable). Both maps share each V tile and mask tile in
    the forward, and dV's pass in the backward; raises ``plan.Unsupported``."""
    from ...core.normalizers import as_normalizer
    pb = _grad_problem(problem(q, k, v, mask, score_mod, as_normalizer("softmax"), scale, need_grad, diff=True))
    if isinstance(lam, Tensor):
        lam_h = lam.to(device=pb.device, dtype=pb.acc_t).reshape(-1).expand(pb.Hq).contiguous()
    else:
        lam_h = torch.full((pb.Hq,), float(lam), dtype=pb.acc_t, device=pb.device)
    out, _ = FusedAttention.apply(pb, q, k, v, lam_h, *pb.learnable_tensors)
    return out
