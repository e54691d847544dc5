"""Differential attention (Ye et al. 2024, "Differential Transformer"): the difference of two softmax maps.

    q = [q1 | q2], k = [k1 | k2]        (head dim 2d split into halves of d)
    A1 = softmax(scale · q1 k1ᵀ),  A2 = softmax(scale · q2 k2ᵀ),   scale = 1/sqrt(d) by default
    out_h = A1_h V − λ_h · A2_h V

With ``backend="triton"`` (or ``"auto"`` on CUDA) both maps run in one set of fused launches
(:func:`attnkit.dispatch.backends.run_differential`): they share each V tile and mask tile in the forward and the
pass that accumulates dV in the backward, and ``attnkit.last_backend()`` reads
``"triton/fused-differential"`` (head dims where ``d`` or ``Dv`` is a power of two ≥ 16; other head dims
run two fused calls, see :func:`attnkit.dispatch.backends.run_differential`). Otherwise each map runs through :func:`attnkit.attention`, so masks,
score mods, GQA and every form apply unchanged. The layer-level parts of the paper (λ's re-parametrization
λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, the per-head GroupNorm and the (1 − λ_init) factor) belong
to layers, not to this function.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from ..core.masks import MaskLike, as_mask
from ..core.record import record_backend
from ..core.scores import ScoreMod, as_score_mod
from ..core.validation import check_qkv, resolve_scale
from . import backends
from .softmax import attention

__all__ = ["differential_attention"]


def _check_lam(lam, Hq: int, q: Tensor) -> Union[float, Tensor]:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, Tensor)):
        raise TypeError(f"lam must be a float or a tensor (scalar or [Hq]), got {type(lam).__name__}")
    if not isinstance(lam, Tensor):
        return float(lam)
    if not lam.is_floating_point():
        raise TypeError(f"lam must be a floating tensor, got dtype {lam.dtype}")
    if lam.dim() > 1 or (lam.dim() == 1 and lam.numel() != Hq):
        raise ValueError(f"lam must be a scalar or a per-head tensor of shape [{Hq}] (Hq), "
                         f"got shape {tuple(lam.shape)}")
    if lam.device != q.device:
        raise ValueError(f"lam is on {lam.device} but q is on {q.device}")
    return lam


def differential_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Union[float, Tensor],
    *,
    mask: MaskLike = None,
    score_mod: Union[ScoreMod, Sequence[ScoreMod], None] = None,
    scale: Optional[float] = None,
    form: str = "auto",
    backend: str = "auto",
    layout: str = "bhtd",
    return_weights: bool = False,
):
    """Differential attention ``out_h = softmax(s·q1 k1ᵀ) V − λ_h · softmax(s·q2 k2ᵀ) V``.

    Args:
        q: ``[B, Hq, Lq, 2d]``; k: ``[B, Hkv, Lk, 2d]``; v: ``[B, Hkv, Lk, Dv]`` (``layout="bthd"``:
            ``[B, T, H, ·]``). Query and key head dims are split into halves ``(q1, q2)``, ``(k1, k2)``.
        lam: λ, a float, a 0-d tensor or a per-head tensor ``[Hq]``; may require grad.
        mask, score_mod: applied to both maps (see :func:`attnkit.attention`).
        scale: defaults to ``1/sqrt(d)`` (d = half the q/k head dim).
        form, backend: as in :func:`attnkit.attention`, used for both maps.
        return_weights: also return the differential map ``A1 − λ·A2`` ``[B, Hq, Lq, Lk]``
            (materialized form), so that ``out = (A1 − λ·A2) V``.

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout, or ``(out, weights)``. Query rows with
        no visible key give zeros. Layer parts (GroupNorm, the (1 − λ_init) factor, λ's
        re-parametrization) are not applied here.
    """
    q, k, v = check_qkv(q, k, v, layout)
    D = q.shape[-1]
    if D % 2:
        raise ValueError(f"differential attention splits the q/k head dim into two halves; it must be even, got {D}")
    lam = _check_lam(lam, q.shape[1], q)
    d = D // 2
    scale = resolve_scale(scale, d)
    if backend != "reference" and form in ("auto", "streaming") and not return_weights:
        out = backends.run_differential(backend, q, k, v, lam, mask=as_mask(mask), score_mod=as_score_mod(score_mod),
                                        scale=scale)
        if out is not None:
            record_backend("triton", "fused-differential")
            return out.transpose(1, 2) if layout == "bthd" else out
    elif backend == "triton":
        raise ValueError(f"backend='triton' runs the fused (streaming) form only; got form={form!r}"
                         + (" with return_weights=True" if return_weights else ""))
    kw = dict(mask=mask, score_mod=score_mod, scale=scale, form=form, backend=backend,
              return_weights=return_weights)
    r1 = attention(q[..., :d], k[..., :d], v, **kw)
    r2 = attention(q[..., d:], k[..., d:], v, **kw)
    o1, o2 = (r1[0], r2[0]) if return_weights else (r1, r2)
    lam_h = lam.to(o1.dtype).view(1, -1, 1, 1) if isinstance(lam, Tensor) else lam
    out = o1 - lam_h * o2
    if layout == "bthd":
        out = out.transpose(1, 2)
    if return_weights:
        w1, w2 = r1[1], r2[1]
        return out, w1 - lam_h * w2
    return out
