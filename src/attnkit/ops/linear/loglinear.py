"""Log-linear attention (Guo, Yang, Goel, Xing, Dao, Kim 2025): one state per Fenwick level.

For a query at position t the prefix [0, t] is split into Fenwick buckets: key s sits at level

    ℓ(t, s) = 0 if s = t, else msb(t ⊕ s) + 1        (bucket ℓ ≥ 1 has 2^{ℓ−1} keys)

and the output weighs each bucket with a data-dependent level weight λ_t^{(ℓ)}:

    o_t = Σ_{s ≤ t} λ_t^{(ℓ(t,s))} · q_tᵀ P_{t←s} w_s v_sᵀ

where ``P_{t←s} w_s v_sᵀ`` is the contribution of token s to the base rule's state at time t
(``linear``: P = I, w = k; ``scalar_gate``: P = Π α; ``gated_delta``: P = Π α_r (I − β_r k_r k_rᵀ),
w = β k). With all λ = 1 this is the base rule. Equivalently one state per level,

    S_t^{(ℓ)} = transition_t(S_{t−1}^{(ℓ')}) merged by the Fenwick carry,   S_t^{(0)} = w_t v_tᵀ,
    o_t = Σ_ℓ λ_t^{(ℓ)} q_tᵀ S_t^{(ℓ)},

so decoding holds O(log T) states (:class:`LogLinearState`). Going from query t−1 to t, levels
0..ctz(t) merge into level ctz(t)+1 (a binary carry). In general a bucket stored relative to query r
moves, for a query t > r, to level ``max(ℓ, msb(t ⊕ r) + 1)``: :func:`merge`.

Chunk form: chunks of a power-of-two size C aligned to absolute positions (a resumed sequence is
front-padded with neutral tokens), so keys in earlier chunks sit at levels > log2 C determined by
chunk indices only. Intra-chunk: ``(M ⊙ Λ) V`` with the base rule's implicit matrix M and
``Λ[t,s] = λ_t^{(ℓ(t,s))}``; inter-chunk: each level state is read with ``Q_eff`` and its λ and
carried through the chunk by the base rule's state map. The parallel form is one unaligned chunk.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .common import level_of
from .engine import Problem, chunk_ops, transfer, transition, write


class LogLinearState(NamedTuple):
    """Decoding state of log-linear attention.

    ``levels [B, H, L, Dk, Dv]``: the Fenwick bucket states relative to the last processed token
    (level 0 = that token). ``position [B]`` (int64): how many tokens were processed.
    """

    levels: Tensor
    position: Tensor


def merge(levels: Tensor, m: int) -> Tensor:
    """Move levels 0..m−1 into level m (``levels [B, H, L, Dk, Dv]``); m = 0 leaves them unchanged."""
    if m <= 0:
        return levels
    L = levels.shape[2]
    if m >= L:
        raise ValueError(f"log_linear state has {L} levels; this position needs level {m} "
                         f"(pass level weights with more levels)")
    merged = levels[:, :, : m + 1].sum(2, keepdim=True)
    return torch.cat([torch.zeros_like(levels[:, :, :m]), merged, levels[:, :, m + 1:]], 2)


def carry(new: int, ref: int) -> int:
    """Level into which all buckets ≤ it merge when the reference query moves from ref to new."""
    return (new ^ ref).bit_length() if new > ref else 0


def recurrent(p: Problem, levels: Tensor, pos0: int) -> Tuple[Tensor, Tensor]:
    """Token by token. ``levels`` relative to query pos0 − 1. Returns ``(o, levels_T)``."""
    outs = []
    for t in range(p.q.shape[2]):
        pos = pos0 + t
        if pos > 0:
            levels = merge(levels, carry(pos, pos - 1))
        q, k, v, g, b = p.token(t)
        levels = transition(levels, k, g, b, p.delta)
        levels = torch.cat([write(k, v, b)[:, :, None], levels[:, :, 1:]], 2)
        outs.append(torch.einsum("bhl,bhk,bhlkv->bhv", p.lam[:, :, t], q, levels))
    return torch.stack(outs, 2), levels


def chunked(p: Problem, levels: Tensor, pos0: int, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Chunk form (``chunk_size`` a power of two) or parallel form (``None``: one chunk)."""
    B, H, T, _ = p.q.shape
    L = p.lam.shape[-1]
    C = T if chunk_size is None else chunk_size
    front = 0 if chunk_size is None else pos0 % C
    N = -(-(front + T) // C)
    pp = p.pad(front, N * C - front - T)
    view = lambda t: None if t is None else t.reshape(t.shape[:2] + (N, C) + t.shape[3:])
    q, k, v, g, beta, lam = map(view, (pp.q, pp.k, pp.v, pp.g, pp.beta, pp.lam))
    base = pos0 - front
    pos = torch.arange(base, base + N * C, device=p.q.device).view(N, C)
    ops = chunk_ops(q, k, g, beta, p.delta)
    M, Q_eff, G = ops.matrix_form()

    # intra-chunk: (M ⊙ Λ) V with Λ[t, s] = λ_t^{(ℓ(t, s))}
    lev = level_of(pos[:, :, None], pos[:, None, :]).clamp(0, L - 1)  # above the diagonal M is 0
    Lam = lam.gather(-1, lev.expand(B, H, N, C, C))
    o = (M * Lam) @ v

    # inter-chunk: Fenwick level states, relative to the first query of the chunk
    if pos0 > 0:
        levels = merge(levels, carry(pos0, pos0 - 1))
    ref = pos0
    H_in = G @ v  # [B,H,N,Dk,Dv]
    ell = torch.arange(L, device=p.q.device)
    delta = ops.L is not None
    chunks = zip(ops.per_chunk(lam), ops.per_chunk(Q_eff), ops.per_chunk(ops.d_end),
                 ops.per_chunk(G if delta else None), ops.per_chunk(ops.k_dec if delta else None), ops.per_chunk(H_in))
    inter = []
    for c, (lam_c, q_eff, d_end, g_c, kd_c, h_in) in enumerate(chunks):
        idx = torch.maximum(ell[None, :], level_of(pos[c][:, None], torch.tensor(ref, device=pos.device)))
        w = lam_c.gather(-1, idx.clamp(max=L - 1).expand(B, H, C, L))  # [B,H,C,L]
        inter.append(torch.einsum("bhcl,bhck,bhlkv->bhcv", w, q_eff, levels))
        levels = transfer(levels, d_end, g_c, kd_c)
        if c < N - 1:
            nxt = base + (c + 1) * C
            m = carry(nxt, ref)
            levels = merge(levels, m)
            levels = torch.cat([levels[:, :, :m], levels[:, :, m:m + 1] + h_in[:, :, None], levels[:, :, m + 1:]], 2)
            ref = nxt
    o = o + torch.stack(inter, 2)

    # final state relative to the last token: old levels carried, last chunk split by bucket
    last = pos0 + T - 1
    levels = merge(levels, carry(last, ref))
    bucket = level_of(torch.tensor(last, device=pos.device), pos[N - 1]).clamp(0, L - 1)  # padding adds nothing
    E = torch.nn.functional.one_hot(bucket, L).to(v.dtype)
    levels = levels + torch.einsum("bhks,sl,bhsv->bhlkv", G[:, :, N - 1], E, v[:, :, N - 1])
    return o.reshape(B, H, N * C, -1)[:, :, front:front + T], levels


def attention_matrix(p: Problem, pos0: int) -> Tensor:
    """``[B, H, T, T]``: the base rule's implicit matrix weighted by λ_t^{(ℓ(t,s))}."""
    B, H, T, _ = p.q.shape
    L = p.lam.shape[-1]
    v = lambda t: None if t is None else t.unsqueeze(2)
    ops = chunk_ops(v(p.q), v(p.k), v(p.g), v(p.beta), p.delta)
    M = ops.matrix_form()[0][:, :, 0]
    pos = torch.arange(pos0, pos0 + T, device=p.q.device)
    lev = level_of(pos[:, None], pos[None, :]).clamp(0, L - 1)
    return M * p.lam.gather(-1, lev.expand(B, H, T, T))
