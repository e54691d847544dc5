"""Score mods: pointwise functions applied to the scaled scores ``s = scale · q·k`` before the
normalizer, ``s' = mod(s, b, h, q, kv)``, with the aligned positions of :mod:`attnkit.masks`.

Score mods are ``nn.Module``s, so learnable parameters (ALiBi slopes, the T5 bias table,
temperatures, Scalable-Softmax factors) show up in ``model.parameters()`` and receive gradients in
every form. Combine several with :func:`compose` or by passing a list; they apply in order.

Built-in mods use tensor ops and tensor indexing only (per-head values are ``t[h]``, the T5 bucket a
table lookup), so ``mod(score, Idx(...))`` works on a ``[B, H, lq, lk]`` block and equally on 0-d
indices under ``torch.func.vmap``: that is how the FlexAttention peer calls them as its ``score_mod``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .keys import value_key

__all__ = [
    "ScoreMod", "SCORE_CODES", "Idx", "log_counts", "softcap", "alibi", "alibi_slopes", "relative_bias", "ssmax", "temperature",
    "pointwise", "compose", "as_score_mod",
]


@dataclass
class Idx:
    """Broadcastable indices of a block of scores ``[B, H, lq, lk]``.

    ``b, h, q, kv`` are index tensors (``q`` holds aligned query positions; 0-d under vmap); ``n`` is
    the number of visible keys of each query row ``[B', H', lq, 1]`` (float) when a mod asked for it;
    ``Lq, Lk, H`` are the sizes of the whole call; ``logn`` optionally gives ``log_counts(n)`` already
    gathered for these indices (instead of ``n``).
    """

    b: Tensor
    h: Tensor
    q: Tensor
    kv: Tensor
    n: Optional[Tensor]
    Lq: int
    Lk: int
    H: int
    logn: Optional[Tensor] = None
    q0: Optional[int] = None  #: position of query row 0 (None: Lk − Lq, end-aligned)
    k0: int = 0  #: position of key 0

    def rel_range(self) -> Tuple[int, int]:
        """Smallest and largest ``kv − q`` over the whole call (every row and key)."""
        q0 = self.Lk - self.Lq if self.q0 is None else self.q0
        return self.k0 - (q0 + self.Lq - 1), self.k0 + self.Lk - 1 - q0

    def log_n(self) -> Tensor:
        """log of the visible-key count of each query row (see :func:`log_counts`)."""
        return self.logn if self.logn is not None else log_counts(self.n)


def log_counts(n: Tensor) -> Tensor:
    """log max(n, 1): the per-row factor of Scalable-Softmax (rows without keys are masked anyway)."""
    return torch.log(n.clamp(min=1))


#: ``{kind: kernel code}`` of every score mod with an in-kernel twin (``attnkit.ops.softmax.triton.mods``:
#: ``score_mod`` / ``score_mod_bwd``), filled by the classes
SCORE_CODES: Dict[str, int] = {}


class ScoreMod(nn.Module):
    """Base class: ``forward(score, idx) -> score`` on a ``[B, H, lq, lk]`` block.

    A mod with an in-kernel twin sets ``kernel_code`` and, for the fused kernels' per-head parameter slot, returns
    its value from :meth:`kernel_value` and the tensor the slot's gradient belongs to from :meth:`kernel_learnable`.
    """

    #: whether the mod needs ``idx.n`` (visible keys per row)
    needs_counts: bool = False
    #: leaf kind
    kind: str = "pointwise"
    #: code of the in-kernel twin; 0: none
    kernel_code: int = 0
    #: ``forward`` works on 0-d indices under ``torch.func.vmap`` (the FlexAttention peer calls it that way; a
    #: ``pointwise`` function must be written so too). False for a subclass that does not say so: no peer is
    #: better than a wrong one
    vmappable: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kernel_code"):
            SCORE_CODES[cls.kind] = cls.kernel_code

    def kernel_value(self, H: int) -> Optional[Tensor]:
        """The value of the kernel's per-head parameter slot (scalar or ``[H]``), or None."""
        return None

    def kernel_learnable(self) -> Optional[Tensor]:
        """The tensor whose gradient the kernel's slot sums give (when it requires grad), or None."""
        return None

    def key(self) -> Hashable:
        """Equal for mods that compute the same function (see :func:`attnkit.core.keys.value_key`)."""
        return (self.kind, id(self))

    def forward(self, score: Tensor, idx: Idx) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, H: int) -> None:
        """Raise ValueError if the mod cannot apply to ``H`` query heads."""

    def mods(self):
        yield self

    def detached(self, device=None) -> "ScoreMod":
        """A copy whose tensors are detached from autograd (sharing storage unless moved to ``device``),
        for peers that time no parameter gradients. Tensors a pointwise function closes over are not
        reached."""
        memo = {}
        for m in self.modules():
            ts = list(m._parameters.values()) + list(m._buffers.values())
            ts += [v for v in vars(m).values() if isinstance(v, Tensor)]
            for t in ts:
                if t is not None:
                    d = t.detach() if device is None else t.detach().to(device)
                    memo[id(t)] = nn.Parameter(d, requires_grad=False) if isinstance(t, nn.Parameter) else d
        return copy.deepcopy(self, memo)


def _head_param(name: str, value, positive: bool = False) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a floating tensor, got {type(value).__name__}")
    t = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float or floating tensor, got {t.dtype}")
    if t.dim() > 1:
        raise ValueError(f"{name} must be a scalar or a per-head 1-D tensor, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite, got {t.detach().tolist()}")
    if positive and bool((t.detach() <= 0).any()):
        raise ValueError(f"{name} must be > 0, got {t.detach().tolist()}")
    return t


def _per_head(t: Tensor, h: Tensor, like: Tensor) -> Tensor:
    """A scalar or [H] tensor at head indices ``h`` (``t[h]``, broadcastable like ``h``) in ``like``'s dtype."""
    t = t.to(device=like.device, dtype=like.dtype)
    return t[h] if t.dim() == 1 else t


def _check_heads(name: str, t: Tensor, H: int):
    if t.dim() == 1 and t.numel() != H:
        raise ValueError(f"{name} has {t.numel()} per-head values but there are {H} query heads")


class Softcap(ScoreMod):
    """s' = c · tanh(s / c) (Gemma-2 / Grok logit soft-capping)."""

    kind = "softcap"
    vmappable = True
    kernel_code = 1

    def kernel_value(self, H):
        return torch.tensor(self.cap, dtype=torch.float64)

    def key(self):
        return ("softcap", self.cap)

    def __init__(self, cap: float):
        super().__init__()
        if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"softcap needs a positive number (finite), got {cap!r}")
        self.cap = float(cap)

    def forward(self, score, idx):
        return self.cap * torch.tanh(score / self.cap)

    def extra_repr(self):
        return f"{self.cap:g}"


def softcap(cap: float) -> ScoreMod:
    """Soft-cap scores to (-cap, cap)."""
    return Softcap(cap)


def alibi_slopes(H: int) -> Tensor:
    """The standard ALiBi slopes 2^(-8i/H), with the paper's interleaving when H is not a power of 2."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if H & (H - 1) == 0:
        s = pow2(H)
    else:
        c = 2 ** math.floor(math.log2(H))
        s = pow2(c) + pow2(2 * c)[0::2][: H - c]
    return torch.tensor(s, dtype=torch.float64)


class ALiBi(ScoreMod):
    """s' = s − m_h · |q − kv| with per-head slopes m_h (Press et al., ALiBi)."""

    kind = "alibi"
    vmappable = True
    kernel_code = 2

    def kernel_value(self, H):
        return self.slopes if self.slopes is not None else self.slopes_for(H, "cpu", torch.float64)

    def kernel_learnable(self):
        return self.slopes

    def key(self):
        return ("alibi", value_key(self.slopes))

    def __init__(self, slopes: Optional[Union[Tensor, Sequence[float]]] = None):
        super().__init__()
        if slopes is not None and not isinstance(slopes, Tensor):
            slopes = torch.tensor(list(slopes), dtype=torch.float64)
        self.slopes = None if slopes is None else _head_param("alibi slopes", slopes)
        self._standard = None  # alibi_slopes(H) on the device of the last call (built once, not per call)

    def validate(self, H):
        if self.slopes is not None:
            _check_heads("alibi slopes", self.slopes, H)

    def slopes_for(self, H: int, device, dtype) -> Tensor:
        s = self.slopes
        if s is None:
            s = self._standard
            if s is None or s.numel() != H or s.device != torch.device(device):
                s = self._standard = alibi_slopes(H).to(device)
        return s.to(device=device, dtype=dtype)

    def forward(self, score, idx):
        m = _per_head(self.slopes_for(idx.H, score.device, score.dtype), idx.h, score)
        return score - m * (idx.q - idx.kv).abs().to(score.dtype)

    def extra_repr(self):
        return "standard slopes" if self.slopes is None else f"slopes[{self.slopes.numel()}]"


def alibi(slopes: Optional[Union[Tensor, Sequence[float]]] = None) -> ScoreMod:
    """ALiBi linear distance bias; ``slopes`` ([H], may require grad) default to the standard ones."""
    return ALiBi(slopes)


def t5_bucket(rel: Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> Tensor:
    """T5 relative-position bucket of ``rel = kv − q``: exact for small distances, log-spaced up to
    ``max_distance``; with ``bidirectional`` half the buckets are for keys after the query."""
    n = -rel
    out = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        out = out + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    exact = num_buckets // 2
    far = exact + (torch.log(n.clamp(min=1).double() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return out + torch.where(n < exact, n, far)


class RelativeBias(ScoreMod):
    """s' = s + table[bucket(kv − q), h], a learnable T5 relative-position bias."""

    kind = "relative_bias"
    vmappable = True
    kernel_code = 3

    def kernel_learnable(self):
        return self.table

    def key(self):
        return ("relative_bias", id(self), value_key(self.table), self.num_buckets, self.max_distance,
                self.bidirectional)

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True, table: Optional[Tensor] = None):
        super().__init__()
        if num_buckets < 4 or (bidirectional and num_buckets % 2):
            raise ValueError(f"num_buckets must be >= 4 (and even when bidirectional), got {num_buckets}")
        if max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ValueError(f"max_distance must exceed the exact range, got {max_distance}")
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        if table is None:
            table = nn.Parameter(torch.randn(num_buckets, num_heads) * 0.1)
        elif tuple(table.shape) != (num_buckets, num_heads):
            raise ValueError(f"relative_bias table must be [{num_buckets}, {num_heads}], got {tuple(table.shape)}")
        self.table = table
        self._lut, self._lut_lo = None, 0  # buckets of rel = kv - q for rel in [-lo, len - lo)

    def buckets(self, rel: Tensor, rel_lo: int, rel_hi: int) -> Tensor:
        """Bucket of ``rel = kv − q`` by lookup in a table of :func:`t5_bucket` over ``rel_lo <= rel <= rel_hi``
        (every offset of the call), built on ``rel``'s device and grown on demand."""
        lut, lo = self._lut, self._lut_lo
        if lut is None or lut.device != rel.device or lo < -rel_lo or lut.numel() - lo <= rel_hi:
            lo = max(-rel_lo, lo if lut is not None else 0)
            hi = max(rel_hi, 0 if lut is None else lut.numel() - self._lut_lo - 1)
            r = torch.arange(-lo, hi + 1, dtype=torch.long, device=rel.device)
            lut = t5_bucket(r, self.num_buckets, self.max_distance, self.bidirectional)
            self._lut, self._lut_lo = lut, lo
        return lut[rel + lo]

    def validate(self, H):
        if H != self.num_heads:
            raise ValueError(f"relative_bias was built for {self.num_heads} heads but there are {H} query heads")

    def forward(self, score, idx):
        bucket = self.buckets(idx.kv - idx.q, *idx.rel_range())
        return score + self.table.to(device=score.device, dtype=score.dtype)[bucket, idx.h]

    def extra_repr(self):
        return (f"heads={self.num_heads}, buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


def relative_bias(num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
                  table: Optional[Tensor] = None) -> ScoreMod:
    """T5 bucketed relative-position bias with a learnable ``[num_buckets, num_heads]`` table."""
    return RelativeBias(num_heads, num_buckets, max_distance, bidirectional, table)


class SSMax(ScoreMod):
    """s' = s_h · log(n) · s, n = number of keys visible to the query (Scalable-Softmax, Nakanishi 2025)."""

    kind = "ssmax"
    vmappable = True
    kernel_code = 4
    needs_counts = True

    def kernel_value(self, H):
        return self.s

    def kernel_learnable(self):
        return self.s

    def key(self):
        return ("ssmax", value_key(self.s))

    def __init__(self, s: Union[float, Tensor] = 0.43):
        super().__init__()
        self.s = _head_param("ssmax s", s)

    def validate(self, H):
        _check_heads("ssmax s", self.s, H)

    def forward(self, score, idx):
        return score * (_per_head(self.s, idx.h, score) * idx.log_n().to(score.dtype))

    def extra_repr(self):
        return f"s={self.s.tolist()}"


def ssmax(s: Union[float, Tensor] = 0.43) -> ScoreMod:
    """Scalable-Softmax factor ``s`` (scalar or learnable per-head tensor)."""
    return SSMax(s)


class Temperature(ScoreMod):
    """s' = s / τ_h (a scalar or per-head, possibly learnable, temperature)."""

    kind = "temperature"
    vmappable = True
    kernel_code = 5

    def kernel_value(self, H):
        return self.tau

    def kernel_learnable(self):
        return self.tau

    def key(self):
        return ("temperature", value_key(self.tau))

    def __init__(self, tau: Union[float, Tensor]):
        super().__init__()
        self.tau = _head_param("temperature", tau, positive=True)

    def validate(self, H):
        _check_heads("temperature", self.tau, H)

    def forward(self, score, idx):
        return score / _per_head(self.tau, idx.h, score)

    def extra_repr(self):
        return f"tau={self.tau.tolist()}"


def temperature(tau: Union[float, Tensor]) -> ScoreMod:
    """Divide scores by a positive temperature (scalar or ``[H]``)."""
    return Temperature(tau)


class Pointwise(ScoreMod):
    """Any user function ``fn(score, b, h, q, kv) -> score`` (torch ops, broadcasting indices)."""

    kind = "pointwise"
    vmappable = True
    kernel_code = 6  # the kernels call its Triton twin ``triton_fn`` when one is given

    def __init__(self, fn: Callable, name: Optional[str] = None, triton_fn=None, params: Sequence[Tensor] = ()):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"pointwise() needs a callable, got {type(fn).__name__}")
        self.fn, self.name, self.triton_fn = fn, name or getattr(fn, "__name__", "fn"), triton_fn
        for i, t in enumerate(params):
            if not isinstance(t, Tensor):
                raise TypeError(f"pointwise params must be tensors, got {type(t).__name__}")
            setattr(self, f"param{i}", t)

    def forward(self, score, idx):
        out = self.fn(score, idx.b, idx.h, idx.q, idx.kv)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(f"pointwise score mod {self.name} must return a floating tensor (the new scores), got "
                            f"{out.dtype if isinstance(out, Tensor) else type(out).__name__}")
        if torch.broadcast_shapes(out.shape, score.shape) != score.shape:
            raise ValueError(f"pointwise score mod {self.name} must return scores of shape {tuple(score.shape)} "
                             f"(or broadcastable to it), got {tuple(out.shape)}")
        return out

    def extra_repr(self):
        return self.name


def pointwise(fn: Callable, name: Optional[str] = None, triton_fn=None, params: Sequence[Tensor] = ()) -> ScoreMod:
    """Wrap ``fn(score, b, h, q_idx, kv_idx)``.

    ``params``: learnable tensors the function closes over (declared so every form differentiates
    them); ``triton_fn``: an optional ``triton.jit`` twin for the fused kernels.
    """
    return Pointwise(fn, name, triton_fn, params)


class Compose(ScoreMod):
    """Apply several mods in order: ``s' = m_n(...m_1(s))``."""

    kind = "compose"

    def __init__(self, *mods: ScoreMod):
        super().__init__()
        for m in mods:
            if not isinstance(m, ScoreMod):
                raise TypeError(f"compose() takes ScoreMods, got {type(m).__name__}")
        self.items = nn.ModuleList(mods)
        self.needs_counts = any(m.needs_counts for m in mods)

    def validate(self, H):
        for m in self.items:
            m.validate(H)

    def forward(self, score, idx):
        for m in self.items:
            score = m(score, idx)
        return score

    def mods(self):
        for m in self.items:
            yield from m.mods()


def compose(*mods: ScoreMod) -> ScoreMod:
    """Chain score mods left to right."""
    return Compose(*mods)


def as_score_mod(m) -> Optional[ScoreMod]:
    """None, a ScoreMod, or a list/tuple of them (composed in order)."""
    if m is None or isinstance(m, ScoreMod):
        return m
    if isinstance(m, (list, tuple)):
        return Compose(*m) if m else None
    if callable(m):
        raise TypeError("score_mod got a plain function; wrap it as attnkit.scores.pointwise(fn)")
    raise TypeError(f"score_mod must be a ScoreMod, a list of them or None, got {type(m).__name__}")
