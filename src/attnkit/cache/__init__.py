"""Caches for decoding: the interface the layers call (:class:`KVCache`, :class:`StateCache`) and a growing
implementation (:class:`DynamicCache`). See :mod:`attnkit.cache.base`."""
from .base import DynamicCache, KVCache, StateCache

__all__ = ["KVCache", "StateCache", "DynamicCache"]
