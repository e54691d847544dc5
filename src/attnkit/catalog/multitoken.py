"""Catalog entry of Multi-Token Attention (Golovneva et al. 2025): inputs, FLOPs and what each form supports."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.multitoken.reference import _mix_plan, multi_token_attention
from .registry import Spec, Variant, register
from .softmax import SOFTMAX_FORMS, kv_cache_bytes, pattern_mask, qkv, reference_only, visible_pairs

#: the paper's kernel sizes (6 query rows, 11 keys) and head-mixing groups of 2
CQ, CK, GROUP = 6, 11, 2


def _group(spec: Spec) -> int:
    return GROUP if spec.Hq % GROUP == 0 else 1


def _make_inputs(spec: Spec) -> dict:
    kernel = 0.1 * torch.randn(spec.Hq, CQ, CK, dtype=spec.dtype, device=spec.device)
    kernel[:, 0, CK // 2] += 1.0  # near the identity convolution, as at initialization in the paper
    g = _group(spec)
    mix = torch.eye(g, dtype=spec.dtype, device=spec.device) + 0.1 * torch.randn(
        spec.Hq // g, g, g, dtype=spec.dtype, device=spec.device)
    return {**qkv(spec), "kernel": kernel, "head_mix": mix, "mask": pattern_mask(spec)}


def _flops(spec: Spec) -> float:
    """Per visible pair: QKᵀ (2D), the convolution (2·cq·ck), PV over n·Dv; plus the head mixing."""
    g = _group(spec)
    n = _mix_plan(spec.Hq, spec.Hkv, g)[1]
    pairs = visible_pairs(pattern_mask(spec), spec)
    return 2.0 * (spec.D + CQ * CK + n * spec.Dv) * pairs + 2.0 * g * spec.Dv * spec.B * spec.Hq * spec.Lq


def _unsupported(spec: Spec, form: str) -> Optional[str]:
    if form == "recurrent" and not spec.causal:
        return "recurrent form needs a mask without look-ahead (causal patterns)"
    return None


_variant = Variant(
    name="multi_token", family="softmax", api="multi_token_attention", aliases=("multi-token",),
    summary=f"softmax over a learned {CQ}x{CK} per-head convolution of the score map, heads mixed in pairs",
    paper="Golovneva et al. 2025, Multi-Token Attention (arXiv:2504.00927)",
    forms=SOFTMAX_FORMS, fn=reference_only(multi_token_attention, "multi-token attention"),
    make_inputs=_make_inputs, masks="any",
    time="O(B·H·pairs·(D + cq·ck + n·Dv)), n = distinct value heads per mixing group",
    memory="materialized O(Lq·Lk); streaming O((block_q+cq)·(block_k+ck)); recurrent O(cq·Lk)",
    cache="K,V: (D+Dv)·Hkv values per token, plus the last cq−1 queries",
    cache_bytes_per_token=kv_cache_bytes, flops=_flops, unsupported=_unsupported, tags=("head-structure",))
register(_variant)
