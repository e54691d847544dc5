"""Named variants of the softmax family: each one is a choice of score mod, normalizer and an extra
mask on top of the pattern's mask, run through :func:`attnkit.attention`.

    get_variant("alibi")(q, k, v, mask=masks.causal)   # attention with standard ALiBi slopes
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..core import masks as M
from ..core import normalizers as N
from ..core import scores as S
from ..dispatch.softmax import attention
from .registry import Spec, Variant, register

SOFTMAX_FORMS = ("materialized", "streaming", "recurrent")
_UNSET = object()


def pattern_mask(spec: Spec) -> M.Mask:
    """The CAB pattern's own mask: causal (end-aligned) or full."""
    return M.causal if spec.causal else M.full


def randn(spec: Spec, *shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=spec.dtype, device=spec.device)


def qkv(spec: Spec, Dq: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Fresh random q ``[B,Hq,Lq,Dq]``, k ``[B,Hkv,Lk,Dq]``, v ``[B,Hkv,Lk,Dv]``."""
    Dq = Dq or spec.D
    return {"q": randn(spec, spec.B, spec.Hq, spec.Lq, Dq), "k": randn(spec, spec.B, spec.Hkv, spec.Lk, Dq),
            "v": randn(spec, spec.B, spec.Hkv, spec.Lk, spec.Dv)}


def kv_cache_bytes(spec: Spec) -> float:
    """Bytes of K and V cached per token (all KV heads of one layer)."""
    return spec.Hkv * (spec.D + spec.Dv) * torch.finfo(spec.dtype).bits / 8


def visible_pairs(mask: M.Mask, spec: Spec) -> int:
    """Number of (query, key) pairs the mask lets through, summed over batch and heads."""
    counts = mask.row_counts(spec.B, spec.Hq, spec.Lq, spec.Lk)
    scale = (spec.B // counts.shape[0]) * (spec.Hq // counts.shape[1])
    return int(counts.sum()) * scale


def reference_only(fn, name: str):
    """Wrap ``fn`` for the registry: accept ``backend`` ('auto' / 'reference') and refuse others."""
    @functools.wraps(fn)
    def run(*args, backend: str = "auto", **kwargs):
        if backend not in ("auto", "reference"):
            raise ValueError(f"{name} runs on the reference backend only (backend='auto' or 'reference'), "
                             f"got {backend!r}")
        return fn(*args, **kwargs)
    return run


def softmax_variant(name: str, summary: str, paper: str, *,
                    score_mod: Optional[Callable[[int, bool], S.ScoreMod]] = None,
                    normalizer: Optional[Callable[[int, bool], N.Normalizer]] = None,
                    extra_mask: Optional[Callable[[int], M.Mask]] = None,
                    lookahead: bool = False, cache: str = "K,V: (D+Dv)·Hkv values per token",
                    tags=(), api: Optional[str] = None, aliases=()) -> Variant:
    """Build and register a softmax-family variant.

    ``score_mod(H, random)`` / ``normalizer(H, random)`` build the pieces for H query heads (with
    random learnable parameters when ``random`` is True, for checks); ``extra_mask(Lk)`` is ANDed
    with the caller's mask; ``lookahead`` marks masks that see future keys (no recurrent form).
    ``name`` is the API's name of the piece the variant adds: ``api`` defaults to ``normalizers.<name>``,
    ``scores.<name>`` or ``masks.<name>`` after the piece given; ``aliases`` are deprecated earlier names.
    """
    if api is None:
        api = f"{'scores' if score_mod else 'masks' if extra_mask and not normalizer else 'normalizers'}.{name}"
    built: Dict[tuple, dict] = {}

    def pieces(H: int, random: bool = False) -> dict:
        return {"score_mod": score_mod(H, random) if score_mod else None,
                "normalizer": normalizer(H, random) if normalizer else N.softmax()}

    def fn(q, k, v, *, mask=None, score_mod=_UNSET, normalizer=_UNSET, layout="bhtd", **kw):
        H = q.shape[1] if layout == "bhtd" else q.shape[2]
        Lk = k.shape[2] if layout == "bhtd" else k.shape[1]
        if score_mod is _UNSET or normalizer is _UNSET:  # the variant's own pieces, built once per (H, device)
            if (H, q.device) not in built:
                built[(H, q.device)] = {k: (m.to(q.device) if m is not None else None) for k, m in pieces(H).items()}
            p = built[(H, q.device)]
            score_mod = p["score_mod"] if score_mod is _UNSET else score_mod
            normalizer = p["normalizer"] if normalizer is _UNSET else normalizer
        m = M.as_mask(mask)
        if extra_mask is not None:
            m = m & extra_mask(Lk)
        return attention(q, k, v, mask=m, score_mod=score_mod, normalizer=normalizer, layout=layout, **kw)

    def make_inputs(spec: Spec) -> dict:
        mods = {k: (m.to(spec.device) if m is not None else None) for k, m in pieces(spec.Hq, random=True).items()}
        return {**qkv(spec), "mask": pattern_mask(spec), **mods}

    def full_mask(spec: Spec) -> M.Mask:
        m = pattern_mask(spec)
        return m & extra_mask(spec.Lk) if extra_mask is not None else m

    def flops(spec: Spec) -> float:
        return 2.0 * (spec.D + spec.Dv) * visible_pairs(full_mask(spec), spec)

    def unsupported(spec: Spec, form: str) -> Optional[str]:
        if form == "recurrent" and (lookahead or not spec.causal):
            return "recurrent form needs a mask without look-ahead (causal patterns)"
        return None

    v = Variant(
        name=name, family="softmax", summary=summary, paper=paper, forms=SOFTMAX_FORMS, fn=fn,
        make_inputs=make_inputs, masks="any" if extra_mask is None else f"any & {extra_mask(4096)!r} (at Lk=4096)",
        time="O(B·H·pairs·D)", memory="materialized O(Lq·Lk); streaming O(block²); recurrent O(Lk)",
        cache=cache, cache_bytes_per_token=kv_cache_bytes, flops=flops, unsupported=unsupported, tags=tuple(tags),
        backends=("reference", "triton"), full_mask=full_mask, pieces=pieces, api=api, aliases=tuple(aliases))
    return register(v)


# -- parameter builders: (H, random) -> piece ----------------------------------------------------

def _learnable(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(torch.float32))


def _sink(H, random):
    return N.softmax_sink(_learnable(torch.randn(H)) if random else H)


def _t5(H, random):
    return S.relative_bias(H, num_buckets=32, max_distance=128, bidirectional=True)


def _temperature(H, random):
    return S.temperature(_learnable(0.5 + torch.rand(H)))


def _ssmax(H, random):
    return S.ssmax(_learnable(0.3 + 0.3 * torch.rand(H)) if random else 0.43)


def _alibi(H, random):
    return S.alibi(_learnable(S.alibi_slopes(H) * (0.5 + torch.rand(H)))) if random else S.alibi()


def _window(Lk: int) -> int:
    return min(1024, max(2, Lk // 4))


# -- the catalog --------------------------------------------------------------------------------

softmax_variant("softmax", "scaled dot-product softmax attention", "Vaswani et al. 2017, Attention Is All You Need")
softmax_variant("softmax_sink", "softmax with a learned per-head sink logit in the denominator",
                "Xiao et al. 2023 (StreamingLLM) / OpenAI gpt-oss 2025", normalizer=_sink, aliases=("softmax-sink",))
softmax_variant("softmax_off_by_one", "softmax₁: exp(s)/(1+Σexp(s)), an implicit zero logit",
                "Miller 2023, Attention Is Off By One", normalizer=lambda H, r: N.softmax_off_by_one(),
                aliases=("softmax-off-by-one",))
softmax_variant("relaxed", "softmax smoothed toward uniform: (1−γ)·softmax + γ/n, γ=0.1",
                "Relaxed attention (Lohrenz et al. 2021)", normalizer=lambda H, r: N.relaxed(0.1),
                aliases=("relaxed-softmax",))
softmax_variant("sigmoid", "sigmoid(s − log Lk) per key, no normalization across keys",
                "Ramapuram et al. 2024, Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
                normalizer=lambda H, r: N.sigmoid())
softmax_variant("relu", "relu(s)/n over visible keys", "Wortsman et al. 2023, Replacing softmax with ReLU in ViTs",
                normalizer=lambda H, r: N.relu())
softmax_variant("relu2", "relu(s)²/n over visible keys", "So et al. 2021 (Primer) / ReLU² attention",
                normalizer=lambda H, r: N.relu2())
softmax_variant("none", "raw masked scores as weights (no normalizer), for research",
                "Katharopoulos et al. 2020 (unnormalized linear view)", normalizer=lambda H, r: N.none(),
                aliases=("linear-none",))
softmax_variant("softcap", "softmax over 30·tanh(s/30) (logit soft-capping)", "Gemma 2 (Team 2024) / Grok-1",
                score_mod=lambda H, r: S.softcap(30.0))
softmax_variant("alibi", "softmax with ALiBi linear distance bias (standard per-head slopes)",
                "Press et al. 2022, Train Short, Test Long (ALiBi)", score_mod=_alibi)
softmax_variant("relative_bias", "softmax with T5 bucketed learnable relative-position bias",
                "Raffel et al. 2020 (T5)", score_mod=_t5, aliases=("t5-bias",))
softmax_variant("ssmax", "Scalable-Softmax: scores × s·log(n visible keys)",
                "Nakanishi 2025, Scalable-Softmax Is Superior for Attention", score_mod=_ssmax)
softmax_variant("temperature", "softmax with learned per-head temperature s/τ_h",
                "per-head temperature (e.g. Selective Attention, Zhang et al. 2024)", score_mod=_temperature)
softmax_variant("sliding_window", "softmax over a sliding window of min(1024, Lk/4) past keys",
                "Beltagy et al. 2020 (Longformer) / Mistral 7B", extra_mask=lambda Lk: M.sliding_window(_window(Lk)),
                cache="K,V of the last w tokens only", aliases=("sliding-window",))
softmax_variant("streaming_llm", "4 attention-sink tokens plus a sliding window (the mask of cache.StreamingLLM)",
                "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks",
                extra_mask=lambda Lk: M.sinks(4) | M.sliding_window(_window(Lk)),
                cache="K,V of 4 sinks + w recent tokens", api="cache.StreamingLLM", aliases=("streaming-llm",))
softmax_variant("chunked", "chunked mask: bidirectional in blocks of min(64, Lk/8), causal across",
                "semi-autoregressive / block diffusion LMs (Arriola et al. 2025, Block Diffusion)",
                extra_mask=lambda Lk: M.chunked(min(64, max(2, Lk // 8))), lookahead=True, aliases=("block-causal",))
softmax_variant("prefix_lm", "bidirectional over a prefix of Lk/4 tokens, causal after",
                "Raffel et al. 2020 (T5 prefix LM) / UniLM", extra_mask=lambda Lk: M.prefix_lm(Lk // 4), lookahead=True,
                aliases=("prefix-lm",))
softmax_variant("document", "packed sequences: 8 equal documents, no attention across them",
                "document masking for packed training (e.g. Krell et al. 2021)",
                extra_mask=lambda Lk: M.document(cu_seqlens=torch.linspace(0, Lk, 9).round().long()))
softmax_variant("dilated", "every 2nd key (dilation rate 2)", "Ding et al. 2023, LongNet (dilated attention)",
                extra_mask=lambda Lk: M.dilated(2))
