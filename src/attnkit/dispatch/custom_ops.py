"""The fused softmax-family kernels as torch custom ops (:mod:`torch.library`), for ``torch.compile`` and
``torch.export``: one opaque node per attention call, with its fake (meta) implementation and registered autograd.

    attnkit::attention_fwd(q, k, v, lam, params, call, scale, q_offset, kv_offset, need_grad, diff)
        -> (out, lse2, osoft)
    attnkit::attention_bwd(q, k, v, lam, params, out, lse2, osoft, dout, dlse2, call, scale, q_offset, kv_offset,
                           diff, want) -> (dq, dk, dv, dlam, dparams)

``call`` names the call's (mask, score mod, normalizer) objects in a registry: the name is computed at trace time
(:func:`torch.compiler.assume_constant_result`; dynamo guards on the objects), and the host planning (block maps,
parameter buffers, tuned tiles) happens inside the op at run time exactly as in eager mode, so a compiled model sees
in-place updates of a mask's tensors too. ``params`` are the learnable tensors of the score mod and normalizer
(:func:`attnkit.ops.softmax.plan.learnable_tensors`, in the kernels' order). ``lse2`` is the base-2 log-sum-exp
(``[B, Hq, Lq]``; ``[2, B, Hq, Lq]`` for differential attention; empty for elementwise normalizers), ``osoft`` the
softmax part of relaxed softmax or map 2 of differential attention (else empty).

Eager calls do not go through the dispatcher: they run the launcher's autograd Function directly, which costs less
host time per call; both paths run the same host functions and kernels (:mod:`attnkit.ops.softmax.fused`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops.softmax import fused as F
from ..ops.softmax import plan as P

_CALLS: Dict[str, tuple] = {}


@torch.compiler.assume_constant_result
def call_name(mask, score_mod, normalizer) -> str:
    """The registry name of a (mask, score mod, normalizer) triple (registered on first use; kept alive)."""
    for obj in (mask, score_mod, normalizer):
        try:
            repr(obj)
        except AttributeError:  # dynamo hands over objects built inside the traced region only half-built
            raise ValueError(f"attnkit under torch.compile: build masks, score mods and normalizers outside the "
                             f"compiled function (e.g. in a module's __init__), not inside it; got a "
                             f"{type(obj).__name__} built during tracing") from None
    name = f"{id(mask)}:{id(score_mod)}:{id(normalizer)}"
    if name not in _CALLS:
        _CALLS[name] = (mask, score_mod, normalizer)
    return name


@torch.compiler.assume_constant_result
def unsupported(score_mod, normalizer, Hq: int, Lk: int, need_grad: bool) -> str:
    """Why the fused kernels cannot compute this call ("" when they can), decided at trace time."""
    try:
        P.mod_plan(score_mod, Hq, need_grad)
        P.norm_plan(normalizer, Lk)
    except P.Unsupported as e:
        return str(e)
    return ""


def _problem(q: Tensor, k: Tensor, v: Tensor, call: str, scale: float, q_offset: Optional[int], kv_offset: int,
             need_grad: bool, diff: bool) -> F.Problem:
    mask, score_mod, normalizer = _CALLS[call]
    return F._grad_problem(F.problem(q, k, v, mask, score_mod, normalizer, scale, need_grad, diff=diff,
                                     pos=(q_offset, kv_offset)))


def _shapes(q: Tensor, v: Tensor, call: str, diff: bool):
    """Output shapes and dtypes: ``(out, lse2, osoft)`` as empty tensors on q's device (the fake implementation)."""
    normalizer = _CALLS[call][2]
    B, Hq, Lq, _ = q.shape
    Dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    softmax = normalizer.family == "softmax"
    lse = (q.new_empty((2, B, Hq, Lq) if diff else (B, Hq, Lq), dtype=acc) if softmax else q.new_empty(0, dtype=acc))
    osoft = q.new_empty(B, Hq, Lq, Dv) if diff or getattr(normalizer, "gamma", 0.0) > 0 else q.new_empty(0)
    return q.new_empty(B, Hq, Lq, Dv), lse, osoft


@torch.library.custom_op("attnkit::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, params: List[Tensor], call: str, scale: float,
                  q_offset: Optional[int], kv_offset: int, need_grad: bool, diff: bool
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    pb = _problem(q, k, v, call, scale, q_offset, kv_offset, need_grad, diff)
    out, lse2, osoft = F.forward(pb, pb.buffers(), q, k, v, lam if diff else pb.dummy_f)
    _, lse0, os0 = _shapes(q, v, call, diff)
    return out, (lse2 if lse2 is not None else lse0), (osoft if osoft is not None else os0)


@attention_fwd.register_fake
def _(q, k, v, lam, params, call, scale, q_offset, kv_offset, need_grad, diff):
    return _shapes(q, v, call, diff)


@torch.library.custom_op("attnkit::attention_bwd", mutates_args=())
def attention_bwd(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, params: List[Tensor], out: Tensor, lse2: Tensor,
                  osoft: Tensor, dout: Tensor, dlse2: Optional[Tensor], call: str, scale: float,
                  q_offset: Optional[int], kv_offset: int, diff: bool, want: int
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    pb = _problem(q, k, v, call, scale, q_offset, kv_offset, True, diff)
    want_params = [bool((want >> (i + 1)) & 1) for i in range(len(params))]
    dq, dk, dv, dlam, grads = F.gradients(pb, pb.buffers(), q, k, v, lam if diff else pb.dummy_f, out,
                                          lse2 if lse2.numel() else None, osoft if osoft.numel() else None, dout,
                                          dlse2, bool(want & 1), want_params)
    empty = q.new_empty(0)
    return (dq, dk, dv, dlam if dlam is not None else empty,
            [g if g is not None else empty for g in grads])


@attention_bwd.register_fake
def _(q, k, v, lam, params, out, lse2, osoft, dout, dlse2, call, scale, q_offset, kv_offset, diff, want):
    dlam = torch.empty_like(lam) if want & 1 else q.new_empty(0)
    dparams = [torch.empty_like(p) if (want >> (i + 1)) & 1 else q.new_empty(0) for i, p in enumerate(params)]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dlam, dparams


def _setup(ctx, inputs, output):
    q, k, v, lam, params, call, scale, q_offset, kv_offset, need_grad, diff = inputs
    out, lse2, osoft = output
    ctx.save_for_backward(q, k, v, lam, out, lse2, osoft, *params)
    ctx.meta = (call, scale, q_offset, kv_offset, diff)
    ctx.want = int(diff and lam.requires_grad) | sum(int(p.requires_grad) << (i + 1) for i, p in enumerate(params))


def _backward(ctx, dout, dlse2, dosoft):
    F.refuse_double_backward()
    q, k, v, lam, out, lse2, osoft, *params = ctx.saved_tensors
    call, scale, q_offset, kv_offset, diff = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dlam, dparams = attention_bwd(q, k, v, lam, params, out, lse2, osoft, dout.contiguous(),
                                              dlse2 if dlse2 is not None and lse2.numel() else None, call, scale,
                                              q_offset, kv_offset, diff, ctx.want)
    grads = [g if (ctx.want >> (i + 1)) & 1 else None for i, g in enumerate(dparams)]
    return dq, dk, dv, (dlam if ctx.want & 1 else None), grads, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, mask, score_mod, normalizer, scale: float, need_grad: bool,
              want_lse: bool, pos=P.DEFAULT_POS, lam: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The fused call through the custom op (what :func:`attnkit.ops.softmax.fused.attention` does eagerly);
    returns ``(out, natural-log lse or None)``. ``lam``: λ per head for differential attention (q / k hold both maps)."""
    diff = lam is not None
    why = unsupported(score_mod, normalizer, q.shape[1], k.shape[2], need_grad)
    if why:
        raise P.Unsupported(why)
    params = P.learnable_tensors(score_mod, normalizer, k.shape[2])
    out, lse2, _ = attention_fwd(q, k, v, lam if diff else q.new_empty(0), params,
                                 call_name(mask, score_mod, normalizer), scale, pos[0], pos[1], need_grad, diff)
    if diff or not want_lse or normalizer.family != "softmax":
        return out, None
    return out, lse2 * F.LN2
