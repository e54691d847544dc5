"""The public entry point of the softmax family: :func:`attention`."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .masks import MaskLike, as_mask
from .normalizers import Normalizer, as_normalizer
from .scores import ScoreMod, as_score_mod
from .variants import softmax as _sm

__all__ = ["attention", "last_backend", "FORMS", "BACKENDS", "check_qkv"]

FORMS = ("auto", "materialized", "streaming", "recurrent")
BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: problems with at most this many score entries run materialized under form="auto"
AUTO_DENSE_LIMIT = 1 << 22

_last = {"backend": None, "form": None}


def last_backend() -> Optional[str]:
    """``"<backend>/<form>"`` of the most recent :func:`attention` call in this process (None before any)."""
    if _last["backend"] is None:
        return None
    return f"{_last['backend']}/{_last['form']}"


def record_backend(backend: str, form: str) -> None:
    _last["backend"], _last["form"] = backend, form


def check_qkv(q: Tensor, k: Tensor, v: Tensor, layout: str = "bhtd") -> Tuple[Tensor, Tensor, Tensor]:
    """Validate q/k/v and return them in ``[B, H, T, D]`` layout (views, no copies)."""
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "[B, H, T, D]" if layout == "bhtd" else "[B, T, H, D]"
            raise ValueError(f"{name} must be 4-D {want} (layout={layout!r}), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float64/float32/bfloat16/float16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout == "bthd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA/MQA")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must share the head dim, got {D} and {k.shape[3]}")
    if Lq == 0 or k.shape[2] == 0 or D == 0 or v.shape[3] == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return q, k, v


def resolve_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = None,
    score_mod: Union[ScoreMod, Sequence[ScoreMod], None] = None,
    normalizer: Union[str, Normalizer] = "softmax",
    scale: Optional[float] = None,
    form: str = "auto",
    backend: str = "auto",
    return_lse: bool = False,
    return_weights: bool = False,
    layout: str = "bhtd",
    deterministic: Optional[bool] = None,
    q_offset: Optional[int] = None,
    kv_offset: int = 0,
):
    """Softmax-family attention ``o_i = Σ_j normalizer(score_mod(scale · q_i·k_j))_j v_j`` over visible keys.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]`` (``layout="bthd"``:
            ``[B, T, H, D]``). ``Hq`` a multiple of ``Hkv`` (GQA / MQA, K/V never repeated).
        mask: a :mod:`attnkit.masks` Mask (``causal``, ``sliding_window(128) | sinks(4)``, ...),
            'causal' / 'full', or None (full). Queries are aligned to the end of the keys.
        score_mod: a :mod:`attnkit.scores` mod or a list applied in order.
        normalizer: a name ('softmax', 'softmax_off_by_one', 'sigmoid', 'relu', 'relu2', 'none')
            or a :mod:`attnkit.normalizers` object (softmax_sink(H), relaxed(γ), sigmoid(b)).
        scale: defaults to 1/sqrt(D).
        form: 'materialized', 'streaming', 'recurrent' or 'auto' (materialized for small problems
            or when weights are requested, else streaming).
        backend: 'reference' (plain PyTorch, any device and dtype), 'triton' (fused GPU kernels)
            or 'auto' (the fastest available for the exact function; see :func:`last_backend`).
        return_lse: also return the log-sum-exp per row ``[B, Hq, Lq]`` over the visible scores and
            the sink logit if any (softmax family; a row with no visible key gets the sink logit, or
            -inf without a sink). float32 for half-precision inputs, float64 for float64.
        return_weights: also return ``[B, Hq, Lq, Lk]`` weights (materialized form only; float32
            for half-precision inputs).
        q_offset, kv_offset: positions of query row 0 and key 0 (query row ``i`` sits at ``q_offset + i``, key
            ``j`` at ``kv_offset + j``); masks and score mods see these positions. Default: keys from 0 and
            queries aligned to the end of the keys (``q_offset = kv_offset + Lk − Lq``). For a shard of a longer
            sequence (context parallelism) or a chunk of a prefill; ``document`` / per-batch ``prefix_lm``
            tensors are indexed by position and must cover every position used.
        deterministic: fused kernels must give bitwise-reproducible results (default: follow
            ``torch.are_deterministic_algorithms_enabled()``). The Triton kernels always are; this
            only stops ``backend="auto"`` from picking SDPA. The reference backend is deterministic.

    Returns:
        ``out`` in q's dtype and layout, or a tuple ``(out, lse?, weights?)``. Query rows with no
        visible key give zeros and zero gradients.
    """
    q, k, v = check_qkv(q, k, v, layout)
    mask = as_mask(mask)
    score_mod = as_score_mod(score_mod)
    normalizer = as_normalizer(normalizer)
    scale = resolve_scale(scale, q.shape[-1])
    positions = check_positions(q_offset, kv_offset)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if return_lse and normalizer.family != "softmax":
        raise ValueError(f"return_lse needs a softmax-family normalizer (softmax, softmax_sink, "
                         f"softmax_off_by_one, relaxed), got {normalizer.name!r}")
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if backend != "reference" and form in ("auto", "streaming") and not return_weights:
        fused = _fused(backend, q, k, v, mask, score_mod, normalizer, scale, return_lse, deterministic, positions)
        if fused is not None:
            name, out, lse = fused
            record_backend(name, "fused")
            if layout == "bthd":
                out = out.transpose(1, 2)
            return (out, lse) if return_lse else out
    elif backend == "triton":
        raise ValueError(f"backend='triton' runs the fused (streaming) form only; got form={form!r}"
                         + (" with return_weights=True" if return_weights else ""))
    if form == "auto":
        form = "materialized" if return_weights or B * Hq * Lq * Lk <= AUTO_DENSE_LIMIT else "streaming"
    if return_weights and form != "materialized":
        raise ValueError(f"return_weights needs form='materialized' (the only form that builds the weights), "
                         f"got form={form!r}")
    return run_reference(q, k, v, mask, score_mod, normalizer, scale, form, return_lse, return_weights, layout,
                         positions=positions)


def check_positions(q_offset, kv_offset) -> Optional[Tuple[Optional[int], int]]:
    """``(q_offset, kv_offset)`` validated, or None for the default placement."""
    for name, val in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            raise TypeError(f"{name} must be an int{' or None' if name == 'q_offset' else ''}, got {val!r}")
    if kv_offset is None:
        raise TypeError("kv_offset must be an int, got None")
    if q_offset is None and kv_offset == 0:
        return None
    return q_offset, kv_offset


def _fused(backend, q, k, v, mask, score_mod, normalizer, scale, return_lse, deterministic=None, positions=None):
    """Ask the fused-kernel dispatcher (:mod:`attnkit.kernels`) for this exact function.

    Returns ``(backend_name, out, lse)`` or None (auto: no fused kernel applies, use the reference).
    With ``backend="triton"`` an unsupported request raises ValueError naming what is supported.
    """
    run = fused_entry(backend, "run")
    if run is None:
        return None
    return run(backend, q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer,
               scale=scale, return_lse=return_lse, deterministic=deterministic, positions=positions)


def fused_entry(backend: str, name: str):
    """The dispatcher ``attnkit.kernels.<name>``, or None where the fused kernels cannot be imported
    (``backend="triton"``: ValueError instead)."""
    try:
        from . import kernels
    except ImportError as e:
        if backend == "triton":
            raise ValueError(f"backend='triton' is not available: {e}") from None
        return None
    fn = getattr(kernels, name, None)
    if fn is None and backend == "triton":
        raise ValueError(f"backend='triton' is not available: attnkit.kernels has no {name}()")
    return fn


def run_reference(q, k, v, mask, score_mod, normalizer, scale, form, return_lse, return_weights, layout,
                  call_cls=_sm.Call, positions=None, **form_kw):
    dtype = q.dtype
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    pos = {} if positions is None else dict(q_offset=positions[0], kv_offset=positions[1])
    call = call_cls(qc, kc, vc, mask, score_mod, normalizer, scale, **pos)
    weights = None
    if form == "materialized":
        out, lse, weights = _sm.materialized(call, qc, kc, vc)
    elif form == "streaming":
        out, lse = _sm.streaming(call, qc, kc, vc, **form_kw)
    else:
        out, lse = _sm.recurrent(call, qc, kc, vc)
    record_backend("reference", form)
    out = out.to(dtype)
    if layout == "bthd":
        out = out.transpose(1, 2)
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_weights:
        res += (weights,)
    return res[0] if len(res) == 1 else res
