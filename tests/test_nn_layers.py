"""attnkit.nn layers (Attention, LinearAttention, RoPE, ShortConv, RMSNorm) against float64 references written
here from the definitions: explicit projections, RoPE as rotated halves, attention as softmax(QKᵀ)V with an
explicit boolean mask, linear rules as their token-by-token recurrences."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit import masks, normalizers
from attnkit.cache import DynamicCache
from attnkit.nn import Attention, LinearAttention, LinearState, RMSNorm, RotaryEmbedding, ShortConv
from attnkit.nn.linear import RULES
from conftest import one_thread

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------

def ref_rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 if w is None else w)


def ref_rope(x, pos, base=10000.0, rot=None, inv=None, factor=1.0):
    """x [B, H, T, D]: the first ``rot`` channels as halves (x1, x2) rotated by pos·θ_i, θ_i = base^(−2i/rot)."""
    D = x.shape[-1]
    rot = D if rot is None else rot
    h = rot // 2
    if inv is None:
        inv = torch.tensor([base ** (-2.0 * i / rot) for i in range(h)], dtype=F64)
    ang = pos.to(F64)[:, None] * inv[None, :]  # [T, h]
    c, s = torch.cos(ang) * factor, torch.sin(ang) * factor
    x1, x2 = x[..., :h], x[..., h:rot]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., rot:]], -1)


def ref_attn(q, k, v, allowed, scale, bias=None, sink=None):
    """softmax(scale·QKᵀ + bias) V over allowed[.., Lq, Lk]; GQA by repeating K/V; empty rows give 0."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, -math.inf)
    mx = s.amax(-1, keepdim=True).clamp(min=-1e30)
    if sink is not None:
        mx = torch.maximum(mx, sink.view(1, -1, 1, 1))
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(sink.view(1, -1, 1, 1) - mx)
    p = torch.where(den > 0, e / den.clamp(min=1e-300), torch.zeros_like(e))
    return p @ v


def causal(Lq, Lk):
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    return i >= torch.arange(Lk)[None, :]


def heads(t, H):
    B, T, _ = t.shape
    return t.view(B, T, H, -1).transpose(1, 2)


def ref_attention_layer(layer: Attention, x, allowed, pos=None, bias=None, sink=None):
    """Attention written out with the layer's own weights."""
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    lin = lambda m, t: t @ m.weight.T + (0 if m.bias is None else m.bias)
    q, k, v = heads(lin(layer.q_proj, x), H), heads(lin(layer.k_proj, x), Hkv), heads(lin(layer.v_proj, x), Hkv)
    if layer.q_norm is not None:
        q, k = ref_rms(q, layer.q_norm.weight, layer.q_norm.eps), ref_rms(k, layer.k_norm.weight, layer.k_norm.eps)
    if layer.rope is not None:
        pos = torch.arange(x.shape[1]) if pos is None else pos
        r = layer.rope
        q, k = (ref_rope(t, pos, r.base, r.rot_dim) for t in (q, k))
    o = ref_attn(q, k, v, allowed, 1 / math.sqrt(D) if layer.scale is None else layer.scale, bias, sink)
    o = o.transpose(1, 2)
    if layer.g_proj is not None:
        o = o * torch.sigmoid(lin(layer.g_proj, x)).view(o.shape)
    return lin(layer.o_proj, o.reshape(x.shape[0], x.shape[1], -1))


def perturb(m, s=0.1):
    """Move every parameter off its initial value (identity / zero / one inits would hide terms)."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(s * torch.randn_like(p))
    return m


def grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


def assert_close_grads(layer, x, y_fn, ref_fn, rtol=1e-9, atol=1e-10):
    """Outputs and gradients (x and every parameter) of the layer and of the reference agree."""
    x = x.clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    y, yr = y_fn(x), ref_fn(x)
    torch.testing.assert_close(y, yr, rtol=rtol, atol=atol)
    g = torch.randn_like(y)
    got, want = grads(y, [x] + params, g), grads(yr, [x] + params, g)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, got, want):
        if b is None:
            assert a is None or a.abs().max() == 0, n
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad of {n}: {m}")


# ------------------------------------------------------------------------------------------------
# RMSNorm, RoPE, short convolution
# ------------------------------------------------------------------------------------------------

def test_rmsnorm_matches_formula():
    n = perturb(RMSNorm(12, eps=1e-5).double())
    x = torch.randn(3, 5, 12, dtype=F64)
    torch.testing.assert_close(n(x), ref_rms(x, n.weight, 1e-5))
    with pytest.raises(ValueError, match="RMSNorm"):
        n(torch.randn(2, 11, dtype=F64))


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3])
def test_rope_rotation_and_relative_property(fraction):
    D = 16
    rope = RotaryEmbedding(D, base=500.0, fraction=fraction).double()
    rot = 2 * int(fraction * D // 2)
    x = torch.randn(2, 3, 7, D, dtype=F64)
    pos = torch.randint(0, 1000, (7,))
    torch.testing.assert_close(rope(x, pos), ref_rope(x, pos, 500.0, rot))
    # q·k after rotation depends on the position difference only
    q, k = torch.randn(D, dtype=F64), torch.randn(D, dtype=F64)
    rq = lambda p: rope(q.view(1, 1, 1, D), torch.tensor([p])).flatten()
    d1 = rq(17) @ rope(k.view(1, 1, 1, D), torch.tensor([5])).flatten()
    d2 = rq(112) @ rope(k.view(1, 1, 1, D), torch.tensor([100])).flatten()
    torch.testing.assert_close(d1, d2)
    # batched positions [B, T]
    pb = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(rope(x, pb), torch.stack([ref_rope(x[b:b + 1], pb[b], 500.0, rot)[0]
                                                         for b in range(2)]))


def test_rope_scalings_follow_the_papers():
    D, base, s, L = 32, 10000.0, 4.0, 64
    i = torch.arange(D // 2, dtype=F64)
    theta = base ** (-2 * i / D)
    lin = RotaryEmbedding(D, base, scaling={"type": "linear", "factor": s})
    torch.testing.assert_close(lin.inv_freq64, theta / s)
    ntk = RotaryEmbedding(D, base, scaling={"type": "ntk", "factor": s})
    torch.testing.assert_close(ntk.inv_freq64, (base * s ** (D / (D - 2))) ** (-2 * i / D))
    yarn = RotaryEmbedding(D, base, scaling={"type": "yarn", "factor": s, "original_max_position": L})
    want = []
    for t in theta.tolist():
        r = L / (2 * math.pi / t)
        g = min(max((r - 1.0) / (32.0 - 1.0), 0.0), 1.0)
        want.append((1 - g) * t / s + g * t)
    torch.testing.assert_close(yarn.inv_freq64, torch.tensor(want, dtype=F64))
    assert yarn.attention_factor == pytest.approx(0.1 * math.log(s) + 1)
    x = torch.randn(1, 2, 5, D, dtype=F64)
    pos = torch.arange(5)
    torch.testing.assert_close(yarn.double()(x, pos), ref_rope(x, pos, inv=yarn.inv_freq64, factor=yarn.attention_factor))
    for bad in ({"type": "dynamic", "factor": 2.0}, {"type": "yarn", "factor": 2.0}, {"type": "ntk", "factor": 0.5}):
        with pytest.raises(ValueError):
            RotaryEmbedding(D, scaling=bad)


def test_short_conv_formula_state_and_documents():
    conv = perturb(ShortConv(6, 4, bias=True)).double()
    x = torch.randn(2, 9, 6, dtype=F64)
    w, b = conv.weight, conv.bias
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(4):  # y_t = Σ_j w[:, j] x_{t−3+j}
            if t - 3 + j >= 0:
                want[:, t] += w[:, j] * x[:, t - 3 + j]
    want = F.silu(want + b)
    y, st = conv(x)
    torch.testing.assert_close(y, want)
    y1, s1 = conv(x[:, :4])
    y2, _ = conv(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), want)
    cu = torch.tensor([0, 3, 9])
    yd, _ = conv(x[:1], cu_seqlens=cu)
    torch.testing.assert_close(yd, torch.cat([conv(x[:1, :3])[0], conv(x[:1, 3:])[0]], 1))


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

ATTN_CONFIGS = [
    dict(),
    dict(n_kv_heads=2, qk_norm=True, output_gate=True, bias=True),
    dict(n_kv_heads=1, causal=False, rope=None),
    dict(n_kv_heads=2, rope={"base": 100.0, "fraction": 0.5}, scale=0.3),
]


@pytest.mark.parametrize("cfg", ATTN_CONFIGS, ids=lambda c: ",".join(c) or "mha")
def test_attention_forward_backward_vs_reference(cfg):
    layer = perturb(Attention(24, 4, **cfg).double())
    T = 7
    x = torch.randn(2, T, 24, dtype=F64)
    allowed = causal(T, T) if layer.causal else torch.ones(T, T, dtype=torch.bool)
    assert_close_grads(layer, x, layer, lambda x: ref_attention_layer(layer, x, allowed))


def test_attention_user_mask_and_variants():
    T = 9
    x = torch.randn(1, T, 16, dtype=F64)
    # a user mask ANDs with causal
    layer = perturb(Attention(16, 2, mask=masks.sliding_window(2)).double())
    allowed = causal(T, T) & (torch.arange(T)[:, None] - torch.arange(T)[None, :] <= 2)
    assert_close_grads(layer, x, layer, lambda x: ref_attention_layer(layer, x, allowed))
    # a catalog variant with a learnable piece: softmax with a sink logit per head, owned by the layer
    sink_layer = perturb(Attention(16, 2, variant="softmax_sink").double())
    sink = sink_layer.normalizer.sink
    assert any(p is sink for p in sink_layer.parameters())
    assert_close_grads(sink_layer, x, sink_layer, lambda x: ref_attention_layer(sink_layer, x, causal(T, T), sink=sink))
    # softcap: 30·tanh(s/30) as a bias on the scaled scores
    cap = perturb(Attention(16, 2, variant="softcap", rope=None).double())
    q = heads(x @ cap.q_proj.weight.T, 2)
    k = heads(x @ cap.k_proj.weight.T, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    want = ref_attention_layer(cap, x, causal(T, T), bias=30 * torch.tanh(s / 30) - s)
    torch.testing.assert_close(cap(x), want)
    for bad in ("differential", "gated_delta"):
        with pytest.raises(ValueError, match="Attention"):
            Attention(16, 2, variant=bad)
    with pytest.raises(ValueError, match="not both"):
        Attention(16, 2, variant="softcap", normalizer="sigmoid")


@pytest.mark.parametrize("cfg", [dict(n_kv_heads=2, qk_norm=True, output_gate=True),
                                 dict(mask=masks.sliding_window(3), variant="alibi"),
                                 dict(normalizer=normalizers.sigmoid(-math.log(16.0)), rope={"scaling": {"type": "yarn", "factor": 4.0,
                                                                              "original_max_position": 8}})],
                         ids=["gqa", "window-alibi", "sigmoid-yarn"])
def test_attention_decode_equals_parallel(cfg):
    layer = perturb(Attention(16, 4, layer_idx=3, **cfg).double())
    x = torch.randn(2, 11, 16, dtype=F64)
    full = layer(x)
    cache = DynamicCache()
    outs = [layer(x[:, :4], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    assert cache.seq_len(3) == 11 and cache.seq_len(0) == 0


def test_attention_decode_with_length_dependent_normalizer_differs():
    """sigmoid's default bias −log Lk follows the keys of each call: decoding sees fewer keys than the full
    forward, so the two differ (documented; a fixed bias restores equality, see the test above)."""
    layer = perturb(Attention(16, 4, normalizer="sigmoid").double())
    x = torch.randn(1, 6, 16, dtype=F64)
    cache = DynamicCache()
    outs = [layer(x[:, :3], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(3, 6)]
    assert not torch.allclose(torch.cat(outs, 1), layer(x))


def test_attention_packed_equals_separate():
    layer = perturb(Attention(16, 4, n_kv_heads=2, qk_norm=True).double())
    lens = [3, 6, 1, 5]
    xs = [torch.randn(1, n, 16, dtype=F64) for n in lens]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    packed = layer(torch.cat(xs, 1), cu_seqlens=cu)
    torch.testing.assert_close(packed, torch.cat([layer(t) for t in xs], 1))
    with pytest.raises(ValueError, match="batch 1"):
        layer(torch.randn(2, 15, 16, dtype=F64), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cannot be combined"):
        layer(torch.cat(xs, 1), cu_seqlens=cu, cache=DynamicCache())
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        layer(torch.randn(2, 15, 8, dtype=F64))


# ------------------------------------------------------------------------------------------------
# LinearAttention
# ------------------------------------------------------------------------------------------------

def ref_linear_layer(layer: LinearAttention, x):
    """The layer written token by token from the rule's recurrence (state Dk×Dv per head)."""
    B, T, _ = x.shape
    H, dk, dv, rule = layer.n_heads, layer.head_dim, layer.head_dim_v, layer.rule

    def conv(proj, cv):
        t = x @ proj.weight.T
        w = cv.weight
        y = torch.zeros_like(t)
        for s in range(T):
            for j in range(cv.kernel_size):
                src = s - cv.kernel_size + 1 + j
                if src >= 0:
                    y[:, s] = y[:, s] + w[:, j] * t[:, src]
        return F.silu(y)

    q = conv(layer.q_proj, layer.q_conv).view(B, T, H, dk) if layer.q_proj is not None else None
    k = conv(layer.k_proj, layer.k_conv).view(B, T, H, dk) if layer.k_proj is not None else None
    v = conv(layer.v_proj, layer.v_conv).view(B, T, H, dv)
    A = torch.exp(layer.A_log) if layer.A_log is not None else None
    if rule in ("scalar_gate", "gated_delta"):
        alpha = torch.exp(-A * F.softplus(x @ layer.a_proj.weight.T + layer.dt_bias))[..., None, None]  # [B,T,H,1,1]
    elif rule == "kda":
        f = x @ layer.f_proj[0].weight.T @ layer.f_proj[1].weight.T
        alpha = torch.exp(-A.view(H, 1) * F.softplus(f + layer.dt_bias).view(B, T, H, dk))[..., None]
    elif rule == "gla":
        g = x @ layer.gk_proj[0].weight.T @ layer.gk_proj[1].weight.T + layer.gk_proj[1].bias
        alpha = torch.exp(F.logsigmoid(g) / 16).view(B, T, H, dk)[..., None]
    elif rule == "hgrn2":
        alpha = torch.sigmoid(x @ layer.f_proj.weight.T).view(B, T, H, dk)[..., None]
        k = 1 - alpha[..., 0]
    elif rule == "retention":
        alpha = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=F64).view(1, 1, H, 1, 1).expand(B, T, H, 1, 1)
    else:
        alpha = None
    beta = torch.sigmoid(x @ layer.b_proj.weight.T) if layer.b_proj is not None else None
    if rule in ("delta", "gated_delta", "kda"):
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    q = q * (1.0 if rule == "hgrn2" else 1 / math.sqrt(dk))
    S = torch.zeros(B, H, dk, dv, dtype=F64)
    I = torch.eye(dk, dtype=F64)
    outs = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]  # [B, H, dk], [B, H, dv]
        kv = kt[..., :, None] * vt[..., None, :]
        if rule in ("delta", "gated_delta", "kda"):
            b = beta[:, t][..., None, None]
            P = I - b * kt[..., :, None] * kt[..., None, :]
            if rule == "delta":
                S = P @ S + b * kv
            elif rule == "gated_delta":
                S = alpha[:, t] * (P @ S) + b * kv
            else:
                S = P @ (alpha[:, t] * S) + b * kv
        else:
            S = (S if alpha is None else alpha[:, t] * S) + kv
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, 1)  # [B, T, H, dv]
    o = ref_rms(o, layer.o_norm.weight, layer.o_norm.eps)
    if layer.g_proj is not None:
        gx = (x @ layer.g_proj.weight.T).view(B, T, H, dv)
        o = o * (torch.sigmoid(gx) if rule == "kda" else F.silu(gx))  # Kimi Linear gates with a sigmoid
    return o.reshape(B, T, H * dv) @ layer.o_proj.weight.T


REF_RULES = ["linear", "retention", "scalar_gate", "gla", "hgrn2", "delta", "gated_delta", "kda"]


@pytest.mark.parametrize("rule", REF_RULES)
def test_linear_layer_forward_backward_vs_recurrence(rule):
    layer = perturb(LinearAttention(16, 2, rule, chunk_size=4).double(), 0.05)
    x = torch.randn(2, 7, 16, dtype=F64)
    assert_close_grads(layer, x, layer, lambda x: ref_linear_layer(layer, x), rtol=1e-8, atol=1e-10)


def test_aaren_layer_vs_prefix_softmax():
    layer = perturb(LinearAttention(16, 2, "aaren", output_gate=False).double())
    x = torch.randn(2, 6, 16, dtype=F64)

    def ref(x):
        B, T, _ = x.shape

        def conv(proj, cv):
            t = x @ proj.weight.T
            return F.silu(sum(F.pad(t, (0, 0, 3 - j, 0))[:, :T] * cv.weight[:, j] for j in range(4)))

        k = conv(layer.k_proj, layer.k_conv).view(B, T, 2, 8)
        v = conv(layer.v_proj, layer.v_conv).view(B, T, 2, 8)
        s = torch.einsum("bthd,hd->bht", k, layer.query) / math.sqrt(8)
        outs = []
        for t in range(T):  # o_t = Σ_{j<=t} softmax_j(s_j) v_j
            p = torch.softmax(s[:, :, :t + 1], -1)
            outs.append(torch.einsum("bhj,bjhd->bhd", p, v[:, :t + 1]))
        o = ref_rms(torch.stack(outs, 1), layer.o_norm.weight, layer.o_norm.eps)
        return o.reshape(B, T, 16) @ layer.o_proj.weight.T

    assert_close_grads(layer, x, layer, ref)


@pytest.mark.parametrize("rule", RULES)
def test_linear_decode_equals_chunk(rule):
    layer = perturb(LinearAttention(16, 2, rule, chunk_size=4, num_levels=6, layer_idx=1, num_layers=3).double(),
                    0.05)
    x = torch.randn(2, 10, 16, dtype=F64)
    full = layer(x)
    cache = DynamicCache()
    outs = [layer(x[:, :5], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-8, atol=1e-10)
    st = cache.get(1)
    assert isinstance(st, LinearState) and st.recurrent is not None


@pytest.mark.parametrize("rule", ["gated_delta", "gla", "linear"])
def test_linear_packed_equals_separate(rule):
    layer = perturb(LinearAttention(16, 2, rule, chunk_size=4).double(), 0.05)
    lens = [5, 2, 6]
    xs = [torch.randn(1, n, 16, dtype=F64) for n in lens]
    cu = torch.tensor([0, 5, 7, 13])
    torch.testing.assert_close(layer(torch.cat(xs, 1), cu_seqlens=cu), torch.cat([layer(t) for t in xs], 1))


def test_linear_layer_errors():
    with pytest.raises(ValueError, match="unknown rule"):
        LinearAttention(16, 2, "mamba3")
    with pytest.raises(ValueError, match="log_linear"):
        LinearAttention(16, 2, "gla", base="linear")
    layer = LinearAttention(16, 2, "gla")
    c = DynamicCache()
    c.set(0, torch.zeros(1))
    with pytest.raises(TypeError, match="LinearState"):
        layer(torch.randn(1, 3, 16), cache=c)
