"""Aaren (Feng et al. 2024, "Attention as an RNN"): softmax attention of a query over every prefix.

With scores ``s_t = scale · q·k_t`` and a fixed (learned) query, the prefix outputs

    o_t = Σ_{i≤t} e^{s_i} v_i / Σ_{i≤t} e^{s_i}

are a many-to-many RNN over the state ``(m, u, w)`` = (running max, Σ e^{s_i−m} v_i, Σ e^{s_i−m}):

    m_t = max(m_{t−1}, s_t),  u_t = u_{t−1} e^{m_{t−1}−m_t} + e^{s_t−m_t} v_t,  w_t likewise,  o_t = u_t / w_t

and the combine ``a ⊕ b = (m, u_a e^{m_a−m} + u_b e^{m_b−m}, w_a e^{m_a−m} + w_b e^{m_b−m})``,
``m = max(m_a, m_b)``, is associative, so all prefixes come from a parallel prefix scan.

Forms for a learned query: ``recurrent`` (O(1) state), ``scan`` (Hillis–Steele, log2 T vectorized
combine steps), ``chunk`` (local prefixes inside chunks, chunk totals carried across) and
``parallel`` (the T×T prefix-softmax matrix, which it can return). With per-token queries it is
causal softmax attention: ``parallel`` is our own T×T prefix softmax; ``chunk`` / ``recurrent`` run
:func:`attnkit.attention` (streaming / KV-cache forms) with the causal mask.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from ...core import masks
from ...core.normalizers import as_normalizer
from ..softmax.reference import run_reference


class AarenState(NamedTuple):
    """Prefix-softmax state of a learned-query Aaren head: ``max [B,H]``, ``num [B,H,Dv]``, ``den [B,H]``."""

    max: Tensor
    num: Tensor
    den: Tensor


def empty_state(B: int, H: int, Dv: int, dtype, device) -> AarenState:
    return AarenState(torch.full((B, H), -math.inf, dtype=dtype, device=device),
                      torch.zeros(B, H, Dv, dtype=dtype, device=device), torch.zeros(B, H, dtype=dtype, device=device))


def combine(a: AarenState, b: AarenState) -> AarenState:
    """``a ⊕ b`` (a before b); a may be empty (max = −inf), b must not be."""
    m = torch.maximum(a.max, b.max)
    ea, eb = torch.exp(a.max - m), torch.exp(b.max - m)
    return AarenState(m, a.num * ea[..., None] + b.num * eb[..., None], a.den * ea + b.den * eb)


def _tokens(s: Tensor, v: Tensor) -> AarenState:
    return AarenState(s, v, torch.ones_like(s))


def _broadcast(st: AarenState, T: int) -> AarenState:
    """A state ``[B,H,...]`` repeated over a time dim (dim 2)."""
    return AarenState(st.max[:, :, None].expand(-1, -1, T), st.num[:, :, None].expand(-1, -1, T, -1),
                      st.den[:, :, None].expand(-1, -1, T))


def _index(st: AarenState, t) -> AarenState:
    return AarenState(st.max[:, :, t], st.num[:, :, t], st.den[:, :, t])


def recurrent(s: Tensor, v: Tensor, st: AarenState) -> Tuple[Tensor, AarenState]:
    """Token by token: ``s [B,H,T]``, ``v [B,H,T,Dv]``."""
    outs = []
    for t in range(s.shape[2]):
        st = combine(st, AarenState(s[:, :, t], v[:, :, t], torch.ones_like(s[:, :, t])))
        outs.append(st.num / st.den[..., None])
    return torch.stack(outs, 2), st


def scan(s: Tensor, v: Tensor, st: AarenState) -> Tuple[Tensor, AarenState]:
    """Hillis–Steele inclusive prefix scan over ⊕ (the initial state folded into token 0)."""
    T = s.shape[2]
    cur = _tokens(s, v)
    first = combine(_broadcast(st, 1), _index(cur, slice(0, 1)))
    cur = AarenState(*(torch.cat([f, c[:, :, 1:]], 2) for f, c in zip(first, cur)))
    d = 1
    while d < T:
        new = combine(_index(cur, slice(0, T - d)), _index(cur, slice(d, T)))
        cur = AarenState(*(torch.cat([c[:, :, :d], n], 2) for c, n in zip(cur, new)))
        d *= 2
    return cur.num / cur.den[..., None], _index(cur, T - 1)


def chunked(s: Tensor, v: Tensor, st: AarenState, C: int) -> Tuple[Tensor, AarenState]:
    """Local prefix softmax inside chunks of C, chunk totals carried across chunks."""
    B, H, T = s.shape
    N = -(-T // C)
    pad = N * C - T
    if pad:
        s = torch.cat([s, s.new_full((B, H, pad), -math.inf)], 2)
        v = torch.cat([v, v.new_zeros(B, H, pad, v.shape[-1])], 2)
    sc, vc = s.view(B, H, N, C), v.view(B, H, N, C, -1)
    m_loc = torch.cummax(sc, -1).values
    keep = torch.tril(torch.ones(C, C, dtype=torch.bool, device=s.device))
    P = torch.exp((sc[..., None, :] - m_loc[..., :, None]).masked_fill(~keep, -math.inf))
    local = AarenState(m_loc, P @ vc, P.sum(-1))  # [B,H,N,C(,Dv)]
    carries = []  # chunk totals are the last rows; unbind (not index) them: one gradient stack in backward
    for tot in zip(local.max[..., -1].unbind(2), local.num[..., -1, :].unbind(2), local.den[..., -1].unbind(2)):
        carries.append(st)
        st = combine(st, AarenState(*tot))
    carry = AarenState(*(torch.stack(x, 2) for x in zip(*carries)))  # [B,H,N,...]
    carry = AarenState(carry.max[..., None].expand(-1, -1, -1, C), carry.num[..., None, :].expand(-1, -1, -1, C, -1),
                       carry.den[..., None].expand(-1, -1, -1, C))
    out = combine(carry, local)
    o = (out.num / out.den[..., None]).reshape(B, H, N * C, -1)[:, :, :T]
    return o, st


def parallel(s: Tensor, v: Tensor, st: AarenState) -> Tuple[Tensor, AarenState, Tensor]:
    """The T×T prefix-softmax matrix. Returns ``(o, final state, weights [B,H,T,T])``."""
    T = s.shape[2]
    m = torch.maximum(torch.cummax(s, -1).values, st.max[..., None])
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=s.device))
    P = torch.exp((s[..., None, :] - m[..., :, None]).masked_fill(~keep, -math.inf))
    e0 = torch.exp(st.max[..., None] - m)  # [B,H,T]
    num = P @ v + st.num[:, :, None] * e0[..., None]
    den = P.sum(-1) + st.den[..., None] * e0
    final = AarenState(m[:, :, -1], num[:, :, -1], den[:, :, -1])
    return num / den[..., None], final, P / den[..., None]


def per_token(q: Tensor, k: Tensor, v: Tensor, scale: float, form: str, return_weights: bool = False):
    """Per-token queries (causal softmax attention). q ``[B,Hq,T,D]``, k/v ``[B,Hkv,T,·]`` (bhtd)."""
    if form == "parallel":
        B, Hq, T, _ = q.shape
        Hkv = k.shape[1]
        s = (q.reshape(B, Hkv, -1, q.shape[-1]) @ k.transpose(-1, -2)).view(B, Hq, T, T) * scale
        keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
        s = s.masked_fill(~keep, -math.inf)
        P = torch.exp(s - s.amax(-1, keepdim=True))
        P = P / P.sum(-1, keepdim=True)
        o = (P.reshape(B, Hkv, -1, T) @ v).view(B, Hq, T, -1)
        return (o, P) if return_weights else o
    sdpa_form = {"chunk": "streaming", "recurrent": "recurrent"}[form]
    return run_reference(q, k, v, masks.causal, None, as_normalizer("softmax"), scale, sdpa_form, False, False, "bhtd")
