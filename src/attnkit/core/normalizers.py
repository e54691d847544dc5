"""Normalizers: how scores ``s_ij`` of the visible keys become weights ``p_ij``; ``o_i = Σ_j p_ij v_j``.

| name | weights over visible keys (``n_i`` = number of visible keys) | family |
|---|---|---|
| ``softmax`` | exp(s_ij) / Σ_j exp(s_ij) | softmax (online rescaling) |
| ``softmax_sink(σ)`` | exp(s_ij) / (exp(σ_h) + Σ_j exp(s_ij)), learnable per-head sink logit σ | softmax |
| ``softmax_off_by_one`` | exp(s_ij) / (1 + Σ_j exp(s_ij)) (softmax₁, an implicit zero logit) | softmax |
| ``relaxed(γ)`` | (1 − γ) · softmax + γ / n_i | softmax |
| ``sigmoid(b)`` | sigmoid(s_ij + b), default b = −log Lk | elementwise |
| ``relu`` / ``relu2`` | relu(s_ij) / n_i, relu(s_ij)² / n_i | elementwise |
| ``none`` | s_ij (raw masked scores) | elementwise |

Elementwise normalizers need no online rescaling: each key block adds its own contribution.
All normalizers run in every form (materialized, streaming, recurrent). Masked keys get weight
exactly 0; a query row with no visible key outputs zeros.
"""
from __future__ import annotations

import math
from typing import Dict, Hashable, Optional, Union

import torch
from torch import Tensor, nn

from .keys import value_key
from .validation import deprecated_name

__all__ = ["Normalizer", "Softmax", "Elementwise", "Sigmoid", "ReLU", "ReLU2", "NoNorm", "NORM_CODES", "softmax", "softmax_sink", "softmax_off_by_one", "relaxed", "sigmoid",
           "relu", "relu2", "none", "as_normalizer"]


#: ``{name: kernel code}`` of every normalizer with an in-kernel twin (``attnkit.ops.softmax.triton.mods``:
#: ``norm_weight``), filled by the classes; the softmax family is code 0
NORM_CODES: Dict[str, int] = {}


class Normalizer(nn.Module):
    """Base class. ``family`` is "softmax" (online max/sum) or "elementwise"."""

    family: str = "elementwise"
    name: str = "?"
    #: elementwise weights are divided by the number of visible keys
    divide_by_count: bool = False
    #: code of the in-kernel twin; None: the fused kernels cannot compute it
    kernel_code: Optional[int] = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kernel_code") is not None:
            NORM_CODES[cls.name] = cls.kernel_code

    def validate(self, H: int) -> None:
        """Raise ValueError if the normalizer cannot apply to ``H`` query heads."""

    def kernel_value(self, Lk: int) -> Optional[Tensor]:
        """The per-head value the kernel reads (a sink logit or a sigmoid bias; scalar or ``[H]``), or None."""
        return None

    def key(self) -> Hashable:
        """Equal for normalizers that compute the same function (see :func:`attnkit.core.keys.value_key`)."""
        return (type(self).__name__, id(self))

    @property
    def needs_counts(self) -> bool:
        return self.divide_by_count

    def extra_repr(self):
        return self.name


class Softmax(Normalizer):
    """Softmax over visible keys, optionally with a sink logit in the denominator.

    ``sink``: None (plain softmax), a float (fixed logit; 0.0 is softmax-off-by-one) or a
    per-head tensor ``[H]`` (learnable sink logits, as in gpt-oss / StreamingLLM's learned sink).
    ``gamma`` > 0 gives relaxed softmax: ``(1 − γ) · softmax + γ / n``.
    """

    family = "softmax"
    name = "softmax"
    kernel_code = 0

    def __init__(self, sink: Optional[Union[float, Tensor]] = None, gamma: float = 0.0, name: str = "softmax"):
        super().__init__()
        if sink is not None and not isinstance(sink, Tensor):
            if not isinstance(sink, (int, float)) or isinstance(sink, bool):
                raise TypeError(f"sink must be a float or a per-head tensor, got {type(sink).__name__}")
            sink = torch.tensor(float(sink), dtype=torch.float64)
        if sink is not None and (not sink.is_floating_point() or sink.dim() > 1):
            raise ValueError(f"sink logits must be a float scalar or a 1-D per-head tensor, got {tuple(sink.shape)}")
        if isinstance(gamma, Tensor):
            if gamma.requires_grad:
                raise TypeError("relaxed softmax takes gamma as a number: a learnable gamma (a tensor that requires "
                                "grad) is not supported, and detaching it silently would drop its gradient")
            if gamma.numel() != 1:
                raise ValueError(f"relaxed gamma must be one number, got a tensor of shape {tuple(gamma.shape)}")
            gamma = float(gamma)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"relaxed gamma must be a float in [0, 1), got {type(gamma).__name__}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"relaxed gamma must be in [0, 1), got {gamma}")
        self.sink, self.gamma, self.name = sink, float(gamma), name

    @property
    def needs_counts(self) -> bool:
        return self.gamma > 0

    def validate(self, H):
        if self.sink is not None and self.sink.dim() == 1 and self.sink.numel() != H:
            raise ValueError(f"sink logits have {self.sink.numel()} entries but there are {H} query heads")

    def kernel_value(self, Lk: int) -> Optional[Tensor]:
        return self.sink

    def key(self):
        return ("softmax", value_key(self.sink), self.gamma)

    def sink_logits(self, H: int, like: Tensor) -> Optional[Tensor]:
        """Sink logit as ``[1, H, 1, 1]`` (or ``[1,1,1,1]``) in ``like``'s dtype, or None."""
        if self.sink is None:
            return None
        s = self.sink.to(device=like.device, dtype=like.dtype)
        return s.view(1, -1, 1, 1) if s.dim() == 1 else s.view(1, 1, 1, 1)


class Elementwise(Normalizer):
    """p = f(s) for each visible key (then / n for relu, relu2); subclasses define :meth:`f`."""

    family = "elementwise"

    def f(self, s: Tensor, Lk: int) -> Tensor:
        """The weight of a score (``Lk``: keys of the call, for defaults that depend on it)."""
        raise NotImplementedError

    def key(self):
        return (self.name,)


class Sigmoid(Elementwise):
    """sigmoid(s + b), b a float or a per-head (learnable) tensor; default −log Lk (Ramapuram et al. 2024)."""

    name = "sigmoid"
    kernel_code = 1

    def __init__(self, bias: Optional[Union[float, Tensor]] = None):
        super().__init__()
        if bias is not None and not isinstance(bias, Tensor):
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise TypeError(f"sigmoid bias must be a float or a per-head tensor, got {type(bias).__name__}")
            bias = torch.tensor(float(bias), dtype=torch.float64)
        if bias is not None:
            if not bias.is_floating_point() or bias.dim() > 1:
                raise ValueError(f"sigmoid bias must be a float, a 0-d or a per-head 1-D floating tensor [H], got "
                                 f"shape {tuple(bias.shape)} dtype {bias.dtype}")
            if not bool(torch.isfinite(bias.detach()).all()):
                raise ValueError(f"sigmoid bias must be finite, got {bias.detach().tolist()}")
        self.bias = bias

    def validate(self, H):
        if self.bias is not None and self.bias.dim() == 1 and self.bias.numel() != H:
            raise ValueError(f"sigmoid bias has {self.bias.numel()} entries but there are {H} query heads")

    def kernel_value(self, Lk: int) -> Tensor:
        return self.bias if self.bias is not None else torch.tensor(-math.log(Lk), dtype=torch.float64)

    def key(self):
        return ("sigmoid", value_key(self.bias))

    def f(self, s: Tensor, Lk: int) -> Tensor:
        if self.bias is None:
            b = -math.log(Lk)
        else:
            b = self.bias.to(device=s.device, dtype=s.dtype)
            b = b.view(1, -1, 1, 1) if b.dim() == 1 else b
        return torch.sigmoid(s + b)


class ReLU(Elementwise):
    """relu(s) / n."""

    name = "relu"
    kernel_code = 2
    divide_by_count = True

    def f(self, s, Lk):
        return torch.relu(s)


class ReLU2(Elementwise):
    """relu(s)² / n."""

    name = "relu2"
    kernel_code = 3
    divide_by_count = True

    def f(self, s, Lk):
        return torch.relu(s) ** 2


class NoNorm(Elementwise):
    """The raw masked scores as weights."""

    name = "none"
    kernel_code = 4

    def f(self, s, Lk):
        return s


def softmax() -> Normalizer:
    return Softmax()


def softmax_sink(logits: Union[int, Tensor]) -> Normalizer:
    """Softmax with learnable per-head sink logits; pass a tensor ``[H]`` or a head count (init 0)."""
    if isinstance(logits, int) and not isinstance(logits, bool):
        logits = nn.Parameter(torch.zeros(logits))
    if not isinstance(logits, Tensor):
        raise TypeError(f"softmax_sink takes a per-head tensor or a head count, got {type(logits).__name__}")
    return Softmax(sink=logits, name="softmax_sink")


def softmax_off_by_one() -> Normalizer:
    """softmax₁: exp(s) / (1 + Σ exp(s)) (Miller's "attention is off by one")."""
    return Softmax(sink=0.0, name="softmax_off_by_one")


def relaxed(gamma: float) -> Normalizer:
    """Relaxed softmax ``(1 − γ) softmax + γ / n`` (smoothed toward uniform over visible keys)."""
    return Softmax(gamma=gamma, name="relaxed")


def sigmoid(bias: Optional[Union[float, Tensor]] = None) -> Normalizer:
    """Sigmoid attention ``sigmoid(s + b)``; ``b`` defaults to −log Lk (Ramapuram et al. 2024)."""
    return Sigmoid(bias)


def relu() -> Normalizer:
    """ReLU attention ``relu(s) / n``."""
    return ReLU()


def relu2() -> Normalizer:
    """ReLU² attention ``relu(s)² / n`` (Primer-style squared ReLU)."""
    return ReLU2()


def none() -> Normalizer:
    """No normalization: raw masked scores as weights (for research)."""
    return NoNorm()


_NAMED = {"softmax": softmax, "softmax_off_by_one": softmax_off_by_one, "sigmoid": sigmoid, "relu": relu,
          "relu2": relu2, "none": none}
#: deprecated names still accepted by :func:`as_normalizer` (with a DeprecationWarning): old name -> name
ALIASES = {"softmax1": "softmax_off_by_one"}


#: one shared instance per parameter-free name, built at import (not per call, and never inside a compiled region)
_SHARED: dict = {name: make() for name, make in _NAMED.items()}


def as_normalizer(n) -> Normalizer:
    if isinstance(n, Normalizer):
        return n
    if isinstance(n, str):
        n = deprecated_name("normalizer", n, ALIASES)
        if n in _NAMED:  # parameter-free: one shared instance per name (no per-call module construction)
            return _SHARED[n]
        if n in ("softmax_sink", "relaxed"):
            raise ValueError(f"normalizer {n!r} needs parameters: use attnkit.normalizers.{n}(...)")
        raise ValueError(f"unknown normalizer {n!r}; expected one of {sorted(_NAMED)} "
                         "or a Normalizer such as normalizers.softmax_sink(H) / relaxed(gamma)")
    raise TypeError(f"normalizer must be a name or a Normalizer, got {type(n).__name__}")
