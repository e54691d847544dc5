"""Block cache for block-causal (semi-autoregressive / diffusion-LM) decoding: :class:`BlockCache`.

Block diffusion (Arriola et al. 2025) and dKV-Cache (Ma et al. 2025) decode a block of ``c`` tokens at a time:
the active block is denoised over several steps, each step a forward over the block's ``c`` tokens that
attends to every committed block and (bidirectionally) to the whole active block (``masks.chunked(c)``); once
the block is final its keys and values are committed and the next block starts.

The cache keeps the committed tokens like a :class:`~attnkit.cache.ContiguousKVCache` and writes the active
block's keys and values right after them on every step (overwriting the previous step's), so a step computes
only the active block and the kernels read committed + active keys in place (``decode_attention`` with
``Lq = c``; the layer's mask should be ``chunked(c)``, with ``causal=False``). :meth:`commit` makes the active
block permanent. Memory: as the contiguous cache, ``max_len`` tokens per sequence.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from ..dispatch.decode import KVView
from .base import _check_index
from .kv import ContiguousKVCache, _check_kv

__all__ = ["BlockCache"]


class BlockCache(ContiguousKVCache):
    """Committed blocks plus one active block per layer (see the module doc).

    ``seq_len`` / ``positions`` give the committed length (the active block's first position) on every step
    until :meth:`commit`."""

    def __init__(self, max_len: int, **kw):
        super().__init__(max_len, **kw)
        self._active: Dict[int, int] = {}  # layer -> tokens of the active block written by the last step

    def append(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        """Write the active block (replacing the previous step's) after the committed tokens."""
        _check_index(layer_idx)
        _check_kv(k, v)
        self._active[layer_idx] = 0
        super().append(layer_idx, k, v)  # appends after the committed length (the active part was not counted)
        lens = self._lens[layer_idx]
        T = k.shape[2]
        for i in range(len(lens)):
            lens[i] -= T  # keep counting committed tokens only
        self._active[layer_idx] = T

    def _visible(self, layer_idx: int) -> List[int]:
        return [n + self._active.get(layer_idx, 0) for n in self.lengths(layer_idx)]

    def read(self, layer_idx: int):
        n = self._visible(layer_idx)
        if any(x != n[0] for x in n):
            raise ValueError(f"layer {layer_idx}: ragged committed lengths {n}; read it with kv_view")
        kb, vb = self._kv[layer_idx]
        return kb[:, :, :n[0]], vb[:, :, :n[0]]

    def kv_view(self, layer_idx: int) -> KVView:
        kb, vb = self._kv[_check_index(layer_idx)]
        lens = self._visible(layer_idx)
        dev = self._device(("len+", tuple(lens)), kb.device, lambda: torch.tensor(lens, dtype=torch.int32))
        return KVView(kb, vb, dev, max(lens), None, lens)

    def commit(self) -> int:
        """Make every layer's active block permanent; returns the committed length."""
        for layer, T in self._active.items():
            lens = self._lens[layer]
            for i in range(len(lens)):
                lens[i] += T
        self._active = {}
        return self.seq_len(next(iter(self._lens))) if self._lens else 0

    def discard(self) -> None:
        """Drop the active block (the next step writes a new one)."""
        self._active = {}
