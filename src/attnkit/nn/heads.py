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
* :class:`DCMHA` — Dynamically Composable Multi-Head Attention (Xiao et al., ICML 2024): talking heads whose
  mixing depends on the query and key tokens of each score entry; builds the ``[B, H, Lq, Lk]`` maps itself
  (materialized only).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops
from .attention import Attention, check_input, layer_mask, positions_for, split_heads
from .norm import RMSNorm
from .rope import as_rope

__all__ = ["MLA", "MFA", "SQA", "MoHAttention", "TalkingHeadsAttention", "DiffAttention", "MultiTokenAttention",
           "SimplicialAttention", "DCMHA", "lambda_init"]


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


# ------------------------------------------------------------------------------------------------
# Dynamically composable multi-head attention
# ------------------------------------------------------------------------------------------------

def _compose(a: Tensor, static: Tensor, qf: Tensor, kf: Tensor, rank: int) -> Tensor:
    """DCMHA's Compose over the head axis of ``a [B, H, Lq, Lk]`` (scores or weights), entry by entry:

        a'_h[i,j] = Σ_m a_m[i,j]·(W_b[m,h] + Σ_r qw1[i,r,m]·qw2[i,r,h] + Σ_r kw1[j,r,m]·kw2[j,r,h])
                    + a_h[i,j]·(qg[i,h] + kg[j,h])

    ``static = W_b [H, H]``; ``qf [B, Lq, 2R+1, H]`` holds the rows ``qw1 (R), qw2 (R), qg (1)`` of each query
    token, ``kf [B, Lk, 2R+1, H]`` the same of each key token. The low-rank terms are contracted through their R
    hidden channels (``O(R·H)`` per entry, not ``O(H²)``). Nothing mixes entries, so a mask applied to the result
    hides the same entries as one applied before.
    """
    out = torch.einsum("bmij,mh->bhij", a, static)
    for f, ax in ((qf, "i"), (kf, "j")):
        hid = torch.einsum(f"bmij,b{ax}rm->bijr", a, f[:, :, :rank])
        out = out + torch.einsum(f"bijr,b{ax}rh->bhij", hid, f[:, :, rank:2 * rank])
    gate = qf[:, :, 2 * rank].transpose(1, 2).unsqueeze(-1) + kf[:, :, 2 * rank].transpose(1, 2).unsqueeze(-2)
    return out + a * gate


class DCMHA(Attention):
    """Dynamically Composable Multi-Head Attention (Xiao, Meng, Li, Yuan, ICML 2024, "Improving Transformers with
    Dynamically Composable Multi-Head Attention", arXiv:2405.08553, §3; code github.com/Caiyun-AI/DCFormer).

    Per score entry (i, j) the H-vector across heads ``A_:ij`` is transformed by Compose, a static H×H mixing plus
    query-wise and key-wise dynamic low-rank projections and gates (the paper's five branches):

        Compose(A)_:ij = A_:ij W_b + A_:ij qw1_i qw2_iᵀ + A_:ij ⊙ qg_i + A_:ij kw1_j kw2_jᵀ + A_:ij ⊙ kg_j
        qw1_i, qw2_i = Chunk(GELU(x_i W_q1) W_q2)  ∈ R^{H×R},   qg_i = tanh(x_i W_qg)  ∈ R^H
        kw1_j, kw2_j = Chunk(GELU(x_j W_k1) W_k2),              kg_j = tanh(x_j W_kg)
        S = Compose_pre(scale · Q_h K_hᵀ),  P = softmax(mask(S)),  P ← mask(Compose_post(P)),  o_h = P_h V_h,
        y = [o_h]_h W_O

    ``x_i``, ``x_j``: the layer input at the query and key token (the paper's Q_i, K_j; the authors' code feeds the
    attention input). Pre- and post-softmax Compose have their own W_b and dynamic weights (four branches
    pre-query, pre-key, post-query, post-key, each ``W_1 [d_model, C]``, ``W_2 [C, 2·R·H]``, ``W_g [d_model, H]``).
    As in the authors' code, Compose acts on the scores *before* the mask, the mask is applied after it, and the
    composed weights are masked again (a no-op unless the mask differs between heads). Entry (i, j) reads only the H
    values at (i, j), x_i and x_j, so nothing from a hidden key (a future token) reaches a visible entry.
    ``w1_norm=True`` RMS-normalizes ``qw1``/``kw1`` over heads (no scale), as the authors' JAX and PyTorch code do;
    ``False`` drops that norm. GELU is the exact one (the authors' PyTorch code; their JAX code uses the tanh
    approximation). Defaults follow the authors' code: ``rank=2``, ``hidden C = 2·R·H``,
    ``W_b = I + N(0, 0.1²/H)``, ``W_2 ~ N(0, (0.01·2/(H+R)/√C)²)``, ``W_g ~ N(0, (0.005·√(2/(d_model+H)))²)`` (the
    dynamic terms start near zero). With ``W_b = I`` and ``W_2 = W_g = 0`` the layer is plain MHA; with only
    ``W_2 = W_g = 0`` it is talking-heads attention.

    Only the materialized form: the ``[B, H, Lq, Lk]`` score and weight maps are built in full (memory
    O(B·H·Lq·Lk), i.e. O(T²) per head, as the paper's reference code); ``form`` other than "auto"/"materialized"
    and ``backend`` other than "auto"/"reference" are refused. GQA: K/V heads are repeated to the H query heads
    before composing. ``cache=``: a cache with a layer-state slot (``get``/``set``, e.g. DynamicCache,
    ContiguousKVCache) keeps each past key's composition weights ``[B, L, 2, 2R+1, H]`` beside its K/V; eviction
    caches (PolicyCache) are refused. ``cu_seqlens=``: document mask and per-document RoPE positions.
    Other arguments as :class:`Attention` (no score_mod / normalizer / variant: the paper's softmax).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 *, rank: int = 2, hidden: Optional[int] = None, w1_norm: bool = True, **kw):
        if any(kw.get(n) is not None for n in ("score_mod", "variant")) or kw.get("normalizer") not in (None,
                                                                                                       "softmax"):
            raise ValueError("DCMHA takes no score_mod / normalizer / variant (it composes softmax attention)")
        if kw.get("form", "auto") not in ("auto", "materialized"):
            raise ValueError(f"DCMHA has only the materialized form (it builds the [B, H, Lq, Lk] score and weight "
                             f"maps: O(T²) memory per head); got form={kw['form']!r}")
        if kw.get("backend", "auto") not in ("auto", "reference"):
            raise ValueError(f"DCMHA runs in plain PyTorch only (backend 'auto' or 'reference'); got "
                             f"backend={kw['backend']!r}")
        for name, val in [("rank", rank)] + ([("hidden", hidden)] if hidden is not None else []):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"DCMHA {name} must be a positive int, got {val!r}")
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, **kw)
        H, R = n_heads, rank
        C = hidden if hidden is not None else 2 * R * H
        self.rank, self.hidden, self.w1_norm, self.w1_eps = R, C, w1_norm, kw.get("norm_eps", 1e-6)
        # branches: 0 pre-query, 1 pre-key, 2 post-query, 3 post-key; dw2's axis 2: (w1, w2)
        self.dw1 = nn.Parameter(torch.randn(d_model, 4, C) * math.sqrt(2.0 / (d_model + C)))
        self.dw2 = nn.Parameter(torch.randn(4, C, 2, R, H) * (math.sqrt(1.0 / C) * 2.0 / (H + R) * 0.01))
        self.dg = nn.Parameter(torch.randn(d_model, 4, H) * (math.sqrt(2.0 / (d_model + H)) * 0.005))
        self.static = nn.Parameter(torch.eye(H).repeat(2, 1, 1) + torch.randn(2, H, H) * (0.1 / math.sqrt(H)))

    def dynamic_weights(self, x: Tensor) -> Tensor:
        """``[B, T, 4, 2R+1, H]``: per token and branch (pre-q, pre-k, post-q, post-k) the rows w1 (R), w2 (R), g."""
        w = torch.einsum("btcn,cnkrh->btckrh", F.gelu(torch.einsum("btd,dcn->btcn", x, self.dw1)), self.dw2)
        w1, w2 = w.unbind(3)
        if self.w1_norm:
            w1 = w1 * torch.rsqrt(w1.pow(2).mean(-1, keepdim=True) + self.w1_eps)
        g = torch.tanh(torch.einsum("btd,dch->btch", x, self.dg)).unsqueeze(3)
        return torch.cat([w1, w2, g], 3)

    def _cached_key_weights(self, cache, n_before: int, kf: Tensor) -> Optional[Tensor]:
        """The composition weights of the ``n_before`` cached keys (from the cache's state slot), checked before the
        cache is touched; None when nothing is cached."""
        prev = cache.get(self.layer_idx)
        if prev is None:
            if n_before:
                raise ValueError(f"DCMHA layer {self.layer_idx}: the cache holds {n_before} tokens but no key "
                                 "weights (it was filled by another layer type)")
            return None
        if not isinstance(prev, Tensor) or prev.dim() != 5 or prev.shape[0] != kf.shape[0] \
                or prev.shape[2:] != kf.shape[2:] or prev.shape[1] < n_before:
            got = tuple(prev.shape) if isinstance(prev, Tensor) else type(prev).__name__
            raise ValueError(f"DCMHA layer {self.layer_idx}: the cache's state slot holds {got}, expected the key "
                             f"weights of the {n_before} cached tokens [{kf.shape[0]}, >= {n_before}, "
                             f"{', '.join(map(str, kf.shape[2:]))}] (a slot shared with another layer?)")
        return prev[:, :n_before]  # the cache may have dropped tokens at its end (truncate, discard)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask, qf: Tensor = None, kf: Tensor = None) -> Tensor:
        """``q [B, H, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, ·]``, composition weights ``qf [B, Lq, 2, 2R+1, H]``,
        ``kf [B, Lk, 2, 2R+1, H]`` (pre, post) → ``[B, H, Lq, Dv]``."""
        if qf is None or kf is None:
            raise ValueError("DCMHA.attend needs the composition weights qf and kf (call the layer on x)")
        B, H, Lq, D = q.shape
        Lk, G, R = k.shape[2], H // k.shape[1], self.rank
        g = _ops.masks.Geometry(B, H, Lq, Lk)
        mask.validate(g)
        allowed = mask.dense(g, q.device)
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(D)
        # products and selects over visible pairs only (at_visible / where / sum_visible), so a non-finite value
        # of a key a row cannot see (its k, v or key-wise weights) reaches neither that row nor its gradients
        # (Compose mixes heads at one (i, j): the pairs any head sees are computed, each head then masks its own)
        seen = allowed.any(1, keepdim=True)
        s = _compose(_ops.at_visible(scale * q, k.transpose(-1, -2), seen), self.static[0], qf[:, :, 0],
                     kf[:, :, 0], R)
        s = s.masked_fill(~allowed, -math.inf).masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # empty rows: 0 below
        p = torch.where(seen, torch.softmax(s, -1), 0.0)
        p = _compose(p, self.static[1], qf[:, :, 1], kf[:, :, 1], R).masked_fill(~allowed, 0.0)
        return _ops.sum_visible(p, v, allowed)

    def heads(self, x: Tensor, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Per-head outputs ``[B, T, H, D]`` (output gate applied), before the output projection."""
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        n_before, prev = 0, None
        if cache is not None:
            if not (callable(getattr(cache, "get", None)) and callable(getattr(cache, "set", None))):
                raise TypeError(f"DCMHA decodes with a cache that also keeps a layer state (get/set, e.g. "
                                f"DynamicCache); {type(cache).__name__} has none")
            if hasattr(cache, "observe"):
                raise ValueError("DCMHA cannot decode with an evicting cache (PolicyCache): its key-wise "
                                 "composition weights are kept per cached token and would not follow evictions")
            n_before = cache.seq_len(self.layer_idx)
        f = self.dynamic_weights(x)
        kf = f[:, :, 1::2]
        if cache is not None:
            prev = self._cached_key_weights(cache, n_before, kf)
        q, k, v = self.qkv(x, cache, cu_seqlens)
        if cache is not None:
            kf = kf if prev is None else torch.cat([prev, kf], 1)
            cache.set(self.layer_idx, kf)
        if kf.shape[1] != k.shape[2]:
            raise ValueError(f"DCMHA layer {self.layer_idx}: {k.shape[2]} keys but {kf.shape[1]} key weights "
                             "(the cache returned keys this layer did not append)")
        o = self.attend(q, k, v, layer_mask(self.causal, self.mask, cu_seqlens), f[:, :, 0::2], kf).transpose(1, 2)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).view(B, T, self.n_heads, self.head_dim)
        return o
