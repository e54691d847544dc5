"""The peers that compute exactly the same function as an attnkit call, for fair benchmarks.

:func:`peers` returns ``{name: fn}`` with zero-argument callables returning the output ``[B,Hq,Lq,Dv]``:

* ``sdpa-cudnn`` / ``sdpa-flash`` / ``sdpa-efficient``: PyTorch SDPA pinned to one backend, only for
  plain softmax with a full or (end-aligned) causal mask, and only where that backend accepts the
  inputs;
* ``flex``: FlexAttention compiled (``torch.compile``, static shapes, one compile per shape) whose
  ``mask_mod`` / ``score_mod`` are the attnkit mask and score mods themselves (they are written for 0-d
  indices under vmap; only the end-alignment offset is added here) and a BlockMask built once here.
  Dynamo's recompile limits are raised so it never falls back to the unfused path. Plain softmax
  only (Flex has no sink / relaxed / elementwise normalizers).
"""
from __future__ import annotations

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


def _compiled_flex():
    if "fn" not in _flex:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, 1 << 14)
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    return _flex["fn"]


def flex_mods(mask: M.Mask, score_mod: Optional[ScoreMod], B: int, Hq: int, Lq: int, Lk: int, device,
              score_dtype: torch.dtype = torch.float32):
    """``(mask_mod or None, score_mod or None)`` for FlexAttention, or None when a score mod has no Flex form.

    Both call attnkit's own pieces: Flex passes raw row indices ``q_idx``, attnkit's aligned position is
    ``q_idx + (Lk - Lq)``. Score mod parameters are detached copies on ``device`` (the peer times no
    parameter gradients; nothing moves inside the compiled kernel), and a warm-up call builds the mods'
    caches (standard ALiBi slopes, T5 buckets) there too. Scalable-Softmax reads the log visible-key
    count of each row from a table built once here in ``score_dtype`` (the dtype Flex computes scores
    in: float32, or float64 for float64 inputs).
    """
    off = Lk - Lq
    mask_mod = None
    if mask.kind != "full":
        mask.on_device(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return mask(b, h, q_idx + off, kv_idx)

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
    return mask_mod, score


def flex_call(mask, score_mod, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, device, scale: float
              ) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """``fn(q, k, v)``: one compiled FlexAttention computing attnkit's ``mask`` and ``score_mod`` at this shape
    (its BlockMask built once), or None where a score mod has no FlexAttention form."""
    mods = flex_mods(mask, score_mod, B, Hq, Lq, Lk, device)
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
    flex, gqa = _compiled_flex(), Hq != Hkv
    return lambda q, k, v: flex(q, k, v, score_mod=sc, block_mask=block_mask, scale=scale, enable_gqa=gqa)


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

