"""attnkit caches as a Hugging Face transformers ``Cache`` (needs ``pip install 'attnkit[hf]'``).

    from attnkit.cache import PagedKVCache
    from attnkit.cache.hf import HFCache
    cache = HFCache(PagedKVCache(num_pages=1024, page_size=16))
    out = model.generate(ids, max_new_tokens=64, cache=cache)          # or past_key_values=cache

Each transformers layer gets a :class:`HFLayer` that appends its keys and values to the attnkit cache and returns
everything cached for the layer: views of the buffer for a :class:`~attnkit.cache.ContiguousKVCache` (no copy),
keys gathered from the pages for a :class:`~attnkit.cache.PagedKVCache` (transformers' attention functions take
tensors; attnkit's own layers read the pages in place). The batch must keep one length for all its sequences
(transformers pads), beam search and batch reordering are refused, ``crop`` rolls back (assisted decoding).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised by the import test without transformers
    raise ImportError(f"attnkit.cache.hf needs transformers 5 (pip install 'attnkit[hf]'): {e}") from None

from .kv import ContiguousKVCache, SequenceKVCache

__all__ = ["HFCache", "HFLayer"]


class HFLayer(CacheLayerMixin):
    """One transformers layer's view of an attnkit :class:`~attnkit.cache.kv.SequenceKVCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache: SequenceKVCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(self.layer_idx, key_states, value_states)
        self.keys, self.values = self.cache.read(self.layer_idx)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cache.seq_len(self.layer_idx) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.cache.max_len if isinstance(self.cache, ContiguousKVCache) else -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``|tokens_to_remove|`` tokens of every sequence (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized and self.layer_idx == 0:
            self.cache.truncate(self.cache.seq_len(0) + tokens_to_remove)

    def reset(self) -> None:
        raise NotImplementedError("an attnkit cache is not reset in place; make a new HFCache")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("beam search is not supported by attnkit caches")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("attnkit caches do not repeat batches (beam search / contrastive search)")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("attnkit caches do not select batch rows")


class HFCache(Cache):
    """A transformers ``Cache`` over an attnkit contiguous or paged KV cache (see the module doc)."""

    def __init__(self, kv: SequenceKVCache, num_layers: Optional[int] = None):
        if not isinstance(kv, SequenceKVCache):
            raise TypeError(f"HFCache wraps a ContiguousKVCache or PagedKVCache, got {type(kv).__name__}")
        self.kv = kv
        super().__init__(layers=[HFLayer(kv, i) for i in range(num_layers or 0)])

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(HFLayer(self.kv, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        if self.layers:
            self.layers[0].crop(tokens_to_remove)

    @property
    def memory(self):
        return self.kv.memory()

