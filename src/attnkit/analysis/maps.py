"""Attention maps: the full ``[B, H, Lq, Lk]`` weights for small problems and exact block means for long ones.

* :func:`attention_map` — the materialized form's weights (``attnkit.attention(..., return_weights=True)``);
* :func:`block_map` — ``[B, H, nq, nk]`` means of the weights over blocks of ``ceil(L / n)`` positions, from the
  streaming walk of :mod:`attnkit.analysis.stats` (no ``Lq × Lk`` tensor; exact: the mean of every block);
* :func:`block_average` — the same block means of a map already in memory.
Linear rules: :func:`attnkit.analysis.linear_maps.linear_map` / ``linear_block_map``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.masks import MaskLike
from ..core.normalizers import Normalizer
from ..core.scores import ScoreMod
from ..dispatch import attention
from .stats import BlockSink, _blocks, _Geo, _problem, walk_softmax

__all__ = ["attention_map", "block_map", "block_average"]


def attention_map(q: Tensor, k: Tensor, *, mask: MaskLike = None,
                  score_mod: Union[ScoreMod, Sequence[ScoreMod], None] = None,
                  normalizer: Union[str, Normalizer] = "softmax", scale: Optional[float] = None, layout: str = "bhtd",
                  q_offset: Optional[int] = None, kv_offset: int = 0) -> Tensor:
    """The weights ``[B, Hq, Lq, Lk]`` of a softmax-family call (materialized form, reference backend; float32 for
    half inputs). O(Lq·Lk) memory: for long sequences use :func:`block_map` or the statistics."""
    _, w = attention(q, k, k, mask=mask, score_mod=score_mod, normalizer=normalizer, scale=scale, layout=layout,
                     q_offset=q_offset, kv_offset=kv_offset, form="materialized", backend="reference",
                     return_weights=True)
    return w


def _side(L: int, n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int (blocks per side), got {n!r}")
    return -(-L // min(n, L))


def block_map(q: Tensor, k: Tensor, *, size: int = 256, mask: MaskLike = None,
              score_mod: Union[ScoreMod, Sequence[ScoreMod], None] = None,
              normalizer: Union[str, Normalizer] = "softmax", scale: Optional[float] = None, layout: str = "bhtd",
              q_offset: Optional[int] = None, kv_offset: int = 0, block_q: Optional[int] = None,
              block_k: Optional[int] = None) -> Tensor:
    """Exact block means ``[B, Hq, nq, nk]`` of the map, ``n = min(size, L)`` blocks per side of ``ceil(L / n)``
    positions (the last shorter; masked entries count as 0), streaming: memory O(B·H·(block_q·block_k + Lq·n/…))."""
    call, qc, kc = _problem(q, k, mask, score_mod, normalizer, scale, layout, q_offset, kv_offset)
    rs, cs = _side(call.Lq, size, "size"), _side(call.Lk, size, "size")
    sink = BlockSink(call.B, call.Hq, call.Lq, call.Lk, rs, cs, _Geo(call.geom.q0, call.geom.k0, call.cdtype,
                                                                       qc.device))
    with torch.no_grad():
        walk_softmax(call, qc, kc, [sink], *_blocks(block_q, block_k))
    return sink.result()


def block_average(weights: Tensor, size: int = 256) -> Tensor:
    """Block means ``[..., nq, nk]`` of a map ``[..., Lq, Lk]`` in memory (blocks as in :func:`block_map`)."""
    if not isinstance(weights, Tensor) or weights.dim() < 2:
        raise ValueError(f"weights must be a tensor [..., Lq, Lk], got {getattr(weights, 'shape', type(weights))}")
    Lq, Lk = weights.shape[-2:]
    rs, cs = _side(Lq, size, "size"), _side(Lk, size, "size")
    nr, nc = -(-Lq // rs), -(-Lk // cs)
    w = torch.nn.functional.pad(weights, (0, nc * cs - Lk, 0, nr * rs - Lq))
    sums = w.unflatten(-1, (nc, cs)).unflatten(-3, (nr, rs)).sum((-3, -1))
    rn = torch.full((nr,), float(rs), dtype=sums.dtype, device=sums.device)
    rn[-1] = Lq - rs * (nr - 1)
    cn = torch.full((nc,), float(cs), dtype=sums.dtype, device=sums.device)
    cn[-1] = Lk - cs * (nc - 1)
    return sums / (rn[:, None] * cn[None, :])
