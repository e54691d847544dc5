"""Attention masks: small composable predicates over (batch, head, query, key) positions.

A mask answers "may query ``q`` attend to key ``kv``?" for broadcastable index tensors
``b [B,1,1,1]``, ``h [1,H,1,1]``, ``q [1,1,Lq,1]``, ``kv [1,1,1,Lk]``. Built-in masks use tensor ops and
tensor indexing only (no Python branch on a value), so the same ``__call__`` also works on 0-d indices
under ``torch.func.vmap``: it is a FlexAttention ``mask_mod`` once the caller adds the offset below to
Flex's raw query row (see :mod:`attnkit.tools.peers`).

Position convention (one rule for every mask and score mod): when ``Lq != Lk`` queries are
aligned to the *end* of the keys, so query row ``i`` sits at position ``q = i + (Lk - Lq)``.
For self-attention this is the plain index; for decoding one token over a cache of ``n`` keys the
query is at position ``n - 1``; for CAB's causal cross pattern it is the end-aligned causal mask.
User predicates and score mods receive these aligned positions too. ``attention(..., q_offset=, kv_offset=)``
places queries and keys at other positions (query row ``i`` at ``q_offset + i``, key ``j`` at
``kv_offset + j``), e.g. one shard of a longer sequence; masks that index tensors by position
(``document``, per-batch ``prefix_lm``) then need those tensors to cover every position used.

Masks combine with ``&``, ``|`` and ``~``. Each one reports, for a block size, which
(query-block, key-block) pairs are empty, full or partial (:meth:`Mask.block_map`); the map is
exact and never materializes ``Lq x Lk``: built-in masks classify blocks analytically from
interval bounds, and only blocks the bounds cannot decide are evaluated element by element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor

__all__ = [
    "Mask", "BlockMap", "EMPTY", "PARTIAL", "FULL", "LEAF_CODES",
    "full", "causal", "sliding_window", "chunked", "prefix_lm", "document", "sinks", "dilated",
    "predicate", "as_mask",
]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Geometry:
    """Sizes and positions of one attention call as seen by masks.

    Query row ``i`` sits at position ``q0 + i``, key ``j`` at ``k0 + j``. By default ``k0 = 0`` and queries
    are aligned to the end of the keys (``q0 = Lk − Lq``); ``q_off`` / ``kv_off`` place them elsewhere (a shard
    of a longer sequence in context parallelism, a chunk of a prefill).
    """

    B: int
    H: int
    Lq: int
    Lk: int
    q_off: Optional[int] = None
    kv_off: int = 0

    @property
    def k0(self) -> int:
        """Position of key 0."""
        return self.kv_off

    @property
    def q0(self) -> int:
        """Position of query row 0."""
        return self.kv_off + self.Lk - self.Lq if self.q_off is None else self.q_off

    @property
    def offset(self) -> int:
        """Query position minus key index for the same row: key ``j`` is at or before row ``i`` iff
        ``j <= i + offset``."""
        return self.q0 - self.k0

    @property
    def explicit(self) -> bool:
        """Whether the caller placed the queries or keys somewhere other than the default."""
        return self.q_off is not None or self.kv_off != 0


def index_grid(g: Geometry, device, q_rows: Optional[Tensor] = None, kv_cols: Optional[Tensor] = None):
    """Broadcastable ``(b, h, q, kv)`` index tensors; ``q`` and ``kv`` hold positions."""
    if q_rows is None:
        q_rows = torch.arange(g.Lq, device=device)
    if kv_cols is None:
        kv_cols = torch.arange(g.Lk, device=device)
    b = torch.arange(g.B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(g.H, device=device).view(1, -1, 1, 1)
    q = (q_rows + g.q0).view(1, 1, -1, 1)
    kv = (kv_cols + g.k0).view(1, 1, 1, -1)
    return b, h, q, kv


@dataclass
class BlockMap:
    """Classification of (query-block, key-block) pairs.

    ``state[b, h, i, j]`` is EMPTY (0), PARTIAL (1) or FULL (2) for query rows
    ``[i*block_q, (i+1)*block_q)`` and key columns ``[j*block_k, (j+1)*block_k)``; the batch and
    head dims are 1 when the mask does not depend on them.
    """

    state: Tensor
    block_q: int
    block_k: int
    Lq: int
    Lk: int

    @property
    def num_empty(self) -> int:
        return int((self.state == EMPTY).sum())

    def density(self) -> float:
        """Fraction of blocks that are not empty."""
        return float((self.state != EMPTY).float().mean())

    def kv_indices(self):
        """Kernel-friendly form: per (b, h, q-block) the non-empty key blocks, in order.

        Returns ``(count [B',H',nq] int32, index [B',H',nq,nk] int32, full [B',H',nq,nk] bool)``
        where the first ``count`` entries of ``index`` list the non-empty key blocks ascending and
        ``full`` marks which of them need no element mask.
        """
        nonempty = self.state != EMPTY
        count = nonempty.sum(-1).to(torch.int32)
        nk = self.state.shape[-1]
        cols = torch.arange(nk, device=self.state.device).expand_as(self.state)
        key = torch.where(nonempty, cols, cols + nk)  # empties sort last
        order = key.argsort(dim=-1, stable=True)
        index = order.to(torch.int32)
        full = torch.gather(self.state, -1, order) == FULL
        return count, index, full


#: ``{kind: kernel code}`` of every leaf with an in-kernel twin, filled by the classes themselves (the fused kernels
#: import their constants from here: one table, no copy kept in sync by eye)
LEAF_CODES: Dict[str, int] = {}


class Mask:
    """Base class. Subclasses implement :meth:`__call__` and, where they can, :meth:`bounds`.

    A leaf with an in-kernel twin (``attnkit.ops.softmax.triton.mods.mask_leaf``) sets ``kernel_code`` and returns
    its parameters from :meth:`kernel_params`; every other mask runs in the fused kernels through per-tile bitmaps.
    """

    #: True when :meth:`bounds` classifies every block exactly (no element refinement needed).
    exact_bounds: bool = False
    #: Short name of the leaf kind ("causal", "sliding_window", ...); None for composites.
    kind: Optional[str] = None
    #: code of the leaf's in-kernel twin; 0: none
    kernel_code: int = 0

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kernel_code"):
            LEAF_CODES[cls.kind] = cls.kernel_code

    def kernel_params(self) -> Tuple[Tuple[int, ...], Optional[Tensor]]:
        """Up to 3 int parameters of the in-kernel twin and an optional int64 CPU tensor it indexes (prefix
        lengths, document ids; the plan stores its offset first)."""
        return (), None

    def key(self) -> Optional[Hashable]:
        """Equal for masks that compute the same function, from their parameters' current values; None when the
        mask is known only by identity (a predicate, a large tensor it holds: see :meth:`version`)."""
        return None

    def version(self) -> Tuple:
        """Storage pointers and version counters of the tensors the leaves hold: an in-place update of one of them
        changes this, so caches keyed on the mask object are rebuilt (and every form reads the new values)."""
        return tuple(h.version() for leaf in self.leaves() for h in vars(leaf).values() if isinstance(h, _Held))

    def __call__(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        raise NotImplementedError

    def bounds(self, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor, g: Geometry):
        """Conservative block classification from inclusive position bounds.

        ``qlo, qhi`` have shape ``[1,1,nq,1]``, ``klo, khi`` shape ``[1,1,1,nk]``.
        Returns ``(any_, all_)``: ``any_`` is False only if no pair in the block is visible,
        ``all_`` is True only if every pair is visible. Default: undecided everywhere.
        """
        t = torch.ones(1, 1, qlo.shape[2], klo.shape[3], dtype=torch.bool, device=qlo.device)
        return t, ~t

    def validate(self, g: Geometry) -> None:
        """Raise ValueError if the mask cannot apply to these sizes."""

    def leaves(self):
        yield self

    def on_device(self, device) -> "Mask":
        """Copy the tensors the leaves hold (prefix lengths, document ids) to ``device`` now, so calls there
        index them without a transfer (and a compiled caller sees no copy). Returns self."""
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
        for leaf in self.leaves():
            for held in vars(leaf).values():
                if isinstance(held, _Held):
                    held.on(device)
        return self

    def bh_shape(self, g: Geometry, device) -> Tuple[int, int]:
        """``(B', H')`` of the mask's values: ``g.B`` (``g.H``) where they may depend on the batch (head)
        index, else 1; probed on one (query, key) pair."""
        probe = self.dense(g, device, torch.arange(min(g.Lq, 1), device=device),
                           torch.arange(min(g.Lk, 1), device=device))  # empty when a length is 0
        return probe.shape[0], probe.shape[1]

    # -- composition ---------------------------------------------------------------
    def __and__(self, other: "Mask") -> "Mask":
        return _And(self, as_mask(other))

    def __or__(self, other: "Mask") -> "Mask":
        return _Or(self, as_mask(other))

    def __invert__(self) -> "Mask":
        return _Not(self)

    # -- evaluation ----------------------------------------------------------------
    def dense(self, g: Geometry, device, q_rows: Optional[Tensor] = None,
              kv_cols: Optional[Tensor] = None) -> Tensor:
        """Boolean ``[B', H', len(q_rows), len(kv_cols)]`` (B', H' are 1 where the mask ignores them)."""
        b, h, q, kv = index_grid(g, device, q_rows, kv_cols)
        out = self(b, h, q, kv)
        if out.dtype != torch.bool:
            raise TypeError(f"mask {self!r} returned dtype {out.dtype}, expected torch.bool")
        return out.expand(out.shape[0], out.shape[1], q.shape[2], kv.shape[3])

    def block_map(self, B: int, H: int, Lq: int, Lk: int, block_q: int = 128, block_k: int = 128,
                  device=None, *, q_offset: Optional[int] = None, kv_offset: int = 0) -> BlockMap:
        """Exact EMPTY/PARTIAL/FULL map for the given block sizes (memory O(Lq·block_k)); the offsets place
        the queries and keys as in :class:`Geometry`."""
        g = Geometry(B, H, Lq, Lk, q_offset, kv_offset)
        return _scan(self, g, block_q, block_k, device or "cpu", counts=False)[0]

    def row_counts(self, B: int, H: int, Lq: int, Lk: int, device=None, block: int = 256, *,
                   q_offset: Optional[int] = None, kv_offset: int = 0) -> Tensor:
        """Number of visible keys per query row, ``[B', H', Lq]`` int64, without an Lq x Lk tensor."""
        g = Geometry(B, H, Lq, Lk, q_offset, kv_offset)
        return _scan(self, g, block, block, device or "cpu", counts=True)[1]


MaskLike = Union[Mask, str, None]


def as_mask(m: MaskLike) -> Mask:
    """Accept a Mask, None (full) or one of the names 'full' / 'causal'."""
    if m is None:
        return full
    if isinstance(m, Mask):
        return m
    if isinstance(m, str):
        if m in _NAMED:
            return _NAMED[m]
        raise ValueError(f"unknown mask name {m!r}; expected one of {sorted(_NAMED)} or a Mask object")
    raise TypeError(f"mask must be a Mask, a mask name or None, got {type(m).__name__}")


# ---------------------------------------------------------------------------------------------
# Leaves
# ---------------------------------------------------------------------------------------------

class _Held:
    """An integer tensor a mask holds, kept as the caller gave it, so an in-place update of it is seen by every form
    and kernel alike. :meth:`get` returns it (or what ``derive`` makes of it) as int64 on the CPU — validation, block
    maps and kernel plans read that — and :meth:`on` a copy on a device; both are rebuilt when the tensor's storage
    or version counter changes (``check`` validates the new values then)."""

    def __init__(self, t: Tensor, check=None, derive=None):
        self.src = t
        self._check, self._derive = check, derive
        self._ver, self._cpu, self._dev = None, None, {}
        self.get()

    def version(self) -> Tuple[int, int]:
        return self.src.data_ptr(), self.src._version

    def get(self) -> Tensor:
        v = self.version()
        if v != self._ver:
            cpu = self.src.detach().to(device="cpu", dtype=torch.long)
            if self._check is not None:
                self._check(cpu)
            self._cpu = self._derive(cpu) if self._derive is not None else cpu
            self._dev, self._ver = {}, v
        return self._cpu

    def on(self, device) -> Tensor:
        if torch.compiler.is_compiling():  # a compiled caller (the Flex peer) reads the copy made by on_device()
            return self._dev.get(device, self._cpu)
        cpu = self.get()
        if device.type == "cpu":
            return cpu
        t = self._dev.get(device)
        if t is None:
            t = self._dev[device] = cpu.to(device)
        return t


def _ones_like_grid(qlo, klo):
    return torch.ones(1, 1, qlo.shape[2], klo.shape[3], dtype=torch.bool, device=qlo.device)


class _Full(Mask):
    exact_bounds = True
    kind = "full"
    kernel_code = 1

    def key(self):
        return "full"

    def __call__(self, b, h, q, kv):
        return torch.ones_like(kv, dtype=torch.bool)

    def bounds(self, qlo, qhi, klo, khi, g):
        t = _ones_like_grid(qlo, klo)
        return t, t

    def __repr__(self):
        return "full"


class _Causal(Mask):
    """kv <= q (end-aligned for Lq != Lk)."""

    exact_bounds = True
    kind = "causal"
    kernel_code = 2

    def key(self):
        return "causal"

    def __call__(self, b, h, q, kv):
        return kv <= q

    def bounds(self, qlo, qhi, klo, khi, g):
        return klo <= qhi, khi <= qlo

    def __repr__(self):
        return "causal"


full: Mask = _Full()
causal: Mask = _Causal()
_NAMED = {"full": full, "causal": causal}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class SlidingWindow(Mask):
    """q - left <= kv <= q + right (``left`` past keys, ``right`` future keys, plus the diagonal)."""

    exact_bounds = True
    kind = "sliding_window"
    kernel_code = 3

    def __init__(self, left: int, right: int = 0):
        self.left = _check_int("sliding_window left", left, 0)
        self.right = _check_int("sliding_window right", right, 0)

    def kernel_params(self):
        return (self.left, self.right), None

    def key(self):
        return ("sliding_window", self.left, self.right)

    def __call__(self, b, h, q, kv):
        d = kv - q
        return (d >= -self.left) & (d <= self.right)

    def bounds(self, qlo, qhi, klo, khi, g):
        dlo, dhi = klo - qhi, khi - qlo
        return (dhi >= -self.left) & (dlo <= self.right), (dlo >= -self.left) & (dhi <= self.right)

    def __repr__(self):
        return f"sliding_window(left={self.left}, right={self.right})"


def sliding_window(left: int, right: int = 0) -> Mask:
    """Keys within ``left`` positions before and ``right`` after the query (inclusive)."""
    return SlidingWindow(left, right)


class Chunked(Mask):
    """kv // block <= q // block: bidirectional inside a chunk, causal across chunks."""

    exact_bounds = True
    kind = "chunked"
    kernel_code = 4

    def __init__(self, block: int):
        self.block = _check_int("chunked block", block, 1)

    def kernel_params(self):
        return (self.block,), None

    def key(self):
        return ("chunked", self.block)

    def __call__(self, b, h, q, kv):
        return torch.div(kv, self.block, rounding_mode="floor") <= torch.div(q, self.block, rounding_mode="floor")

    def bounds(self, qlo, qhi, klo, khi, g):
        c = self.block
        fd = lambda x: torch.div(x, c, rounding_mode="floor")  # noqa: E731
        return fd(klo) <= fd(qhi), fd(khi) <= fd(qlo)

    def __repr__(self):
        return f"chunked({self.block})"


def chunked(block: int) -> Mask:
    """Block-causal (semi-autoregressive / diffusion-LM) mask with chunks of ``block`` tokens."""
    return Chunked(block)


def _check_integers(name: str, t: Tensor) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")


def _small_values(held: "_Held") -> Optional[Tuple[int, ...]]:
    """The values of a small CPU tensor a mask holds (a cache key that follows in-place updates), else None."""
    return tuple(held.get().reshape(-1).tolist()) if held.src.device.type == "cpu" and held.src.numel() <= 256 \
        else None


class PrefixLM(Mask):
    """kv < prefix_len[b] or kv <= q: bidirectional over the prefix, causal after it."""

    exact_bounds = True
    kind = "prefix_lm"
    kernel_code = 5

    def __init__(self, prefix_len: Union[int, Sequence[int], Tensor]):
        if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
            _check_int("prefix_len", prefix_len, 0)
        p = prefix_len if isinstance(prefix_len, Tensor) else torch.as_tensor(prefix_len)
        _check_integers("prefix_len", p)

        def check(p):
            if p.dim() > 1:
                raise ValueError(f"prefix_len must be an int or a 1-D per-batch tensor, got shape {tuple(p.shape)}")
            if (p < 0).any():
                raise ValueError(f"prefix_len must be >= 0, got {p.tolist()}")

        self._held = _Held(p, check, lambda p: p.reshape(()) if p.numel() == 1 else p)  # 0-d (any batch) or [B]

    @property
    def prefix_len(self) -> Tensor:
        """The prefix length(s), int64 on the CPU: 0-d, or ``[B]``."""
        return self._held.get()

    def _p(self, b, device):
        """Prefix length of batch ``b`` (broadcastable like ``b``; 0-d when it is one for all)."""
        p = self._held.on(device)
        return p if p.dim() == 0 else p[b]

    def kernel_params(self):
        pl = self.prefix_len.reshape(-1)
        return (1 if pl.numel() > 1 else 0,), pl

    def key(self):
        vals = _small_values(self._held)
        return None if vals is None else ("prefix_lm", vals)

    def validate(self, g):
        p = self.prefix_len
        if p.dim() == 1 and p.numel() not in (1, g.B):
            raise ValueError(f"prefix_len has {p.numel()} entries but the batch has {g.B}")
        if not g.explicit and int(p.max()) > g.Lk:
            raise ValueError(f"prefix_len {int(p.max())} is longer than the sequence (Lk={g.Lk})")

    def __call__(self, b, h, q, kv):
        return (kv < self._p(b, q.device)) | (kv <= q)

    def bounds(self, qlo, qhi, klo, khi, g):
        p = self._p(torch.arange(g.B, device=qlo.device).view(-1, 1, 1, 1), qlo.device)
        return (klo < p) | (klo <= qhi), khi < torch.maximum(p, qlo + 1)

    def __repr__(self):
        p = self.prefix_len
        return f"prefix_lm({p.item() if p.dim() == 0 else p.tolist()})"


def prefix_lm(prefix_len: Union[int, Sequence[int], Tensor]) -> Mask:
    """Prefix-LM: the first ``prefix_len`` keys (int or per-batch) are visible to every query."""
    return PrefixLM(prefix_len)


class Sinks(Mask):
    """kv < n: the first n keys are always visible (attention sinks, StreamingLLM)."""

    exact_bounds = True
    kind = "sinks"
    kernel_code = 6

    def __init__(self, n: int):
        self.n = _check_int("sinks n", n, 0)

    def kernel_params(self):
        return (self.n,), None

    def key(self):
        return ("sinks", self.n)

    def __call__(self, b, h, q, kv):
        return kv < self.n

    def bounds(self, qlo, qhi, klo, khi, g):
        return klo < self.n, khi < self.n

    def __repr__(self):
        return f"sinks({self.n})"


def sinks(n: int) -> Mask:
    """The first ``n`` keys; combine as ``causal & (sliding_window(w) | sinks(4))``."""
    return Sinks(n)


class Dilated(Mask):
    """(q - kv) % rate == 0: every ``rate``-th key counted from the query."""

    exact_bounds = True
    kind = "dilated"
    kernel_code = 7

    def __init__(self, rate: int):
        self.rate = _check_int("dilated rate", rate, 1)

    def kernel_params(self):
        return (self.rate,), None

    def key(self):
        return ("dilated", self.rate)

    def __call__(self, b, h, q, kv):
        return torch.remainder(q - kv, self.rate) == 0

    def bounds(self, qlo, qhi, klo, khi, g):
        r = self.rate
        if r == 1:
            t = _ones_like_grid(qlo, klo)
            return t, t
        dlo, dhi = qlo - khi, qhi - klo  # range of q - kv over the block, every integer attained
        any_ = torch.div(dhi, r, rounding_mode="floor") * r >= dlo
        all_ = (dlo == dhi) & (torch.remainder(dlo, r) == 0)
        return any_, all_

    def __repr__(self):
        return f"dilated({self.rate})"


def dilated(rate: int) -> Mask:
    """Dilated pattern: keys at distances that are multiples of ``rate`` (combine with causal)."""
    return Dilated(rate)


class Document(Mask):
    """doc[q] == doc[kv]: no attention across packed documents.

    ``doc_ids`` is ``[Lk]`` or ``[B, Lk]`` (document index of each key position; query positions
    use the same ids at their aligned position), or give ``cu_seqlens`` (``[n_docs + 1]``,
    starting at 0, non-decreasing, ending at Lk).
    """

    kind = "document"
    kernel_code = 8

    def __init__(self, doc_ids: Optional[Tensor] = None, *, cu_seqlens: Optional[Tensor] = None):
        if (doc_ids is None) == (cu_seqlens is None):
            raise ValueError("document() takes exactly one of doc_ids or cu_seqlens")
        given = cu_seqlens if cu_seqlens is not None else doc_ids
        t = given if isinstance(given, Tensor) else torch.as_tensor(given)
        _check_integers("cu_seqlens" if cu_seqlens is not None else "doc_ids", t)
        self._from_cu = cu_seqlens is not None
        if self._from_cu:
            self._held = _Held(t, _check_cu, _ids_from_cu)
        else:
            self._held = _Held(t, _check_ids, lambda ids: ids if ids.dim() == 2 else ids.unsqueeze(0))

    @property
    def ids(self) -> Tensor:
        """Document index of every position, ``[B', L]`` int64 on the CPU (``B'`` = 1 when shared by the batch)."""
        return self._held.get()

    @property
    def cu_seqlens(self) -> Optional[Tensor]:
        """The ``cu_seqlens`` the mask was built from (int64, CPU), or None when built from ``doc_ids``."""
        return self._held.src.detach().to(device="cpu", dtype=torch.long) if self._from_cu else None

    def kernel_params(self):
        ids = self.ids
        return (ids.shape[1] if ids.shape[0] > 1 else 0, ids.shape[1]), ids.reshape(-1)

    def key(self):
        vals = _small_values(self._held) if self._from_cu else None
        return None if vals is None else ("document", vals)

    def validate(self, g):
        Bp, L = self.ids.shape
        what = "cu_seqlens[-1]" if self.cu_seqlens is not None else "doc_ids length"
        if Bp not in (1, g.B):
            raise ValueError(f"document mask: doc_ids batch is {Bp} but the batch has {g.B}")
        if not g.explicit:
            if L != g.Lk:
                raise ValueError(f"document mask: {what} is {L} but Lk is {g.Lk}")
            if g.Lq > g.Lk:
                raise ValueError(f"document mask needs Lq <= Lk (queries aligned to the end), got Lq={g.Lq} > "
                                 f"Lk={g.Lk}")
        elif min(g.q0, g.k0) < 0 or max(g.q0 + g.Lq, g.k0 + g.Lk) > L:
            raise ValueError(f"document mask: {what} is {L}, but the call uses query positions [{g.q0}, "
                             f"{g.q0 + g.Lq}) and key positions [{g.k0}, {g.k0 + g.Lk}); the ids must cover them")

    def __call__(self, b, h, q, kv):
        ids = self._held.on(q.device)
        q = q.clamp(0, ids.shape[1] - 1)  # rows before the first key (Lq > Lk) see none of them anyway
        if ids.shape[0] == 1:  # one id row for every batch: no dependence on b
            return ids[0, q] == ids[0, kv]
        return ids[b, q] == ids[b, kv]

    def bounds(self, qlo, qhi, klo, khi, g):
        # Per-block min / max id; exact when ids are sorted (packing), refined otherwise.
        ids = self._held.on(qlo.device)
        Bp = ids.shape[0]

        def rng(lo, hi):  # min / max id over each contiguous range [lo, hi]; memory O(B'·L)
            lo, hi = lo.flatten(), hi.flatten()
            width = int((hi - lo).max()) + 1
            idx = torch.minimum(lo.view(-1, 1) + torch.arange(width, device=ids.device), hi.view(-1, 1))
            vals = ids[:, idx]  # [B', n, width]
            return vals.amin(-1), vals.amax(-1)

        last = ids.shape[1] - 1
        qmn, qmx = rng(qlo.clamp(0, last), qhi.clamp(0, last))
        kmn, kmx = rng(klo, khi)
        qmn, qmx = qmn.view(Bp, 1, -1, 1), qmx.view(Bp, 1, -1, 1)
        kmn, kmx = kmn.view(Bp, 1, 1, -1), kmx.view(Bp, 1, 1, -1)
        any_ = (qmx >= kmn) & (kmx >= qmn)
        all_ = (qmn == qmx) & (kmn == kmx) & (qmn == kmn)
        return any_, all_

    def __repr__(self):
        if self.cu_seqlens is not None:
            return f"document(cu_seqlens={self.cu_seqlens.tolist()})"
        return f"document(doc_ids[{', '.join(map(str, self.ids.shape))}])"


def _check_cu(cu: Tensor) -> None:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")


def _ids_from_cu(cu: Tensor) -> Tensor:
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths).unsqueeze(0)  # [1, L]


def _check_ids(ids: Tensor) -> None:
    if ids.dim() not in (1, 2):
        raise ValueError(f"doc_ids must be [Lk] or [B, Lk], got shape {tuple(ids.shape)}")


def document(doc_ids: Optional[Tensor] = None, *, cu_seqlens: Optional[Tensor] = None) -> Mask:
    """Document (packing) mask from per-position ``doc_ids`` or from ``cu_seqlens``."""
    return Document(doc_ids, cu_seqlens=cu_seqlens)


class Predicate(Mask):
    """Any user function ``fn(b, h, q, kv) -> bool tensor`` of broadcastable index tensors."""

    kind = "predicate"

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"predicate() needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def __call__(self, b, h, q, kv):
        out = self.fn(b, h, q, kv)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(f"predicate {self.name} must return a bool tensor, got "
                            f"{out.dtype if isinstance(out, Tensor) else type(out).__name__}")
        want = torch.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape)
        if out.dim() > len(want) or any(o not in (1, w) for o, w in zip(out.shape[::-1], want[::-1])):
            raise ValueError(f"predicate {self.name} must return a bool tensor broadcastable to the index grid "
                             f"{tuple(want)} (b, h, q, kv broadcast), got shape {tuple(out.shape)}")
        return out

    def __repr__(self):
        return f"predicate({self.name})"


def predicate(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], name: Optional[str] = None) -> Mask:
    """Wrap ``fn(b, h, q_idx, kv_idx) -> bool`` (aligned positions) as a Mask."""
    return Predicate(fn, name)


# ---------------------------------------------------------------------------------------------
# Composites
# ---------------------------------------------------------------------------------------------

class _And(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def __call__(self, b, h, q, kv):
        return self.a(b, h, q, kv) & self.b(b, h, q, kv)

    def bounds(self, qlo, qhi, klo, khi, g):
        a_any, a_all = self.a.bounds(qlo, qhi, klo, khi, g)
        b_any, b_all = self.b.bounds(qlo, qhi, klo, khi, g)
        return a_any & b_any, a_all & b_all

    def validate(self, g):
        self.a.validate(g)
        self.b.validate(g)

    def leaves(self):
        yield from self.a.leaves()
        yield from self.b.leaves()

    op = "&"

    def key(self):
        a, b = self.a.key(), self.b.key()
        return None if a is None or b is None else (self.op, a, b)

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class _Or(_And):
    op = "|"

    def __call__(self, b, h, q, kv):
        return self.a(b, h, q, kv) | self.b(b, h, q, kv)

    def bounds(self, qlo, qhi, klo, khi, g):
        a_any, a_all = self.a.bounds(qlo, qhi, klo, khi, g)
        b_any, b_all = self.b.bounds(qlo, qhi, klo, khi, g)
        return a_any | b_any, a_all | b_all

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a
        self.exact_bounds = a.exact_bounds

    def __call__(self, b, h, q, kv):
        return ~self.a(b, h, q, kv)

    def bounds(self, qlo, qhi, klo, khi, g):
        a_any, a_all = self.a.bounds(qlo, qhi, klo, khi, g)
        return ~a_all, ~a_any

    def validate(self, g):
        self.a.validate(g)

    def leaves(self):
        yield from self.a.leaves()

    def key(self):
        a = self.a.key()
        return None if a is None else ("~", a)

    def __repr__(self):
        return f"~{self.a!r}"


# ---------------------------------------------------------------------------------------------
# Block scan: block map and per-row counts
# ---------------------------------------------------------------------------------------------

def block_bounds(g: Geometry, block_q: int, block_k: int, device):
    """Inclusive aligned position bounds of each query block and key block."""
    nq, nk = -(-g.Lq // block_q), -(-g.Lk // block_k)
    qs = torch.arange(nq, device=device) * block_q
    ks = torch.arange(nk, device=device) * block_k
    qlo = (qs + g.q0).view(1, 1, -1, 1)
    qhi = (torch.clamp(qs + block_q, max=g.Lq) - 1 + g.q0).view(1, 1, -1, 1)
    klo = (ks + g.k0).view(1, 1, 1, -1)
    khi = (torch.clamp(ks + block_k, max=g.Lk) - 1 + g.k0).view(1, 1, 1, -1)
    return qlo, qhi, klo, khi


def _scan(mask: Mask, g: Geometry, block_q: int, block_k: int, device, counts: bool):
    """Classify blocks (analytic bounds, then element refinement of undecided blocks); count rows."""
    if g.Lq == 0 or g.Lk == 0:
        raise ValueError(f"attention needs Lq >= 1 and Lk >= 1, got Lq={g.Lq}, Lk={g.Lk}")
    mask.validate(g)
    qlo, qhi, klo, khi = block_bounds(g, block_q, block_k, device)
    any_, all_ = mask.bounds(qlo, qhi, klo, khi, g)
    nq, nk = qlo.shape[2], klo.shape[3]
    state = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    state = state.expand(*state.shape[:2], nq, nk).contiguous()  # bounds may ignore the query or key block
    refine = not mask.exact_bounds
    row_counts = None
    if counts or refine:
        # the mask may depend on b / h even when its bounds do not (predicates): probe its shape.
        pb, ph = mask.bh_shape(g, device)
        Bp, Hp = max(state.shape[0], pb), max(state.shape[1], ph)
        state = state.expand(Bp, Hp, nq, nk).contiguous()
        if counts:
            row_counts = torch.zeros(Bp, Hp, g.Lq, dtype=torch.long, device=device)
        kcols = torch.arange(g.Lk, device=device)
        for i in range(nq):
            r0, r1 = i * block_q, min((i + 1) * block_q, g.Lq)
            cand = (state[:, :, i] == PARTIAL).any(dim=(0, 1)).nonzero().flatten().tolist()
            if counts:
                widths = (khi - klo + 1).view(nk)
                row_counts[:, :, r0:r1] += ((state[:, :, i] == FULL).long() * widths).sum(-1, keepdim=True)
            if not cand:
                continue
            cols = torch.cat([kcols[j * block_k:min((j + 1) * block_k, g.Lk)] for j in cand])
            m = mask.dense(g, device, torch.arange(r0, r1, device=device), cols)
            m = m.expand(Bp, Hp, r1 - r0, cols.numel())
            start = 0
            for j in cand:
                w = min((j + 1) * block_k, g.Lk) - j * block_k
                mb = m[..., start:start + w]
                start += w
                sel = state[:, :, i, j] == PARTIAL
                if counts:
                    row_counts[:, :, r0:r1] += torch.where(sel.unsqueeze(-1), mb.sum(-1), 0)
                if refine:
                    new = torch.where(mb.all(-1).all(-1), FULL, torch.where(mb.any(-1).any(-1), PARTIAL, EMPTY))
                    state[:, :, i, j] = torch.where(sel, new.to(torch.int8), state[:, :, i, j])
    return BlockMap(state, block_q, block_k, g.Lq, g.Lk), row_counts
