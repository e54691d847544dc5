"""Cache policies that bound memory by evicting tokens: StreamingLLM, H2O, SnapKV, and their pieces.

A :class:`Policy` is a sum of *pieces*, each choosing tokens to keep; a :class:`PolicyCache` keeps, per layer,
sequence and KV head, only the union of what its policy's pieces choose (the policy's ``budget`` tokens) and
frees the rest:

* :class:`Sinks` ``(n)``: the first ``n`` tokens of the sequence (attention sinks);
* :class:`Recent` ``(w)``: the ``w`` most recent tokens;
* :class:`HeavyHitters` ``(k)``: the ``k`` tokens (not already kept) with the largest attention mass accumulated
  over every query so far, summed over the query heads of the KV group (H2O, Zhang et al. 2023);
* :class:`SnapKV` ``(k, window, kernel)``: after a prompt, the ``k`` prompt tokens (before the last ``window``)
  with the largest attention from the last ``window`` prompt queries, pooled over ``kernel`` neighbouring tokens
  (Li et al. 2024), plus the window itself; later tokens are appended (SnapKV compresses the prompt once).

Positional pieces choose first, then score pieces pick among the rest, so the kept count is exactly the budget
once the sequence is longer than it. ``StreamingLLM(s, w) = Sinks(s) + Recent(w)`` with cache positions,
``H2O(k, w) = HeavyHitters(k) + Recent(w)``; any sum composes (``Sinks(4) + HeavyHitters(64) + Recent(256)``).
A cache takes one policy for every layer, a dict ``{layer: policy}`` or a function ``layer -> policy``
(per-layer budgets).

When it runs: each call appends its new tokens, the layer attends over what is kept plus the new tokens, then the
cache evicts down to the budget (H2O's order: the new token's attention counts toward the scores before anything
is evicted). A decode step therefore attends to ``budget + 1`` tokens. For a prompt longer than the budget the
layer attends over the whole prompt with the policy's mask (StreamingLLM: ``sinks(s) | sliding_window(w)``; score
policies: none, as the papers prefill with full attention), then the prompt is compressed.

Positions. StreamingLLM places tokens at their positions *within the cache* (Xiao et al. 2023, §3.2: "when
determining the relative distance and adding positional information to tokens, StreamingLLM focuses on positions
within the cache rather than those in the original text"), so the distances RoPE and ALiBi see never exceed the
cache length the model was trained on: the cache stores keys before RoPE and the layer rotates them by their cache
slot at every step (``rope_at_read``); masks and score mods see cache slots too. H2O and SnapKV keep the
original positions (their keys are cached after RoPE, as in the papers' code); their masks and score mods see
cache slots (all kept tokens are in the past, so causal and full masks agree).

Memory: per layer ``B · Hkv · (budget + T) · (D + Dv)`` values while a call of ``T`` tokens is attended, back to
``budget + 1`` slots after a prompt: constant while decoding (see ``benchmarks/results/streaming_memory.json``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import masks as M
from ..dispatch.decode import KVView
from .base import KVCache, StateCache, _check_index

__all__ = ["Piece", "Sinks", "Recent", "HeavyHitters", "SnapKV", "Policy", "StreamingLLM", "H2O", "PolicyCache"]

#: query rows per weights call when scoring a long prompt (memory O(rows · keys))
SCORE_ROWS = 256


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


class Piece:
    """One selection rule of a :class:`Policy`."""

    budget: int = 0
    #: keeps by a score rather than by position
    scored: bool = False

    def __add__(self, other) -> "Policy":
        return Policy(self) + other

    def keep(self, pos: Tensor, n_seen: int) -> Optional[Tensor]:
        """Positional pieces: bool ``[B, Hkv, n]`` of the tokens to keep given their original positions."""
        return None


@dataclass(frozen=True)
class Sinks(Piece):
    n: int

    def __post_init__(self):
        _pos_int("Sinks n", self.n)

    @property
    def budget(self) -> int:
        return self.n

    def keep(self, pos, n_seen):
        return pos < self.n


@dataclass(frozen=True)
class Recent(Piece):
    w: int

    def __post_init__(self):
        _pos_int("Recent w", self.w)

    @property
    def budget(self) -> int:
        return self.w

    def keep(self, pos, n_seen):
        return pos >= n_seen - self.w


@dataclass(frozen=True)
class HeavyHitters(Piece):
    k: int
    scored = True

    def __post_init__(self):
        _pos_int("HeavyHitters k", self.k)

    @property
    def budget(self) -> int:
        return self.k


@dataclass(frozen=True)
class SnapKV(Piece):
    k: int
    window: int = 32
    kernel: int = 7
    pooling: str = "avg"
    scored = True

    def __post_init__(self):
        _pos_int("SnapKV k", self.k)
        _pos_int("SnapKV window", self.window)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV kernel must be a positive odd int, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def budget(self) -> int:
        return self.k + self.window

    def keep(self, pos, n_seen):  # the observation window itself
        return pos >= n_seen - self.window


class Policy:
    """A sum of pieces (see the module doc). ``positions``: ``"original"`` or ``"cache"`` (StreamingLLM)."""

    def __init__(self, *pieces: Piece, positions: str = "original"):
        for p in pieces:
            if not isinstance(p, Piece):
                raise TypeError(f"Policy takes Sinks / Recent / HeavyHitters / SnapKV pieces, got {type(p).__name__}")
        if positions not in ("original", "cache"):
            raise ValueError(f"positions must be 'original' or 'cache', got {positions!r}")
        if sum(isinstance(p, SnapKV) for p in pieces) > 1 or sum(isinstance(p, HeavyHitters) for p in pieces) > 1:
            raise ValueError("a policy takes at most one SnapKV and one HeavyHitters piece")
        if any(isinstance(p, SnapKV) for p in pieces) and any(isinstance(p, HeavyHitters) for p in pieces):
            raise ValueError("SnapKV (compress the prompt once) and HeavyHitters (evict every step) do not combine")
        self.pieces: Tuple[Piece, ...] = tuple(pieces)
        self.positions = positions

    def __add__(self, other) -> "Policy":
        other = Policy(other) if isinstance(other, Piece) else other
        if not isinstance(other, Policy):
            return NotImplemented
        pos = "cache" if "cache" in (self.positions, other.positions) else "original"
        return Policy(*self.pieces, *other.pieces, positions=pos)

    __radd__ = __add__

    @property
    def budget(self) -> int:
        return sum(p.budget for p in self.pieces)

    @property
    def snap(self) -> Optional[SnapKV]:
        return next((p for p in self.pieces if isinstance(p, SnapKV)), None)

    @property
    def heavy(self) -> Optional[HeavyHitters]:
        return next((p for p in self.pieces if isinstance(p, HeavyHitters)), None)

    def mask(self) -> Optional[M.Mask]:
        """The mask a prompt is attended with (StreamingLLM's sinks | window), None for full attention."""
        if self.positions != "cache" or any(p.scored for p in self.pieces):
            return None
        m = None
        for p in self.pieces:
            leaf = M.sinks(p.n) if isinstance(p, Sinks) else M.sliding_window(p.w)
            m = leaf if m is None else m | leaf
        return m

    def __repr__(self):
        return " + ".join(repr(p) for p in self.pieces) + (" (cache positions)" if self.positions == "cache" else "")


def StreamingLLM(sinks: int = 4, window: int = 1020) -> Policy:
    """Attention sinks + a recent window, tokens at their positions within the cache (Xiao et al. 2023)."""
    return Policy(Sinks(sinks), Recent(window), positions="cache")


def H2O(heavy: int, recent: int) -> Policy:
    """Heavy hitters by accumulated attention + a recent window (Zhang et al. 2023)."""
    return Policy(HeavyHitters(heavy), Recent(recent))


PolicyLike = Union[Policy, Piece, Dict[int, Union[Policy, Piece]], Callable[[int], Union[Policy, Piece]]]


def select(policy: Policy, pos: Tensor, n_seen: int, scores: Optional[Tensor]) -> Tensor:
    """bool ``[B, Hkv, n]``: the tokens ``policy`` keeps, given their original positions ``pos [B, Hkv, n]``,
    the tokens seen so far and the score pieces' scores (``[B, Hkv, n]``)."""
    keep = torch.zeros_like(pos, dtype=torch.bool)
    for p in policy.pieces:
        k = p.keep(pos, n_seen)
        if k is not None:
            keep |= k
    for p in policy.pieces:
        if not p.scored:
            continue
        rest = ~keep
        k = min(p.k, int(rest.sum(-1).min()))
        if k > 0:
            s = scores.masked_fill(keep, -math.inf)
            idx = s.topk(k, dim=-1).indices
            keep.scatter_(-1, idx, True)
    return keep


class PolicyCache(KVCache, StateCache):
    """A KV cache that evicts per its policy (see the module doc). Layer states are kept as given."""

    def __init__(self, policy: PolicyLike):
        self._policy = policy
        self._k: Dict[int, Tensor] = {}
        self._v: Dict[int, Tensor] = {}
        self._pos: Dict[int, Tensor] = {}  # original positions of the kept tokens [B, Hkv, cap]
        self._score: Dict[int, Tensor] = {}  # HeavyHitters' accumulated attention [B, Hkv, cap]
        self._n: Dict[int, int] = {}  # kept tokens (same for every sequence and head)
        self._seen: Dict[int, int] = {}  # tokens seen so far
        self._pending: Dict[int, int] = {}  # tokens appended by the last update, not yet observed
        self._state: Dict[int, object] = {}
        self.evicted = 0

    def policy(self, layer_idx: int) -> Policy:
        p = self._policy
        if isinstance(p, dict):
            if layer_idx not in p:
                raise ValueError(f"PolicyCache has no policy for layer {layer_idx} (layers: {sorted(p)})")
            p = p[layer_idx]
        elif callable(p) and not isinstance(p, (Policy, Piece)):
            p = p(layer_idx)
        if isinstance(p, Piece):
            p = Policy(p)
        if not isinstance(p, Policy):
            raise TypeError(f"layer {layer_idx}: expected a Policy, got {type(p).__name__}")
        return p

    # -- what the layers read ------------------------------------------------------------------------
    def seq_len(self, layer_idx: int) -> int:
        """The position of the next token: its cache slot (cache positions) or its place in the sequence."""
        _check_index(layer_idx)
        if self.policy(layer_idx).positions == "cache":
            return self._n.get(layer_idx, 0)
        return self._seen.get(layer_idx, 0)

    def cached(self, layer_idx: int) -> int:
        """Tokens held for layer ``layer_idx`` (per sequence and KV head)."""
        return self._n.get(_check_index(layer_idx), 0)

    def rope_at_read(self, layer_idx: int) -> bool:
        """Keys are stored before RoPE and rotated by their cache slot when read (cache positions)."""
        return self.policy(layer_idx).positions == "cache"

    def attention_mask(self, layer_idx: int) -> Optional[M.Mask]:
        """What the layer ANDs with its mask (StreamingLLM's sinks | window over a long prompt), or None."""
        return self.policy(layer_idx).mask()

    def needs_weights(self, layer_idx: int) -> bool:
        """Whether :meth:`observe` needs the attention weights of the call just made."""
        p = self.policy(layer_idx)
        return p.heavy is not None or (p.snap is not None and self._pending.get(layer_idx, 0) > 1)

    def positions_kept(self, layer_idx: int) -> Tensor:
        """Original positions of the kept tokens ``[B, Hkv, n]``."""
        return self._pos[layer_idx][:, :, :self._n[layer_idx]]

    # -- updates ---------------------------------------------------------------------------------------
    def _grow(self, layer_idx: int, k: Tensor, v: Tensor, need: int) -> None:
        """Room for ``need`` tokens: at least budget + 1 slots, doubling past that (SnapKV keeps growing)."""
        B, Hkv, _, D = k.shape
        old = self._k.get(layer_idx)
        n = self._n.get(layer_idx, 0)
        if old is not None and old.shape[2] >= need:
            return
        need = max(need, self.policy(layer_idx).budget + 1, 2 * old.shape[2] if old is not None else 0)
        nk = k.new_empty(B, Hkv, need, D)
        nv = v.new_empty(B, Hkv, need, v.shape[3])
        npos = torch.empty(B, Hkv, need, dtype=torch.long, device=k.device)
        nsc = torch.zeros(B, Hkv, need, dtype=torch.float64 if k.dtype == torch.float64 else torch.float32,
                          device=k.device)
        if old is not None:
            nk[:, :, :n] = old[:, :, :n]
            nv[:, :, :n] = self._v[layer_idx][:, :, :n]
            npos[:, :, :n] = self._pos[layer_idx][:, :, :n]
            nsc[:, :, :n] = self._score[layer_idx][:, :, :n]
        self._k[layer_idx], self._v[layer_idx], self._pos[layer_idx], self._score[layer_idx] = nk, nv, npos, nsc

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        _check_index(layer_idx)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"cache update takes {name} as [B, H, T_new, D], got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if self._pending.get(layer_idx):
            self.observe(layer_idx, None)  # the previous call was not observed: evict now (no new scores)
        old = self._k.get(layer_idx)
        if old is not None and (old.shape[0] != k.shape[0] or old.shape[1] != k.shape[1] or old.shape[3] != k.shape[3]
                                or self._v[layer_idx].shape[3] != v.shape[3]):
            raise ValueError(f"layer {layer_idx}: cached k {tuple(old.shape)} does not match the new k "
                             f"{tuple(k.shape)} / v {tuple(v.shape)} (batch, heads, head dims)")
        n, T = self._n.get(layer_idx, 0), k.shape[2]
        self._grow(layer_idx, k, v, n + T)
        seen = self._seen.get(layer_idx, 0)
        self._k[layer_idx][:, :, n:n + T] = k
        self._v[layer_idx][:, :, n:n + T] = v
        self._pos[layer_idx][:, :, n:n + T] = torch.arange(seen, seen + T, device=k.device)
        self._score[layer_idx][:, :, n:n + T] = 0
        self._n[layer_idx], self._seen[layer_idx], self._pending[layer_idx] = n + T, seen + T, T
        return self._k[layer_idx][:, :, :n + T], self._v[layer_idx][:, :, :n + T]

    def kv_view(self, layer_idx: int) -> KVView:
        """The kept keys (and the last update's), as the decode kernels read them (one length for every row)."""
        k, v, n = self._k[layer_idx], self._v[layer_idx], self._n[layer_idx]
        B = k.shape[0]
        return KVView(k, v, torch.full((B,), n, dtype=torch.int32, device=k.device), n, None, [n] * B)

    def observe(self, layer_idx: int, weights: Optional[Callable[[int, int], Tensor]]) -> None:
        """After the layer attended over the last update: add the score pieces' attention mass (``weights(r0, r1)``
        gives the weights ``[B, Hq, r1 − r0, n]`` of that call's query rows ``r0 … r1 − 1`` over the ``n`` cached
        tokens), then evict down to the budget."""
        T = self._pending.pop(layer_idx, 0)
        if not T:
            return
        p = self.policy(layer_idx)
        n = self._n[layer_idx]
        score = self._score[layer_idx]
        Hkv = score.shape[1]
        if weights is not None and (p.heavy is not None or (p.snap is not None and T > 1)):
            rows = range(T - p.snap.window, T) if p.heavy is None else range(T)
            r0 = max(0, rows.start)
            add = torch.zeros_like(score[:, :, :n])
            for a in range(r0, T, SCORE_ROWS):
                w = weights(a, min(T, a + SCORE_ROWS))
                B, Hq, R, nk = w.shape
                add += w.reshape(B, Hkv, Hq // Hkv * R, nk).sum(2).to(add.dtype)
            if p.heavy is not None:
                score[:, :, :n] += add
            else:  # pooled over the prompt before the window (the window is kept anyway)
                pre = n - p.snap.window
                if pre > 0:
                    score[:, :, :pre] = self._pool(add[:, :, :pre], p.snap)
        if n <= p.budget or (p.snap is not None and T == 1):
            return
        if not any(pc.scored for pc in p.pieces):
            m = self._evict_positional(layer_idx, p, n)
        else:
            keep = select(p, self._pos[layer_idx][:, :, :n], self._seen[layer_idx], score[:, :, :n])
            m = int(keep[0, 0].sum())
            idx = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :m].sort(-1).values
            for store in (self._k, self._v):
                t = store[layer_idx]
                t[:, :, :m] = t[:, :, :n].gather(2, idx[..., None].expand(-1, -1, -1, t.shape[3]))
            for store in (self._pos, self._score):
                t = store[layer_idx]
                t[:, :, :m] = t[:, :, :n].gather(2, idx)
        self.evicted += n - m
        self._n[layer_idx] = m
        cap = self._k[layer_idx].shape[2]
        if cap > m + 1:  # after a prompt: back to budget + one decode slot
            for store in (self._k, self._v, self._pos, self._score):
                store[layer_idx] = store[layer_idx][:, :, :m + 1].clone()

    def _evict_positional(self, layer_idx: int, p: Policy, n: int) -> int:
        """Sinks + recent (the same for every sequence and head): the sinks are the first slots (never evicted,
        positions ``0 … a−1``) and the recent tokens the last ones, so eviction moves one slice (no gather)."""
        a = min(sum(pc.n for pc in p.pieces if isinstance(pc, Sinks)), n)
        w = min(sum(pc.w for pc in p.pieces if isinstance(pc, Recent)), n - a)
        m = a + w
        if m < n:
            for store in (self._k, self._v, self._pos, self._score):
                t = store[layer_idx]
                t[:, :, a:m] = t[:, :, n - w:n].clone()
        return m

    @staticmethod
    def _pool(s: Tensor, snap: SnapKV) -> Tensor:
        """SnapKV's pooling of the observation scores over neighbouring tokens (the window keeps its own)."""
        B, H, n = s.shape
        x = s.reshape(B * H, 1, n)
        pad = snap.kernel // 2
        if snap.pooling == "max":
            y = F.max_pool1d(x, snap.kernel, stride=1, padding=pad)
        else:
            y = F.avg_pool1d(x, snap.kernel, stride=1, padding=pad, count_include_pad=False)
        return y.reshape(B, H, n)

    # -- states and memory -------------------------------------------------------------------------------
    def get(self, layer_idx: int):
        return self._state.get(_check_index(layer_idx))

    def set(self, layer_idx: int, state) -> None:
        self._state[_check_index(layer_idx)] = state

    def memory(self) -> Dict[str, int]:
        """Bytes held (all layers) and the kept tokens of each layer."""
        total = sum(t.numel() * t.element_size() for s in (self._k, self._v, self._pos, self._score)
                    for t in s.values())
        return {"allocated": total, **{f"layer{i}": n for i, n in sorted(self._n.items())}}
