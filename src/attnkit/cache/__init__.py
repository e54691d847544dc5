"""Caches for decoding.

* the interface the layers call (:class:`KVCache`, :class:`StateCache`) and a growing implementation
  (:class:`DynamicCache`) — :mod:`attnkit.cache.base`;
* :class:`ContiguousKVCache` (preallocated per layer) and :class:`PagedKVCache` (pages + block tables, many
  sequences of different lengths; optional Quest / TokenSelect-style top-k page selection per step) — the attention
  layers read them in place through the decode kernels;
* :class:`RecurrentStateCache`: fixed-memory states of linear / recurrent layers; :class:`ModelCache` pairs a KV
  cache with it for hybrid models;
* :class:`PolicyCache` with :func:`StreamingLLM`, :func:`H2O`, :class:`SnapKV` and composable pieces: bounded memory
  by eviction;
* :class:`BlockCache`: block-causal (diffusion-LM) decoding, committed blocks + one recomputed active block.

Each module documents its memory per token and per sequence.
"""
from .base import DynamicCache, KVCache, ModelCache, StateCache
from .block import BlockCache
from .kv import ContiguousKVCache, SequenceKVCache
from .paged import PagedKVCache
from .policies import H2O, HeavyHitters, Policy, PolicyCache, Recent, Sinks, SnapKV, StreamingLLM
from .state import RecurrentStateCache

__all__ = ["KVCache", "StateCache", "DynamicCache", "ModelCache", "ContiguousKVCache", "SequenceKVCache",
           "PagedKVCache", "RecurrentStateCache", "PolicyCache", "Policy", "Sinks", "Recent", "HeavyHitters",
           "SnapKV", "StreamingLLM", "H2O", "BlockCache"]
