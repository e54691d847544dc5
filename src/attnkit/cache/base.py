"""The cache interface the layers of :mod:`attnkit.nn` call while decoding, and one simple implementation.

Two small interfaces, one per kind of layer state:

* :class:`KVCache` (softmax-family layers): ``update(layer_idx, k, v) -> (k_all, v_all)`` appends the
  new keys/values of one layer (``[B, Hkv, T_new, D]``, ``[B, Hkv, T_new, Dv]``) and returns everything
  cached for that layer so far (``[B, Hkv, T_cached + T_new, ·]``); ``seq_len(layer_idx)`` is the number
  of tokens cached for that layer (0 before its first update), i.e. the position of the next token.
* :class:`StateCache` (linear / recurrent layers, and per-layer extras such as Multi-Token Attention's
  last queries): ``get(layer_idx)`` returns what the layer stored last (None before the first ``set``),
  ``set(layer_idx, state)`` replaces it. The state is opaque to the cache (a tensor, a tuple, a dict).

A layer that needs more than one tensor pair in its KV cache packs them (e.g. MLA caches its latent
``c_kv`` as "v" and its shared RoPE key as "k"; 2-simplicial concatenates its two key sets along the
head dim). :class:`DynamicCache` implements both interfaces by growing tensors with ``torch.cat``;
preallocated / paged caches and eviction policies implement the same methods.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

__all__ = ["KVCache", "StateCache", "DynamicCache", "ModelCache"]


class KVCache:
    """Per-layer key/value cache. Subclasses implement :meth:`update` and :meth:`seq_len`."""

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Append ``k [B, Hkv, T_new, D]`` and ``v [B, Hkv, T_new, Dv]`` to layer ``layer_idx``; return all of
        that layer's keys and values ``([B, Hkv, T, D], [B, Hkv, T, Dv])``, oldest first."""
        raise NotImplementedError

    def seq_len(self, layer_idx: int) -> int:
        """Tokens cached for layer ``layer_idx`` (0 before its first update)."""
        raise NotImplementedError

    def positions(self, layer_idx: int, T: int, device=None) -> Tensor:
        """Positions of the next ``T`` tokens of layer ``layer_idx`` (RoPE): ``[T]``, or ``[B, T]`` when the
        sequences of a batch have different lengths. Default: ``seq_len … seq_len + T − 1``."""
        n = self.seq_len(layer_idx)
        return torch.arange(n, n + T, device=device)


class StateCache:
    """Per-layer recurrent state. Subclasses implement :meth:`get` and :meth:`set`."""

    def get(self, layer_idx: int) -> Any:
        """The state last stored for ``layer_idx``, or None."""
        raise NotImplementedError

    def set(self, layer_idx: int, state: Any) -> None:
        """Store ``state`` for ``layer_idx`` (replacing the previous one)."""
        raise NotImplementedError


def _check_index(layer_idx) -> int:
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise TypeError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
    return layer_idx


class DynamicCache(KVCache, StateCache):
    """Growing cache for tests and simple decoding: K/V concatenated along the time dim, states kept as given."""

    def __init__(self):
        self._kv: Dict[int, Tuple[Tensor, Tensor]] = {}
        self._state: Dict[int, Any] = {}

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        _check_index(layer_idx)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"cache update takes {name} as [B, H, T_new, D], got {got}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and length")
        old = self._kv.get(layer_idx)
        if old is not None:
            ko, vo = old
            if ko.shape[:2] != k.shape[:2] or ko.shape[3] != k.shape[3] or vo.shape[3] != v.shape[3]:
                raise ValueError(f"layer {layer_idx}: cached k {tuple(ko.shape)} / v {tuple(vo.shape)} do not match "
                                 f"the new k {tuple(k.shape)} / v {tuple(v.shape)} (batch, heads, head dims)")
            k, v = torch.cat([ko, k], 2), torch.cat([vo, v], 2)
        self._kv[layer_idx] = (k, v)
        return k, v

    def seq_len(self, layer_idx: int) -> int:
        kv = self._kv.get(_check_index(layer_idx))
        return 0 if kv is None else kv[0].shape[2]

    def get(self, layer_idx: int) -> Any:
        return self._state.get(_check_index(layer_idx))

    def set(self, layer_idx: int, state: Any) -> None:
        self._state[_check_index(layer_idx)] = state

    def layers(self) -> List[int]:
        """Indices of the layers holding K/V or a state."""
        return sorted(set(self._kv) | set(self._state))


class ModelCache(KVCache, StateCache):
    """One cache object for a hybrid model: K/V through ``kv`` (any :class:`KVCache`, e.g. a paged cache), layer
    states through ``state`` (any :class:`StateCache`, e.g. :class:`attnkit.cache.RecurrentStateCache`).
    Everything else (``kv_view``, ``truncate``, ...) is looked up on ``kv``."""

    def __init__(self, kv: KVCache, state: StateCache):
        if not isinstance(kv, KVCache) or not isinstance(state, StateCache):
            raise TypeError(f"ModelCache takes a KVCache and a StateCache, got {type(kv).__name__}, "
                            f"{type(state).__name__}")
        self.kv, self.state = kv, state

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        return self.kv.update(layer_idx, k, v)

    def seq_len(self, layer_idx: int) -> int:
        return self.kv.seq_len(layer_idx)

    def positions(self, layer_idx: int, T: int, device=None) -> Tensor:
        return self.kv.positions(layer_idx, T, device)

    def get(self, layer_idx: int) -> Any:
        return self.state.get(layer_idx)

    def set(self, layer_idx: int, state: Any) -> None:
        self.state.set(layer_idx, state)

    def __getattr__(self, name: str):
        if name in ("kv", "state"):
            raise AttributeError(name)
        return getattr(self.kv, name)
