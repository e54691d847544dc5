"""Feature maps φ for linear attention: ``o_t = φ(q_t)ᵀ Σ_{s≤t} φ(k_s) v_sᵀ``.

    identity   φ(x) = x
    elu        φ(x) = elu(x) + 1                         (Katharopoulos et al. 2020)
    relu       φ(x) = max(x, 0)
    favor      φ(x) = exp(W x' − |x'|²/2) / √m, x' = x / d^{1/4}, W: m orthogonal Gaussian rows
               E[φ(q)·φ(k)] = exp(q·k / √d)             (Performer, Choromanski et al. 2021)
    taylor2    φ(x) = [1, x / d^{1/4}, vec(x xᵀ) / √(2d)]
               φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)     (Based, Arora et al. 2024)

``favor`` and ``taylor2`` carry their own 1/√d temperature, so their default ``scale`` is 1; the
others default to the rule's scale (1/√Dk). FAVOR+ projections are drawn from a seeded generator:
the same seed gives the same features on every call and form; :meth:`Favor.redraw` draws new ones.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.validation import deprecated_name

__all__ = ["FeatureMap", "identity", "elu", "relu", "favor", "taylor2", "Favor", "as_feature_map", "FEATURE_MAPS",
           "FEATURE_MAP_ALIASES"]


class FeatureMap:
    """φ applied to the last dim of q and k. ``positive``: φ(q)·φ(k) > 0 (allows normalize=True)."""

    name: str = "feature_map"
    positive: bool = False
    own_scale: bool = False  # the map includes its own 1/√d temperature (default scale 1)

    def dim(self, d: int) -> int:
        return d

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _Pointwise(FeatureMap):
    def __init__(self, name: str, fn, positive: bool):
        self.name, self.fn, self.positive = name, fn, positive

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


identity = _Pointwise("identity", lambda x: x, positive=False)
elu = _Pointwise("elu", lambda x: F.elu(x) + 1, positive=True)
relu = _Pointwise("relu", F.relu, positive=True)


class _Taylor2(FeatureMap):
    name, positive, own_scale = "taylor2", True, True

    def dim(self, d: int) -> int:
        return 1 + d + d * d

    def __call__(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)
        return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], -1)


taylor2 = _Taylor2()


class Favor(FeatureMap):
    """Performer's FAVOR+ positive orthogonal random features (seeded; :meth:`redraw` for new ones)."""

    positive, own_scale = True, True

    def __init__(self, num_features: Optional[int] = None, seed: int = 0, orthogonal: bool = True):
        if num_features is not None and (not isinstance(num_features, int) or num_features < 1):
            raise ValueError(f"num_features must be a positive int or None, got {num_features!r}")
        self.num_features, self.seed, self.orthogonal = num_features, int(seed), orthogonal
        self._cache: Dict[Tuple, Tensor] = {}

    @property
    def name(self) -> str:
        return f"favor(m={self.num_features or 'd'}, seed={self.seed})"

    def dim(self, d: int) -> int:
        return self.num_features or d

    def redraw(self, seed: Optional[int] = None) -> "Favor":
        """Draw a new projection (seed + 1 unless a seed is given); returns self."""
        self.seed = self.seed + 1 if seed is None else int(seed)
        self._cache.clear()
        return self

    def projection(self, d: int, dtype=torch.float64, device="cpu") -> Tensor:
        """``W [m, d]``: blocks of orthogonal rows, each row rescaled to a χ_d-distributed norm."""
        key = (d, dtype, str(device))
        if key not in self._cache:
            gen = torch.Generator().manual_seed(self.seed)
            m = self.dim(d)
            if self.orthogonal:
                g = torch.randn(-(-m // d), d, d, generator=gen, dtype=torch.float64)
                qmat, r = torch.linalg.qr(g)
                # sign-correct so each block is Haar-distributed (raw QR's sign convention biases the rows)
                qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
                w = qmat.transpose(-1, -2).reshape(-1, d)[:m]
                w = w * torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=-1, keepdim=True)
            else:
                w = torch.randn(m, d, generator=gen, dtype=torch.float64)
            self._cache[key] = w.to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        xs = x / d ** 0.25
        w = self.projection(d, x.dtype, x.device)
        return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def favor(num_features: Optional[int] = None, seed: int = 0, orthogonal: bool = True) -> Favor:
    """A FAVOR+ feature map with ``num_features`` (default: the head dim) seeded random features."""
    return Favor(num_features, seed, orthogonal)


FEATURE_MAPS = {"identity": lambda: identity, "elu": lambda: elu, "relu": lambda: relu,
                "favor": lambda: Favor(), "taylor2": lambda: taylor2}
#: deprecated names still accepted (with a DeprecationWarning): old name -> name
FEATURE_MAP_ALIASES = {"taylor": "taylor2", "based": "taylor2"}


def as_feature_map(fm: Union[None, str, FeatureMap]) -> FeatureMap:
    """None -> identity; a name from FEATURE_MAPS; or a FeatureMap instance."""
    if fm is None:
        return identity
    if isinstance(fm, FeatureMap):
        return fm
    if isinstance(fm, str):
        fm = deprecated_name("feature_map", fm, FEATURE_MAP_ALIASES)
        if fm not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {fm!r}; expected one of {sorted(FEATURE_MAPS)} or a FeatureMap")
        return FEATURE_MAPS[fm]()
    raise TypeError(f"feature_map must be None, a name or a FeatureMap, got {type(fm).__name__}")
