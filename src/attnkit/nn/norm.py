"""Normalization layers: RMSNorm (Zhang & Sennrich 2019) and the gated RMSNorm of Mamba-2 / fla output norms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "GatedRMSNorm", "rms_norm"]


def rms_norm(x: Tensor, weight, eps: float) -> Tensor:
    """``x / sqrt(mean(x², last dim) + eps) · weight`` computed in at least float32, returned in x's dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) · w`` over the last dim ``dim`` (``w`` learnable, init 1, unless
    ``affine=False``)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm({self.dim}) got last dim {x.shape[-1]} (shape {tuple(x.shape)})")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """``y = RMSNorm(x) · act(g)``, ``act`` = silu (Mamba-2, GLA, Gated DeltaNet) or sigmoid (Kimi Linear's KDA)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, activation: str = "silu"):
        super().__init__(dim, eps, affine)
        if activation not in ("silu", "sigmoid"):
            raise ValueError(f"gate activation must be 'silu' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return super().forward(x) * (F.silu(g) if self.activation == "silu" else torch.sigmoid(g))
