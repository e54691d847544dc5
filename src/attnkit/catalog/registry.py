"""The variant registry: every named attention variant, its forms, costs and source paper.

A :class:`Variant` is callable (it runs the variant on user tensors) and also knows how to build
fresh random inputs for a :class:`Spec`, which is what ``attnkit check`` and ``attnkit bench`` use.
Families register their variants at import time with :func:`register` (the modules of
:mod:`attnkit.catalog`, imported in a fixed order by the package).

Names. A variant is called by the API's own name for what it adds (``Variant.api`` says where that name lives):
the normalizer, score mod or mask it puts on softmax attention (``softmax_sink``, ``relative_bias``,
``sliding_window``), the function it runs (``differential``, ``multi_token``, ``simplicial``), the linear rule,
then its feature map or base rule (``gated_delta``, ``linear_elu``, ``log_linear_scalar_gate``). Earlier names
(``gated-deltanet``, ``t5-bias``, ...) stay accepted by :func:`get_variant` with a DeprecationWarning
(:func:`aliases`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..core.validation import deprecated_name

__all__ = ["Spec", "Variant", "register", "variants", "get_variant", "aliases", "PATTERNS"]

#: CAB's four patterns: (name, causal, cross). Cross patterns use Lq = Lk / 4.
PATTERNS = {
    "self": (False, False),
    "causal-self": (True, False),
    "cross": (False, True),
    "causal-cross": (True, True),
}

@dataclass(frozen=True)
class Spec:
    """Sizes of one generated problem. ``Hq`` query heads over ``Hkv`` key/value heads."""

    B: int = 1
    Hq: int = 4
    Hkv: int = 4
    Lq: int = 64
    Lk: int = 64
    D: int = 32
    Dv: int = 32
    causal: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @staticmethod
    def for_pattern(pattern: str, T: int, **kw) -> "Spec":
        """Spec for a CAB pattern at length T (cross patterns: Lq = max(1, T // 4), Lk = T)."""
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; expected one of {list(PATTERNS)}")
        is_causal, cross = PATTERNS[pattern]
        return Spec(Lq=max(1, T // 4) if cross else T, Lk=T, causal=is_causal, **kw)

    def with_(self, **kw) -> "Spec":
        return replace(self, **kw)


@dataclass
class Variant:
    """A named variant.

    ``fn(**inputs, form=..., backend=...)`` runs it and returns the output tensor (or a tuple whose
    first item is the output). ``make_inputs(spec)`` returns fresh random inputs for ``fn``: tensors,
    and modules whose parameters are learnable. ``unsupported(spec, form)`` returns None or a reason.
    """

    name: str
    family: str
    summary: str
    paper: str
    forms: Tuple[str, ...]
    fn: Callable[..., Any]
    make_inputs: Callable[[Spec], Dict[str, Any]]
    masks: str = "any"
    time: str = "O(Lq·Lk·D)"
    memory: str = ""
    cache: str = ""
    cache_bytes_per_token: Optional[Callable[[Spec], float]] = None
    state_bytes: Optional[Callable[[Spec], float]] = None
    flops: Optional[Callable[[Spec], float]] = None
    unsupported: Callable[[Spec, str], Optional[str]] = field(default=lambda spec, form: None)
    reference_form: str = "materialized"
    backends: Tuple[str, ...] = ("reference",)
    tags: Tuple[str, ...] = ()
    #: set only when the variant is exactly ``attention(q, k, v, mask=full_mask(spec), score_mod=inputs[
    #: "score_mod"], normalizer=inputs["normalizer"])`` on its inputs: peers (SDPA, Flex) are timed on it
    full_mask: Optional[Callable[[Spec], Any]] = None
    #: extra keyword arguments bound when the variant is called on user tensors
    call_kwargs: Callable[..., Dict[str, Any]] = field(default=lambda *a, **k: {})
    #: ``pieces(H) -> {"score_mod": ..., "normalizer": ...}``: fresh modules with the paper's initial values for
    #: H query heads (softmax-family variants; layers own them), None where the variant has no such pieces
    pieces: Optional[Callable[[int], Dict[str, Any]]] = None
    #: where the name comes from in the public API, a path under ``attnkit``: ``"normalizers.softmax_sink"``,
    #: ``"scores.alibi"``, ``"masks.chunked"``, ``"cache.StreamingLLM"``, ``"differential_attention"``,
    #: ``"linear_attention"`` (the name is then the rule, plus the feature map or base rule bound)
    api: str = ""
    #: earlier names of the variant, still accepted by :func:`get_variant` with a DeprecationWarning
    aliases: Tuple[str, ...] = ()

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **{**self.call_kwargs(*args, **kwargs), **kwargs})

    def cache_at_reference(self) -> Dict[str, Optional[float]]:
        """Decoding memory at :data:`REFERENCE_SPEC`: KV-cache bytes per token (all KV heads of a layer)
        and fixed state bytes per head (linear family), None where not applicable."""
        s = REFERENCE_SPEC
        return {"kv_bytes_per_token": self.cache_bytes_per_token(s) if self.cache_bytes_per_token else None,
                "state_bytes_per_head": self.state_bytes(s) if self.state_bytes else None}

    def row(self) -> Dict[str, Any]:
        """The catalog entry as plain data (for ``attnkit list --json``)."""
        return {
            "name": self.name, "family": self.family, "summary": self.summary, "forms": list(self.forms),
            "masks": self.masks, "time": self.time, "memory": self.memory, "cache": self.cache,
            **self.cache_at_reference(), "paper": self.paper, "backends": list(self.backends), "api": self.api,
            "aliases": list(self.aliases),
        }


#: the shape at which ``attnkit list`` quotes cache sizes: 32 query heads over 8 KV heads, D = Dv = 128, bf16, T = 4096
REFERENCE_SPEC = Spec(B=1, Hq=32, Hkv=8, Lq=4096, Lk=4096, D=128, Dv=128, causal=True, dtype=torch.bfloat16)

_REGISTRY: Dict[str, Variant] = {}
#: deprecated name -> name
_ALIASES: Dict[str, str] = {}


def register(v: Variant) -> Variant:
    """Add a variant; names and aliases are unique."""
    if v.name in _ALIASES or _REGISTRY.get(v.name, v) is not v:
        raise ValueError(f"variant {v.name!r} is already registered (as a name or an alias)")
    for old in v.aliases:
        if old in _REGISTRY or old == v.name or _ALIASES.get(old, v.name) != v.name:
            raise ValueError(f"alias {old!r} of variant {v.name!r} is already a name or another variant's alias")
    _REGISTRY[v.name] = v
    _ALIASES.update({old: v.name for old in v.aliases})
    return v


def aliases() -> Dict[str, str]:
    """Deprecated variant names and the names they stand for (``{"gated-deltanet": "gated_delta", ...}``)."""
    return dict(_ALIASES)


def variants(family: Optional[str] = None) -> List[Variant]:
    """All registered variants (optionally of one family), in registration order."""
    return [v for v in _REGISTRY.values() if family is None or v.family == family]


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (a deprecated alias: with a DeprecationWarning naming the new name); ValueError
    listing the known names otherwise."""
    name = deprecated_name("variant", name, _ALIASES)
    if name not in _REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown variant {name!r}{hint}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
