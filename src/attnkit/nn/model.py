"""``HybridLM``: a decoder-only language model whose layer pattern is a string, e.g. ``"LLLA"`` (three linear
layers to one softmax attention layer, as in Kimi Linear / Qwen3-Next style hybrids).

    tokens → embedding → [Block(mixer_l)]_{l < n_layers} → RMSNorm → lm_head (tied to the embedding by default)

``L`` is a :class:`~attnkit.nn.LinearAttention` with ``config.linear_rule``, ``A`` an
:class:`~attnkit.nn.Attention`; ``config.mixers`` adds letters (``{"D": lambda cfg, i: DiffAttention(...)}``).
The pattern repeats to ``n_layers``. Initialization (GPT-2 / Megatron): every linear and embedding weight
~ N(0, init_std²), the residual output projections (each mixer's ``o_proj``, each MLP's ``down_proj``)
~ N(0, init_std² / (2·n_layers)), biases 0; parameters with their own paper initialization (A_log, dt_bias,
λ vectors, convolution kernels, head-mixing matrices, norms) keep it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import ContiguousKVCache, DynamicCache, ModelCache, PagedKVCache, RecurrentStateCache
from .attention import Attention
from .blocks import Block
from .linear import LinearAttention
from .norm import RMSNorm

__all__ = ["HybridConfig", "HybridLM"]


@dataclass
class HybridConfig:
    """Sizes and layer pattern of a :class:`HybridLM`.

    ``layers``: pattern letters, repeated to ``n_layers`` (default: its own length). ``attention`` /
    ``linear``: extra keyword arguments of every Attention / LinearAttention layer (e.g.
    ``attention={"qk_norm": True, "variant": "softcap", "rope": {"base": 5e5}}``). ``linear_heads`` defaults
    to ``n_heads``. ``mixers``: extra letters, ``letter -> fn(config, layer_idx) -> nn.Module``.
    """

    vocab_size: int = 32000
    d_model: int = 1024
    n_heads: int = 16
    layers: str = "LLLA"
    n_layers: Optional[int] = None
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    linear_rule: str = "gated_delta"
    linear_heads: Optional[int] = None
    attention: dict = field(default_factory=dict)
    linear: dict = field(default_factory=dict)
    mlp_hidden: Optional[int] = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    mixers: Dict[str, Callable] = field(default_factory=dict)

    def pattern(self) -> str:
        """The layer letters, one per layer."""
        if not isinstance(self.layers, str) or not self.layers:
            raise ValueError(f"layers must be a non-empty pattern string such as 'LLLA', got {self.layers!r}")
        n = self.n_layers or len(self.layers)
        known = set("LA") | set(self.mixers)
        bad = sorted(set(self.layers) - known)
        if bad:
            raise ValueError(f"unknown layer letters {bad} in {self.layers!r}; known: {sorted(known)} "
                             "(add more through config.mixers)")
        return (self.layers * (n // len(self.layers) + 1))[:n]


class HybridLM(nn.Module):
    """Decoder-only LM over a layer pattern (see the module docstring).

    ``forward(input_ids [B, T], *, cache=None, cu_seqlens=None, labels=None)`` returns logits
    ``[B, T, vocab]``, or ``(logits, loss)`` with ``labels`` (next-token cross entropy: position t predicts
    ``labels[:, t + 1]``; ``-100`` ignored). :meth:`generate` decodes with a :class:`attnkit.cache.DynamicCache`.
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = c = config
        pattern = c.pattern()
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c.d_model, self._mixer(ch, i, len(pattern)), c.mlp_hidden, c.norm_eps)
                                    for i, ch in enumerate(pattern))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def _mixer(self, letter: str, i: int, n: int) -> nn.Module:
        c = self.config
        if letter in c.mixers:
            return c.mixers[letter](c, i)
        if letter == "A":
            return Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, layer_idx=i, norm_eps=c.norm_eps,
                             **c.attention)
        return LinearAttention(c.d_model, c.linear_heads or c.n_heads, c.linear_rule, layer_idx=i, num_layers=n,
                               norm_eps=c.norm_eps, **c.linear)

    def reset_parameters(self) -> None:
        std = self.config.init_std
        res_std = std / math.sqrt(2 * len(self.blocks))
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not getattr(m, "keep_init", False):
                nn.init.normal_(m.weight, 0.0, res_std if name.endswith(("o_proj", "down_proj")) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)

    def forward(self, input_ids: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None,
                labels: Optional[Tensor] = None):
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {got}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cache=cache, cu_seqlens=cu_seqlens)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        loss = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cache=None) -> Tensor:
        """Prefill ``input_ids [B, T]`` then decode ``max_new_tokens`` one at a time through the caches.

        ``temperature=0``: greedy (argmax); else sample from ``softmax(logits / temperature)`` restricted to the
        ``top_k`` largest logits (all if None), with ``generator``. Stops early once every row has produced
        ``eos_token_id``. Returns ``[B, T + new]``.

        ``cache``: a cache object (any :class:`attnkit.cache.KVCache` that is also a ``StateCache``, e.g. a
        :class:`~attnkit.cache.ModelCache`, a :class:`~attnkit.cache.PolicyCache`), or ``"dynamic"`` (default:
        growing tensors), ``"contiguous"`` (preallocated for ``T + max_new_tokens`` tokens) or ``"paged"`` (pages
        of 16 tokens); the last two keep linear layers' states in a fixed-memory
        :class:`~attnkit.cache.RecurrentStateCache`.
        """
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens}, {temperature}")
        cache = self.make_cache(cache, input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, cache=cache)[:, -1]
        for i in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt[:, None])
            if (eos_token_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits = self(nxt[:, None], cache=cache)[:, -1]
        return torch.cat(out, 1)

    @staticmethod
    def make_cache(kind, batch: int, max_len: int):
        """The cache :meth:`generate` uses for ``kind`` (a name or a cache object, returned as is)."""
        if kind is None or kind == "dynamic":
            return DynamicCache()
        if kind == "contiguous":
            return ModelCache(ContiguousKVCache(max_len), RecurrentStateCache())
        if kind == "paged":
            page = 16
            return ModelCache(PagedKVCache(batch * -(-max_len // page), page), RecurrentStateCache())
        if isinstance(kind, str):
            raise ValueError(f"cache must be a cache object or one of 'dynamic', 'contiguous', 'paged', got {kind!r}")
        return kind

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
