"""Head-structure layers (MLA, MFA/MFA-KR, SQA, MoH, talking heads, Differential, Multi-Token, 2-simplicial)
against float64 references written here from the papers' equations, forward and backward; decoding with a
cache equals the full forward; packed documents equal separate sequences; MLA's absorbed form equals its
expanded form."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.cache import DynamicCache
from attnkit.nn import (MFA, MLA, SQA, DiffAttention, MoHAttention, MultiTokenAttention, SimplicialAttention,
                        TalkingHeadsAttention, lambda_init)
from conftest import one_thread
from test_nn_layers import (assert_close_grads, causal, heads, perturb, ref_attention_layer, ref_attn, ref_rms,
                            ref_rope)

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
d = 24


def x_(B=2, T=7):
    return torch.randn(B, T, d, dtype=F64)


def softmax_masked(s, allowed):
    s = s.masked_fill(~allowed, -math.inf)
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0)


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------

def ref_mla(m: MLA, x):
    B, T, _ = x.shape
    H, dn, dr, dv, r = m.n_heads, m.dn, m.dr, m.dv, m.kv_rank
    if m.q_rank:
        q = ref_rms(x @ m.q_a.weight.T, m.q_norm.weight, m.q_norm.eps) @ m.q_b.weight.T
    else:
        q = x @ m.q_proj.weight.T
    q = heads(q, H)
    ckv = x @ m.kv_a.weight.T
    c = ref_rms(ckv[..., :r], m.kv_norm.weight, m.kv_norm.eps)
    pos = torch.arange(T)
    k_r = ref_rope(ckv[..., r:].unsqueeze(1), pos)  # one RoPE key shared by all heads
    kv = heads(c @ m.kv_b.weight.T, H)
    k = torch.cat([kv[..., :dn], k_r.expand(B, H, T, dr)], -1)
    qq = torch.cat([q[..., :dn], ref_rope(q[..., dn:], pos)], -1)
    o = ref_attn(qq, k, kv[..., dn:], causal(T, T), 1 / math.sqrt(dn + dr))
    return o.transpose(1, 2).reshape(B, T, H * dv) @ m.o_proj.weight.T


def ref_mfa(m: MFA, x):
    B, T, _ = x.shape
    q = heads(ref_rms(x @ m.q_a.weight.T, m.q_norm.weight, m.q_norm.eps) @ m.q_b.weight.T, m.n_heads)
    k = (x @ m.k_proj.weight.T).unsqueeze(1)
    v = k @ m.r_proj.weight.T if m.key_reuse else (x @ m.v_proj.weight.T).unsqueeze(1)
    pos = torch.arange(T)
    o = ref_attn(ref_rope(q, pos), ref_rope(k, pos), v, causal(T, T), 1 / math.sqrt(m.head_dim))
    return o.transpose(1, 2).reshape(B, T, -1) @ m.o_proj.weight.T


def ref_moh(m: MoHAttention, x):
    B, T, _ = x.shape
    H, D = m.n_heads, m.head_dim
    q, k, v = heads(x @ m.q_proj.weight.T, H), heads(x @ m.k_proj.weight.T, m.n_kv_heads), \
        heads(x @ m.v_proj.weight.T, m.n_kv_heads)
    pos = torch.arange(T)
    o = ref_attn(ref_rope(q, pos), ref_rope(k, pos), v, causal(T, T), 1 / math.sqrt(D)).transpose(1, 2)
    a = torch.softmax(x @ m.head_gate.weight.T, -1)
    p = torch.softmax(x @ m.router.weight.T, -1)
    g = torch.zeros(B, T, H, dtype=F64)
    for b in range(B):
        for t in range(T):
            top = sorted(range(H - m.n_shared), key=lambda i: -float(p[b, t, i].detach()))[:m.top_k]
            for i in top:
                g[b, t, m.n_shared + i] = a[b, t, 1] * p[b, t, i]
    if m.n_shared:
        g = g + F.pad(a[..., :1] * torch.softmax(x @ m.router_shared.weight.T, -1), (0, H - m.n_shared))
    return (o * g[..., None]).reshape(B, T, H * D) @ m.o_proj.weight.T


def ref_talking_heads(m: TalkingHeadsAttention, x):
    B, T, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, v = heads(x @ m.q_proj.weight.T, H), heads(x @ m.k_proj.weight.T, Hkv), heads(x @ m.v_proj.weight.T, Hkv)
    pos = torch.arange(T)
    q, k = ref_rope(q, pos), ref_rope(k, pos).repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    J = torch.einsum("hg,bgij->bhij", m.logit_mix[0], logits)
    W = torch.einsum("hg,bgij->bhij", m.weight_mix[0], softmax_masked(J, causal(T, T)))
    return (W @ v).transpose(1, 2).reshape(B, T, -1) @ m.o_proj.weight.T


def ref_diff(m: DiffAttention, x):
    B, T, _ = x.shape
    H, Hkv, dd = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, v = heads(x @ m.q_proj.weight.T, H), heads(x @ m.k_proj.weight.T, Hkv), heads(x @ m.v_proj.weight.T, Hkv)
    pos = torch.arange(T)
    rot = lambda t: torch.cat([ref_rope(t[..., :dd], pos), ref_rope(t[..., dd:], pos)], -1)
    q, k = rot(q), rot(k).repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * m.layer_idx)
    lam = torch.exp(m.lambda_q1 @ m.lambda_k1) - torch.exp(m.lambda_q2 @ m.lambda_k2) + lam_init
    a1 = softmax_masked(q[..., :dd] @ k[..., :dd].transpose(-1, -2) / math.sqrt(dd), causal(T, T))
    a2 = softmax_masked(q[..., dd:] @ k[..., dd:].transpose(-1, -2) / math.sqrt(dd), causal(T, T))
    o = ref_rms((a1 - lam * a2) @ v, m.subln.weight, m.subln.eps) * (1 - lam_init)
    return o.transpose(1, 2).reshape(B, T, -1) @ m.o_proj.weight.T


def ref_mta(m: MultiTokenAttention, x):
    B, T, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, v = heads(x @ m.q_proj.weight.T, H), heads(x @ m.k_proj.weight.T, Hkv), heads(x @ m.v_proj.weight.T, Hkv)
    pos = torch.arange(T)
    q, k = ref_rope(q, pos), ref_rope(k, pos).repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    allowed = causal(T, T)
    S0 = torch.where(allowed, q @ k.transpose(-1, -2) / math.sqrt(D), torch.zeros((), dtype=F64))
    cq, ck = m.kernel.shape[1:]
    C = torch.zeros_like(S0)
    for i in range(T):
        for j in range(T):
            for a in range(cq):
                for c in range(ck):
                    ii, jj = i - a, j + ck // 2 - c
                    if 0 <= ii < T and 0 <= jj < T:
                        C[:, :, i, j] = C[:, :, i, j] + m.kernel[:, a, c] * S0[:, :, ii, jj]
    if m.head_mix_pre is not None:
        g = m.head_mix_pre.shape[1]
        C = torch.einsum("nhl,bnlij->bnhij", m.head_mix_pre, C.view(B, H // g, g, T, T)).reshape(B, H, T, T)
    A = softmax_masked(C, allowed)
    if m.head_mix is not None:
        g = m.head_mix.shape[1]
        A = torch.einsum("nhl,bnlij->bnhij", m.head_mix, A.view(B, H // g, g, T, T)).reshape(B, H, T, T)
    o = ref_rms(A @ v, m.norm.weight, m.norm.eps) * (1 - m.lambda_init)
    return o.transpose(1, 2).reshape(B, T, -1) @ m.o_proj.weight.T


def ref_simplicial(m: SimplicialAttention, x):
    B, T, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    q = heads(x @ m.q_proj.weight.T, H)
    k1, v1, k2, v2 = (t.repeat_interleave(H // Hkv, 1) for t in heads(x @ m.kv_proj.weight.T, Hkv).split(D, -1))
    i = torch.arange(T)
    ok1 = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < m.window1)
    ok2 = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < m.window2)
    A = torch.einsum("bhid,bhjd,bhkd->bhijk", q, k1, k2) / math.sqrt(D)
    ok = ok1[:, :, None] & ok2[:, None, :]
    P = torch.softmax(A.masked_fill(~ok, -math.inf).flatten(-2), -1).view_as(A)
    o = torch.einsum("bhijk,bhjd,bhkd->bhid", P, v1, v2)
    return o.transpose(1, 2).reshape(B, T, -1) @ m.o_proj.weight.T


def _mla(q_rank=6):
    return MLA(d, 3, kv_rank=8, q_rank=q_rank, head_dim_nope=4, head_dim_rope=4, head_dim_v=6)


CASES = {
    "mla-qlora": (lambda: _mla(6), ref_mla),
    "mla": (lambda: _mla(None), ref_mla),
    "mfa": (lambda: MFA(d, 4, 12, q_rank=8), ref_mfa),
    "mfa-kr": (lambda: MFA(d, 4, 12, q_rank=8, key_reuse=True), ref_mfa),
    "sqa": (lambda: SQA(d, 6, 2, 1), None),
    "moh": (lambda: MoHAttention(d, 6, 2, n_shared=2, top_k=2), ref_moh),
    "moh-noshared": (lambda: MoHAttention(d, 4, n_shared=0, top_k=1), ref_moh),
    "talking-heads": (lambda: TalkingHeadsAttention(d, 4, 2), ref_talking_heads),
    "diff": (lambda: DiffAttention(d, 3, layer_idx=2), ref_diff),
    "diff-gqa": (lambda: DiffAttention(d, 4, 2, head_dim=4, layer_idx=0), ref_diff),
    "mta": (lambda: MultiTokenAttention(d, 4, 2, cq=3, ck=5, layer_idx=1), ref_mta),
    "mta-premix": (lambda: MultiTokenAttention(d, 4, cq=2, ck=3, head_group=4, pre_mix_group=2), ref_mta),
    "simplicial": (lambda: SimplicialAttention(d, 2, window1=4, window2=3), ref_simplicial),
    "simplicial-gqa": (lambda: SimplicialAttention(d, 4, 2, head_dim=4, window1=3, window2=2), ref_simplicial),
}


@pytest.mark.parametrize("name", list(CASES))
def test_head_layer_forward_backward_vs_reference(name):
    make, ref = CASES[name]
    m = perturb(make().double())
    x = x_()
    if ref is None:  # SQA is Attention with fewer query heads of the baseline head dim
        assert (m.n_heads, m.n_kv_heads, m.head_dim) == (2, 1, 4)
        ref = lambda m, x: ref_attention_layer(m, x, causal(x.shape[1], x.shape[1]))
    assert_close_grads(m, x, m, lambda x: ref(m, x))


@pytest.mark.parametrize("name", list(CASES))
def test_head_layer_decode_equals_parallel(name):
    m = perturb(CASES[name][0]().double())
    x = x_(2, 9)
    full = m(x)
    cache = DynamicCache()
    outs = [m(x[:, :3], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mla", "mfa-kr", "moh", "talking-heads", "diff", "mta", "simplicial"])
def test_head_layer_packed_equals_separate(name):
    m = perturb(CASES[name][0]().double())
    lens = [4, 1, 6]
    xs = [torch.randn(1, n, d, dtype=F64) for n in lens]
    cu = torch.tensor([0, 4, 5, 11])
    torch.testing.assert_close(m(torch.cat(xs, 1), cu_seqlens=cu), torch.cat([m(t) for t in xs], 1))


def test_mla_absorbed_equals_expanded_and_caches_latents():
    m = perturb(_mla(6).double())
    x = x_(2, 8)
    torch.testing.assert_close(m(x, absorb=True), m(x, absorb=False))
    g = torch.randn(2, 8, d, dtype=F64)
    ga = torch.autograd.grad(m(x, absorb=True), list(m.parameters()), g)
    ge = torch.autograd.grad(m(x, absorb=False), list(m.parameters()), g)
    for a, b in zip(ga, ge):
        torch.testing.assert_close(a, b)
    cache = DynamicCache()
    m(x[:, :5], cache=cache, absorb=False)
    step_abs = m(x[:, 5:6], cache=cache, absorb=True)
    k_r, c = cache.update(0, torch.zeros(2, 1, 0, 4, dtype=F64), torch.zeros(2, 1, 0, 8, dtype=F64))
    assert k_r.shape == (2, 1, 6, 4) and c.shape == (2, 1, 6, 8)  # kv_rank + d_rope values per token
    torch.testing.assert_close(step_abs, m(x[:, :6])[:, 5:6])


def test_mfa_kr_cache_holds_keys_only():
    m = perturb(MFA(d, 4, 12, q_rank=8, key_reuse=True).double())
    cache = DynamicCache()
    m(x_(1, 5), cache=cache)
    k, v = cache.update(0, torch.zeros(1, 1, 0, 12, dtype=F64), torch.zeros(1, 1, 0, 0, dtype=F64))
    assert k.shape == (1, 1, 5, 12) and v.numel() == 0


def test_moh_uses_shared_plus_top_k_heads():
    m = perturb(MoHAttention(d, 6, n_shared=2, top_k=2).double())
    g = m.head_weights(x_())
    assert ((g[..., 2:] > 0).sum(-1) == 2).all() and (g[..., :2] > 0).all()
    x = x_()
    g = m.head_weights(x)
    a = torch.softmax(x @ m.head_gate.weight.T, -1)
    torch.testing.assert_close(g[..., :2].sum(-1), a[..., 0])  # shared heads share α₁
    assert (g[..., 2:].sum(-1) < a[..., 1]).all()  # routed: α₂ times the top-k probabilities (< 1)
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(d, 4, n_shared=2, top_k=3)


def test_lambda_init_schedule():
    assert lambda_init(0) == pytest.approx(0.2)
    for l in range(1, 13):  # l = layer_idx + 1
        assert lambda_init(l - 1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * (l - 1)))


def test_head_layer_errors():
    with pytest.raises(ValueError, match="n_query_heads"):
        SQA(d, 4, 6)
    with pytest.raises(ValueError, match="head_group"):
        MultiTokenAttention(d, 4, head_group=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        DiffAttention(d, 4, 3)
    with pytest.raises(ValueError, match="score_mod"):
        TalkingHeadsAttention(d, 4, variant="softcap")
    with pytest.raises(ValueError, match="causal"):
        MultiTokenAttention(d, 4, causal=False).double()(x_(1, 3), cache=DynamicCache())
