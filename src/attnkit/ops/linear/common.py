"""Shared pieces of the linear / recurrent family: layouts, validation, stable decay products.

Conventions used everywhere in :mod:`attnkit.ops.linear`:

* the state of a head is ``S ∈ R^{Dk×Dv}`` and the read-out is ``o_t = q_tᵀ S_t`` (fla's orientation);
* gates are **log** decays ``g ≤ 0`` (``α = exp(g)``); a chunk only ever exponentiates *differences*
  of cumulative log gates taken inside one chunk, ``b_t − b_s ≤ 0`` for ``s ≤ t``, never a large
  positive number, so log gates of −20 per step over 8k tokens neither overflow nor produce NaN;
* cumulative log gates are summed in float64 (cheap, [B,H,T] or [B,H,T,Dk]) so that differences of
  long sums keep their precision in the float32 compute path;
* half-precision inputs are computed in float32, float64 stays float64; states are float32/float64.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("bhtd", "bthd")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, ndim: int, want: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {want}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64/float32/bfloat16/float16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {want}, got shape {tuple(t.shape)}")
    return t


def to_bhtd(t: Tensor, layout: str) -> Tensor:
    """``[B,T,H,...]`` -> ``[B,H,T,...]`` for layout 'bthd' (a view); identity for 'bhtd'."""
    return t.transpose(1, 2) if layout == "bthd" else t


def check_shape(name: str, t: Tensor, want: Sequence[int], desc: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {desc} = {tuple(want)}, got {tuple(t.shape)}")


_VALUE_CHECKS: ContextVar[bool] = ContextVar("attnkit_linear_value_checks", default=True)


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the data-dependent checks of :func:`check_log_gate` and :func:`check_beta` (finite gates ≤ 0, β ∈ [0, 2];
    one host sync each on CUDA, which dominates a decode step) on or off in this context. For callers whose gates
    and β are in range by construction (``logsigmoid``, ``−exp(A)·softplus(·)``, ``sigmoid``), as attnkit.nn's layers;
    shapes, dtypes and devices are checked either way."""
    if torch.compiler.is_compiling():  # the checks are off while tracing anyway (and dynamo cannot set a ContextVar)
        yield
        return
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_enabled() -> bool:
    """Whether gate / β values are checked here: on unless :func:`value_checks` turned them off or torch.compile is
    tracing (no host sync, no graph break)."""
    return not torch.compiler.is_compiling() and _VALUE_CHECKS.get()


def check_log_gate(name: str, g: Tensor) -> None:
    """Log gates must be finite and ≤ 0 (a decay α = exp(g) in (0, 1]). A value check: one host sync in eager;
    skipped while torch.compile traces or inside ``value_checks(False)`` (:func:`value_checks_enabled`)."""
    if not value_checks_enabled():
        return
    with torch.no_grad():
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{name} must be finite log decays (≤ 0); found NaN or inf")
        mx = float(g.max()) if g.numel() else 0.0
    if mx > 0:
        raise ValueError(f"{name} holds log decays and must be ≤ 0 (α = exp(g) ≤ 1); got a maximum of {mx:.4g}")


def check_beta(beta: Tensor, lo: float = 0.0, hi: float = 2.0) -> None:
    """β of the delta rules: finite and in [0, 2] (the transition I − β k kᵀ of a unit key is then
    non-expansive; DeltaNet uses β = sigmoid(·) ∈ (0, 1), Grazzi et al. 2024 extend it to (0, 2)). Skipped as
    :func:`check_log_gate` is."""
    if not value_checks_enabled():
        return
    with torch.no_grad():
        if not bool(torch.isfinite(beta).all()):
            raise ValueError("beta must be finite; found NaN or inf")
        bmin, bmax = float(beta.min()), float(beta.max())
    if bmin < lo or bmax > hi:
        raise ValueError(f"beta must lie in [{lo}, {hi}] for the delta rules, got values in [{bmin:.4g}, {bmax:.4g}]")


def expand_heads(t: Tensor, H: int) -> Tensor:
    """Repeat heads (dim 1) so that head h reads head h // (H // t.shape[1])."""
    h = t.shape[1]
    return t if h == H else t.repeat_interleave(H // h, dim=1)


def pad_time(t: Optional[Tensor], before: int, after: int, dim: int = 2) -> Optional[Tensor]:
    """Zero-pad a tensor along its time dim (zeros are neutral tokens: k = 0, v = 0, g = 0, β = 0)."""
    if t is None or (before == 0 and after == 0):
        return t
    shape = list(t.shape)
    parts = []
    if before:
        shape[dim] = before
        parts.append(t.new_zeros(shape))
    parts.append(t)
    if after:
        shape[dim] = after
        parts.append(t.new_zeros(shape))
    return torch.cat(parts, dim)


# ------------------------------------------------------------------------------------------------
# Stable decay-weighted products inside a chunk
# ------------------------------------------------------------------------------------------------

def exp_neg(x: Tensor, dtype: torch.dtype) -> Tensor:
    """exp of a non-positive float64 tensor, cast to the compute dtype."""
    return torch.exp(x).to(dtype)


def decay_matmul(a: Tensor, b: Tensor, cum: Optional[Tensor], strict: bool) -> Tensor:
    """Lower-triangular ``A[t, s] = Σ_d a_td b_sd exp(cum_td − cum_sd)`` for ``s ≤ t`` (``s < t`` if strict).

    ``a, b``: ``[..., C, D]``; ``cum``: None (no decay), ``[..., C]`` (one decay per head) or
    ``[..., C, D]`` (one per channel), float64 cumulative log gates (non-increasing along C).
    Returns ``[..., C, C]`` in a's dtype; entries above the diagonal are 0.

    Per-channel decays cannot be factored as ``(a·e^{cum})(b·e^{−cum})ᵀ`` without overflow, so the
    matrix is built by recursive halving: the lower-left quadrant of every block uses the last row of
    its upper half as reference ``r``: ``a_t e^{cum_t − cum_r}`` and ``b_s e^{cum_r − cum_s}`` both
    have exponents ≤ 0. log2(C) vectorized levels, O(C²·D) work, O(C·D) extra memory per level.
    """
    C = a.shape[-2]
    ones = torch.ones(C, C, dtype=torch.bool, device=a.device)
    keep = torch.tril(ones, diagonal=-1 if strict else 0)
    if cum is None:
        return (a @ b.transpose(-1, -2)).masked_fill(~keep, 0.0)
    if cum.dim() == a.dim() - 1:  # one decay per head
        diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~keep, -math.inf)
        return (a @ b.transpose(-1, -2)) * exp_neg(diff, a.dtype)
    return _channel_decay_matmul(a, b, cum, strict)


def _channel_decay_matmul(a: Tensor, b: Tensor, cum: Tensor, strict: bool) -> Tensor:
    C, D = a.shape[-2], a.shape[-1]
    P = 1 << max(C - 1, 0).bit_length()  # next power of two
    if P != C:  # pad rows with zero vectors; cum with its last value (stays non-increasing)
        extra = P - C
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], extra, D)], -2)
        b = torch.cat([b, b.new_zeros(*b.shape[:-2], extra, D)], -2)
        cum = torch.cat([cum, cum[..., -1:, :].expand(*cum.shape[:-2], extra, D)], -2)
    lead = a.shape[:-2]
    diag = torch.zeros_like(a[..., 0]) if strict else (a * b).sum(-1)
    blocks = diag.reshape(*lead, P, 1, 1)  # [..., n, s, s] diagonal blocks of size s
    s = 1
    while s < P:
        n = P // (2 * s)
        av = a.reshape(*lead, n, 2, s, D)
        bv = b.reshape(*lead, n, 2, s, D)
        cv = cum.reshape(*lead, n, 2, s, D)
        ref = cv[..., 0, s - 1:s, :]  # last row of the upper half
        qa = av[..., 1, :, :] * exp_neg(cv[..., 1, :, :] - ref, a.dtype)
        kb = bv[..., 0, :, :] * exp_neg(ref - cv[..., 0, :, :], a.dtype)
        off = qa @ kb.transpose(-1, -2)  # [..., n, s, s]
        bl = blocks.reshape(*lead, n, 2, s, s)
        top = torch.cat([bl[..., 0, :, :], torch.zeros_like(off)], -1)
        bot = torch.cat([off, bl[..., 1, :, :]], -1)
        blocks = torch.cat([top, bot], -2)  # [..., n, 2s, 2s]
        s *= 2
    out = blocks.reshape(*lead, P, P)
    return out[..., :C, :C] if P != C else out


def diagonal_blocks(x: Tensor, s: int) -> Tensor:
    """The diagonal ``s×s`` blocks of ``x [..., C, C]`` (C a multiple of s) as ``[..., C/s, s, s]``."""
    n = x.shape[-1] // s
    blocks = x.reshape(*x.shape[:-2], n, s, n, s).diagonal(dim1=-4, dim2=-2)  # [..., s, s, n]
    return blocks.movedim(-1, -3)


def unit_lower_inverse(L: Tensor) -> Tensor:
    """Inverse of unit lower-triangular ``L [..., C, C]`` by recursive 2×2 blocks:
    ``[[A, 0], [X, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹ X A⁻¹, B⁻¹]]``, log2(C) vectorized levels of matmuls
    (the UT transform's ``T = (I + Diag(β) A_kk)⁻¹``; batched matmuls beat a batched trsm on CPU)."""
    C = L.shape[-1]
    P = 1 << max(C - 1, 0).bit_length()
    if P != C:
        L = torch.nn.functional.pad(L, (0, P - C, 0, P - C))
        L = L + torch.diag(torch.cat([L.new_zeros(C), L.new_ones(P - C)]))
    lead = L.shape[:-2]
    inv = torch.ones(*lead, P, 1, 1, dtype=L.dtype, device=L.device)
    s = 1
    while s < P:
        n = P // (2 * s)
        pairs = inv.reshape(*lead, n, 2, s, s)
        a_inv, b_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        x = diagonal_blocks(L, 2 * s)[..., s:, :s]  # lower-left quadrant of each 2s block
        off = -(b_inv @ x @ a_inv)
        top = torch.cat([a_inv, torch.zeros_like(off)], -1)
        bot = torch.cat([off, b_inv], -1)
        inv = torch.cat([top, bot], -2)
        s *= 2
    out = inv.reshape(*lead, P, P)
    return out[..., :C, :C] if P != C else out


# ------------------------------------------------------------------------------------------------
# Fenwick-tree levels (log-linear attention)
# ------------------------------------------------------------------------------------------------

def msb(x: Tensor) -> Tensor:
    """Index of the highest set bit of a non-negative int64 tensor; −1 for 0 (exact below 2^53)."""
    return torch.frexp(x.to(torch.float64)).exponent.to(torch.int64) - 1


def level_of(t: Tensor, s: Tensor) -> Tensor:
    """Fenwick level of key position ``s`` for query position ``t ≥ s``: 0 if s == t, else msb(t ⊕ s) + 1."""
    return msb(torch.bitwise_xor(t, s)) + 1


def levels_needed(last_position: int) -> int:
    """Number of levels (incl. level 0) used by queries at positions ≤ last_position."""
    return max(last_position, 0).bit_length() + 1
