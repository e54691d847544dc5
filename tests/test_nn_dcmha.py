"""DCMHA (Xiao et al., ICML 2024) against a float64 reference written here from the paper's Compose equations, with
explicit loops over heads (one H×H composition coefficient per entry, not the layer's low-rank contraction):
outputs and gradients, gradcheck, reduction to plain MHA and to talking heads, causality (a changed future token
leaves earlier outputs and their gradients untouched), decoding with a cache, packed documents, masks that differ
by head or hide whole rows, T=1, GQA/MQA, and the errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit import masks
from attnkit.cache import ContiguousKVCache, DynamicCache, KVCache, PolicyCache, StreamingLLM
from attnkit.nn import DCMHA, Attention, TalkingHeadsAttention
import attnkit.nn
from conftest import one_thread
from test_nn_layers import assert_close_grads, causal, heads, perturb, ref_rms, ref_rope

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
d = 24


def x_(B=2, T=7):
    return torch.randn(B, T, d, dtype=F64)


# ------------------------------------------------------------------------------------------------
# reference (paper §3: Compose with a static W_b, query-/key-wise low-rank projections and tanh gates)
# ------------------------------------------------------------------------------------------------

def ref_dynamic(m: DCMHA, x):
    """Per branch c (0 pre-query, 1 pre-key, 2 post-query, 3 post-key): w1, w2 [B, T, R, H] and g [B, T, H] of every
    token: w1, w2 = Chunk(GELU(x W_c1) W_c2), g = tanh(x W_cg); w1 RMS-normalized over heads when m.w1_norm."""
    B, T, _ = x.shape
    R, H, C = m.rank, m.n_heads, m.hidden
    out = []
    for c in range(4):
        w = F.gelu(x @ m.dw1[:, c, :]) @ m.dw2[c].reshape(C, 2 * R * H)
        w1, w2 = w[..., :R * H].reshape(B, T, R, H), w[..., R * H:].reshape(B, T, R, H)
        if m.w1_norm:
            w1 = w1 / torch.sqrt((w1 * w1).mean(-1, keepdim=True) + m.w1_eps)
        out.append((w1, w2, torch.tanh(x @ m.dg[:, c, :])))
    return out


def ref_compose(A, Wb, qdyn, kdyn):
    """A'_h[i,j] = Σ_m A_m[i,j]·(W_b[m,h] + Σ_r qw1[i,r,m] qw2[i,r,h] + Σ_r kw1[j,r,m] kw2[j,r,h])
    + A_h[i,j]·(qg[i,h] + kg[j,h]), looping over output head h and input head m."""
    (qw1, qw2, qg), (kw1, kw2, kg) = qdyn, kdyn
    H = A.shape[1]
    out = []
    for h in range(H):
        acc = A[:, h] * (qg[:, :, h][:, :, None] + kg[:, :, h][:, None, :])
        for mm in range(H):
            coef = (Wb[mm, h] + (qw1[:, :, :, mm] * qw2[:, :, :, h]).sum(-1)[:, :, None]
                    + (kw1[:, :, :, mm] * kw2[:, :, :, h]).sum(-1)[:, None, :])
            acc = acc + A[:, mm] * coef
        out.append(acc)
    return torch.stack(out, 1)


def softmax_rows(s, allowed):
    """softmax over the allowed keys of each row; a row with none gives zeros (and zero gradients)."""
    s = s.masked_fill(~allowed, -math.inf)
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp(min=-1e30))
    den = e.sum(-1, keepdim=True)
    return torch.where(den > 0, e / den.clamp(min=1e-300), torch.zeros_like(e))


def ref_dcmha(m: DCMHA, x, allowed=None):
    B, T, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    G = H // Hkv
    lin = lambda p, t: t @ p.weight.T + (0 if p.bias is None else p.bias)
    q, k, v = heads(lin(m.q_proj, x), H), heads(lin(m.k_proj, x), Hkv), heads(lin(m.v_proj, x), Hkv)
    if m.q_norm is not None:
        q, k = ref_rms(q, m.q_norm.weight, m.q_norm.eps), ref_rms(k, m.k_norm.weight, m.k_norm.eps)
    if m.rope is not None:
        pos = torch.arange(T)
        q, k = (ref_rope(t, pos, m.rope.base, m.rope.rot_dim) for t in (q, k))
    if allowed is None:
        allowed = causal(T, T) if m.causal else torch.ones(T, T, dtype=torch.bool)
    scale = 1 / math.sqrt(D) if m.scale is None else m.scale
    dyn = ref_dynamic(m, x)
    S = torch.stack([scale * q[:, h] @ k[:, h // G].transpose(-1, -2) for h in range(H)], 1)
    S = ref_compose(S, m.static[0], dyn[0], dyn[1])  # compose the scores, then mask (as the authors' code)
    P = ref_compose(softmax_rows(S, allowed), m.static[1], dyn[2], dyn[3]).masked_fill(~allowed, 0.0)
    o = torch.stack([P[:, h] @ v[:, h // G] for h in range(H)], 2)  # [B, T, H, D]
    if m.g_proj is not None:
        o = o * torch.sigmoid(lin(m.g_proj, x)).view(B, T, H, D)
    return lin(m.o_proj, o.reshape(B, T, H * D))


CASES = {
    "mha": lambda: DCMHA(d, 4),
    "gqa": lambda: DCMHA(d, 4, 2),
    "mqa-rank1-hidden5": lambda: DCMHA(d, 4, 1, rank=1, hidden=5),
    "rank3-no-w1-norm": lambda: DCMHA(d, 4, rank=3, w1_norm=False),
    "encoder-qknorm-gate-bias": lambda: DCMHA(d, 4, 2, causal=False, qk_norm=True, output_gate=True, bias=True),
    "no-rope-scale": lambda: DCMHA(d, 2, head_dim=8, rope=False, scale=0.3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dcmha_forward_backward_vs_reference(name):
    m = perturb(CASES[name]().double())
    assert_close_grads(m, x_(), m, lambda x: ref_dcmha(m, x))


@pytest.mark.parametrize("T", [1, 2])
def test_dcmha_short_sequences(T):
    m = perturb(DCMHA(d, 4, 2).double())
    assert_close_grads(m, x_(3, T), m, lambda x: ref_dcmha(m, x))


def test_dcmha_gradcheck():
    m = perturb(DCMHA(8, 2, 1, rank=1, hidden=3).double())
    names = ["dw1", "dw2", "dg", "static", "q_proj.weight", "k_proj.weight"]
    params = dict(m.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, {**params, **dict(zip(names, ps))}, (x,))

    x = torch.randn(1, 3, 8, dtype=F64, requires_grad=True)
    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs)


# ------------------------------------------------------------------------------------------------
# reductions
# ------------------------------------------------------------------------------------------------

def assert_same_function(m: DCMHA, other, x):
    """Outputs and the gradients of x and of the projections both layers share agree (DCMHA's own composition
    parameters still get gradients at zero, which the other layer has no counterpart for)."""
    x = x.clone().requires_grad_(True)
    shared = [n for n, _ in other.named_parameters() if n.endswith(("_proj.weight", "_proj.bias"))]
    y, yo = m(x), other(x)
    torch.testing.assert_close(y, yo, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    mine = dict(m.named_parameters())
    got = torch.autograd.grad(y, [x] + [mine[n] for n in shared], g)
    want = torch.autograd.grad(yo, [x] + [dict(other.named_parameters())[n] for n in shared], g)
    for n, a, b in zip(["x"] + shared, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s: f"grad of {n}: {s}")
    assert len(shared) == 4


def _no_dynamic(m: DCMHA) -> DCMHA:
    with torch.no_grad():
        m.dw2.zero_()
        m.dg.zero_()
    return m


def test_dcmha_reduces_to_plain_mha():
    m = perturb(DCMHA(d, 4, 2).double())
    plain = Attention(d, 4, 2).double()
    plain.load_state_dict(m.state_dict(), strict=False)
    x = x_()
    assert (m(x) - plain(x)).abs().max() > 1e-3  # the composition does something before it is turned off
    with torch.no_grad():
        m.static.copy_(torch.eye(4, dtype=F64).repeat(2, 1, 1))
    assert_same_function(_no_dynamic(m), plain, x)


def test_dcmha_without_dynamic_terms_is_talking_heads():
    m = _no_dynamic(perturb(DCMHA(d, 4, 2).double()))
    th = TalkingHeadsAttention(d, 4, 2).double()
    th.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():  # talking heads mixes J_h = Σ_h' P[h, h'] A_h'; Compose is A_:ij W_b, so P = W_bᵀ
        th.logit_mix[0].copy_(m.static[0].T)
        th.weight_mix[0].copy_(m.static[1].T)
    assert_same_function(m, th, x_())


# ------------------------------------------------------------------------------------------------
# causality, decoding, documents, masks
# ------------------------------------------------------------------------------------------------

def test_dcmha_future_tokens_do_not_leak():
    m = perturb(DCMHA(d, 4, 2).double())
    with torch.no_grad():  # strong key-wise terms (branches 1, 3): a leak through them would show
        m.dw2[1::2].mul_(20.0)
        m.dg[:, 1::2].mul_(20.0)
    x, t0 = x_(2, 10), 6
    x2 = x.clone()
    x2[:, t0:] = torch.randn(2, 10 - t0, d, dtype=F64)
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, :t0], y[:, :t0], rtol=1e-13, atol=1e-14)
    assert (y2[:, t0:] - y[:, t0:]).abs().amin(-1).min() > 1e-6  # every later row changes
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(m(xg)[:, :t0], xg, torch.randn(2, t0, d, dtype=F64))
    assert gx[:, t0:].abs().max() == 0 and gx[:, :t0].abs().min() > 0


def test_dcmha_non_finite_hidden_token_reaches_nothing():
    """NaN / inf in the input of a token no row sees and whose row sees nothing (its q, k, v and query- and key-wise
    composition weights are all non-finite) changes no other output and no gradient of the other tokens."""
    T, t0 = 10, 6
    m = perturb(DCMHA(d, 4, 2, mask=masks.predicate(lambda b, h, q, kv: (q >= kv) & (q != t0) & (kv != t0))).double())
    x = x_(2, T)
    bad = x.clone()
    bad[:, t0, 3], bad[:, t0, 0] = float("nan"), float("inf")
    xa, xb = x.clone().requires_grad_(True), bad.clone().requires_grad_(True)
    ya, yb = m(xa), m(xb)
    keep = torch.arange(T) != t0
    torch.testing.assert_close(yb[:, keep], ya[:, keep], rtol=1e-13, atol=1e-14)
    g = torch.randn(2, T - 1, d, dtype=F64)
    (ga,) = torch.autograd.grad(ya[:, keep], xa, g)
    (gb,) = torch.autograd.grad(yb[:, keep], xb, g)
    torch.testing.assert_close(gb[:, keep], ga[:, keep], rtol=1e-12, atol=1e-13)


def test_dcmha_decode_equals_parallel():
    m = perturb(DCMHA(d, 4, 2).double())
    x = x_(2, 9)
    full = m(x)
    cache = DynamicCache()
    outs = [m(x[:, :3], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(3, 7)] + [
        m(x[:, 7:], cache=cache)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    kf = cache.get(0)
    assert kf.shape == (2, 9, 2, 2 * m.rank + 1, 4)  # key weights of every cached token, pre and post


def test_dcmha_decode_after_truncate():
    m = perturb(DCMHA(d, 4, 2).double())
    x = x_(2, 8)
    cache = ContiguousKVCache(16)
    m(x[:, :6], cache=cache)
    cache.truncate(4)  # e.g. rejected speculative tokens: keys and key weights past 4 are dropped
    got = m(x[:, 4:8], cache=cache)
    torch.testing.assert_close(got, m(x)[:, 4:8], rtol=1e-10, atol=1e-12)


def test_dcmha_packed_equals_separate():
    m = perturb(DCMHA(d, 4, 2).double())
    lens = [4, 1, 6]
    xs = [torch.randn(1, n, d, dtype=F64) for n in lens]
    cu = torch.tensor([0, 4, 5, 11])
    torch.testing.assert_close(m(torch.cat(xs, 1), cu_seqlens=cu), torch.cat([m(t) for t in xs], 1))


def test_dcmha_mask_per_head_and_empty_rows():
    T, H = 7, 4
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    # head h sees the last h + 1 keys (a mask that differs by head: the composed weights are masked per head)
    m = perturb(DCMHA(d, H, 2, mask=masks.predicate(lambda b, h, q, kv: q - kv <= h)).double())
    allowed = torch.stack([causal(T, T) & (i - j <= h) for h in range(H)])[None]
    assert_close_grads(m, x_(2, T), m, lambda x: ref_dcmha(m, x, allowed))
    # rows 0, 1 see no key: zero output rows, finite gradients
    m = perturb(DCMHA(d, H, mask=masks.predicate(lambda b, h, q, kv: (q >= 2) & (kv >= 0))).double())
    x = x_(2, T)
    assert m(x)[:, :2].abs().max() == 0
    assert_close_grads(m, x, m, lambda x: ref_dcmha(m, x, causal(T, T) & (i >= 2)))


def test_dcmha_non_contiguous_input():
    m = perturb(DCMHA(d, 4, 2).double())
    x = torch.randn(7, 2, d, dtype=F64).transpose(0, 1)
    assert not x.is_contiguous()
    torch.testing.assert_close(m(x), m(x.contiguous()))


# ------------------------------------------------------------------------------------------------
# errors, export
# ------------------------------------------------------------------------------------------------

class _KVOnly(KVCache):
    def update(self, layer_idx, k, v):
        return k, v

    def seq_len(self, layer_idx):
        return 0


def test_dcmha_errors():
    with pytest.raises(ValueError, match="materialized"):
        DCMHA(d, 4, form="streaming")
    with pytest.raises(ValueError, match="backend"):
        DCMHA(d, 4, backend="triton")
    for kw in ({"variant": "softcap"}, {"score_mod": "softcap"}, {"normalizer": "sigmoid"}):
        with pytest.raises(ValueError, match="score_mod / normalizer / variant"):
            DCMHA(d, 4, **kw)
    for kw in ({"rank": 0}, {"rank": None}, {"hidden": 0}, {"rank": 1.5}):
        with pytest.raises(ValueError, match="positive int"):
            DCMHA(d, 4, **kw)
    with pytest.raises(ValueError, match="n_kv_heads"):
        DCMHA(d, 4, 3)
    m = DCMHA(d, 4).double()
    with pytest.raises(ValueError, match=r"expected x of shape \[B, T, 24\]"):
        m(torch.randn(2, 5, 12, dtype=F64))
    with pytest.raises(ValueError, match="batch 1"):
        m(x_(2, 4), cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(TypeError, match="layer state"):
        m(x_(1, 3), cache=_KVOnly())
    with pytest.raises(ValueError, match="evicting"):
        m(x_(1, 3), cache=PolicyCache(StreamingLLM(2, 4)))
    cache = DynamicCache()
    cache.set(0, torch.zeros(3))
    with pytest.raises(ValueError, match="state slot"):
        m(x_(1, 3), cache=cache)
    assert cache.seq_len(0) == 0  # refused before the cache was touched
    with pytest.raises(ValueError, match="qf and kf"):
        m.attend(*(torch.randn(1, 4, 3, 6, dtype=F64) for _ in range(3)), masks.causal)


def test_dcmha_exported():
    assert "DCMHA" in attnkit.nn.__all__ and attnkit.nn.DCMHA is DCMHA
