"""The peers that compute exactly the same function as an attnkit call, for fair benchmarks.

:func:`peers` returns ``{name: fn}`` with zero-argument callables returning the output ``[B,Hq,Lq,Dv]``:

* ``sdpa-cudnn`` / ``sdpa-flash`` / ``sdpa-efficient``: PyTorch SDPA pinned to one backend, only for
  plain softmax with a full or (end-aligned) causal mask, and only where that backend accepts the
  inputs;
* ``flex``: FlexAttention compiled (``torch.compile``, one process-wide compiled function) whose ``mask_mod`` /
  ``score_mod`` are the attnkit mask and score mods themselves (they are written for 0-d indices under vmap; only
  the end-alignment offset is added here) and a BlockMask built once per call shape. On CPUs it is compiled once
  per mask structure with dynamic sequence lengths (the mask's integer parameters -- window sizes, chunk lengths --
  and the offset reach the kernel as 0-d tensors, so another length or window reuses it: a compile costs seconds
  there; measured on 2 cores the kernel equals a per-shape one at T=1024 and is ~10% slower at Lq=64, Lk=256); on
  GPUs once per shape (kernels specialized to the shape).
  Dynamo's recompile limits are raised so it never falls back to the unfused path. Plain softmax only (Flex has no
  sink / relaxed / elementwise normalizers).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..core import masks as M
from ..core.normalizers import Softmax
from ..core.scores import Idx, ScoreMod, log_counts
from ..dispatch import sdpa

__all__ = ["peers", "flex_mods"]

_flex = {}


def _compiled_flex(dynamic: bool = True):
    """The process-wide compiled ``flex_attention`` every peer call shares: dynamic shapes (one compile per mask and
    score-mod structure), or static (one compile per shape: the fallback where the dynamic compile fails)."""
    if dynamic not in _flex:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, 1 << 14)
        _flex[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _flex[dynamic]


@contextlib.contextmanager
def _shape_generic():
    """Dynamo settings while the compiled Flex peer traces: one symbol per length even where two are equal
    (Lq = Lk), no specialization of lengths that happen to be 1 (one block of queries), so a compiled kernel serves
    every later shape; float parameters of score mods stay constants (a symbolic float becomes a ``.item()`` that
    the CPU Flex lowering cannot take)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config
    fx = {k: x for k, x in (("use_duck_shape", False), ("backed_size_oblivious", True)) if hasattr(fx_config, k)}
    dyn = {k: x for k, x in (("specialize_float", True),) if hasattr(dynamo_config, k)}
    with fx_config.patch(**fx), dynamo_config.patch(**dyn):
        yield


def _params_as_tensors(mask: M.Mask, device) -> M.Mask:
    """A copy of ``mask`` whose leaves hold their integer parameters as 0-d int32 tensors on ``device`` (the same
    ``__call__`` code; for the compiled Flex peer, where a Python int would be a constant of the kernel)."""
    out = copy.copy(mask)
    for name, x in vars(mask).items():
        if isinstance(x, M.Mask):
            setattr(out, name, _params_as_tensors(x, device))
        elif isinstance(x, int) and not isinstance(x, bool):
            setattr(out, name, torch.tensor(x, dtype=torch.int32, device=device))
    return out


def flex_mods(mask: M.Mask, score_mod: Optional[ScoreMod], B: int, Hq: int, Lq: int, Lk: int, device,
              score_dtype: torch.dtype = torch.float32, params_as_tensors: bool = True):
    """``(mask_mod or None, score_mod or None)`` for FlexAttention, or None when a score mod has no Flex form.

    Both call attnkit's own pieces: Flex passes raw row indices ``q_idx``, attnkit's aligned position is
    ``q_idx + (Lk - Lq)`` (with ``params_as_tensors`` the offset and the mask's integer parameters are 0-d
    tensors: see :func:`_params_as_tensors`). Score mod parameters are detached copies on ``device`` (the peer times no
    parameter gradients; nothing moves inside the compiled kernel), and a warm-up call builds the mods'
    caches (standard ALiBi slopes, T5 buckets) there too. Scalable-Softmax reads the log visible-key
    count of each row from a table built once here in ``score_dtype`` (the dtype Flex computes scores
    in: float32, or float64 for float64 inputs).
    """
    off = torch.tensor(Lk - Lq, dtype=torch.int32, device=device) if params_as_tensors else Lk - Lq
    mask_mod = None
    if mask.kind != "full":
        mask.on_device(device)
        flex_mask = _params_as_tensors(mask, device) if params_as_tensors else mask

        def mask_mod(b, h, q_idx, kv_idx):
            return flex_mask(b, h, q_idx + off, kv_idx)

    if score_mod is None:
        return mask_mod, None
    if not all(m.vmappable for m in score_mod.mods()):
        return None
    mod = score_mod.detached(device)
    logn = None
    if mod.needs_counts:
        logn = log_counts(mask.row_counts(B, Hq, Lq, Lk, device=device).to(score_dtype))

    def score(s, b, h, q_idx, kv_idx):
        ln = None if logn is None else logn[b % logn.shape[0], h % logn.shape[1], q_idx]
        return mod(s, Idx(b, h, q_idx + off, kv_idx, None, Lq, Lk, Hq, ln))

    i = torch.zeros((), dtype=torch.int32, device=device)
    score(torch.zeros((), dtype=score_dtype, device=device), i, i, i, i)  # caches filled outside compile
    _mark_static(mod, logn)
    return mask_mod, score


def _mark_static(mod: ScoreMod, *tensors: Optional[Tensor]) -> None:
    """Tell Dynamo the sizes of the tensors a score mod reads (its parameters, buffers and caches, the log-count
    table) are constants of the compiled kernel: Inductor's CPU Flex kernel fails to compile a score mod that
    indexes a captured tensor of symbolic size (torch 2.13), and none of these sizes follows the length except
    the log-count table's, which is rebuilt per shape anyway."""
    import torch._dynamo
    ts = list(tensors)
    for m in mod.modules():
        ts += list(m._parameters.values()) + list(m._buffers.values())
        ts += [x for x in vars(m).values() if isinstance(x, Tensor)]
    for t in ts:
        if t is not None:
            torch._dynamo.mark_static(t)


def flex_call(mask, score_mod, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, device, scale: float
              ) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """``fn(q, k, v)``: the compiled FlexAttention computing attnkit's ``mask`` and ``score_mod`` at this shape (its
    BlockMask built once), or None where a score mod has no FlexAttention form. Other shapes and other parameter
    values of the same mask reuse one compiled kernel on CPUs (:func:`_compiled_flex`); after the first call
    ``fn.compiled`` says which compile ran it ("dynamic"; "static" on GPUs and where the dynamic one failed:
    ``fn.dynamic_error``)."""
    dynamic = torch.device(device).type == "cpu"
    mods = flex_mods(mask, score_mod, B, Hq, Lq, Lk, device, params_as_tensors=dynamic)
    if mods is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask
    mask_mod, sc = mods
    block_mask = None
    if mask_mod is not None:
        Bp, Hp = mask.bh_shape(M.Geometry(B, Hq, Lq, Lk), device)
        # uncompiled build (once per shape): the compiled builder's first inductor compile stalled
        # minutes on a fresh machine; this one evaluates mask_mod over Lq x Lk once
        block_mask = create_block_mask(mask_mod, B if Bp > 1 else None, Hq if Hp > 1 else None, Lq, Lk,
                                       device=device, _compile=False)
    gqa = Hq != Hkv
    kw = dict(score_mod=sc, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if call.compiled is not None:
            return _flex[call.compiled == "dynamic"](q, k, v, **kw)
        if not dynamic:
            call.compiled = "static"
            return _compiled_flex(False)(q, k, v, **kw)
        try:  # the first call at this shape is the one that may trace (the guards do not read these settings)
            with _shape_generic():
                out = _compiled_flex(True)(q, k, v, **kw)
            call.compiled = "dynamic"
        except Exception as e:  # an Inductor failure on dynamic shapes: compile for this shape instead
            call.dynamic_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            out = _compiled_flex(False)(q, k, v, **kw)
            call.compiled = "static"
        return out
    call.compiled, call.dynamic_error = None, None
    return call


def peers(q: Tensor, k: Tensor, v: Tensor, *, mask, score_mod, normalizer, scale: Optional[float]
          ) -> Dict[str, Callable[[], Tensor]]:
    """Peers computing exactly this call (q ``[B,Hq,Lq,D]``, k ``[B,Hkv,Lk,D]``, v ``[B,Hkv,Lk,Dv]``, CUDA)."""
    from ..core.masks import as_mask
    from ..core.normalizers import as_normalizer
    from ..core.scores import as_score_mod
    mask, score_mod, normalizer = as_mask(mask), as_score_mod(score_mod), as_normalizer(normalizer)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out: Dict[str, Callable[[], Tensor]] = {}
    if q.device.type != "cuda":
        return out
    form = sdpa.sdpa_form(q, k, mask, score_mod, normalizer)
    if form is not None:
        for name in sdpa.BACKENDS:
            if sdpa.available(name, q, k, v, form, scale):
                out[f"sdpa-{name}"] = (lambda name=name: sdpa.call(name, q, k, v, form, scale))
    plain = isinstance(normalizer, Softmax) and normalizer.sink is None and normalizer.gamma == 0
    if plain and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        B, Hq, Lq, _ = q.shape
        fn = flex_call(mask, score_mod, B, Hq, k.shape[1], Lq, k.shape[2], q.device, scale)
        if fn is not None:
            out["flex"] = lambda: fn(q, k, v)
    return out

