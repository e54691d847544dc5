"""Rotary position embeddings (RoPE) with partial rotation and NTK / YaRN context extension.

Standard RoPE (Su et al. 2021, RoFormer): the first ``r`` channels of a head (``r = head_dim`` by default)
are split into halves ``x = [x₁, x₂]`` (the GPT-NeoX / Llama layout) and rotated by the angle ``p·θ_i``
of position ``p``:

    θ_i = b^(−2i/r),  i = 0 … r/2 − 1          (b = base, 10000 by default)
    y₁ = x₁ cos(pθ) − x₂ sin(pθ),   y₂ = x₂ cos(pθ) + x₁ sin(pθ)

Partial rotary (GPT-NeoX ``rotary_pct``): ``r = 2·⌊fraction·head_dim / 2⌋``; channels ``r …`` pass unchanged.

Context extension by a factor ``s`` (``scaling={"type": ..., "factor": s, ...}``):

* ``"linear"`` (position interpolation, Chen et al. 2023): ``θ'_i = θ_i / s``.
* ``"ntk"`` (NTK-aware scaling, bloc97 2023): the base grows, ``b' = b · s^(r/(r−2))``, so the lowest
  frequency is interpolated by ``s`` and the highest is kept.
* ``"yarn"`` (Peng et al. 2023, YaRN): with the original context ``L`` and the wavelength ``λ_i = 2π/θ_i``,
  ``ρ_i = L / λ_i`` rotations fit in the original context; the ramp ``γ_i = clamp((ρ_i − α)/(β − α), 0, 1)``
  (``α = beta_slow = 1``, ``β = beta_fast = 32``) blends interpolation and extrapolation,
  ``θ'_i = (1 − γ_i)·θ_i/s + γ_i·θ_i``, and the attention temperature ``√(1/t) = 0.1·ln s + 1`` multiplies
  cos and sin (so every q·k logit is scaled by ``(0.1·ln s + 1)²``).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "rope_frequencies", "apply_rotary", "as_rope", "doc_positions"]

SCALINGS = ("linear", "ntk", "yarn")


def rope_frequencies(rot_dim: int, base: float = 10000.0, scaling: Optional[dict] = None):
    """``(θ' [rot_dim/2] float64, attention_factor)`` for the given scaling (see the module docstring)."""
    if rot_dim < 2 or rot_dim % 2:
        raise ValueError(f"the rotated dim must be an even number >= 2, got {rot_dim}")
    if not (isinstance(base, (int, float)) and base > 1):
        raise ValueError(f"rope base must be a number > 1, got {base!r}")
    i = torch.arange(rot_dim // 2, dtype=torch.float64)
    if scaling is None:
        return base ** (-2.0 * i / rot_dim), 1.0
    if not isinstance(scaling, dict) or scaling.get("type") not in SCALINGS:
        raise ValueError(f"rope scaling must be None or a dict with 'type' in {SCALINGS}, got {scaling!r}")
    s = scaling.get("factor")
    if not isinstance(s, (int, float)) or not s >= 1:
        raise ValueError(f"rope scaling needs 'factor' >= 1, got {s!r}")
    kind = scaling["type"]
    if kind == "linear":
        return base ** (-2.0 * i / rot_dim) / s, 1.0
    if kind == "ntk":
        b = base * s ** (rot_dim / (rot_dim - 2))
        return b ** (-2.0 * i / rot_dim), 1.0
    L = scaling.get("original_max_position")
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"yarn scaling needs 'original_max_position' (the pretraining context), got {L!r}")
    alpha, beta = float(scaling.get("beta_slow", 1.0)), float(scaling.get("beta_fast", 32.0))
    if not beta > alpha:
        raise ValueError(f"yarn needs beta_fast > beta_slow, got {beta} <= {alpha}")
    theta = base ** (-2.0 * i / rot_dim)
    rho = L / (2 * math.pi / theta)
    gamma = ((rho - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    mscale = scaling.get("attention_factor", 0.1 * math.log(s) + 1.0)
    return (1 - gamma) * theta / s + gamma * theta, float(mscale)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2·cos.shape[-1]`` channels of ``x [..., T, D]`` (half-split layout); ``cos``/``sin``
    broadcast against ``x[..., :r/2]``."""
    h = cos.shape[-1]
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)
    return y


def doc_positions(cu_seqlens: Tensor, T: int, device) -> Tensor:
    """Position of each packed token inside its own document, ``[T]`` int64 (0 at every document start)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    t = torch.arange(T, device=device)
    doc = torch.searchsorted(cu[1:], t, right=True)
    return t - cu[doc]


class RotaryEmbedding(nn.Module):
    """RoPE for heads of ``head_dim`` channels: ``forward(x [B, H, T, D], positions [T] or [B, T]) -> x
    rotated`` (see the module docstring for the formulas of ``fraction`` and ``scaling``)."""

    def __init__(self, head_dim: int, base: float = 10000.0, fraction: float = 1.0, scaling: Optional[dict] = None):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"rope fraction must be in (0, 1], got {fraction!r}")
        self.head_dim, self.base, self.fraction, self.scaling = head_dim, base, fraction, scaling
        self.rot_dim = 2 * int(fraction * head_dim // 2)
        inv, self.attention_factor = rope_frequencies(self.rot_dim, base, scaling)
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.register_buffer("inv_freq64", inv, persistent=False)

    def angles(self, positions: Tensor, dtype) -> tuple:
        """``(cos, sin)`` ``[T, r/2]`` or ``[B, 1, T, r/2]`` for integer positions, multiplied by the attention factor."""
        inv = self.inv_freq64 if dtype == torch.float64 else self.inv_freq
        ang = positions.to(inv.dtype).unsqueeze(-1) * inv
        if positions.dim() == 2:
            ang = ang.unsqueeze(1)
        f = self.attention_factor
        return (torch.cos(ang) * f).to(dtype), (torch.sin(ang) * f).to(dtype)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding({self.head_dim}) got head dim {x.shape[-1]}")
        if positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[-2]:
            raise ValueError(f"positions must be [T] or [B, T] with T={x.shape[-2]}, got {tuple(positions.shape)}")
        cos, sin = self.angles(positions, x.dtype if x.dtype == torch.float64 else torch.float32)
        return apply_rotary(x.to(cos.dtype), cos, sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, base={self.base}, scaling={self.scaling}"


def as_rope(rope: Union[None, bool, dict, RotaryEmbedding], head_dim: int) -> Optional[RotaryEmbedding]:
    """``None``/``False`` (no RoPE), ``True`` (standard, base 10000), a dict of :class:`RotaryEmbedding`
    keyword arguments (``base``, ``fraction``, ``scaling``) or a module."""
    if rope is None or rope is False:
        return None
    if rope is True:
        return RotaryEmbedding(head_dim)
    if isinstance(rope, dict):
        return RotaryEmbedding(head_dim, **rope)
    if isinstance(rope, RotaryEmbedding):
        if rope.head_dim != head_dim:
            raise ValueError(f"rope module has head_dim {rope.head_dim}, the layer {head_dim}")
        return rope
    raise TypeError(f"rope must be None, a bool, a dict of RotaryEmbedding arguments or a RotaryEmbedding, "
                    f"got {type(rope).__name__}")
