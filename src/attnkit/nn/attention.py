"""``Attention``: the softmax-family attention layer (projections, GQA/MQA, RoPE, qk-norm, output gate, KV cache).

    x [B, T, d_model] → q = x W_q, k = x W_k, v = x W_v   (Hq heads of q, Hkv heads of k and v, head dim D)
    q, k ← RMSNorm(q), RMSNorm(k)        (qk_norm, per head, as in OLMo 2 / Qwen3)
    q, k ← RoPE(q, p), RoPE(k, p)        (positions p: cache length + t, or per document with cu_seqlens)
    o = attention(q, k, v; mask, score_mod, normalizer)          (attnkit.attention: any softmax-family variant)
    o ← o ⊙ sigmoid(x W_g)               (output_gate: head-specific elementwise gate after attention,
                                          Qiu et al. 2025, "Gated Attention for Large Language Models")
    y = o W_o
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..dispatch.decode import decode_attention
from . import _ops
from .norm import RMSNorm
from .rope import RotaryEmbedding, as_rope, doc_positions

__all__ = ["Attention", "layer_mask", "positions_for", "check_input", "split_heads", "DECODE_MAX_Q"]

#: calls with a cache and at most this many new tokens per sequence run through the decode kernels
#: (:func:`attnkit.dispatch.decode.decode_attention`); longer ones (prefill) through :func:`attnkit.attention`
DECODE_MAX_Q = 32


def check_input(x: Tensor, d_model: int, cu_seqlens: Optional[Tensor], cache) -> None:
    """``x [B, T, d_model]``; with ``cu_seqlens`` batch 1 and no cache."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected x of shape [B, T, {d_model}], got {got}")
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs the documents packed into batch 1, got batch {x.shape[0]}")
        if cache is not None:
            raise ValueError("cu_seqlens (packed training) and a cache (decoding) cannot be combined")


def positions_for(T: int, offset: int, cu_seqlens: Optional[Tensor], device) -> Tensor:
    """Token positions ``[T]``: ``offset … offset + T − 1``, or restarting at 0 in every packed document."""
    if cu_seqlens is not None:
        return doc_positions(cu_seqlens, T, device)
    return torch.arange(offset, offset + T, device=device)


def layer_mask(causal: bool, mask, cu_seqlens: Optional[Tensor]):
    """The layer's mask: causal (end-aligned) or full, ANDed with the user's mask and the document mask."""
    m = _ops.masks.causal if causal else _ops.masks.full
    if mask is not None:
        m = m & _ops.masks.as_mask(mask)
    if cu_seqlens is not None:
        m = m & _ops.masks.document(cu_seqlens=cu_seqlens.cpu())
    return m


def split_heads(t: Tensor, n_heads: int) -> Tensor:
    """``[B, T, H·D] -> [B, H, T, D]`` (a view)."""
    B, T, _ = t.shape
    return t.view(B, T, n_heads, -1).transpose(1, 2)


class Attention(nn.Module):
    """Softmax-family attention layer (see the module docstring for the computation).

    Args:
        d_model: model width. n_heads: query heads. n_kv_heads: key/value heads (GQA; 1 = MQA; default
            n_heads). head_dim: default d_model // n_heads.
        mask, score_mod, normalizer: the variant's pieces (:mod:`attnkit.masks` / ``scores`` / ``normalizers``
            objects or names); the mask is ANDed with causal (``causal=True``) or full.
        variant: a registered softmax-family variant name (``"alibi"``, ``"softmax_sink"``, ``"ssmax"``, …)
            instead of score_mod / normalizer; its learnable pieces become this layer's parameters and any mask
            it adds is built per call (masks sized by the key length follow the keys seen in that call). The
            pieces start from the catalog's own initialization where the catalog exposes ``Variant.pieces``,
            else from the learnable pieces it builds for its checks (``make_inputs``: random values).
        causal: decoder (True) or encoder (False) attention.
        rope: None/False, True (standard), a dict (``base``, ``fraction``, ``scaling``) or a RotaryEmbedding.
        qk_norm: per-head RMSNorm of q and k before RoPE. output_gate: sigmoid gate on the attention output.
        bias: biases on the q/k/v/o projections. scale: logit scale (default 1/√head_dim).
        form, backend: passed to :func:`attnkit.attention`.
        layer_idx: this layer's index in a cache.

    ``forward(x [B, T, d_model], *, cache=None, cu_seqlens=None) -> [B, T, d_model]``. With a
    :class:`attnkit.cache.KVCache` the new keys/values are appended and the queries attend to all cached
    keys (positions continue from ``cache.seq_len(layer_idx)``); ``cu_seqlens`` ``[N + 1]`` packs N documents
    in batch 1 (document mask, RoPE positions restarting per document).

    Decoding equals the full forward for every mask and normalizer whose value at (query, key) does not depend
    on how many keys one call holds; pieces sized by the call's key count (sigmoid's default bias ``−log Lk``,
    the catalog's windows of ``Lk / 4``) change as the cache grows: give them fixed sizes
    (``normalizers.sigmoid(-math.log(n))``, ``masks.sliding_window(w)``) to decode.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 *, mask=None, score_mod=None, normalizer=None, variant: Optional[str] = None, causal: bool = True,
                 rope: Union[None, bool, dict, RotaryEmbedding] = True, qk_norm: bool = False,
                 output_gate: bool = False, bias: bool = False, scale: Optional[float] = None, form: str = "auto",
                 backend: str = "auto", layer_idx: int = 0, norm_eps: float = 1e-6):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) is not divisible by n_heads ({n_heads}); give head_dim")
            head_dim = d_model // n_heads
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.causal, self.scale, self.form, self.backend, self.layer_idx = causal, scale, form, backend, layer_idx
        self.mask = None if mask is None else _ops.masks.as_mask(mask)
        self.variant = None
        if variant is not None:
            if score_mod is not None or normalizer is not None:
                raise ValueError("give either variant= or score_mod= / normalizer=, not both")
            self.variant = _softmax_variant(variant)
            pieces = _ops.variant_pieces(self.variant, n_heads, n_kv_heads, head_dim)
            score_mod, normalizer = pieces["score_mod"], pieces["normalizer"]
        self.score_mod = _ops.scores.as_score_mod(score_mod)
        self.normalizer = _ops.normalizers.as_normalizer("softmax" if normalizer is None else normalizer)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.g_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias) if output_gate else None
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.rope = as_rope(rope, head_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
        """``[B, Hq, Lq, D] x [B, Hkv, Lk, D] x [B, Hkv, Lk, Dv] -> [B, Hq, Lq, Dv]`` with the layer's variant."""
        kw = dict(mask=mask, score_mod=self.score_mod, normalizer=self.normalizer, scale=self.scale,
                  form=self.form, backend=self.backend)
        if self.variant is not None:
            return self.variant(q, k, v, **kw)
        return _ops.attention(q, k, v, **kw)

    def project(self, x: Tensor):
        """``q [B, Hq, T, D]``, ``k``, ``v`` ``[B, Hkv, T, D]`` of ``x`` after the projections and qk-norm (no RoPE)."""
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _positions(self, T: int, cache, cu_seqlens, device) -> Tensor:
        if cache is None or cu_seqlens is not None:
            return positions_for(T, 0, cu_seqlens, device)
        if hasattr(cache, "positions"):  # [T], or [B, T] for a ragged batch
            return cache.positions(self.layer_idx, T, device)
        return positions_for(T, cache.seq_len(self.layer_idx), None, device)

    def qkv(self, x: Tensor, cache=None, cu_seqlens: Optional[Tensor] = None):
        """Projected, normed and rotated ``q [B, Hq, T, D]``, and ``k``, ``v`` ``[B, Hkv, T_all, D]`` (all cached
        keys and values when a cache is given). A cache with ``rope_at_read`` (StreamingLLM's cache positions)
        stores keys before RoPE; they are rotated here by their cache slot."""
        check_input(x, self.d_model, cu_seqlens, cache)
        T = x.shape[1]
        q, k, v = self.project(x)
        at_read = cache is not None and hasattr(cache, "rope_at_read") and cache.rope_at_read(self.layer_idx)
        if self.rope is not None:
            pos = self._positions(T, cache, cu_seqlens, x.device)
            q = self.rope(q, pos)
            if not at_read:
                k = self.rope(k, pos)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            if at_read and self.rope is not None:
                k = self.rope(k, torch.arange(k.shape[2], device=x.device))
        return q, k, v

    def _decode(self, q: Tensor, kv, mask, v: Optional[Tensor] = None) -> Tensor:
        """The decode kernels' path: ``kv`` an attnkit cache (read in place) or the keys with ``v``."""
        return decode_attention(q, kv, v, layer_idx=self.layer_idx, mask=mask, score_mod=self.score_mod,
                                normalizer=self.normalizer, scale=self.scale, backend=self.backend, check=False)

    def _in_place(self, x: Tensor, cache, mask, cu_seqlens) -> Tensor:
        """Caches the decode kernels read in place (contiguous, paged, block): append, then attend."""
        check_input(x, self.d_model, cu_seqlens, cache)
        T = x.shape[1]
        q, k, v = self.project(x)
        if self.rope is not None:
            pos = self._positions(T, cache, None, x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        empty = not any(cache.lengths(self.layer_idx))
        cache.append(self.layer_idx, k, v)
        if T <= DECODE_MAX_Q:  # (a paged cache that selects pages picks them with these queries)
            view = cache.kv_view(self.layer_idx, q) if getattr(cache, "select_pages", None) else cache
            return self._decode(q, view, mask)
        if not empty:  # a long chunk after cached tokens: read them back (one length for every sequence)
            k, v = cache.read(self.layer_idx)
        return self.attend(q, k, v, mask)

    def _weights(self, q: Tensor, k: Tensor, v: Tensor, mask):
        """``weights(r0, r1)``: attention weights ``[B, Hq, r1 − r0, Lk]`` of query rows ``r0 … r1 − 1`` (policies)."""
        def weights(r0: int, r1: int) -> Tensor:
            kw = dict(mask=mask, score_mod=self.score_mod, normalizer=self.normalizer, scale=self.scale,
                      form="materialized", backend="reference", return_weights=True,
                      q_offset=k.shape[2] - q.shape[2] + r0)
            fn = self.variant if self.variant is not None else _ops.attention
            return fn(q[:, :, r0:r1], k, v, **kw)[1]
        return weights

    def heads(self, x: Tensor, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Per-head outputs ``[B, T, Hq, D]`` (output gate applied), before the output projection."""
        B, T, _ = x.shape
        mask = layer_mask(self.causal, self.mask, cu_seqlens)
        if cache is not None and hasattr(cache, "attention_mask"):
            extra = cache.attention_mask(self.layer_idx)
            mask = mask if extra is None else mask & extra
        # the decode kernels compute attend() of this class (subclasses that change attend() keep their own)
        plain = self.variant is None and type(self).attend is Attention.attend
        if cache is not None and plain and hasattr(cache, "kv_view") and hasattr(cache, "append"):
            o = self._in_place(x, cache, mask, cu_seqlens)
        else:
            q, k, v = self.qkv(x, cache, cu_seqlens)
            if cache is not None and plain and self.form == "auto" and T <= DECODE_MAX_Q:
                o = self._decode(q, k, mask, v)
            else:
                o = self.attend(q, k, v, mask)
            if cache is not None and hasattr(cache, "observe"):
                cache.observe(self.layer_idx, self._weights(q, k, v, mask) if cache.needs_weights(self.layer_idx)
                              else None)
        o = o.transpose(1, 2)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).view(B, T, self.n_heads, self.head_dim)
        return o

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        o = self.heads(x, cache, cu_seqlens)
        return self.o_proj(o.reshape(x.shape[0], x.shape[1], self.n_heads * self.head_dim))


def _softmax_variant(name: str):
    v = _ops.get_variant(name) if isinstance(name, str) else name
    if getattr(v, "family", None) != "softmax" or getattr(v, "full_mask", None) is None:
        layers = {"differential": "DiffAttention", "multi_token": "MultiTokenAttention",
                  "simplicial": "SimplicialAttention"}
        hint = layers.get(getattr(v, "name", ""), "LinearAttention" if getattr(v, "family", "") == "linear" else None)
        raise ValueError(f"Attention(variant=...) takes a softmax-family variant that is one attention call "
                         f"(mask, score mod, normalizer); {getattr(v, 'name', v)!r} is not"
                         + (f": use attnkit.nn.{hint}" if hint else ""))
    return v
