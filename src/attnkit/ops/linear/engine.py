"""The three forms of every matrix-state rule, on canonical tensors.

One token of any rule (per head, ``S ∈ R^{Dk×Dv}``, α_t = exp(g_t) a scalar or a per-channel vector):

    additive:  S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ
    delta:     S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ     (decay first, then the
               delta correction, as in Kimi Delta Attention; for a scalar α it equals Gated DeltaNet's
               α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ)
    read-out:  o_t = q_tᵀ S_t

Forms:

* :func:`recurrent` — the definition, token by token (also the decoding step).
* :func:`chunked` — chunkwise parallel. Inside a chunk with cumulative log gates ``b_t`` (from the
  chunk start) and start state ``S_0``:

      A_qk[t,s] = Σ_d q_td k_sd e^{b_td − b_sd} (s ≤ t),  A_kk the same with k, strictly lower
      q̄_t = q_t ⊙ e^{b_t},  k̄_t = k_t ⊙ e^{b_t},  k̂_t = k_t ⊙ e^{b_C − b_t}
      additive:  U = V
      delta:     U = T (β ⊙ (V − K̄ S_0)),  T = (I + Diag(β) A_kk)⁻¹   (the UT transform; WY form
                 U = U_0 − W S_0 with U_0 = T(β V), W = T(β K̄); T by recursive block inversion in
                 chunks, a triangular solve in the parallel form)
      O = Q̄ S_0 + A_qk U,   S_C = e^{b_C} ⊙ S_0 + K̂ᵀ U

  The intra-chunk terms are computed for all chunks at once; only the state pass
  ``S_0 -> S_C`` loops over chunks. ``chunk_size=None`` runs one chunk over the whole sequence:
  that is the ``parallel`` form (the T×T decay-masked matrix).
* :func:`attention_matrix` — the implicit T×T matrix ``M`` with ``o = M V`` (+ the initial-state
  term): ``A_qk`` for additive rules, ``A_qk T Diag(β)`` for delta rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .common import decay_matmul, exp_neg, pad_time, unit_lower_inverse


@dataclass
class Problem:
    """A rule after validation and preprocessing, all ``[B, H, T, ...]`` in the compute dtype.

    ``q`` already holds the feature map, normalization and scale; ``v`` the ones column when
    normalizing. ``g``: None, ``[B,H,T]`` (one decay per head) or ``[B,H,T,Dk]`` (per channel).
    ``beta``: ``[B,H,T]`` for delta rules. ``lam``: ``[B,H,T,L]`` level weights (log-linear).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    g: Optional[Tensor] = None
    beta: Optional[Tensor] = None
    delta: bool = False
    lam: Optional[Tensor] = None

    @property
    def channel(self) -> bool:
        return self.g is not None and self.g.dim() == 4

    def pad(self, before: int, after: int) -> "Problem":
        """Neutral tokens (k = v = q = 0, g = 0, β = 0, λ = 0) before/after: they leave the state unchanged."""
        f = lambda t: pad_time(t, before, after)
        return Problem(f(self.q), f(self.k), f(self.v), f(self.g), f(self.beta), self.delta, f(self.lam))

    def token(self, t: int):
        g = None if self.g is None else self.g[:, :, t]
        b = None if self.beta is None else self.beta[:, :, t]
        return self.q[:, :, t], self.k[:, :, t], self.v[:, :, t], g, b


# ------------------------------------------------------------------------------------------------
# One token
# ------------------------------------------------------------------------------------------------

def transition(S: Tensor, k: Tensor, g: Optional[Tensor], beta: Optional[Tensor], delta: bool) -> Tensor:
    """``(I − β k kᵀ) Diag(e^g) S`` (delta) or ``Diag(e^g) S``; S ``[B,H,*,Dk,Dv]``, k ``[B,H,Dk]``,
    g ``[B,H]`` / ``[B,H,Dk]``, β ``[B,H]``. Extra dims of S (Fenwick levels) broadcast."""
    extra = S.dim() - 4
    lift = lambda x: x.reshape(x.shape[:2] + (1,) * extra + x.shape[2:])
    if g is not None:
        a = torch.exp(g)
        S = S * (lift(a)[..., :, None] if g.dim() == 3 else lift(a)[..., None, None])
    if delta:
        kk = lift(k)
        pred = (kk[..., :, None] * S).sum(-2)  # kᵀ S  [..., Dv]
        S = S - (lift(beta)[..., None] * kk)[..., :, None] * pred[..., None, :]
    return S


def write(k: Tensor, v: Tensor, beta: Optional[Tensor]) -> Tensor:
    """``β k vᵀ`` (delta) or ``k vᵀ``: ``[B,H,Dk,Dv]``."""
    if beta is not None:
        k = k * beta[..., None]
    return k[..., :, None] * v[..., None, :]


def recurrent(p: Problem, S: Tensor) -> Tuple[Tensor, Tensor]:
    """Token by token from state S ``[B,H,Dk,Dv]``. Returns ``(o [B,H,T,Dv], S_T)``."""
    outs = []
    for t in range(p.q.shape[2]):
        q, k, v, g, b = p.token(t)
        S = transition(S, k, g, b, p.delta) + write(k, v, b)
        outs.append(torch.einsum("bhk,bhkv->bhv", q, S))
    return torch.stack(outs, 2), S


# ------------------------------------------------------------------------------------------------
# Chunks
# ------------------------------------------------------------------------------------------------

#: chunks longer than this solve the UT system with a triangular solve instead of an explicit inverse
SOLVE_ABOVE = 256


@dataclass
class ChunkOps:
    """Per-chunk operators, all ``[B, H, N, C, ...]`` (see the module docstring)."""

    A_qk: Tensor
    q_dec: Tensor
    k_dec: Tensor
    k_end: Tensor
    d_end: Optional[Tensor]  # e^{b_C}: [B,H,N] or [B,H,N,Dk]; None without gates
    L: Optional[Tensor] = None  # I + Diag(β) A_kk (delta rules)
    beta: Optional[Tensor] = None
    _T: Optional[Tensor] = None

    @property
    def T(self) -> Optional[Tensor]:
        """``(I + Diag(β) A_kk)⁻¹`` by recursive block inversion (O(C³): chunks and explicit matrices)."""
        if self.L is not None and self._T is None:
            self._T = unit_lower_inverse(self.L)
        return self._T

    def per_chunk(self, t: Optional[Tensor]):
        """``t [B, H, N, ...]`` as a tuple of N chunks (``unbind``: one gradient stack in backward, where
        indexing ``t[:, :, c]`` in a loop would materialize a full-size zero gradient per chunk: O(N²))."""
        return (None,) * self.A_qk.shape[2] if t is None else t.unbind(2)

    def solve(self, rhs: Tensor) -> Tensor:
        """``T (β ⊙ rhs)`` (rows of rhs are chunk positions): explicit T for small chunks (batched matmuls are
        fast on CPU), a triangular solve for long ones (the parallel form stays O(T²·D))."""
        rhs = rhs * self.beta[..., None]
        if self.L.shape[-1] <= SOLVE_ABOVE:
            return self.T @ rhs
        return torch.linalg.solve_triangular(self.L, rhs, upper=False, unitriangular=True)

    def matrix_form(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(M, Q_eff, G)`` with ``O = M V + Q_eff S_0`` and ``S_C = e^{b_C} ⊙ S_0 − G K̄ S_0 + G V``.

        Additive: ``M = A_qk, Q_eff = Q̄, G = K̂ᵀ``; delta: ``M = A_qk T Diag(β)``,
        ``G = K̂ᵀ T Diag(β)``, ``Q_eff = Q̄ − M K̄``.
        """
        G = self.k_end.transpose(-1, -2)
        if self.T is None:
            return self.A_qk, self.q_dec, G
        TB = self.T * self.beta[..., None, :]
        M, G = self.A_qk @ TB, G @ TB
        return M, self.q_dec - M @ self.k_dec, G


def lift(x: Tensor, S: Tensor) -> Tensor:
    """Insert the extra state dims of S (Fenwick levels) after the (B, H) dims of a per-chunk tensor."""
    return x.reshape(x.shape[:2] + (1,) * (S.dim() - 4) + x.shape[2:])


def decay_state(S: Tensor, d_end: Optional[Tensor]) -> Tensor:
    """``e^{b_C} ⊙ S`` for one chunk: ``d_end`` ``[B,H]`` (per head) or ``[B,H,Dk]`` (per channel)."""
    if d_end is None:
        return S
    d = lift(d_end, S)
    return S * (d[..., :, None] if d_end.dim() == 3 else d[..., None, None])


def transfer(S: Tensor, d_end: Optional[Tensor], G: Optional[Tensor], k_dec: Optional[Tensor]) -> Tensor:
    """One chunk's state map without inputs: ``e^{b_C} ⊙ S − G K̄ S`` (delta: G, k_dec of the chunk), else
    ``e^{b_C} ⊙ S``."""
    out = decay_state(S, d_end)
    if G is not None:
        out = out - lift(G, S) @ (lift(k_dec, S) @ S)
    return out


def chunk_ops(q: Tensor, k: Tensor, g: Optional[Tensor], beta: Optional[Tensor], delta: bool) -> ChunkOps:
    """Operators of chunks ``q, k [B,H,N,C,Dk]``, ``g [B,H,N,C(,Dk)]``, ``beta [B,H,N,C]``."""
    dt = q.dtype
    if g is None:
        cum, q_dec, k_dec, k_end, d_end = None, q, k, k, None
    else:
        channel = g.dim() == 5
        cum = g.to(torch.float64).cumsum(-2 if channel else -1)
        last = cum[..., -1:, :] if channel else cum[..., -1:]
        e, e_end = exp_neg(cum, dt), exp_neg(last - cum, dt)
        if not channel:
            e, e_end = e[..., None], e_end[..., None]
        q_dec, k_dec, k_end = q * e, k * e, k * e_end
        d_end = exp_neg(last.squeeze(-2) if channel else last.squeeze(-1), dt)
    A_qk = decay_matmul(q, k, cum, strict=False)
    if not delta:
        return ChunkOps(A_qk, q_dec, k_dec, k_end, d_end)
    C = q.shape[-2]
    eye = torch.eye(C, dtype=dt, device=q.device)
    L = eye + beta[..., :, None] * decay_matmul(k, k, cum, strict=True)
    return ChunkOps(A_qk, q_dec, k_dec, k_end, d_end, L, beta)


def split_chunks(p: Problem, chunk_size: Optional[int]):
    """Pad T to a multiple of the chunk and view every tensor as ``[B, H, N, C, ...]``."""
    T = p.q.shape[2]
    C = T if chunk_size is None else chunk_size
    N = -(-T // C)
    pp = p.pad(0, N * C - T)
    view = lambda t: None if t is None else t.reshape(t.shape[:2] + (N, C) + t.shape[3:])
    return C, N, view(pp.q), view(pp.k), view(pp.v), view(pp.g), view(pp.beta)


def chunked(p: Problem, S: Tensor, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Chunkwise-parallel form (``chunk_size=None``: one chunk, the parallel form). ``(o, S_T)``."""
    B, H, T, _ = p.q.shape
    C, N, q, k, v, g, beta = split_chunks(p, chunk_size)
    ops = chunk_ops(q, k, g, beta, p.delta)
    if p.delta:
        Dv = v.shape[-1]
        sol = ops.solve(torch.cat([v, ops.k_dec], -1))
        U0, W = sol[..., :Dv], sol[..., Dv:]
    else:
        U0, W = v, None
    k_end_t = ops.k_end.transpose(-1, -2)
    H_in = k_end_t @ U0  # [B,H,N,Dk,Dv]: what each chunk adds to a zero state
    chunks = zip(ops.per_chunk(ops.d_end), ops.per_chunk(H_in), ops.per_chunk(None if W is None else k_end_t),
                 ops.per_chunk(W))
    states: List[Tensor] = []
    for d_end, h_in, ke_t, w in chunks:
        states.append(S)
        nxt = decay_state(S, d_end) + h_in
        if w is not None:
            nxt = nxt - ke_t @ (w @ S)
        S = nxt
    S_start = torch.stack(states, 2)  # [B,H,N,Dk,Dv]
    U = U0 if W is None else U0 - W @ S_start
    o = ops.A_qk @ U + ops.q_dec @ S_start
    return o.reshape(B, H, N * C, -1)[:, :, :T], S


def attention_matrix(p: Problem) -> Tensor:
    """The implicit ``[B, H, T, T]`` matrix M of the rule (``o = M V`` plus the initial-state term)."""
    _, _, q, k, _, g, beta = split_chunks(p, None)
    return chunk_ops(q, k, g, beta, p.delta).matrix_form()[0][:, :, 0]


def bidirectional(p: Problem, S: Tensor, form: str) -> Tuple[Tensor, Tensor]:
    """Non-causal linear attention ``o_t = q_tᵀ (S_0 + Σ_s k_s v_sᵀ)`` (no gates, no delta)."""
    if form == "parallel":
        o = (p.q @ p.k.transpose(-1, -2)) @ p.v + p.q @ S
        return o, S + p.k.transpose(-1, -2) @ p.v
    S = S + p.k.transpose(-1, -2) @ p.v
    return p.q @ S, S
