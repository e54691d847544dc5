"""Where PyTorch's SDPA backends (cuDNN, FlashAttention-2, memory-efficient) compute exactly the same
function as attnkit, and how to call them. Used by ``backend="auto"`` dispatch and by :mod:`.peers`."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.normalizers import Softmax

BACKENDS = ("cudnn", "flash", "efficient")


def sdpa_form(q: Tensor, k: Tensor, mask, score_mod, normalizer) -> Optional[dict]:
    """SDPA keyword arguments expressing this call exactly (plain softmax, full or end-aligned causal),
    or None. Fully masked rows (causal with Lq > Lk) are excluded: SDPA returns NaN there."""
    if score_mod is not None or not isinstance(normalizer, Softmax):
        return None
    if normalizer.sink is not None or normalizer.gamma > 0:
        return None
    Lq, Lk = q.shape[2], k.shape[2]
    if mask.kind == "full":
        return {"is_causal": False}
    if mask.kind == "causal":
        if Lq == Lk:
            return {"is_causal": True}
        if Lq < Lk:
            from torch.nn.attention.bias import causal_lower_right
            return {"attn_mask": causal_lower_right(Lq, Lk)}
    return None


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def call(name: str, q: Tensor, k: Tensor, v: Tensor, form: dict, scale: float) -> Tensor:
    """Run SDPA restricted to one backend; RuntimeError when that backend cannot take the inputs."""
    from torch.nn.attention import sdpa_kernel
    gqa = q.shape[1] != k.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sdpa_kernel([_backend_enum(name)]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa, **form)


def available(name: str, q: Tensor, k: Tensor, v: Tensor, form: dict, scale: float) -> bool:
    """Whether a backend accepts these inputs (tried once on tiny tensors of the same kind)."""
    try:
        with torch.no_grad():
            call(name, q, k, v, form, scale)
        return True
    except RuntimeError:
        return False
