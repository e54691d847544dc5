"""The pre-norm block: ``h = x + mixer(RMSNorm(x))``, ``y = h + SwiGLU(RMSNorm(h))``."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .norm import RMSNorm

__all__ = ["Block", "SwiGLU", "swiglu_hidden"]


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 8/3 · d_model rounded up to a multiple of ``multiple_of``."""
    h = int(8 * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``y = (silu(x W_gate) ⊙ x W_up) W_down`` (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, d_model: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model)
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block around a token mixer (any attnkit.nn layer) and a SwiGLU MLP."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp_hidden: Optional[int] = None, norm_eps: float = 1e-6):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x: Tensor, *, cache=None, cu_seqlens=None) -> Tensor:
        h = x + self.mixer(self.attn_norm(x), cache=cache, cu_seqlens=cu_seqlens)
        return h + self.mlp(self.mlp_norm(h))
