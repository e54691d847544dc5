"""Fused GPU kernels behind ``attnkit.attention(..., backend="triton" | "auto")``.

:func:`run` is the dispatcher the API calls. ``backend="triton"`` runs the Triton kernels of
:mod:`.triton` (on CPU tensors only under ``TRITON_INTERPRET=1``, Triton's interpreter, which the
CPU tests use) or raises ValueError naming what is supported. ``backend="auto"`` on CUDA runs SDPA's
cuDNN / flash kernels where they compute exactly the same function and were measured faster
(:data:`SDPA_AUTO`), else the Triton kernels, else (an unsupported combination) warns once and
returns None so the API runs the unfused streaming reference.

What the kernels compute (see ``notes/kernels.md`` for measurements):

* masks: every built-in leaf in-kernel from its parameters (full, causal incl. end-aligned causal
  cross, sliding window, chunked, prefix-LM, document / cu_seqlens, sinks, dilated) combined with
  ``& | ~`` (up to 4 leaves); any other mask (``predicate``, subclasses, more leaves) through the
  block map plus packed bitmaps of its partial 128×128 tiles, built once per mask and shape;
* score mods (up to 4, in order): softcap, ALiBi (learnable slopes), T5 relative bias (learnable
  table), Scalable-Softmax (learnable s), temperature (learnable τ), and user ``pointwise`` mods
  given a Triton twin ``triton_fn=(fn, dfn)``: ``fn(score, b, h, q_idx, kv_idx)`` returns the new
  score and ``dfn`` (same arguments) its derivative with respect to ``score`` (``dfn`` may be
  omitted for forward-only use). Both are ``triton.jit`` functions on fp32 tiles, e.g.::

      @triton.jit
      def tanh_cap(s, b, h, q, kv):      # 20·tanh(s/20)
          e = tl.exp(-2.0 * tl.abs(s / 20.0)); t = (1.0 - e) / (1.0 + e)
          return 20.0 * tl.where(s >= 0, t, -t)

* normalizers: softmax, softmax with sink logits (learnable) / off-by-one, relaxed softmax,
  sigmoid (learnable bias), relu, relu², none;
* GQA / MQA without repeating K/V, Lq != Lk (end-aligned), Dv != D, head dims 1..256 (padded to a
  power of two ≥ 16 inside the kernel), fp16 / bf16 (fp32 accumulation); fp32 inputs use TF32
  tensor-core products (relative error ~3e-4); fp64 only under the interpreter (tests);
* ``return_lse``; backward for q, k, v and learnable parameters, deterministic by construction
  (no atomics; parameter gradients are per-program partial sums reduced in a fixed order), so
  ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) only turns off the
  SDPA dispatch;
* varlen packed layout through :func:`varlen_attention`;
* differential attention (``A1·V − λ·A2·V``) with both maps in the same launches, sharing each V and
  mask tile, through :func:`run_differential`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.softmax.plan import Unsupported
from ..ops.utils import tuning

__all__ = ["run", "run_differential", "SUPPORTED", "SDPA_AUTO", "available"]

#: SDPA backends ``backend="auto"`` prefers for plain softmax with a full mask (any Lq, Lk) or a causal mask
#: with Lq == Lk, in order (H100, notes/kernels.md: cuDNN 1.5x faster there; empty tuple: always Triton)
SDPA_AUTO: Tuple[str, ...] = ("cudnn", "flash")

SUPPORTED = ("masks: any (built-in leaves in-kernel, others via per-block bitmaps); score mods (<= 4): softcap, "
             "alibi, relative_bias (one), ssmax, temperature, pointwise with triton_fn=(fn, dfn); normalizers: "
             "softmax, softmax_sink, softmax_off_by_one, relaxed, sigmoid, relu, relu2, none; dtypes: float16, "
             "bfloat16, float32 on CUDA (float64 only under TRITON_INTERPRET=1); head dims 1..256; CUDA tensors "
             "(CPU only under TRITON_INTERPRET=1)")

_warned = set()
_sdpa_refused = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


_available = []


def available() -> bool:
    """Whether Triton can be imported (checked once)."""
    if not _available:
        try:
            import triton  # noqa: F401
            _available.append(True)
        except ImportError:
            _available.append(False)
    return _available[0]


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype == torch.float64 and not tuning.interpreting():
        raise Unsupported("float64 inputs (the fused kernels take float16 / bfloat16 / float32 on the GPU)")
    if q.dtype == torch.bfloat16 and tuning.interpreting():
        raise Unsupported("bfloat16 under Triton's CPU interpreter (TRITON_INTERPRET=1), whose tl.dot multiplies "
                          "bf16 bit patterns as integers; use float16 / float32 / float64 there, bfloat16 on the GPU")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise Unsupported(f"dtype {q.dtype}")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise Unsupported(f"head dims up to 256, got D={q.shape[-1]}, Dv={v.shape[-1]}")


def _try_sdpa(q, k, v, mask, score_mod, normalizer, scale) -> Optional[Tuple[str, Tensor]]:
    from . import sdpa
    form = sdpa.sdpa_form(q, k, mask, score_mod, normalizer)
    if form is None or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] != v.shape[-1]:
        return None
    if "attn_mask" in form:  # end-aligned causal cross: SDPA measured no faster than Triton at 8k-16k
        return None
    for name in SDPA_AUTO:
        key = (name, q.dtype, q.shape[-1], q.shape[1], k.shape[1], mask.kind, q.shape[2] == k.shape[2])
        if key in _sdpa_refused:
            continue
        try:
            return f"sdpa-{name}", sdpa.call(name, q, k, v, form, scale)
        except RuntimeError:
            _sdpa_refused.add(key)
    return None


def _fusable(backend: str, q: Tensor) -> bool:
    """Checks every fused call shares: False (``auto``: use the reference) or raise (``triton``)."""
    if backend not in ("auto", "triton"):
        raise ValueError(f"kernels.run takes backend 'auto' or 'triton', got {backend!r}")
    if q.device.type != "cuda":
        if backend == "triton" and not tuning.interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run Triton's CPU "
                             f"interpreter), got device {q.device}")
        if backend == "auto":
            return False
    if not available():
        if backend == "triton":
            raise ValueError("backend='triton' needs the triton package (pip install attnkit[triton])")
        _warn_once("attnkit: triton is not installed; attention runs the unfused streaming reference "
                   "(slow path). Install triton for the fused kernels")
        return False
    return True


def _unsupported(backend: str, e: Unsupported) -> None:
    """``triton``: ValueError naming what is supported; ``auto``: warn once (the caller runs the reference)."""
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot compute this call: {e}. Supported: {SUPPORTED}") from None
    _warn_once(f"attnkit: no fused kernel for this call ({e}); running the unfused streaming reference "
               "instead (slow path)")


def run(backend: str, q: Tensor, k: Tensor, v: Tensor, *, mask, score_mod, normalizer, scale: float,
        return_lse: bool, deterministic: Optional[bool] = None, positions=None):
    """Fused attention for :func:`attnkit.attention`: ``(backend_name, out, lse or None)`` or None.

    ``q [B,Hq,Lq,D]``, ``k [B,Hkv,Lk,D]``, ``v [B,Hkv,Lk,Dv]`` (views allowed). None means "no
    fused kernel; use the reference" (only for ``backend="auto"``).
    """
    if not _fusable(backend, q):
        return None
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if torch.compiler.is_compiling():  # one opaque custom-op node for torch.compile / torch.export
        from .custom_ops import attention as fused
    else:
        from ..ops.softmax.fused import attention as fused
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    try:
        _check(q, k, v)
        if (backend == "auto" and q.device.type == "cuda" and not return_lse and not deterministic
                and positions is None):
            hit = _try_sdpa(q, k, v, mask, score_mod, normalizer, scale)
            if hit is not None:
                return hit[0], hit[1], None
        out, lse = fused(q, k, v, mask, score_mod, normalizer, scale, need_grad, want_lse=return_lse,
                         pos=positions or (None, 0))
    except Unsupported as e:
        return _unsupported(backend, e)
    return "triton", out, (lse if return_lse else None)


def _even(n: int) -> bool:
    """A head dim the kernels use unpadded (a power of two ≥ 16)."""
    return n >= 16 and n & (n - 1) == 0


def run_differential(backend: str, q: Tensor, k: Tensor, v: Tensor, lam, *, mask, score_mod,
                     scale: float) -> Optional[Tensor]:
    """Fused differential attention for :func:`attnkit.differential_attention`: ``out`` or None
    (the caller then runs the two maps as two :func:`attnkit.attention` calls with the same backend).
    ``q [B,Hq,Lq,2d]``, ``k [B,Hkv,Lk,2d]``, ``v [B,Hkv,Lk,Dv]``; both maps run in the same launches (no
    SDPA form computes this).

    Head dims where neither ``d`` nor ``Dv`` is a power of two ≥ 16 (both padded inside the kernel, e.g.
    d = 8 or 24 with Dv = 19 or 40) return None: there the single-call kernel compiled by Triton 3.6 for
    sm_90 gave wrong dQ or an illegal address on the H100 while the interpreter's result was exact
    (notes/kernels.md); two single-map calls are exact there. The interpreter (CPU tests) runs every
    head dim fused."""
    if not _fusable(backend, q):
        return None
    if not (_even(q.shape[-1] // 2) or _even(v.shape[-1]) or tuning.interpreting()):
        return None
    from ..ops.softmax.fused import differential
    need_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v))
                                             or (isinstance(lam, Tensor) and lam.requires_grad))
    try:
        _check(q[..., : q.shape[-1] // 2], k, v)
        return differential(q, k, v, lam, mask, score_mod, scale, need_grad)
    except Unsupported as e:
        return _unsupported(backend, e)
