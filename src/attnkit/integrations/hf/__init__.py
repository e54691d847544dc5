"""Hugging Face transformers plug-in: attnkit as an attention implementation.

    import attnkit.integrations.hf as akhf
    akhf.register()                                   # "attnkit" and "attnkit:<variant>" for every
    model = AutoModel.from_pretrained(path, attn_implementation="attnkit")          # one-call variant
    model = AutoModel.from_pretrained(path, attn_implementation="attnkit:sigmoid")  # a catalog variant

:func:`register` adds each name to transformers' ``AttentionInterface`` (the attention function) and to its
``AttentionMaskInterface`` (transformers 5 builds no mask at all for an implementation missing there, so
padding would be ignored); the mask function is transformers' own boolean ``sdpa_mask``, which attnkit turns
into a mask predicate. A plain ``"attnkit"`` model can also pick a variant and a backend through config
fields ``attnkit_variant`` / ``attnkit_backend`` (read at every call).

Catalog variants run with the catalog's default pieces (e.g. the standard ALiBi slopes, zero sink logits):
their parameters are not parameters of the transformers model. Dropout is refused while training (attnkit's
kernels have none); an additive float mask is accepted only when it is a 0 / −∞ (or dtype minimum) mask.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["register", "attention_forward", "cache", "IMPLEMENTATION", "TESTED_TRANSFORMERS"]

#: the name of the plain implementation; variants are registered as ``"attnkit:<variant>"``
IMPLEMENTATION = "attnkit"
#: the transformers versions this module was tested with (the ``attnkit[hf]`` extra pins the same range)
TESTED_TRANSFORMERS = (">=5.24", "<6")  # 5.24.0 tested


def _ops():
    from attnkit.nn import _ops as ops  # one place for attnkit's public operations
    return ops


def _bool_mask(attention_mask: Tensor, Lk: int) -> Tensor:
    """HF's 4-D mask ``[B', H', Lq, ≥Lk]`` as booleans (True = attend)."""
    m = attention_mask[..., :Lk]
    if m.dtype == torch.bool:
        return m
    if not m.is_floating_point():
        raise TypeError(f"attention_mask must be bool or an additive float mask, got {m.dtype}")
    keep = m > torch.finfo(m.dtype).min / 2
    if bool((m[keep] != 0).any()):
        raise ValueError("attnkit takes a boolean (or 0 / -inf additive) attention mask; this float mask carries a "
                         "bias. Express biases as attnkit score mods instead")
    return keep


def hf_mask(attention_mask: Optional[Tensor], is_causal: bool, Lq: int, Lk: int):
    """The attnkit mask of one HF call: causal / full without a mask tensor, else a predicate over it (query rows
    end-aligned: row ``i`` is at position ``i + Lk − Lq``)."""
    masks = _ops().masks
    if attention_mask is None:
        return masks.causal if is_causal else masks.full
    if attention_mask.dim() != 4 or attention_mask.shape[-2] != Lq:
        raise ValueError(f"expected a 4-D attention mask [B, H, {Lq}, {Lk}], got {tuple(attention_mask.shape)}")
    m = _bool_mask(attention_mask, Lk)
    off = Lk - Lq
    Bp, Hp = m.shape[0], m.shape[1]

    def keep(b, h, q, kv):
        return m[b if Bp > 1 else 0, h if Hp > 1 else 0, q - off, kv]

    return masks.predicate(keep, "hf_mask")


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      variant: Optional[str] = None, **kwargs):
    """transformers' attention-function contract: ``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, Lk, ·]``
    (GQA not repeated) -> ``(out [B, Lq, Hq, Dv], None)``; ``variant`` a catalog name (None: plain softmax or
    the config field ``attnkit_variant``)."""
    if dropout and getattr(module, "training", False):
        raise ValueError(f"attnkit attention has no dropout; got dropout={dropout} in training mode "
                         "(set attention_probs_dropout_prob / attention_dropout to 0)")
    if kwargs.get("position_bias") is not None:
        raise ValueError("attnkit does not take transformers' position_bias; use an attnkit score mod")
    ops = _ops()
    config = getattr(module, "config", None)
    variant = variant or getattr(config, "attnkit_variant", None)
    backend = getattr(config, "attnkit_backend", None) or "auto"
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    Lq, Lk = query.shape[2], key.shape[2]
    mask = hf_mask(attention_mask, bool(is_causal), Lq, Lk)
    score_mod = ops.scores.softcap(float(kwargs["softcap"])) if kwargs.get("softcap") else None
    kw = dict(mask=mask, scale=scaling, backend=backend)
    if variant is not None:
        if score_mod is not None:
            raise ValueError(f"variant {variant!r} with the model's softcap is not supported; use plain 'attnkit'")
        out = ops.get_variant(variant)(query, key, value, **kw)
    else:
        out = ops.attention(query, key, value, score_mod=score_mod, **kw)
    return out.transpose(1, 2).contiguous(), None


def cache(kv):
    """A transformers ``Cache`` over an attnkit contiguous or paged KV cache (:class:`attnkit.cache.hf.HFCache`):
    ``model.generate(ids, cache=akhf.cache(PagedKVCache(num_pages=1024)))``."""
    from attnkit.cache.hf import HFCache
    return HFCache(kv)


def _one_call_variants() -> List[str]:
    """Names of the catalog variants that are one attention call, then their deprecated names (which still run,
    with a DeprecationWarning naming the new name)."""
    one = [v for v in _ops().catalog("softmax") if getattr(v, "full_mask", None) is not None]
    return [v.name for v in one] + [old for v in one for old in getattr(v, "aliases", ())]


def register(variants: bool = True) -> List[str]:
    """Register ``"attnkit"`` (and ``"attnkit:<name>"`` for every catalog variant that is one attention call and
    for its deprecated names, when ``variants``) with transformers' attention and mask interfaces; returns the
    names registered. ImportError naming the extra when transformers is missing."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(f"attnkit.integrations.hf needs transformers 5 (pip install 'attnkit[hf]'): {e}") from None
    names = [IMPLEMENTATION] + ([f"{IMPLEMENTATION}:{n}" for n in _one_call_variants()] if variants else [])
    for name in names:
        var = None if name == IMPLEMENTATION else name.split(":", 1)[1]

        def fn(module, query, key, value, attention_mask, _var=var, **kw):
            return attention_forward(module, query, key, value, attention_mask, variant=_var, **kw)

        fn.__name__ = f"attnkit_attention_{(var or 'softmax').replace('-', '_')}"
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    return names
