"""Catalog entry of differential attention (Ye et al. 2024): inputs, FLOPs and what each form supports."""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch.differential import differential_attention
from .registry import Spec, Variant, register
from .softmax import SOFTMAX_FORMS, kv_cache_bytes, pattern_mask, qkv, visible_pairs


def _make_inputs(spec: Spec) -> dict:
    lam = 0.2 + 0.6 * torch.rand(spec.Hq, dtype=spec.dtype, device=spec.device)
    return {**qkv(spec), "lam": lam, "mask": pattern_mask(spec)}


def _flops(spec: Spec) -> float:
    """Two maps of head dim D/2, each QKᵀ (D/2 per pair) and PV (Dv per pair): 2·(D + 2·Dv) per pair."""
    return 2.0 * (spec.D + 2 * spec.Dv) * visible_pairs(pattern_mask(spec), spec)


def _unsupported(spec: Spec, form: str) -> Optional[str]:
    if spec.D % 2:
        return f"needs an even q/k head dim (split into two halves), got D={spec.D}"
    if form == "recurrent" and not spec.causal:
        return "recurrent form needs a mask without look-ahead (causal patterns)"
    return None


_variant = Variant(
    name="differential", family="softmax",
    summary="A1·V − λ_h·A2·V, two softmax maps from split query/key halves",
    paper="Ye et al. 2024, Differential Transformer (arXiv:2410.05258)",
    forms=SOFTMAX_FORMS, fn=differential_attention, make_inputs=_make_inputs, masks="any",
    time="O(B·H·pairs·(D + 2·Dv)) (two maps of head dim D/2)",
    memory="materialized O(Lq·Lk); streaming O(block²); recurrent O(Lk)",
    cache="K,V: (D+Dv)·Hkv values per token (both maps share K's halves and V)",
    cache_bytes_per_token=kv_cache_bytes, flops=_flops, unsupported=_unsupported,
    tags=("head-structure",), backends=("reference", "triton"), full_mask=None, api="differential_attention")
register(_variant)
