"""Attention rollout and attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Both take per-layer maps ``A_l [B, T, T]`` (rows = queries, usually averaged over heads) of layers ``1..L`` and add
the residual connection: ``Ã_l = (1 − r) A_l + r I``, rows renormalized to sum 1 (``r = 0.5`` in the paper).

* rollout: ``R = Ã_L Ã_{L−1} ⋯ Ã_1``; ``R[b, i, j]`` is how much output token i draws on input token j;
* flow: the graph with a node per (layer, token), an edge from ``(l−1, j)`` to ``(l, i)`` of capacity
  ``Ã_l[i, j]``; ``F[b, i, j]`` is the maximum flow from input token j (layer 0) to output token i (layer L),
  solved by networkx (``maximum_flow_value``, preflow-push).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["residual_maps", "rollout", "flow"]


def residual_maps(maps: Sequence[Tensor], residual: float = 0.5) -> list:
    """``Ã_l = (1 − r) A_l + r I`` with rows renormalized (rows of zeros stay the identity's)."""
    if not maps:
        raise ValueError("give at least one layer's map")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    out = []
    for i, a in enumerate(maps):
        if not isinstance(a, Tensor) or a.dim() != 3 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"layer {i}: expected a map [B, T, T] (average the heads first), "
                             f"got {tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
        if a.shape != maps[0].shape:
            raise ValueError(f"layer {i}: shape {tuple(a.shape)} differs from layer 0's {tuple(maps[0].shape)}")
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        m = (1 - residual) * a.detach() + residual * eye
        s = m.sum(-1, keepdim=True)
        out.append(torch.where(s != 0, m / torch.where(s != 0, s, torch.ones_like(s)), eye.expand_as(m)))
    return out


def rollout(maps: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout ``Ã_L ⋯ Ã_1`` ``[B, T, T]`` from per-layer maps ``[B, T, T]`` (first layer first)."""
    res = residual_maps(maps, residual)
    r = res[0]
    for a in res[1:]:
        r = a @ r
    return r


def flow(maps: Sequence[Tensor], residual: float = 0.5, outputs: Optional[Sequence[int]] = None) -> Tensor:
    """Attention flow ``[B, len(outputs), T]``: max flow from every input token to each output token (all tokens
    by default) through the layered graph of the residual-augmented maps."""
    import networkx as nx
    res = [a.to(torch.float64).cpu() for a in residual_maps(maps, residual)]
    B, T, _ = res[0].shape
    L = len(res)
    outs = list(range(T)) if outputs is None else [int(o) for o in outputs]
    for o in outs:
        if not 0 <= o < T:
            raise ValueError(f"output token {o} is outside 0..{T - 1}")
    result = torch.zeros(B, len(outs), T, dtype=torch.float64)
    for b in range(B):
        g = nx.DiGraph()
        g.add_nodes_from((l, i) for l in range(L + 1) for i in range(T))
        for l, a in enumerate(res, start=1):
            ab = a[b]
            for i in range(T):
                for j in range(T):
                    c = float(ab[i, j])
                    if c > 0:
                        g.add_edge((l - 1, j), (l, i), capacity=c)
        for oi, o in enumerate(outs):
            for j in range(T):
                result[b, oi, j] = nx.maximum_flow_value(g, (0, j), (L, o))
    return result.to(maps[0].dtype)
