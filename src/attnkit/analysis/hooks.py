"""Per-layer attention from models: attnkit layers and Hugging Face models using the attnkit plug-in.

    with capture(model) as recs:          # one record per attention call, in call order
        model(**inputs)
    maps = [r.weights() for r in recs]    # [B, H, Lq, Lk] each (small T)
    stats = [r.stats(sink_tokens=1) for r in recs]   # exact streaming statistics (any T)

:func:`intercept` is the one mechanism underneath (also used by :mod:`attnkit.analysis.importance` to gate heads):
for the duration of a ``with`` block it wraps

* every :class:`attnkit.nn.Attention` layer's ``attend`` (q, k after projections, norms and RoPE; its mask,
  score mod, normalizer, scale and catalog variant),
* the linear op called by every :class:`attnkit.nn.LinearAttention` layer (q, k, gates, β, … as the op gets them),
* :func:`attnkit.integrations.hf.attention_forward`, which every ``attn_implementation="attnkit…"`` model calls
  (query, key, the mask transformers built, scaling, softcap, variant),

and hands each call's inputs and per-head output to a handler. Records keep q and k (detached), never a map: maps
and statistics are computed when asked.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from torch import Tensor, nn

from ..catalog import Spec, get_variant
from ..core import masks as M
from ..core import scores as S
from ..core.normalizers import as_normalizer
from ..integrations import hf as _hf
from ..nn import _ops as _nn_ops
from ..nn.attention import Attention
from ..nn.linear import LinearAttention
from .linear_maps import linear_block_map, linear_map, linear_stats
from .maps import attention_map, block_map
from .stats import RowStats, attention_stats

__all__ = ["SoftmaxRecord", "LinearRecord", "capture", "intercept", "Handler", "head_mean"]

#: ``handler(name, record, out, head_dim) -> out``: called once per attention call with its record and per-head
#: output (heads along ``head_dim``); returns the output to use
Handler = Callable[[str, Any, Tensor, int], Tensor]


@dataclass
class SoftmaxRecord:
    """One softmax-family call: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` and the pieces of the call."""

    name: str
    q: Tensor
    k: Tensor
    mask: Any = None
    score_mod: Any = None
    normalizer: Any = "softmax"
    scale: Optional[float] = None
    kind: str = "softmax"

    def _kw(self) -> dict:
        return dict(mask=self.mask, score_mod=self.score_mod, normalizer=self.normalizer, scale=self.scale)

    def weights(self) -> Tensor:
        """``[B, Hq, Lq, Lk]`` (materialized form)."""
        return attention_map(self.q, self.k, **self._kw())

    def stats(self, **kw) -> RowStats:
        """Exact streaming row statistics (keyword arguments of :func:`attnkit.analysis.attention_stats`)."""
        return attention_stats(self.q, self.k, **self._kw(), **kw)

    def block_map(self, size: int = 256) -> Tensor:
        return block_map(self.q, self.k, size=size, **self._kw())


@dataclass
class LinearRecord:
    """One linear-rule call: ``q, k`` and the op's keyword arguments (rule, gate, β, feature map, …)."""

    name: str
    q: Optional[Tensor]
    k: Optional[Tensor]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    kind: str = "linear"

    def weights(self) -> Tensor:
        """The implicit ``[B, H, T, T]`` map (parallel form)."""
        return linear_map(self.q, self.k, **self.kwargs)

    def stats(self, **kw) -> RowStats:
        return linear_stats(self.q, self.k, **self.kwargs, **kw)

    def block_map(self, size: int = 256) -> Tensor:
        return linear_block_map(self.q, self.k, size=size, **self.kwargs)


_MAP_KEYS = ("rule", "gate", "beta", "feature_map", "normalize", "scale", "qk_l2norm", "level_weights", "base",
             "query", "layer_idx", "num_layers", "causal", "layout")


def _d(t):
    return None if t is None else t.detach()


def _variant_mask(variant, mask, Lq: int, Lk: int):
    """The mask a catalog variant adds to the caller's (its ``full_mask`` of a non-causal problem)."""
    if variant is None:
        return mask
    v = get_variant(variant) if isinstance(variant, str) else variant
    return M.as_mask(mask) & v.full_mask(Spec(Lq=Lq, Lk=Lk, causal=False))


def _layer_record(name: str, layer: Attention, q, k, mask) -> SoftmaxRecord:
    mask = _variant_mask(layer.variant, mask, q.shape[2], k.shape[2])
    return SoftmaxRecord(name, _d(q), _d(k), mask, layer.score_mod, layer.normalizer, layer.scale)


def _hf_record(name: str, module, query, key, attention_mask, scaling, is_causal, variant, kw) -> SoftmaxRecord:
    """Rebuild the call :func:`attnkit.integrations.hf.attention_forward` makes (same defaults)."""
    config = getattr(module, "config", None)
    variant = variant or getattr(config, "attnkit_variant", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    Lq, Lk = query.shape[2], key.shape[2]
    mask = _hf.hf_mask(attention_mask, bool(is_causal), Lq, Lk)
    score_mod, normalizer = (S.softcap(float(kw["softcap"])) if kw.get("softcap") else None), as_normalizer("softmax")
    if variant is not None:
        pieces = get_variant(variant).pieces(query.shape[1])
        score_mod, normalizer = pieces["score_mod"], pieces["normalizer"]
        mask = _variant_mask(variant, mask, Lq, Lk)
    return SoftmaxRecord(name, _d(query), _d(key), mask, score_mod, normalizer, scaling)


@contextlib.contextmanager
def intercept(model: nn.Module, handler: Handler) -> Iterator[None]:
    """Route every attention call inside ``model`` through ``handler`` while the block runs (see the module
    docstring); the model is restored on exit, also after an exception."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    undo: List[Callable[[], None]] = []
    current: List[Optional[str]] = [None]
    try:
        for name, m in model.named_modules():
            if isinstance(m, Attention):
                def attend(q, k, v, mask, _m=m, _orig=m.attend, _name=name):
                    out = _orig(q, k, v, mask)
                    return handler(_name, _layer_record(_name, _m, q, k, mask), out, 1)
                m.attend = attend
                undo.append(lambda m=m: m.__dict__.pop("attend", None))
            elif isinstance(m, LinearAttention):
                def pre(mod, args, _name=name):
                    current[0] = _name

                def post(mod, args, out):
                    current[0] = None
                undo += [m.register_forward_pre_hook(pre).remove, m.register_forward_hook(post).remove]
        orig_lin = _nn_ops.linear_attention

        def linear(q, k, v, **kw):
            res = orig_lin(q, k, v, **kw)
            if current[0] is None:
                return res
            rec = LinearRecord(current[0], _d(q), _d(k), {key: (_d(x) if isinstance(x, Tensor) else x)
                                                         for key, x in kw.items() if key in _MAP_KEYS})
            out = handler(current[0], rec, res[0], 2 if kw.get("layout", "bhtd") == "bthd" else 1)
            return (out,) + tuple(res[1:])
        _nn_ops.linear_attention = linear
        undo.append(lambda: setattr(_nn_ops, "linear_attention", orig_lin))
        orig_hf = _hf.attention_forward

        def hf_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       variant=None, **kw):
            out, w = orig_hf(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, variant=variant, **kw)
            name = names.get(id(module))
            if name is None:  # a call from another model
                return out, w
            rec = _hf_record(name, module, query, key, attention_mask, scaling, is_causal, variant, kw)
            return handler(name, rec, out, 2), w
        _hf.attention_forward = hf_forward
        undo.append(lambda: setattr(_hf, "attention_forward", orig_hf))
        yield
    finally:
        for u in reversed(undo):
            u()


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[List[Any]]:
    """Record every attention call of ``model`` inside the block: a list of :class:`SoftmaxRecord` /
    :class:`LinearRecord` in call order (one per layer per forward)."""
    recs: List[Any] = []

    def keep(name, rec, out, head_dim):
        recs.append(rec)
        return out

    with intercept(model, keep):
        yield recs


def head_mean(maps: List[Tensor]) -> List[Tensor]:
    """Head-averaged maps ``[B, T, T]`` (what rollout and flow take)."""
    return [m.mean(1) for m in maps]

