"""Sharding a sequence over the ranks of a context-parallel group.

A sequence of ``T`` tokens is padded to ``T_pad`` (a multiple of the number of pieces) and cut into pieces:

* ``load_balance=None`` (contiguous): ``n`` pieces of ``L = T_pad / n`` tokens; rank ``r`` holds piece ``r``.
* ``load_balance="zigzag"`` (head-tail): ``2n`` chunks of ``c = T_pad / (2n)`` tokens; rank ``r`` holds chunks
  ``r`` and ``2n − 1 − r`` (in that order). Under a causal mask every rank then sees the same number of
  visible (query, key) pairs: chunk ``r`` sees ``r + ½`` chunks of keys, chunk ``2n−1−r`` sees ``2n − r − ½``.

Padded positions ``[T, T_pad)`` sit at the end of the sequence. :func:`context_parallel_attention` masks padded
keys exactly (``seq_len=T``: keys at positions ``>= T`` are invisible) and the linear rules make padded tokens
neutral (no write, no decay); the outputs of padded rows are dropped by :func:`unshard`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ShardLayout", "LOAD_BALANCE", "padded_length", "zigzag_permutation", "inverse_permutation",
           "shard", "unshard", "pad_cu_seqlens", "local_cu_seqlens"]

LOAD_BALANCE = (None, "zigzag")


def _check_lb(load_balance) -> Optional[str]:
    if load_balance not in LOAD_BALANCE:
        raise ValueError(f"load_balance must be None (contiguous shards) or 'zigzag', got {load_balance!r}")
    return load_balance


def _check_pos_int(name: str, x, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")
    return x


def padded_length(seq_len: int, world_size: int, load_balance: Optional[str] = None, multiple: int = 1) -> int:
    """Smallest ``T_pad >= seq_len`` that splits into equal pieces: a multiple of ``world_size`` (contiguous) or of
    ``2·world_size`` (zigzag), times ``multiple`` (e.g. a kernel tile, so every piece is whole tiles)."""
    _check_pos_int("seq_len", seq_len)
    _check_pos_int("world_size", world_size)
    _check_pos_int("multiple", multiple)
    m = world_size * (2 if _check_lb(load_balance) == "zigzag" else 1) * multiple
    return -(-seq_len // m) * m


@dataclass(frozen=True)
class ShardLayout:
    """Which global positions each rank holds: ``world_size`` ranks of ``local_len`` tokens each.

    ``seq_len`` is the true length (``<= total``); positions ``>= seq_len`` are padding.
    """

    world_size: int
    local_len: int
    load_balance: Optional[str] = None
    seq_len: Optional[int] = None

    def __post_init__(self):
        _check_pos_int("world_size", self.world_size)
        _check_pos_int("local_len", self.local_len)
        _check_lb(self.load_balance)
        if self.load_balance == "zigzag" and self.local_len % 2:
            raise ValueError(f"zigzag shards hold two equal chunks: the local length must be even, got "
                             f"{self.local_len} (pad the sequence to a multiple of 2·world_size = "
                             f"{2 * self.world_size}: attnkit.distributed.padded_length)")
        if self.seq_len is not None:
            _check_pos_int("seq_len", self.seq_len)
            if self.seq_len > self.total:
                raise ValueError(f"seq_len {self.seq_len} exceeds the sharded length {self.world_size} x "
                                 f"{self.local_len} = {self.total}")

    @classmethod
    def for_sequence(cls, seq_len: int, world_size: int, load_balance: Optional[str] = None,
                     multiple: int = 1) -> "ShardLayout":
        """The layout of a ``seq_len``-token sequence padded by :func:`padded_length`."""
        total = padded_length(seq_len, world_size, load_balance, multiple)
        return cls(world_size, total // world_size, load_balance, seq_len)

    @property
    def total(self) -> int:
        """Padded global length ``T_pad``."""
        return self.world_size * self.local_len

    @property
    def length(self) -> int:
        """True global length (``seq_len``, or ``total`` when nothing is padded)."""
        return self.total if self.seq_len is None else self.seq_len

    @property
    def chunk(self) -> int:
        """Length of one contiguous piece (``local_len``, or ``local_len / 2`` for zigzag)."""
        return self.local_len // 2 if self.load_balance == "zigzag" else self.local_len

    def segments(self, rank: int) -> List[Tuple[int, int]]:
        """``[(global_start, length), ...]`` of the contiguous pieces rank ``rank`` holds, in local order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        if self.load_balance == "zigzag":
            c = self.chunk
            return [(rank * c, c), ((2 * self.world_size - 1 - rank) * c, c)]
        return [(rank * self.local_len, self.local_len)]

    def positions(self, rank: int, device=None) -> Tensor:
        """Global positions ``[local_len]`` (int64) of rank ``rank``'s rows, e.g. for RoPE."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.segments(rank)])

    def permutation(self, device=None) -> Tensor:
        """``[total]``: global position of each row of the rank-major concatenation of all shards."""
        return torch.cat([self.positions(r, device) for r in range(self.world_size)])


def zigzag_permutation(total: int, world_size: int, device=None) -> Tensor:
    """Global positions in rank-major zigzag order (``x[..., perm]`` lays a sequence out shard after shard)."""
    if total % (2 * world_size):
        raise ValueError(f"zigzag needs a length divisible by 2·world_size = {2 * world_size}, got {total}")
    return ShardLayout(world_size, total // world_size, "zigzag").permutation(device)


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (``x_sharded[..., inv]`` restores the global order)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _pad_along(x: Tensor, dim: int, total: int, value: float) -> Tensor:
    T = x.shape[dim]
    if T == total:
        return x
    shape = list(x.shape)
    shape[dim] = total - T
    return torch.cat([x, x.new_full(shape, value)], dim)


def shard(x: Tensor, rank: int, world_size: int, *, dim: int = 2, load_balance: Optional[str] = None,
          multiple: int = 1, pad_value: float = 0.0) -> Tensor:
    """Rank ``rank``'s shard of a global tensor along ``dim`` (``dim=2`` for ``[B, H, T, D]``, 1 for
    ``[B, T, H, D]``): pads to :func:`padded_length` with ``pad_value`` (zeros are neutral for the linear rules),
    then takes the rank's pieces. Differentiable (a gather)."""
    dim = dim % x.dim()
    layout = ShardLayout.for_sequence(x.shape[dim], world_size, load_balance, multiple)
    x = _pad_along(x, dim, layout.total, pad_value)
    return x.index_select(dim, layout.positions(rank, x.device))


def unshard(parts: Sequence[Tensor], *, dim: int = 2, load_balance: Optional[str] = None,
            seq_len: Optional[int] = None) -> Tensor:
    """The global tensor from every rank's shard (``parts[r]`` from rank ``r``), padding dropped to ``seq_len``.
    Differentiable. On a group, ``torch.distributed.all_gather`` the shards first (or use
    :func:`attnkit.distributed.gather_sequence`)."""
    if not parts:
        raise ValueError("unshard needs one shard per rank, got none")
    dim = dim % parts[0].dim()
    n, L = len(parts), parts[0].shape[dim]
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"shards must share a shape, got {[tuple(p.shape) for p in parts]}")
    layout = ShardLayout(n, L, load_balance, seq_len)
    x = torch.cat(list(parts), dim)
    inv = inverse_permutation(layout.permutation(x.device))
    return x.index_select(dim, inv[:layout.length])


def pad_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """``cu_seqlens`` of a packed sequence extended to the padded length: the padding becomes one more document
    (so a document mask never lets real tokens see it, and the linear rules restart there)."""
    cu = torch.as_tensor(cu_seqlens).to(torch.long).flatten()
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    end = int(cu[-1])
    if end > total:
        raise ValueError(f"cu_seqlens ends at {end}, beyond the padded length {total}")
    return cu if end == total else torch.cat([cu, cu.new_tensor([total])])


def local_cu_seqlens(cu_seqlens: Tensor, layout: ShardLayout, rank: int) -> Tensor:
    """The document boundaries of rank ``rank``'s local rows (its pieces concatenated), as local ``cu_seqlens``
    (0, every boundary inside a piece, every piece end). A document cut by a shard boundary appears as two
    local documents; the linear rules carry its state across ranks (see
    :func:`context_parallel_linear_attention`)."""
    cu = pad_cu_seqlens(cu_seqlens, layout.total).tolist()
    out, base = [0], 0
    for s, n in layout.segments(rank):
        out += [c - s + base for c in cu if s < c < s + n] + [base + n]
        base += n
    return torch.tensor(out, dtype=torch.long)
