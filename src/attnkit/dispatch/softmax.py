"""The public entry point of the softmax family: :func:`attention` (and its packed form :func:`varlen_attention`).

It validates, then picks the backend: the fused kernels or SDPA (:mod:`.backends`) where they compute exactly the
requested function, else one of the reference forms (:mod:`attnkit.ops.softmax`), and records what ran.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from ..core import masks as M
from ..core.masks import MaskLike, as_mask
from ..core.normalizers import Normalizer, as_normalizer
from ..core.record import record_backend
from ..core.scores import ScoreMod, as_score_mod
from ..core.validation import (AUTO_DENSE_LIMIT, BACKENDS, FORMS, check_choice, check_positions, check_qkv,
                               resolve_scale)
from ..ops.softmax.reference import run_reference
from . import backends
from . import decode as _decode

__all__ = ["attention", "varlen_attention"]


def _result(out: Tensor, lse: Optional[Tensor], layout: str, return_lse: bool):
    """A kernel's ``[B, H, L, Dv]`` output in the caller's layout, with the lse when asked for."""
    if layout == "bthd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


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
    check_choice("form", form, FORMS)
    check_choice("backend", backend, BACKENDS)
    if return_lse and normalizer.family != "softmax":
        raise ValueError(f"return_lse needs a softmax-family normalizer (softmax, softmax_sink, "
                         f"softmax_off_by_one, relaxed), got {normalizer.name!r}")
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if backend != "reference" and form in ("auto", "streaming") and not return_weights:
        via = _decode.route(q, k, v, backend, score_mod, normalizer, positions, deterministic)
        if via is not None:  # a few query rows over many keys, no gradient: the split-KV decode kernel
            res = _decode.decode_attention(q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer,
                                           scale=scale, backend=via, return_lse=return_lse, check=False)
            return _result(*(res if return_lse else (res, None)), layout, return_lse)
        fused = backends.run(backend, q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer, scale=scale,
                             return_lse=return_lse, deterministic=deterministic, positions=positions)
        if fused is not None:
            name, out, lse = fused
            record_backend(name, "fused")
            return _result(out, lse, layout, return_lse)
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


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = True, mask=None,
                     score_mod=None, normalizer="softmax", scale: Optional[float] = None, backend: str = "auto",
                     return_lse: bool = False):
    """Packed variable-length attention: ``q [total, Hq, D]``, ``k [total, Hkv, D]``, ``v [total, Hkv, Dv]``
    holding sequences back to back with boundaries ``cu_seqlens`` (``[n + 1]``, from 0 to total).

    Each sequence attends only to itself (``document(cu_seqlens=...)``, ANDed with causal when
    ``causal`` and with ``mask``). Returns ``[total, Hq, Dv]`` (and lse ``[Hq, total]``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"varlen_attention takes {name} as [total_tokens, heads, dim], got {tuple(t.shape)}")
    m = M.document(cu_seqlens=cu_seqlens.cpu() if isinstance(cu_seqlens, Tensor) else cu_seqlens)
    if causal:
        m = m & M.causal
    if mask is not None:
        m = m & M.as_mask(mask)
    res = attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask=m, score_mod=score_mod,
                    normalizer=normalizer, scale=scale, backend=backend, layout="bthd", return_lse=return_lse)
    if return_lse:
        return res[0][0], res[1][0]
    return res[0]
