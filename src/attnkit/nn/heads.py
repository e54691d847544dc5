"""Head structures that live at layer level, each citing its paper. Every layer takes ``x [B, T, d_model]`` and
returns ``[B, T, d_model]``; ``forward(x, *, cache=None, cu_seqlens=None)`` as :class:`attnkit.nn.Attention`.

* :class:`MLA` — Multi-head Latent Attention (DeepSeek-V2, 2024): low-rank joint KV compression, a decoupled
  RoPE key shared by all heads, and the absorbed form for decoding.
* :class:`MFA` — Multi-matrix Factorization Attention and MFA-Key-Reuse (Hu et al. 2025).
* :class:`SQA` — Sparse Query Attention, fewer query heads (Filipek 2025).
* :class:`MoHAttention` — Mixture-of-Head attention, routed heads (Jin et al. 2024).
* :class:`TalkingHeadsAttention` — talking-heads attention (Shazeer et al. 2020).
* :class:`DiffAttention` — the Differential Transformer layer (Ye et al. 2024).
* :class:`MultiTokenAttention` — the Multi-Token Attention layer (Golovneva et al. 2025).
* :class:`SimplicialAttention` — the 2-simplicial layer (Clift et al. 2019; Roy et al. 2025).

Dynamically composable multi-head attention (DCMHA, Xiao et al. 2024) is not here: its head composition
depends on the query and key of each score entry (``A'_h[i,j] = Σ_h' A_h'[i,j]·(W_hh' + w_q(x_i)_hh' +
w_k(x_j)_hh')``, low-rank query-wise and key-wise terms), which no attnkit op computes (the multi-token op's
head mixing is static per layer); a layer would have to build the ``[B, H, T, T]`` maps itself, which the
layers here never do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops
from .attention import Attention, check_input, layer_mask, positions_for, split_heads
from .norm import RMSNorm
from .rope import as_rope

__all__ = ["MLA", "MFA", "SQA", "MoHAttention", "TalkingHeadsAttention", "DiffAttention", "MultiTokenAttention",
           "SimplicialAttention", "lambda_init"]


def lambda_init(layer_idx: int) -> float:
    """The Differential Transformer's depth schedule ``λ_init = 0.8 − 0.6·exp(−0.3·(l − 1))`` for layer
    ``l = layer_idx + 1``."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def _head_dim(d_model: int, n_heads: int, head_dim: Optional[int]) -> int:
    if head_dim is not None:
        return head_dim
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) is not divisible by n_heads ({n_heads}); give head_dim")
    return d_model // n_heads


def _kv_heads(n_heads: int, n_kv_heads: Optional[int]) -> int:
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
    return n_kv_heads


def _offset(cache, layer_idx: int) -> int:
    return cache.seq_len(layer_idx) if cache is not None else 0


# ------------------------------------------------------------------------------------------------
# MLA
# ------------------------------------------------------------------------------------------------

class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-AI 2024, "DeepSeek-V2", arXiv:2405.04434, §2.1).

        c_Q = RMSNorm(x W_DQ)  (q_rank given; else q = x W_Q)        q = c_Q W_UQ = [q^C | q^R]   per head
        [c_KV | k^R] = x W_DKV,  c_KV ← RMSNorm(c_KV)               (one latent of kv_rank, one RoPE key)
        k^C_h = c_KV W_UK,h,  v_h = c_KV W_UV,h                      (up-projections, per head)
        q^R, k^R ← RoPE(q^R), RoPE(k^R)                             (decoupled RoPE: k^R shared by all heads)
        o_h = softmax(scale · (q^C_h·k^C_h + q^R_h·k^R)) v_h,   scale = 1/√(d_nope + d_rope),   y = [o_h] W_O

    The cache holds only ``c_KV`` and ``k^R`` (kv_rank + d_rope values per token). Absorbed form (decoding):
    ``q^C_h·k^C_h = (q^C_h W_UK,hᵀ)·c_KV`` and ``o_h = (Σ_j p_j c_KV,j) W_UV,hᵀ``, i.e. MQA over one shared
    head ``[c_KV | k^R]`` with queries ``[q^C_h W_UK,h | q^R_h]`` and values ``c_KV`` — the same function.
    ``absorb=None`` uses the absorbed form when a cache is given, the expanded form otherwise.
    """

    def __init__(self, d_model: int, n_heads: int, *, kv_rank: int = 512, q_rank: Optional[int] = None,
                 head_dim_nope: int = 128, head_dim_rope: int = 64, head_dim_v: int = 128,
                 rope=True, causal: bool = True, mask=None, scale: Optional[float] = None, form: str = "auto",
                 backend: str = "auto", layer_idx: int = 0, norm_eps: float = 1e-6):
        super().__init__()
        H, dn, dr, dv = n_heads, head_dim_nope, head_dim_rope, head_dim_v
        self.d_model, self.n_heads, self.kv_rank, self.q_rank = d_model, H, kv_rank, q_rank
        self.dn, self.dr, self.dv = dn, dr, dv
        self.causal, self.mask, self.form, self.backend, self.layer_idx = causal, mask, form, backend, layer_idx
        self.scale = scale if scale is not None else 1.0 / math.sqrt(dn + dr)
        if q_rank:
            self.q_a = nn.Linear(d_model, q_rank, bias=False)
            self.q_norm = RMSNorm(q_rank, norm_eps)
            self.q_b = nn.Linear(q_rank, H * (dn + dr), bias=False)
        else:
            self.q_proj = nn.Linear(d_model, H * (dn + dr), bias=False)
        self.kv_a = nn.Linear(d_model, kv_rank + dr, bias=False)
        self.kv_norm = RMSNorm(kv_rank, norm_eps)
        self.kv_b = nn.Linear(kv_rank, H * (dn + dv), bias=False)
        self.o_proj = nn.Linear(H * dv, d_model, bias=False)
        self.rope = as_rope(rope, dr)

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None,
                absorb: Optional[bool] = None) -> Tensor:
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        H, dn, dr, dv, r = self.n_heads, self.dn, self.dr, self.dv, self.kv_rank
        q = self.q_b(self.q_norm(self.q_a(x))) if self.q_rank else self.q_proj(x)
        q = split_heads(q, H)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        ckv = self.kv_a(x)
        c = self.kv_norm(ckv[..., :r]).unsqueeze(1)  # [B, 1, T, r]
        k_pe = ckv[..., r:].unsqueeze(1)  # [B, 1, T, dr]
        if self.rope is not None:
            pos = positions_for(T, _offset(cache, self.layer_idx), cu_seqlens, x.device)
            q_pe, k_pe = self.rope(q_pe, pos), self.rope(k_pe, pos)
        if cache is not None:
            k_pe, c = cache.update(self.layer_idx, k_pe, c)
        mask = layer_mask(self.causal, self.mask, cu_seqlens)
        W = self.kv_b.weight.view(H, dn + dv, r)
        kw = dict(mask=mask, scale=self.scale, form=self.form, backend=self.backend)
        if absorb if absorb is not None else cache is not None:
            q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, W[:, :dn])
            o_lat = _ops.attention(torch.cat([q_lat, q_pe], -1), torch.cat([c, k_pe], -1), c, **kw)
            o = torch.einsum("bhtr,hvr->bhtv", o_lat, W[:, dn:])
        else:
            L = c.shape[2]
            kv = split_heads(self.kv_b(c[:, 0]), H)  # [B, H, L, dn + dv]
            k = torch.cat([kv[..., :dn], k_pe.expand(B, H, L, dr)], -1)
            o = _ops.attention(torch.cat([q_nope, q_pe], -1), k, kv[..., dn:], **kw)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * dv))


# ------------------------------------------------------------------------------------------------
# MFA / MFA-KR
# ------------------------------------------------------------------------------------------------

class MFA(nn.Module):
    """Multi-matrix Factorization Attention (Hu et al. 2025, ACL Findings, arXiv:2412.19255).

    Many large query heads through a low-rank factorized query projection, one shared key/value head (MQA):

        q_h = RMSNorm(x W_DQ) W_UQ,h  (rank q_rank),   k = x W_K,   v = x W_V   (one head each)
        o_h = softmax(q_h·kᵀ/√D) v,   y = [o_h] W_O

    MFA-KR (``key_reuse=True``): the key cache doubles as the value cache through a value re-parameterization,
    ``v = k̃ W_R`` with ``k̃`` the key before RoPE and ``W_R`` (D×D) initialized to the identity; the cache holds
    only ``k̃`` (D values per token) and the layer rotates it at use.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: Optional[int] = None, *, q_rank: Optional[int] = None,
                 key_reuse: bool = False, rope=True, causal: bool = True, mask=None, scale: Optional[float] = None,
                 form: str = "auto", backend: str = "auto", layer_idx: int = 0, norm_eps: float = 1e-6):
        super().__init__()
        D = _head_dim(d_model, n_heads, head_dim)
        self.d_model, self.n_heads, self.head_dim, self.key_reuse = d_model, n_heads, D, key_reuse
        self.causal, self.mask, self.scale, self.form, self.backend, self.layer_idx = (
            causal, mask, scale, form, backend, layer_idx)
        q_rank = q_rank or d_model
        self.q_a = nn.Linear(d_model, q_rank, bias=False)
        self.q_norm = RMSNorm(q_rank, norm_eps)
        self.q_b = nn.Linear(q_rank, n_heads * D, bias=False)
        self.k_proj = nn.Linear(d_model, D, bias=False)
        self.v_proj = None if key_reuse else nn.Linear(d_model, D, bias=False)
        self.r_proj = nn.Linear(D, D, bias=False) if key_reuse else None
        if key_reuse:
            with torch.no_grad():
                self.r_proj.weight.copy_(torch.eye(D))
            self.r_proj.keep_init = True  # HybridLM.reset_parameters leaves the identity
        self.o_proj = nn.Linear(n_heads * D, d_model, bias=False)
        self.rope = as_rope(rope, D)

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        q = split_heads(self.q_b(self.q_norm(self.q_a(x))), self.n_heads)
        k = self.k_proj(x).unsqueeze(1)  # [B, 1, T, D]
        off = _offset(cache, self.layer_idx)
        pos = positions_for(T, off, cu_seqlens, x.device)
        if self.rope is not None:
            q = self.rope(q, pos)
        if self.key_reuse:  # cache the un-rotated key only (a zero-width value)
            if cache is not None:
                k, _ = cache.update(self.layer_idx, k, k.new_zeros(B, 1, T, 0))
            v = self.r_proj(k)
            if self.rope is not None:
                k = self.rope(k, positions_for(k.shape[2], 0, cu_seqlens, x.device))
        else:
            v = self.v_proj(x).unsqueeze(1)
            if self.rope is not None:
                k = self.rope(k, pos)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
        o = _ops.attention(q, k, v, mask=layer_mask(self.causal, self.mask, cu_seqlens), scale=self.scale,
                           form=self.form, backend=self.backend)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


# ------------------------------------------------------------------------------------------------
# SQA, MoH, talking heads
# ------------------------------------------------------------------------------------------------

class SQA(Attention):
    """Sparse Query Attention (Filipek 2025, "Sparse Query Attention (SQA): A Computationally Efficient Attention
    Mechanism with Query Heads Reduction"): ``n_query_heads < n_heads`` query heads of the
    baseline head dim ``d_model / n_heads`` over ``n_kv_heads <= n_query_heads`` key/value heads; the score
    computation shrinks by ``n_heads / n_query_heads`` (symmetric sSQA: H/2 and H/2; extreme xSQA: H/4).
    The output projection maps ``n_query_heads · head_dim`` back to ``d_model``. Other arguments as Attention.
    """

    def __init__(self, d_model: int, n_heads: int, n_query_heads: int, n_kv_heads: Optional[int] = None, **kw):
        n_kv_heads = n_query_heads if n_kv_heads is None else n_kv_heads
        if not 1 <= n_query_heads <= n_heads:
            raise ValueError(f"SQA needs 1 <= n_query_heads <= n_heads, got {n_query_heads} and {n_heads}")
        super().__init__(d_model, n_query_heads, n_kv_heads, _head_dim(d_model, n_heads, kw.pop("head_dim", None)),
                         **kw)


class MoHAttention(Attention):
    """Mixture-of-Head attention (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention",
    arXiv:2410.11842): heads are experts, each token uses ``n_shared`` shared heads and its top-k routed heads,
    and the output is the weighted sum ``y = Σ_h g_h · o_h W_O,h`` with the two-stage routing

        [α₁, α₂] = softmax(x W_h),
        g_h = α₁ · softmax(x W_s)_h                               (shared heads)
        g_h = α₂ · softmax(x W_r)_h  if h ∈ top-k(x W_r) else 0    (routed heads)

    Every head is computed and unselected ones get weight 0 (the function; a kernel skipping them is not here).
    ``last_router_probs`` keeps the routed softmax of the last call for the paper's load-balance loss.
    Other arguments as :class:`Attention`.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 *, n_shared: int = 2, top_k: int = 4, **kw):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, **kw)
        n_routed = n_heads - n_shared
        if n_shared < 0 or n_routed < 1 or not 1 <= top_k <= n_routed:
            raise ValueError(f"MoH needs 0 <= n_shared < n_heads and 1 <= top_k <= n_heads - n_shared, got "
                             f"n_heads={n_heads}, n_shared={n_shared}, top_k={top_k}")
        self.n_shared, self.top_k = n_shared, top_k
        self.router_shared = nn.Linear(d_model, n_shared, bias=False) if n_shared else None
        self.router = nn.Linear(d_model, n_routed, bias=False)
        self.head_gate = nn.Linear(d_model, 2, bias=False)
        self.last_router_probs = None

    def head_weights(self, x: Tensor) -> Tensor:
        """``g [B, T, H]`` (shared heads first, then routed)."""
        a = torch.softmax(self.head_gate(x), -1)
        p = torch.softmax(self.router(x), -1)
        self.last_router_probs = p
        top = torch.topk(p, self.top_k, -1).indices
        keep = torch.zeros_like(p).scatter(-1, top, 1.0)
        routed = a[..., 1:] * p * keep
        if self.router_shared is None:
            return routed
        return torch.cat([a[..., :1] * torch.softmax(self.router_shared(x), -1), routed], -1)

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        o = self.heads(x, cache, cu_seqlens) * self.head_weights(x).unsqueeze(-1)
        return self.o_proj(o.reshape(x.shape[0], x.shape[1], -1))


def _identity_mix(n_groups: int, g: int) -> nn.Parameter:
    return nn.Parameter(torch.eye(g).repeat(n_groups, 1, 1))


class TalkingHeadsAttention(Attention):
    """Talking-heads attention (Shazeer et al. 2020, arXiv:2003.02436): learned H×H maps mix the logits across
    heads before the softmax and the weights after it,

        J_h = Σ_h' P_l[h, h'] · (scale · q_h' k_h'ᵀ),   W_h = Σ_h' P_w[h, h'] · softmax(J_h),   o_h = W_h v_h

    computed by attnkit's multi-token op with a 1×1 identity kernel and head mixing over one group of all H
    heads (masks are applied to every head alike). P_l, P_w start at the identity (plain MHA).
    Other arguments as :class:`Attention` (score mods are not supported here).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 **kw):
        if kw.get("score_mod") is not None or kw.get("variant") is not None:
            raise ValueError("TalkingHeadsAttention takes no score_mod / variant (the multi-token op has none)")
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, **kw)
        self.logit_mix = _identity_mix(1, n_heads)
        self.weight_mix = _identity_mix(1, n_heads)
        self.register_buffer("unit_kernel", torch.ones(n_heads, 1, 1), persistent=False)

    def attend(self, q, k, v, mask):
        return _ops.multi_token_attention(q, k, v, self.unit_kernel.to(q.dtype), mask=mask,
                                          head_mix=self.weight_mix.to(q.dtype),
                                          head_mix_pre=self.logit_mix.to(q.dtype), scale=self.scale,
                                          normalizer=self.normalizer, form=self.form)


# ------------------------------------------------------------------------------------------------
# Differential, multi-token, 2-simplicial
# ------------------------------------------------------------------------------------------------

class DiffAttention(nn.Module):
    """The Differential Transformer layer (Ye et al. 2024, ICLR 2025, arXiv:2410.05258).

        [q₁|q₂] = x W_Q, [k₁|k₂] = x W_K, v = x W_V   (per head: q, k of 2d channels, v of 2d)
        λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init,  λ_init = 0.8 − 0.6·exp(−0.3·(l − 1))
        o_h = softmax(q₁k₁ᵀ/√d) v − λ · softmax(q₂k₂ᵀ/√d) v        (attnkit.differential_attention)
        y = [(1 − λ_init) · RMSNorm(o_h)]_h W_O                      (per-head norm: the paper's GroupNorm)

    ``head_dim`` is d, the dim of one map (default d_model / n_heads / 2, so W_Q is d_model × d_model as in
    the paper, with half the heads of the baseline). λ vectors ~ N(0, 0.1²), one λ per layer. RoPE rotates
    each half (q₁, q₂, k₁, k₂) with a d-dim rotation.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 *, layer_idx: int = 0, rope=True, causal: bool = True, mask=None, score_mod=None,
                 scale: Optional[float] = None, form: str = "auto", backend: str = "auto", norm_eps: float = 1e-5):
        super().__init__()
        d = head_dim if head_dim is not None else _head_dim(d_model, n_heads, None) // 2
        if d < 1:
            raise ValueError(f"DiffAttention head_dim must be >= 1, got {d} (d_model {d_model}, n_heads {n_heads})")
        Hkv = _kv_heads(n_heads, n_kv_heads)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, Hkv, d
        self.causal, self.mask, self.score_mod, self.scale = causal, mask, _ops.scores.as_score_mod(score_mod), scale
        self.form, self.backend, self.layer_idx = form, backend, layer_idx
        self.lambda_init = lambda_init(layer_idx)
        self.q_proj = nn.Linear(d_model, n_heads * 2 * d, bias=False)
        self.k_proj = nn.Linear(d_model, Hkv * 2 * d, bias=False)
        self.v_proj = nn.Linear(d_model, Hkv * 2 * d, bias=False)
        self.o_proj = nn.Linear(n_heads * 2 * d, d_model, bias=False)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(d) * 0.1) for _ in range(4))
        self.subln = RMSNorm(2 * d, norm_eps)
        self.rope = as_rope(rope, d)

    def lam(self) -> Tensor:
        """``λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init`` (a 0-d tensor)."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

    def _rot(self, t: Tensor, pos: Tensor) -> Tensor:
        d = self.head_dim
        return torch.cat([self.rope(t[..., :d], pos), self.rope(t[..., d:], pos)], -1)

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        if self.rope is not None:
            pos = positions_for(T, _offset(cache, self.layer_idx), cu_seqlens, x.device)
            q, k = self._rot(q, pos), self._rot(k, pos)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        lam = self.lam().to(q.dtype)
        o = _ops.differential_attention(q, k, v, lam, mask=layer_mask(self.causal, self.mask, cu_seqlens),
                                        score_mod=self.score_mod, scale=self.scale, form=self.form,
                                        backend=self.backend)
        o = self.subln(o) * (1.0 - self.lambda_init)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MultiTokenAttention(nn.Module):
    """The Multi-Token Attention layer (Golovneva et al. 2025, arXiv:2504.00927).

        q, k, v = RoPE(x W_Q), RoPE(x W_K), x W_V
        o = multi_token_attention(q, k, v; θ, W)      key-query convolution θ_h (cq × ck) over the masked scores,
                                                     softmax, head mixing W in groups of ``head_group`` heads
        y = [(1 − λ_init) · RMSNorm(o_h)]_h W_O      (per-head group norm with the depth scaling of DIFF)

    θ starts as the identity convolution and W as the identity mixing (plain attention at init).
    Decoding keeps the last ``cq − 1`` queries in the :class:`attnkit.cache.StateCache` slot of the layer.
    With ``cu_seqlens`` each document runs separately (the query convolution must not cross documents).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 *, cq: int = 6, ck: int = 11, head_group: int = 2, pre_mix_group: Optional[int] = None,
                 layer_idx: int = 0, rope=True, causal: bool = True, mask=None, normalizer="softmax",
                 scale: Optional[float] = None, form: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        D = _head_dim(d_model, n_heads, head_dim)
        Hkv = _kv_heads(n_heads, n_kv_heads)
        for name, g in (("head_group", head_group), ("pre_mix_group", pre_mix_group)):
            if g is not None and (g < 1 or n_heads % g):
                raise ValueError(f"{name} must divide n_heads ({n_heads}), got {g}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.cq = d_model, n_heads, Hkv, D, cq
        self.causal, self.mask, self.scale, self.form, self.layer_idx = causal, mask, scale, form, layer_idx
        self.normalizer = _ops.normalizers.as_normalizer(normalizer)
        self.lambda_init = lambda_init(layer_idx)
        self.q_proj = nn.Linear(d_model, n_heads * D, bias=False)
        self.k_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.o_proj = nn.Linear(n_heads * D, d_model, bias=False)
        kernel = torch.zeros(n_heads, cq, ck)
        kernel[:, 0, ck // 2] = 1.0
        self.kernel = nn.Parameter(kernel)
        self.head_mix = _identity_mix(n_heads // head_group, head_group) if head_group > 1 else None
        self.head_mix_pre = _identity_mix(n_heads // pre_mix_group, pre_mix_group) if pre_mix_group else None
        self.norm = RMSNorm(D, norm_eps)
        self.rope = as_rope(rope, D)

    def _mta(self, q, k, v, mask):
        dt = q.dtype
        return _ops.multi_token_attention(
            q, k, v, self.kernel.to(dt), mask=mask, head_mix=None if self.head_mix is None else self.head_mix.to(dt),
            head_mix_pre=None if self.head_mix_pre is None else self.head_mix_pre.to(dt), scale=self.scale,
            normalizer=self.normalizer, form=self.form)

    def _one(self, x: Tensor, cache) -> Tensor:
        B, T, _ = x.shape
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        if self.rope is not None:
            pos = positions_for(T, _offset(cache, self.layer_idx), None, x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        mask = layer_mask(self.causal, self.mask, None)
        if cache is None:
            return self._mta(q, k, v, mask)
        if not self.causal:
            raise ValueError("MultiTokenAttention decodes with a cache only when causal")
        prev = cache.get(self.layer_idx)
        k, v = cache.update(self.layer_idx, k, v)
        qx = q if prev is None else torch.cat([prev, q], 2)  # earlier queries the convolution reads
        if self.cq > 1:
            cache.set(self.layer_idx, qx[:, :, max(0, qx.shape[2] - (self.cq - 1)):])
        return self._mta(qx, k, v, mask)[:, :, -T:]

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        if cu_seqlens is None:
            o = self._one(x, cache)
        else:
            cu = cu_seqlens.tolist()
            o = torch.cat([self._one(x[:, a:b], None) for a, b in zip(cu, cu[1:])], 2)
        o = self.norm(o) * (1.0 - self.lambda_init)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class SimplicialAttention(nn.Module):
    """The 2-simplicial attention layer (Clift et al. 2019, "Logic and the 2-Simplicial Transformer"; Roy et al.
    2025, "Fast and Simplex: 2-Simplicial Attention in Triton", arXiv:2507.02754).

        q, k₁, v₁, k₂, v₂ = x W_Q, x W_K1, x W_V1, x W_K2, x W_V2
        o_i = Σ_{j,k} softmax_{(j,k)}(scale · Σ_d q_id k₁_jd k₂_kd) (v₁_j ∘ v₂_k)    (attnkit.simplicial_attention)
        y = [o_h] W_O

    over causal windows of ``window1`` keys j and ``window2`` keys k (Roy et al.'s sliding windows; 32 and 8
    by default). No RoPE: the trilinear form is not invariant under per-position rotations (Roy et al.
    discuss a determinant-based alternative); interleave with RoPE attention layers instead. The KV cache
    holds ``[k₁|k₂]`` and ``[v₁|v₂]`` concatenated along the head dim.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 *, window1: int = 32, window2: int = 8, scale: Optional[float] = None, form: str = "auto",
                 layer_idx: int = 0):
        super().__init__()
        D = _head_dim(d_model, n_heads, head_dim)
        Hkv = _kv_heads(n_heads, n_kv_heads)
        if window1 < 1 or window2 < 1:
            raise ValueError(f"windows must be >= 1, got {window1}, {window2}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, Hkv, D
        self.window1, self.window2, self.scale, self.form, self.layer_idx = window1, window2, scale, form, layer_idx
        self.q_proj = nn.Linear(d_model, n_heads * D, bias=False)
        self.kv_proj = nn.Linear(d_model, 4 * Hkv * D, bias=False)  # k1, v1, k2, v2
        self.o_proj = nn.Linear(n_heads * D, d_model, bias=False)

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        D = self.head_dim
        q = split_heads(self.q_proj(x), self.n_heads)
        k1, v1, k2, v2 = split_heads(self.kv_proj(x), self.n_kv_heads).split(D, -1)
        if cache is not None:
            kk, vv = cache.update(self.layer_idx, torch.cat([k1, k2], -1), torch.cat([v1, v2], -1))
            k1, k2 = kk.split(D, -1)
            v1, v2 = vv.split(D, -1)
        m1 = layer_mask(True, _ops.masks.sliding_window(self.window1 - 1), cu_seqlens)
        m2 = layer_mask(True, _ops.masks.sliding_window(self.window2 - 1), cu_seqlens)
        o = _ops.simplicial_attention(q, k1, v1, k2, v2, mask1=m1, mask2=m2, scale=self.scale, form=self.form)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
