"""The torch.distributed pieces context parallelism uses: group info, a cross-rank argument check that fails on
every rank at once, point-to-point batches with clear errors, and a differentiable all-gather.

Everything goes through ``torch.distributed`` (NCCL on GPUs, gloo on CPUs); nothing here opens its own
transport. A process group created with ``timeout=timedelta(seconds=...)`` bounds every wait: a rank that died
or raised elsewhere makes the others raise :class:`RingError` instead of hanging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Group", "RingError", "check_group", "all_gather_stack", "gather_sequence", "connect"]


class RingError(RuntimeError):
    """A communication step of a context-parallel call failed (a peer raised, died or timed out)."""


@dataclass(frozen=True)
class Group:
    """A process group with its size and this process's rank (``world_size == 1`` when torch.distributed is not
    initialized and no group was given: everything then runs locally)."""

    pg: Any
    rank: int
    world_size: int

    @classmethod
    def of(cls, group=None) -> "Group":
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return cls(None, 0, 1)
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("a process group was given but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def backend(self) -> Optional[str]:
        return None if self.world_size == 1 else str(dist.get_backend(self.pg))

    def global_rank(self, r: int) -> int:
        """The default-group rank of group rank ``r`` (point-to-point calls address global ranks)."""
        r %= self.world_size
        return r if self.pg is None else dist.get_global_rank(self.pg, r)


def check_group(g: Group, what: str, signature: dict, error: Optional[BaseException]) -> None:
    """Compare ``signature`` (shapes and settings that every rank must share) across ranks and share local
    failures: if any rank had an ``error`` or the signatures differ, every rank raises (the failing rank its own
    error, the others a ValueError naming the rank and its message), so nobody waits on a peer that quit."""
    if g.world_size == 1:
        if error is not None:
            raise error
        return
    mine = (None if error is None else f"{type(error).__name__}: {error}", signature)
    allv: List[Any] = [None] * g.world_size
    try:
        dist.all_gather_object(allv, mine, group=g.pg)
    except Exception as e:  # a peer died before the check
        raise RingError(f"{what}: rank {g.rank} could not exchange the argument check with its peers ({e})") from e
    if error is not None:
        raise error
    failed = [(r, m) for r, (m, _) in enumerate(allv) if m is not None]
    if failed:
        r, m = failed[0]
        raise ValueError(f"{what}: rank {r} rejected its arguments ({m}); every rank stops")
    ref = allv[0][1]
    for r, (_, sig) in enumerate(allv):
        diff = {k: (ref.get(k), sig.get(k)) for k in set(ref) | set(sig) if ref.get(k) != sig.get(k)}
        if diff:
            lines = "; ".join(f"{k}: rank 0 has {a}, rank {r} has {b}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{what}: the ranks disagree ({lines}). Every rank must hold an equal shard (same "
                             f"local length and shapes; pad with attnkit.distributed.shard) and pass the same "
                             f"settings")


class P2P:
    """Batches of isend/irecv on one group (``batch_isend_irecv``: NCCL groups them so a ring cannot deadlock)."""

    def __init__(self, g: Group, what: str):
        self.g, self.what = g, what
        self.ops: List[Any] = []
        self.desc: List[str] = []

    def send(self, t: Tensor, to: int, tag: int) -> None:
        self.ops.append(dist.P2POp(dist.isend, t, self.g.global_rank(to), self.g.pg, tag))
        self.desc.append(f"send to rank {to % self.g.world_size}")

    def recv(self, t: Tensor, frm: int, tag: int) -> Tensor:
        self.ops.append(dist.P2POp(dist.irecv, t, self.g.global_rank(frm), self.g.pg, tag))
        self.desc.append(f"receive from rank {frm % self.g.world_size}")
        return t

    def start(self, step: int) -> "Pending":
        ops, desc = self.ops, self.desc
        self.ops, self.desc = [], []
        if not ops:
            return Pending([], [], self, step)
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as e:
            raise RingError(f"{self.what}: rank {self.g.rank}, ring step {step}: posting {', '.join(desc)} failed "
                            f"({type(e).__name__}: {e}); another rank probably raised or died") from e
        return Pending(works, desc, self, step)


@dataclass
class Pending:
    """Posted transfers of one step; :meth:`wait` raises :class:`RingError` naming them if one fails."""

    works: list
    desc: List[str]
    p2p: P2P
    step: int

    def wait(self) -> None:
        works, self.works = self.works, []
        for i, w in enumerate(works):
            try:
                w.wait()
            except Exception as e:
                Pending(works[i + 1:], [], self.p2p, self.step).drain()
                raise RingError(f"{self.p2p.what}: rank {self.p2p.g.rank}, ring step {self.step}: "
                                f"{', '.join(self.desc)} failed ({type(e).__name__}: {e}). Another rank probably "
                                f"raised or died; the wait is bounded by the process group's timeout") from e

    def drain(self) -> None:
        """Wait for the posted transfers, ignoring their errors (before re-raising a local failure: a rank must not
        leave transfers in flight, its peers posted the matching ones)."""
        works, self.works = self.works, []
        for w in works:
            try:
                w.wait()
            except Exception:
                pass


class _AllGather(torch.autograd.Function):
    """``[n, *x.shape]`` from every rank's ``x``; backward: each rank gets the sum over ranks of the gradient of
    its own slot (reduce-scatter on NCCL, all-reduce then slice elsewhere)."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Group):
        ctx.g = g
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(g.world_size)]
        _collective(g, "all-gather", dist.all_gather, out, x, group=g.pg)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = ctx.g
        grad = grad.contiguous()
        if g.backend == "nccl":
            out = torch.empty_like(grad[0])
            _collective(g, "reduce-scatter", dist.reduce_scatter_tensor, out, grad, group=g.pg)
            return out, None
        _collective(g, "all-reduce", dist.all_reduce, grad, group=g.pg)
        return grad[g.rank].clone(), None


def _collective(g: Group, name: str, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:
        raise RingError(f"rank {g.rank}: {name} over {g.world_size} ranks failed ({type(e).__name__}: {e}); another "
                        f"rank probably raised or died") from e


def connect(x: Tensor, *others: Tensor) -> Tensor:
    """``x`` plus an exact zero that depends on ``others`` (a select, never NaN): an output that does not otherwise
    use a gathered tensor still reaches it in autograd, so every rank joins the gather's backward collective."""
    off = torch.zeros((), dtype=torch.bool, device=x.device)
    return x + sum(torch.where(off, t.reshape(-1)[:1].to(x.dtype), 0).sum() for t in others)


def all_gather_stack(x: Tensor, g: Group) -> Tensor:
    """Differentiable all-gather: ``[world_size, *x.shape]`` (``x[None]`` on one rank)."""
    if g.world_size == 1:
        return x[None]
    return _AllGather.apply(x, g)


def gather_sequence(x: Tensor, layout, group=None, dim: int = 2) -> Tensor:
    """Every rank's shard of ``x`` gathered and put back in global order along ``dim`` (padding dropped to
    ``layout.seq_len``). Differentiable: the gradient of each rank's shard is the sum over ranks of its slice."""
    from .shard import inverse_permutation

    g = Group.of(group)
    dim = dim % x.dim()
    parts = all_gather_stack(x, g)  # [n, ...]
    full = torch.cat(parts.unbind(0), dim)
    inv = inverse_permutation(layout.permutation(x.device))
    return full.index_select(dim, inv[:layout.length])


def tag(step: int, kind: int) -> int:
    """Message tag: unique per ring step and kind (gloo matches on (source, tag); NCCL on order)."""
    return step * 8 + kind

