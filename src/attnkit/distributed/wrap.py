"""Context parallelism for layers: one config object a layer holds, and a generic module wrapper.

A layer that produces q/k/v from its input and calls :func:`attnkit.attention` (or
:func:`attnkit.linear_attention`) becomes context parallel by

1. taking the global positions of its local rows from :meth:`CPConfig.positions` (RoPE, learned positions), and
2. calling :meth:`CPConfig.attention` / :meth:`CPConfig.linear_attention` instead of the single-device call.

:class:`ContextParallel` does both for any q/k/v-producing callable or module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .comm import Group, all_gather_stack, gather_sequence
from .linear import context_parallel_linear_attention
from .ring import context_parallel_attention
from .shard import ShardLayout, shard

__all__ = ["CPConfig", "ContextParallel"]


@dataclass
class CPConfig:
    """How a sequence is sharded over ``group`` (None: the default group; a single process when
    torch.distributed is not initialized).

    ``load_balance``: ``"zigzag"`` (causal softmax layers: balanced work) or None (contiguous);
    ``seq_len``: the true global length when the shards are padded; ``strategy``: ``"ring"`` or ``"allgather"``
    for softmax layers; ``check``: the cross-rank argument check before each call.
    """

    group: Any = None
    load_balance: Optional[str] = "zigzag"
    seq_len: Optional[int] = None
    strategy: str = "ring"
    check: bool = True

    @property
    def world(self) -> Group:
        return Group.of(self.group)

    def layout(self, local_len: int) -> ShardLayout:
        return ShardLayout(self.world.world_size, local_len, self.load_balance, self.seq_len)

    def positions(self, local_len: int, device=None) -> Tensor:
        """Global positions ``[local_len]`` of this rank's rows."""
        return self.layout(local_len).positions(self.world.rank, device)

    def shard(self, x: Tensor, dim: int = 1, pad_value: float = 0.0) -> Tensor:
        """This rank's shard of a global tensor (padded to the layout; ``dim=1`` for ``[B, T, ...]``)."""
        w = self.world
        return shard(x, w.rank, w.world_size, dim=dim, load_balance=self.load_balance, pad_value=pad_value)

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        """The global tensor from every rank's shard (differentiable; padding dropped to ``seq_len``)."""
        return gather_sequence(x, self.layout(x.shape[dim]), self.group, dim)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, **kw):
        """:func:`context_parallel_attention` with this config (``kw``: mask, score_mod, normalizer, layout, ...)."""
        kw.setdefault("strategy", self.strategy)
        return context_parallel_attention(q, k, v, group=self.group, load_balance=self.load_balance,
                                          seq_len=self.seq_len, check=self.check, **kw)

    def linear_attention(self, q: Optional[Tensor], k: Optional[Tensor], v: Tensor, **kw):
        """:func:`context_parallel_linear_attention` with this config (``kw``: rule, gate, beta, layout, ...)."""
        return context_parallel_linear_attention(q, k, v, group=self.group, load_balance=self.load_balance,
                                                 seq_len=self.seq_len, check=self.check, **kw)

    def halo(self, x: Tensor, width: int, dim: int = 1) -> List[Tensor]:
        """For each local piece, the ``width`` tokens just before it in the global sequence (zeros before
        position 0), e.g. the left context of a causal short convolution. Differentiable."""
        w = self.world
        lay = self.layout(x.shape[dim])
        dim = dim % x.dim()
        if width < 1 or width > lay.chunk:
            raise ValueError(f"halo width must be in [1, {lay.chunk}] (one piece), got {width}")
        tails, off = [], 0
        for _, n in lay.segments(w.rank):
            tails.append(x.narrow(dim, off + n - width, width))
            off += n
        allt = all_gather_stack(torch.stack(tails), w)  # [world, pieces, ...]
        owner = {s: (r, i) for r in range(w.world_size) for i, (s, _) in enumerate(lay.segments(r))}
        out = []
        for s, _ in lay.segments(w.rank):
            if s == 0:
                out.append(torch.zeros_like(tails[0]))
            else:
                r, i = owner[s - lay.chunk]
                out.append(allt[r, i])
        return out


class ContextParallel(nn.Module):
    """A context-parallel attention layer from the code that makes q, k, v.

    ``qkv(x, positions) -> (q, k, v)`` or ``(q, k, v, extra)``: a callable or module taking this rank's shard of
    the input and the global positions of its rows (e.g. for RoPE); ``extra`` is a dict of per-call arguments
    (a linear rule's ``gate`` / ``beta``). ``out``: an optional callable or module applied to the attention
    output (e.g. the output projection). ``family``: ``"softmax"`` (:func:`context_parallel_attention`) or
    ``"linear"`` (:func:`context_parallel_linear_attention`); ``attn_kwargs``: the fixed arguments of the call
    (mask, score_mod, normalizer, rule, layout, ...). ``seq_dim``: the sequence dim of ``x``.
    """

    def __init__(self, qkv: Union[Callable, nn.Module], out: Union[Callable, nn.Module, None] = None, *,
                 config: Optional[CPConfig] = None, family: str = "softmax", seq_dim: int = 1,
                 **attn_kwargs: Any):
        super().__init__()
        if family not in ("softmax", "linear"):
            raise ValueError(f"family must be 'softmax' or 'linear', got {family!r}")
        if not callable(qkv) or (out is not None and not callable(out)):
            raise TypeError("qkv (and out, if given) must be callables or modules")
        self.qkv, self.out = qkv, out
        self.config = config if config is not None else CPConfig()
        self.family, self.seq_dim, self.attn_kwargs = family, seq_dim, attn_kwargs

    def forward(self, x: Tensor, **call_kwargs: Any) -> Tensor:
        pos = self.config.positions(x.shape[self.seq_dim], x.device)
        res = self.qkv(x, pos)
        if len(res) not in (3, 4):
            raise ValueError(f"qkv must return (q, k, v) or (q, k, v, extra), got {len(res)} values")
        q, k, v = res[:3]
        kw: Dict[str, Any] = {**self.attn_kwargs, **(res[3] if len(res) == 4 else {}), **call_kwargs}
        if self.family == "softmax":
            o = self.config.attention(q, k, v, **kw)
        else:
            o, _ = self.config.linear_attention(q, k, v, **kw)
        return self.out(o) if self.out is not None else o
