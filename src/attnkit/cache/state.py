"""Fixed-memory state cache for linear / recurrent layers: :class:`RecurrentStateCache`.

A linear layer (:class:`attnkit.nn.LinearAttention`) stores a :class:`~attnkit.nn.linear.LinearState` after every
call: the short convolutions' last ``K − 1`` inputs and the rule's recurrent state. The first ``set`` of a layer
allocates buffers of the same structure (fp32 for half-precision models, as the ops compute states; fp64 for
fp64); every later ``set`` copies into them in place, so the memory of a layer never changes while decoding and
``get`` always returns the same tensors.

Memory per layer and sequence (``H`` heads, key/value dims ``Dk`` / ``Dv``, 4 bytes per fp32 value):

* matrix-state rules (linear, retention, gated / delta rules, GLA, KDA, …): ``H · Dk · Dv · 4`` (+ ``H · Dk · 4``
  for a normalizer state), e.g. 16 heads of 128×128: 1 MiB;
* log-linear: one such state per Fenwick level: ``H · levels · Dk · Dv · 4`` (+ the token count, int64);
* Aaren: the prefix-softmax triple ``(max, num [Dv], den)``: ``H · (Dv + 2) · 4``;
* each short convolution: ``(K − 1) · channels`` values in the model's dtype.

Anything else a layer stores (e.g. multi-token attention's last queries) is kept in place the same way while
its shape stays the same, and replaced when it changes (:attr:`reallocations` counts those).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor

from .base import StateCache, _check_index

__all__ = ["RecurrentStateCache", "state_bytes"]


def _same_structure(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    if isinstance(a, tuple) and isinstance(b, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
    return a is None and b is None


def _clone(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        vals = [_clone(v) for v in x]
        return type(x)(*vals) if hasattr(x, "_fields") else tuple(vals)
    return x


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, Tensor):
        if dst is not src:
            dst.copy_(src.detach())
    elif isinstance(dst, tuple):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a state (nested tuples / named tuples)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, tuple):
        return sum(state_bytes(x) for x in state)
    return 0


class RecurrentStateCache(StateCache):
    """Per-layer states kept in buffers allocated once (see the module doc)."""

    def __init__(self):
        self._state: Dict[int, Any] = {}
        self.reallocations = 0

    def get(self, layer_idx: int) -> Any:
        return self._state.get(_check_index(layer_idx))

    def set(self, layer_idx: int, state: Any) -> None:
        _check_index(layer_idx)
        cur = self._state.get(layer_idx)
        if cur is not None and _same_structure(cur, state):
            _copy_into(cur, state)
            return
        if cur is not None:
            self.reallocations += 1
        self._state[layer_idx] = _clone(state)

    def layers(self) -> List[int]:
        return sorted(self._state)

    def memory(self) -> Dict[str, int]:
        """Bytes held per layer and in total."""
        per = {f"layer{i}": state_bytes(s) for i, s in sorted(self._state.items())}
        return {"total": sum(per.values()), **per}
