"""Preallocated KV caches: :class:`ContiguousKVCache` (one ``[B, Hkv, max_len, D]`` buffer per layer) and the
bookkeeping it shares with the paged cache (:class:`SequenceKVCache`: per-sequence lengths, positions, ragged
batches, rollback).

Memory (per layer, ``Hkv`` KV heads, head dims ``D`` / ``Dv``, ``s`` bytes per element):

* per token: ``Hkv · (D + Dv) · s`` (bf16, 8 KV heads, D = Dv = 128: 4 KiB);
* per sequence: ``max_len`` tokens of that, allocated on the layer's first update (the whole buffer:
  ``B · max_len · Hkv · (D + Dv) · s`` per layer), never reallocated; appending past ``max_len`` raises.

GQA-aware: only the ``Hkv`` KV heads are stored, never the query heads. Layers call :meth:`update` (the
:class:`~attnkit.cache.KVCache` interface: returns views of everything cached) or :meth:`append` +
:meth:`kv_view` (the decode kernels then read the buffer in place, ragged lengths included).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..dispatch.decode import KVView
from .base import KVCache, StateCache, _check_index

__all__ = ["SequenceKVCache", "ContiguousKVCache"]


def _check_kv(k, v) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"cache update takes {name} as [B, H, T_new, D], got {got}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and length")


class SequenceKVCache(KVCache, StateCache):
    """What the contiguous and paged caches share: per layer and sequence the number of cached tokens (on the
    host, so nothing waits for the GPU), the device copy the kernels read, RoPE positions of ragged batches,
    :meth:`truncate`, and a plain store for layer states (:meth:`get` / :meth:`set`, kept as given)."""

    def __init__(self):
        self._lens: Dict[int, List[int]] = {}  # layer -> tokens per sequence slot
        self._state: Dict[int, Any] = {}
        self._dev: "OrderedDict[tuple, Tensor]" = OrderedDict()  # small device tensors (lengths, positions) by value

    # -- what subclasses provide ------------------------------------------------------------------
    def _rows(self) -> List[int]:
        """Sequence slot of each batch row."""
        raise NotImplementedError

    # -- lengths ----------------------------------------------------------------------------------
    def lengths(self, layer_idx: int) -> List[int]:
        """Tokens cached for each batch row of layer ``layer_idx``."""
        lens = self._lens.get(_check_index(layer_idx))
        rows = self._rows()
        return [0] * len(rows) if lens is None else [lens[r] for r in rows]

    def seq_len(self, layer_idx: int) -> int:
        lens = self.lengths(layer_idx)
        if not lens:
            return 0
        if any(n != lens[0] for n in lens):
            raise ValueError(f"layer {layer_idx}: the sequences hold different numbers of tokens {lens}; read "
                             "positions() (per sequence) instead of seq_len()")
        return lens[0]

    def positions(self, layer_idx: int, T: int, device=None) -> Tensor:
        lens = self.lengths(layer_idx)
        if lens and any(n != lens[0] for n in lens):
            return self._device(("pos", tuple(lens), T), device,
                                lambda: torch.tensor([[n + t for t in range(T)] for n in lens]))
        n = lens[0] if lens else 0
        return torch.arange(n, n + T, device=device)

    def _device(self, key: tuple, device, build) -> Tensor:
        """A small tensor built on the host and copied to ``device`` once per value (the 16 last used are kept)."""
        key = key + (str(device),)
        t = self._dev.get(key)
        if t is None:
            t = self._dev[key] = build().to(device)
            if len(self._dev) > 16:
                self._dev.popitem(last=False)
        else:
            self._dev.move_to_end(key)
        return t

    def seqlens(self, layer_idx: int, device) -> Tensor:
        """int32 ``[B]`` lengths of layer ``layer_idx`` on ``device``."""
        lens = self.lengths(layer_idx)
        return self._device(("len", tuple(lens)), device, lambda: torch.tensor(lens, dtype=torch.int32))

    def truncate(self, lengths: Union[int, Sequence[int]]) -> None:
        """Keep only the first ``lengths`` tokens of every sequence in the batch (an int or one per row), in every
        layer: rolls back rejected speculative tokens, or trims a right-padded batched prefill to ragged lengths."""
        rows = self._rows()
        want = [lengths] * len(rows) if isinstance(lengths, int) else [int(n) for n in lengths]
        if len(want) != len(rows):
            raise ValueError(f"truncate takes one length per batch row ({len(rows)}), got {len(want)}")
        for layer, lens in self._lens.items():
            for r, n in zip(rows, want):
                if not 0 <= n <= lens[r]:
                    raise ValueError(f"layer {layer}: cannot truncate a sequence of {lens[r]} tokens to {n}")
        for lens in self._lens.values():
            for r, n in zip(rows, want):
                lens[r] = n
        self._after_truncate()

    def _after_truncate(self) -> None:
        pass

    def layers(self) -> List[int]:
        return sorted(set(self._lens) | set(self._state))

    # -- layer states -------------------------------------------------------------------------------
    def get(self, layer_idx: int) -> Any:
        return self._state.get(_check_index(layer_idx))

    def set(self, layer_idx: int, state: Any) -> None:
        self._state[_check_index(layer_idx)] = state

    # -- the KVCache interface -----------------------------------------------------------------------
    def append(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        """Add ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]`` after each sequence's cached tokens."""
        raise NotImplementedError

    def kv_view(self, layer_idx: int) -> KVView:
        """Everything cached for layer ``layer_idx``, as :func:`attnkit.dispatch.decode.decode_attention` reads it."""
        raise NotImplementedError

    def read(self, layer_idx: int) -> Tuple[Tensor, Tensor]:
        """All cached keys and values ``[B, Hkv, n, ·]`` of a batch whose sequences have the same length ``n``."""
        raise NotImplementedError

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        self.append(layer_idx, k, v)
        return self.read(layer_idx)


class ContiguousKVCache(SequenceKVCache):
    """Preallocated KV cache: per layer ``k [B, Hkv, max_len, D]``, ``v [B, Hkv, max_len, Dv]`` (see the module doc).

    ``max_len``: tokens per sequence. ``batch_size``, ``dtype``, ``device``: taken from the first update when
    omitted (then fixed). Sequences may hold different numbers of tokens (:meth:`truncate` after a right-padded
    prefill); appends then go to each sequence's own end.
    """

    def __init__(self, max_len: int, *, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 device=None):
        super().__init__()
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len, self.batch_size, self.dtype = max_len, batch_size, dtype
        self.device = None if device is None else torch.device(device)
        self._kv: Dict[int, Tuple[Tensor, Tensor]] = {}

    def _rows(self) -> List[int]:
        return list(range(self.batch_size or 0))

    def _buffers(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        buf = self._kv.get(layer_idx)
        B, Hkv, _, D = k.shape
        if self.batch_size is None:
            self.batch_size = B
        if B != self.batch_size:
            raise ValueError(f"layer {layer_idx}: the cache holds a batch of {self.batch_size} sequences, the update "
                             f"has {B}")
        if buf is None:
            dtype = self.dtype or k.dtype
            device = self.device or k.device
            buf = self._kv[layer_idx] = (torch.empty(B, Hkv, self.max_len, D, dtype=dtype, device=device),
                                         torch.empty(B, Hkv, self.max_len, v.shape[3], dtype=dtype, device=device))
            self._lens[layer_idx] = [0] * B
        kb, vb = buf
        if kb.shape[1] != Hkv or kb.shape[3] != D or vb.shape[3] != v.shape[3]:
            raise ValueError(f"layer {layer_idx}: cached k {tuple(kb.shape)} / v {tuple(vb.shape)} do not match the "
                             f"new k {tuple(k.shape)} / v {tuple(v.shape)} (heads, head dims)")
        return buf

    def append(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        _check_index(layer_idx)
        _check_kv(k, v)
        kb, vb = self._buffers(layer_idx, k, v)
        lens = self._lens[layer_idx]
        T = k.shape[2]
        if max(lens) + T > self.max_len:
            raise ValueError(f"layer {layer_idx}: appending {T} tokens to sequences holding {max(lens)} exceeds the "
                             f"cache's max_len={self.max_len}; allocate a ContiguousKVCache(max_len >= "
                             f"{max(lens) + T}) or use a PagedKVCache")
        if all(n == lens[0] for n in lens):
            n = lens[0]
            kb[:, :, n:n + T] = k
            vb[:, :, n:n + T] = v
        else:  # ragged: each row at its own end
            rows = self._device(("rows", tuple(lens), T), kb.device,
                                lambda: torch.arange(len(lens)).repeat_interleave(T))
            cols = self._device(("cols", tuple(lens), T), kb.device,
                                lambda: torch.tensor([n + t for n in lens for t in range(T)]))
            kb[rows, :, cols] = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3]).to(kb.dtype)
            vb[rows, :, cols] = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3]).to(vb.dtype)
        for i in range(len(lens)):
            lens[i] += T

    def read(self, layer_idx: int) -> Tuple[Tensor, Tensor]:
        n = self.seq_len(layer_idx)
        kb, vb = self._kv[layer_idx]
        return kb[:, :, :n], vb[:, :, :n]

    def kv_view(self, layer_idx: int) -> KVView:
        kb, vb = self._kv[_check_index(layer_idx)]
        lens = self.lengths(layer_idx)
        return KVView(kb, vb, self.seqlens(layer_idx, kb.device), max(lens), None, lens)

    def memory(self) -> Dict[str, int]:
        """Bytes allocated (all layers), per cached token (all layers) and per sequence."""
        total = sum(t.numel() * t.element_size() for kv in self._kv.values() for t in kv)
        per_token = sum((kb.shape[1] * kb.shape[3] + vb.shape[1] * vb.shape[3]) * kb.element_size()
                        for kb, vb in self._kv.values())
        return {"allocated": total, "per_token": per_token, "per_sequence": per_token * self.max_len}
