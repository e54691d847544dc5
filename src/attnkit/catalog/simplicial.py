"""Catalog entry of 2-simplicial attention (Clift et al. 2019; Roy et al. 2025): inputs, FLOPs, cache."""
from __future__ import annotations

from typing import Optional

import torch

from ..core import masks as M
from ..ops.simplicial.reference import WINDOW1, WINDOW2, simplicial_attention
from .registry import Spec, Variant, register
from .softmax import SOFTMAX_FORMS, reference_only

def _windows(spec: Spec):
    """Window sizes for a spec (clipped to Lk)."""
    return min(WINDOW1, spec.Lk), min(WINDOW2, spec.Lk)


def _spec_masks(spec: Spec):
    """Causal patterns: causal windows of w keys; non-causal: windows of w keys centred on the query."""
    if spec.causal:
        return tuple(M.sliding_window(w - 1) for w in _windows(spec))
    return tuple(M.sliding_window(w // 2, w - 1 - w // 2) for w in _windows(spec))


def _make_inputs(spec: Spec) -> dict:
    def r(*shape):
        return torch.randn(*shape, dtype=spec.dtype, device=spec.device)

    B, H, L = spec.B, spec.Hkv, spec.Lk
    m1, m2 = _spec_masks(spec)
    return {"q": r(B, spec.Hq, spec.Lq, spec.D), "k1": r(B, H, L, spec.D), "v1": r(B, H, L, spec.Dv),
            "k2": r(B, H, L, spec.D), "v2": r(B, H, L, spec.Dv), "mask1": m1, "mask2": m2}


def _visible_triples(spec: Spec) -> int:
    """Σ over (b, h, i) of (#keys of set 1) · (#keys of set 2) visible to query i."""
    c1, c2 = (m.row_counts(spec.B, spec.Hq, spec.Lq, spec.Lk) for m in _spec_masks(spec))
    n = (c1 * c2).sum()
    return int(n) * (spec.B // max(c1.shape[0], c2.shape[0])) * (spec.Hq // max(c1.shape[1], c2.shape[1]))


def _flops(spec: Spec) -> float:
    """Per visible triple: the trilinear logit (2·D) and the output Σ p·(v1∘v2) (2·Dv)."""
    return 2.0 * (spec.D + spec.Dv) * _visible_triples(spec)


def _cache_bytes(spec: Spec) -> float:
    """k1, v1, k2, v2 per token (a decoder keeps only the last w1 of set 1 and the last w2 of set 2)."""
    return 2 * spec.Hkv * (spec.D + spec.Dv) * torch.finfo(spec.dtype).bits / 8


#: materialized logits beyond this many entries are left to the streaming form in checks and benches
MATERIALIZED_LIMIT = 1 << 24


def _unsupported(spec: Spec, form: str) -> Optional[str]:
    if form == "recurrent" and not spec.causal:
        return "recurrent form needs masks without look-ahead (causal patterns)"
    if form == "materialized" and spec.B * spec.Hq * spec.Lq * spec.Lk ** 2 > MATERIALIZED_LIMIT:
        return f"materialized form builds [B, H, Lq, Lk, Lk] logits: over {MATERIALIZED_LIMIT} entries here"
    return None


register(Variant(
    name="simplicial", family="softmax", api="simplicial_attention", aliases=("simplicial-2",),
    summary=f"trilinear logits q·(k1_j ∘ k2_k) over windows of {WINDOW1} and {WINDOW2} keys, joint softmax",
    paper="Roy et al. 2025, Fast and Simplex: 2-Simplicial Attention in Triton (arXiv:2507.02754); "
          "Clift et al. 2019, Logic and the 2-Simplicial Transformer",
    forms=SOFTMAX_FORMS, fn=reference_only(simplicial_attention, "2-simplicial attention"),
    make_inputs=_make_inputs, masks="any pair (mask1 for k1, mask2 for k2); default causal windows",
    time="O(B·H·L·w1·w2·(D + Dv))",
    memory="materialized O(Lq·Lk1·Lk2); streaming O(block_q·block_k1·block_k2); recurrent O(w1·w2)",
    cache="k1,v1 of the last w1 tokens and k2,v2 of the last w2 tokens",
    cache_bytes_per_token=_cache_bytes, flops=_flops, unsupported=_unsupported, tags=("head-structure",)))
