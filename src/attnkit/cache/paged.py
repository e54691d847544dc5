"""Paged KV cache (vLLM's PagedAttention layout): fixed-size pages from one pool, a block table per sequence.

    cache = PagedKVCache(num_pages=4096, page_size=16)
    a, b = cache.add_sequences(2)                # empty sequences (ids)
    with cache.batch([a]):  model(prompt_a, cache=cache)       # prefill each prompt alone (any length)
    with cache.batch([b]):  model(prompt_b, cache=cache)
    with cache.batch([a, b]):  model(next_tokens, cache=cache)  # decode both together (different lengths)
    cache.free([a])                              # its pages go back to the pool

Without :meth:`batch`, the first update creates one sequence per batch row and uses them in order.

Every layer has its own pools ``k [num_pages, Hkv, page_size, D]``, ``v [num_pages, Hkv, page_size, Dv]``
(HND: the keys of one page and head are contiguous) allocated on its first update; the page ids and the block
table ``[max_seqs, max_pages_per_seq]`` (int32, on the device) are shared by all layers. Page ``table[s, i]``
holds keys ``i·page_size … (i+1)·page_size − 1`` of sequence ``s``.

Memory (per layer; ``s`` bytes per element):

* pools: ``num_pages · page_size · Hkv · (D + Dv) · s``, allocated once;
* per token: ``Hkv · (D + Dv) · s``; per sequence of ``n`` tokens: ``⌈n / page_size⌉`` pages (at most
  ``page_size − 1`` tokens of slack), plus 4 bytes per table entry.

Running out of pages, and block tables that point outside the pool, at pages another sequence owns, or at too
few pages, raise ValueError naming the numbers.

Top-k page selection (Quest, Tang et al. 2024; TokenSelect-style dynamic selection): with ``select_pages=k`` the
cache also keeps each page's per-channel key maximum and minimum (``2 · Hkv · D`` fp32 values per page and layer)
and :meth:`kv_view` given the step's queries returns, per sequence and KV head, only the ``k`` pages with the largest
upper bound on their attention scores, ``Σ_d max(q_d · max_d, q_d · min_d)`` summed over the group's query heads
and tokens, always including the first ``first_pages`` and the last ``last_pages`` pages (per-head block tables: the
decode kernel reads those pages only). Nothing is evicted: every page stays for later steps. Inside the selection
masks and score mods see the selected keys' slots (as with H2O), so use plain causal masks with it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..dispatch.decode import KVView, gather
from .base import _check_index
from .kv import SequenceKVCache, _check_kv

__all__ = ["PagedKVCache"]


class PagedKVCache(SequenceKVCache):
    """Paged KV cache (see the module doc).

    Args:
        num_pages: pages in each layer's pool. page_size: tokens per page.
        max_seqs: sequences the block table can hold at once. max_pages_per_seq: table width (default: all pages).
        dtype, device: of the pools (default: the first update's).
    """

    def __init__(self, num_pages: int, page_size: int = 16, *, max_seqs: int = 256,
                 max_pages_per_seq: Optional[int] = None, dtype: Optional[torch.dtype] = None, device=None,
                 select_pages: Optional[int] = None, first_pages: int = 1, last_pages: int = 1):
        super().__init__()
        if select_pages is not None and (select_pages < first_pages + last_pages or first_pages < 0 or last_pages < 1):
            raise ValueError(f"select_pages ({select_pages}) must cover first_pages ({first_pages}) + last_pages "
                             f"({last_pages} >= 1)")
        self.select_pages, self.first_pages, self.last_pages = select_pages, first_pages, last_pages
        self._summary: Dict[int, Tuple[Tensor, Tensor]] = {}  # layer -> (key max, key min) [num_pages, Hkv, D]
        for name, val in (("num_pages", num_pages), ("page_size", page_size), ("max_seqs", max_seqs)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.num_pages, self.page_size, self.max_seqs = num_pages, page_size, max_seqs
        self.max_pages_per_seq = max_pages_per_seq or num_pages
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._pools: Dict[int, Tuple[Tensor, Tensor]] = {}
        self._free: List[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._pages: Dict[int, List[int]] = {}  # sequence -> its pages in order
        self._free_slots: List[int] = list(range(max_seqs - 1, -1, -1))
        self._active: Optional[List[int]] = None
        self._table: Optional[Tensor] = None
        self._version = 0  # bumped whenever a table row changes (device gathers are cached per version)

    # -- sequences -------------------------------------------------------------------------------
    def add_sequences(self, n: int = 1) -> List[int]:
        """``n`` new empty sequences; returns their ids."""
        if n > len(self._free_slots):
            raise ValueError(f"the block table holds at most {self.max_seqs} sequences; {self.max_seqs - len(self._free_slots)} "
                             f"are in use, {n} more asked for (free some or raise max_seqs)")
        ids = [self._free_slots.pop() for _ in range(n)]
        for s in ids:
            self._pages[s] = []
            for lens in self._lens.values():
                lens[s] = 0
        return ids

    def free(self, ids: Sequence[int]) -> None:
        """Release sequences and their pages."""
        for s in ids:
            if s not in self._pages:
                raise ValueError(f"sequence {s} is not in the cache (live: {sorted(self._pages)})")
        for s in ids:
            self._free.extend(reversed(self._pages.pop(s)))
            self._free_slots.append(s)
            for lens in self._lens.values():
                lens[s] = 0
        if self._active is not None and any(s in ids for s in self._active):
            self._active = None
        self._version += 1

    @contextlib.contextmanager
    def batch(self, ids: Sequence[int]) -> Iterator["PagedKVCache"]:
        """Make ``ids`` the batch rows of the calls inside the block (row ``i`` is sequence ``ids[i]``)."""
        prev = self._active
        self.use(ids)
        try:
            yield self
        finally:
            self._active = prev

    def use(self, ids: Sequence[int]) -> None:
        """Make ``ids`` the batch rows of the following calls (see :meth:`batch`)."""
        ids = [int(s) for s in ids]
        bad = [s for s in ids if s not in self._pages]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"batch ids must be distinct live sequences (live: {sorted(self._pages)}), got {ids}")
        self._active = ids

    def sequences(self) -> List[int]:
        return sorted(self._pages)

    def _rows(self) -> List[int]:
        return list(self._active) if self._active is not None else []

    @property
    def free_pages(self) -> int:
        return len(self._free)

    # -- block table -----------------------------------------------------------------------------
    def _table_on(self, device) -> Tensor:
        if self._table is None:
            t = torch.zeros(self.max_seqs, self.max_pages_per_seq, dtype=torch.int32)
            for s, pages in self._pages.items():
                t[s, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
            self._table = t.to(device)
        return self._table

    def block_table(self, seq: int) -> List[int]:
        """The pages of sequence ``seq``, in order."""
        if seq not in self._pages:
            raise ValueError(f"sequence {seq} is not in the cache")
        return list(self._pages[seq])

    def set_block_table(self, seq: int, pages: Sequence[int]) -> None:
        """Give sequence ``seq`` exactly these pages (e.g. shared prefix pages copied from another sequence's
        table are not allowed: each page has one owner). Pages must be free or already its own, in range, distinct,
        and enough for the tokens it holds; its other pages are freed."""
        if seq not in self._pages:
            raise ValueError(f"sequence {seq} is not in the cache")
        pages = [int(p) for p in pages]
        own = set(self._pages[seq])
        free = set(self._free)
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"block table of sequence {seq}: page {p} is outside the pool [0, {self.num_pages})")
            if p not in own and p not in free:
                raise ValueError(f"block table of sequence {seq}: page {p} belongs to another sequence")
        if len(set(pages)) != len(pages):
            raise ValueError(f"block table of sequence {seq} repeats pages: {pages}")
        if len(pages) > self.max_pages_per_seq:
            raise ValueError(f"block table of sequence {seq} has {len(pages)} pages, at most {self.max_pages_per_seq}")
        need = max((lens[seq] for lens in self._lens.values()), default=0)
        if len(pages) * self.page_size < need:
            raise ValueError(f"block table of sequence {seq}: {len(pages)} pages of {self.page_size} cannot hold its "
                             f"{need} tokens")
        self._free = [p for p in self._free if p not in set(pages)] + [p for p in self._pages[seq] if p not in set(pages)]
        self._pages[seq] = pages
        if self._table is not None and pages:
            self._table[seq, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self._version += 1

    def _reserve(self, rows: List[int], upto: List[int]) -> None:
        """Give each row's sequence pages for ``upto`` tokens (ValueError, allocating nothing, when short)."""
        P = self.page_size
        need = [max(0, -(-n // P) - len(self._pages[s])) for s, n in zip(rows, upto)]
        for s, n in zip(rows, upto):
            if -(-n // P) > self.max_pages_per_seq:
                raise ValueError(f"sequence {s} would need {-(-n // P)} pages for {n} tokens; max_pages_per_seq is "
                                 f"{self.max_pages_per_seq}")
        if sum(need) > len(self._free):
            raise ValueError(f"paged cache out of pages: {sum(need)} more pages of {P} tokens needed, {len(self._free)} "
                             f"of {self.num_pages} free ({len(self._pages)} sequences live); free sequences or "
                             "allocate more pages")
        table = self._table
        for s, k in zip(rows, need):
            if k:
                new = [self._free.pop() for _ in range(k)]
                first = len(self._pages[s])
                self._pages[s].extend(new)
                table[s, first:first + k] = torch.tensor(new, dtype=torch.int32)
                self._version += 1

    def _rows_table(self, device) -> Tensor:
        rows = self._rows()
        return self._device(("tbl", tuple(rows), self._version), device,
                            lambda: self._table.index_select(0, torch.tensor(rows, device=self._table.device)))

    def _after_truncate(self) -> None:
        """Return the pages no layer needs any more."""
        for s, pages in self._pages.items():
            keep = max(-(-lens[s] // self.page_size) for lens in self._lens.values()) if self._lens else 0
            if len(pages) > keep:
                self._free.extend(reversed(pages[keep:]))
                del pages[keep:]
        self._version += 1

    # -- KV ---------------------------------------------------------------------------------------
    def _start(self, B: int) -> None:
        if self._active is None:
            self._active = self.add_sequences(B)
        if len(self._active) != B:
            raise ValueError(f"the update has a batch of {B}, the cache's active batch has {len(self._active)} "
                             f"sequences {self._active} (select them with cache.batch(ids))")

    def _layer_pools(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        pools = self._pools.get(layer_idx)
        Hkv, D = k.shape[1], k.shape[3]
        if pools is None:
            dtype = self.dtype or k.dtype
            device = self.device or k.device
            self._table_on(device)
            pools = self._pools[layer_idx] = (
                torch.empty(self.num_pages, Hkv, self.page_size, D, dtype=dtype, device=device),
                torch.empty(self.num_pages, Hkv, self.page_size, v.shape[3], dtype=dtype, device=device))
            self._lens[layer_idx] = {s: 0 for s in self._pages}  # type: ignore[assignment]
        kp, vp = pools
        if kp.shape[1] != Hkv or kp.shape[3] != D or vp.shape[3] != v.shape[3]:
            raise ValueError(f"layer {layer_idx}: the pools hold {kp.shape[1]} heads of dims {kp.shape[3]}/{vp.shape[3]}; "
                             f"the update has k {tuple(k.shape)}, v {tuple(v.shape)}")
        return pools

    def append(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        _check_index(layer_idx)
        _check_kv(k, v)
        B, Hkv, T, _ = k.shape
        self._start(B)
        kp, vp = self._layer_pools(layer_idx, k, v)
        rows = self._rows()
        lens = self._lens[layer_idx]
        start = [lens[s] for s in rows]
        self._reserve(rows, [n + T for n in start])
        P = self.page_size
        pages, slots = self._device(("dst", tuple(rows), tuple(start), T, self._version), kp.device,
                                    lambda: torch.tensor([[self._pages[s][(n + t) // P], (n + t) % P]
                                                          for s, n in zip(rows, start) for t in range(T)]).t())
        kk = k.transpose(1, 2).reshape(B * T, Hkv, -1).to(kp.dtype)
        kp[pages, :, slots] = kk
        vp[pages, :, slots] = v.transpose(1, 2).reshape(B * T, Hkv, -1).to(vp.dtype)
        if self.select_pages is not None:
            self._summarize(layer_idx, pages, slots, kk)
        for s in rows:
            lens[s] += T

    def _summarize(self, layer_idx: int, pages: Tensor, slots: Tensor, k: Tensor) -> None:
        """Fold the keys just written into their pages' per-channel max / min (a page's first slot resets them)."""
        kp = self._pools[layer_idx][0]
        if layer_idx not in self._summary:
            shape = (self.num_pages, kp.shape[1], kp.shape[3])
            self._summary[layer_idx] = (torch.full(shape, -math.inf, device=kp.device),
                                        torch.full(shape, math.inf, device=kp.device))
        kmax, kmin = self._summary[layer_idx]
        fresh = pages[slots == 0]
        kmax[fresh], kmin[fresh] = -math.inf, math.inf
        kf = k.float()
        at = pages[:, None, None].expand_as(kf)
        kmax.scatter_reduce_(0, at, kf, "amax")
        kmin.scatter_reduce_(0, at, kf, "amin")

    def kv_view(self, layer_idx: int, q: Optional[Tensor] = None) -> KVView:
        """Everything cached for layer ``layer_idx``; with ``select_pages`` and the step's queries ``q [B, Hq, Lq, D]``,
        only the selected pages of each sequence and KV head (see the module doc)."""
        kp, vp = self._pools[_check_index(layer_idx)]
        lens = self.lengths(layer_idx)
        if self.select_pages is not None and q is not None:
            return self._selected(layer_idx, q, lens)
        return KVView(kp, vp, self.seqlens(layer_idx, kp.device), max(lens), self._rows_table(kp.device), lens)

    def page_scores(self, layer_idx: int, q: Tensor) -> Tensor:
        """Quest's bound per (row, KV head, page of the row's table): ``Σ_rows Σ_d max(q_d·max_d, q_d·min_d)`` over the
        group's query heads and tokens, ``[B, Hkv, pages]`` (−inf past each sequence's pages)."""
        kmax, kmin = self._summary[layer_idx]
        table = self._rows_table(kmax.device).long()  # [B, n]
        B, Hq, Lq, D = q.shape
        Hkv = kmax.shape[1]
        qg = q.float().reshape(B, Hkv, Hq // Hkv * Lq, D)
        mx = kmax[table].permute(0, 2, 1, 3)  # [B, Hkv, n, D]
        mn = kmin[table].permute(0, 2, 1, 3)
        s = (qg.clamp(min=0) @ mx.transpose(-1, -2) + qg.clamp(max=0) @ mn.transpose(-1, -2)).sum(2)
        npg = torch.tensor([-(-n // self.page_size) for n in self.lengths(layer_idx)], device=s.device)
        return s.masked_fill(torch.arange(s.shape[-1], device=s.device) >= npg[:, None, None], -math.inf)

    def _selected(self, layer_idx: int, q: Tensor, lens: List[int]) -> KVView:
        kp, vp = self._pools[layer_idx]
        P, k = self.page_size, self.select_pages
        s = self.page_scores(layer_idx, q)
        B, Hkv, n = s.shape
        npg = [-(-x // P) for x in lens]
        idx = torch.arange(n, device=s.device)
        npg_t = torch.tensor(npg, device=s.device)[:, None, None]
        forced = (idx < self.first_pages) | ((idx >= npg_t - self.last_pages) & (idx < npg_t))
        s = torch.where(forced, torch.full_like(s, math.inf), s)
        k_eff = min(k, n)
        chosen = s.topk(k_eff, dim=-1).indices.sort(-1).values  # ascending: the last page stays last
        table = self._rows_table(kp.device).long()
        per_head = table[:, None, :].expand(B, Hkv, n).gather(-1, chosen).to(torch.int32).contiguous()
        sel = [x if m <= k_eff else (k_eff - 1) * P + (x - (m - 1) * P) for x, m in zip(lens, npg)]
        return KVView(kp, vp, self._device(("sel", tuple(sel)), kp.device, lambda: torch.tensor(sel, dtype=torch.int32)),
                      max(sel), per_head, sel)

    def read(self, layer_idx: int) -> Tuple[Tensor, Tensor]:
        """Copies of the cached keys and values ``[B, Hkv, n, ·]`` (gathered from the pages; for layers that need
        tensors — the attention layers read the pages in place through :meth:`kv_view`)."""
        n = self.seq_len(layer_idx)
        view = self.kv_view(layer_idx)
        parts = [gather(view, b, n) for b in range(len(self._rows()))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def memory(self) -> Dict[str, int]:
        """Bytes of the pools (all layers), in use by live sequences, and per token (all layers)."""
        per_token = sum((kp.shape[1] * kp.shape[3] + vp.shape[1] * vp.shape[3]) * kp.element_size()
                        for kp, vp in self._pools.values())
        used = (self.num_pages - len(self._free)) * self.page_size * per_token
        return {"allocated": self.num_pages * self.page_size * per_token, "in_use": used, "per_token": per_token}
