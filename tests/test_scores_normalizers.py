"""Score mods and normalizers against their formulas, in every form, with gradients of every learnable
parameter (ALiBi slopes, T5 table, Scalable-Softmax s, temperatures, pointwise params, sink logits, bias).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import attnkit
import attnkit.masks as M
import attnkit.normalizers as N
import attnkit.scores as S
from conftest import (F64, FORMS, alibi_slopes_ref, assert_close, check_form, mask_case, rand_qkv, randn,
                      ref_attention, run_form, t5_bucket_ref)

SHAPES = [(9, 9), (5, 12), (12, 5)]


def t5_table_ref(Lq, Lk, bidirectional, nb, md):
    """Bucket of every (i, j) from the T5 definition, by loops (aligned positions)."""
    off = Lk - Lq
    return torch.tensor([[t5_bucket_ref(j - (i + off), bidirectional, nb, md) for j in range(Lk)] for i in range(Lq)])


def mod_case(name: str, H: int, Lq: int, Lk: int):
    """(attnkit score mod, reference fn(s, Pos), learnable tensors) with fresh random parameters."""
    if name == "softcap":
        c = random.uniform(0.5, 3.0)
        return S.softcap(c), lambda s, P: c * torch.tanh(s / c), []
    if name == "alibi-default":
        sl = torch.tensor(alibi_slopes_ref(H), dtype=F64)
        return S.alibi(), lambda s, P: s - sl.view(1, -1, 1, 1) * (P.q - P.kv).abs(), []
    if name == "alibi-learnable":
        sl = (torch.rand(H, dtype=F64) + 0.1).requires_grad_()
        return S.alibi(sl), lambda s, P: s - sl.view(1, -1, 1, 1) * (P.q - P.kv).abs(), [sl]
    if name in ("t5-bidirectional", "t5-causal"):
        bidir = name == "t5-bidirectional"
        nb, md = random.choice([(8, 12), (10, 20), (16, 40)])
        if not bidir:
            nb, md = nb // 2 + 2, md
        table = randn(nb, H, requires_grad=True)
        buckets = t5_table_ref(Lq, Lk, bidir, nb, md)
        mod = S.relative_bias(H, num_buckets=nb, max_distance=md, bidirectional=bidir, table=table)
        return mod, lambda s, P: s + table[buckets].permute(2, 0, 1).unsqueeze(0), [table]
    if name == "ssmax-scalar":
        a = random.uniform(0.2, 0.8)
        return S.ssmax(a), lambda s, P: s * a * torch.log(P.n.clamp(min=1)), []
    if name == "ssmax-learnable":
        a = (0.2 + torch.rand(H, dtype=F64)).requires_grad_()
        return S.ssmax(a), lambda s, P: s * a.view(1, -1, 1, 1) * torch.log(P.n.clamp(min=1)), [a]
    if name == "temperature-scalar":
        t = random.uniform(0.3, 2.0)
        return S.temperature(t), lambda s, P: s / t, []
    if name == "temperature-learnable":
        t = (0.5 + torch.rand(H, dtype=F64)).requires_grad_()
        return S.temperature(t), lambda s, P: s / t.view(1, -1, 1, 1), [t]
    if name == "pointwise":
        w = randn(H, requires_grad=True)

        def fn(s, b, h, q, kv):
            return s + w[h] * torch.cos(0.3 * (q - kv)) + 0.1 * b - 0.05 * h * (kv % 3)
        return S.pointwise(fn, params=[w]), lambda s, P: fn(s, P.b, P.h, P.q, P.kv), [w]
    if name == "scalar-params":  # 0-dim learnable temperature and ALiBi slope shared by all heads
        t = torch.tensor(random.uniform(0.5, 1.5), dtype=F64, requires_grad=True)
        sl = torch.tensor(random.uniform(0.1, 0.6), dtype=F64, requires_grad=True)
        return [S.temperature(t), S.alibi(sl)], lambda s, P: s / t - sl * (P.q - P.kv).abs(), [t, sl]
    if name == "list":  # temperature, then softcap, then ALiBi: order matters
        t = (0.5 + torch.rand(H, dtype=F64)).requires_grad_()
        sl = (torch.rand(H, dtype=F64) + 0.1).requires_grad_()
        mods = [S.temperature(t), S.softcap(2.0), S.alibi(sl)]
        return mods, lambda s, P: (2.0 * torch.tanh((s / t.view(1, -1, 1, 1)) / 2.0)
                                   - sl.view(1, -1, 1, 1) * (P.q - P.kv).abs()), [t, sl]
    if name == "compose":
        a = (0.2 + torch.rand(H, dtype=F64)).requires_grad_()
        table = randn(8, H, requires_grad=True)
        buckets = t5_table_ref(Lq, Lk, True, 8, 12)
        mod = S.compose(S.relative_bias(H, 8, 12, True, table=table), S.ssmax(a), S.softcap(1.5))
        return mod, lambda s, P: 1.5 * torch.tanh((s + table[buckets].permute(2, 0, 1).unsqueeze(0))
                                                  * a.view(1, -1, 1, 1) * torch.log(P.n.clamp(min=1)) / 1.5), \
            [table, a]
    raise KeyError(name)


MODS = ["softcap", "alibi-default", "alibi-learnable", "t5-bidirectional", "t5-causal", "ssmax-scalar",
        "ssmax-learnable", "temperature-scalar", "temperature-learnable", "pointwise", "scalar-params", "list",
        "compose"]


@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", MODS)
def test_score_mod(name, form, Lq, Lk):
    """Each score mod in each form: output, lse and gradients of q, k, v and of its parameters."""
    B, Hq, Hkv = 2, 4, 2
    names = ["causal-no-first", "streamingllm", "causal"]
    if form != "recurrent":  # keys after the query too (ALiBi's |q - kv|, T5's future buckets)
        names = ["full", "window2", "prefix-batch", "predicate-bh", "anti-causal"]
    rm = mask_case(random.choice(names), B, Hq, Lq, Lk)
    m = rm.dense(B, Hq, Lq, Lk)
    mod, ref, params = mod_case(name, Hq, Lq, Lk)
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 4, 3, requires_grad=True)
    check_form(form, q, k, v, m, mask=rm.ak, score_mod=mod, ref_mod=ref, params=params,
               blocks=random.choice([(3, 5), (4, 2), (2, 3)]), what=f"{name} {rm}")


@pytest.mark.parametrize("form", ["materialized", "streaming-blocks", "recurrent"])
@pytest.mark.parametrize("name", ["alibi-learnable", "t5-causal", "ssmax-learnable", "temperature-learnable",
                                  "pointwise", "compose"])
def test_score_mod_gradcheck(name, form):
    """torch.autograd.gradcheck at float64 w.r.t. q and the score mod's parameters (k, v in test_attention)."""
    B, H, Lq, Lk = 1, 2, 4, 5
    q, k, v = rand_qkv(B, H, 1, Lq, Lk, 2, 2)
    q.requires_grad_()
    _, _, params = mod_case(name, H, Lq, Lk)

    def fn(q, *ps):
        ps = iter(ps)
        mod = {
            "alibi-learnable": lambda: S.alibi(next(ps)),
            "t5-causal": lambda: S.relative_bias(H, 4, 6, False, table=next(ps)),
            "ssmax-learnable": lambda: S.ssmax(next(ps)),
            "temperature-learnable": lambda: S.temperature(next(ps)),
            "pointwise": lambda: (lambda w: S.pointwise(lambda s, b, h, qi, kv: s * w[h] + 0.1 * w[h] ** 2 * kv,
                                                        params=[w]))(next(ps)),
            "compose": lambda: S.compose(S.relative_bias(H, 8, 12, True, table=next(ps)), S.ssmax(next(ps))),
        }[name]()
        return run_form(form, q, k, v, mask=M.causal & M.sliding_window(3), score_mod=mod, blocks=(2, 3),
                        return_lse=True)

    if name == "t5-causal":
        params = [randn(4, H, requires_grad=True)]
    assert torch.autograd.gradcheck(fn, (q, *params))


def test_t5_bucket_matches_definition():
    """attnkit's bucket function against T5's relative_position_bucket over a wide range of distances."""
    rel = torch.arange(-300, 301)
    for nb, md, bidir in [(32, 128, True), (32, 128, False), (8, 12, True), (6, 20, False), (10, 17, True)]:
        want = torch.tensor([t5_bucket_ref(int(r), bidir, nb, md) for r in rel])
        got = S.t5_bucket(rel, nb, md, bidir)
        assert torch.equal(got, want), f"buckets={nb} max_distance={md} bidirectional={bidir}"


@pytest.mark.parametrize("H", [1, 2, 5, 6, 8, 12, 16])
def test_alibi_default_slopes(H):
    assert_close(S.alibi_slopes(H), torch.tensor(alibi_slopes_ref(H), dtype=F64), atol=0, rtol=1e-15)
    q, k, v = rand_qkv(1, H, 1, 7, 7, 4, 4)
    sl = torch.tensor(alibi_slopes_ref(H), dtype=F64).view(1, -1, 1, 1)
    for name in ("causal", "full"):
        m = mask_case(name, 1, H, 7, 7).dense(1, H, 7, 7)
        want, _, _ = ref_attention(q, k, v, m, mod=lambda s, P: s - sl * (P.q - P.kv).abs())
        assert_close(attnkit.attention(q, k, v, mask=name, score_mod=S.alibi(), backend="reference"), want)


def test_score_mods_are_modules_with_parameters():
    table = nn.Parameter(torch.randn(8, 4))
    slopes = nn.Parameter(torch.rand(4))
    mod = S.compose(S.relative_bias(4, 8, 12, True, table=table), S.alibi(slopes), S.softcap(5.0))
    assert isinstance(mod, nn.Module)
    ids = {id(p) for p in mod.parameters()}
    assert id(table) in ids and id(slopes) in ids
    rb = S.relative_bias(4)
    assert [tuple(p.shape) for p in rb.parameters()] == [(32, 4)] and next(rb.parameters()).requires_grad


@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_learnable_float32_parameters_with_float32_inputs(form):
    """nn.Parameter (float32) score-mod and sink parameters receive float32 gradients equal to float64 ones."""
    H = 4
    slopes32 = nn.Parameter(torch.rand(H) + 0.1)
    sink32 = nn.Parameter(torch.randn(H))
    q, k, v = rand_qkv(1, H, 2, 8, 8, 4, 4, dtype=torch.float32)
    out = attnkit.attention(q, k, v, mask="causal", score_mod=S.alibi(slopes32),
                            normalizer=N.softmax_sink(sink32), form=form)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    sl64 = slopes32.detach().double().requires_grad_()
    sk64 = sink32.detach().double().requires_grad_()
    m = mask_case("causal", 1, H, 8, 8).dense(1, H, 8, 8)
    ro, _, _ = ref_attention(q.double(), k.double(), v.double(), m,
                             mod=lambda s, P: s - sl64.view(1, -1, 1, 1) * (P.q - P.kv).abs(), kind="sink", sink=sk64)
    (ro * g.double()).sum().backward()
    assert slopes32.grad.dtype == torch.float32 and sink32.grad.dtype == torch.float32
    assert_close(slopes32.grad, sl64.grad, atol=1e-4, rtol=1e-4)
    assert_close(sink32.grad, sk64.grad, atol=1e-4, rtol=1e-4)


def test_undeclared_learnable_tensor_is_refused_not_ignored():
    """A pointwise mod closing over a tensor that requires grad must declare it (params=[...]) for streaming."""
    w = torch.randn(2, dtype=F64, requires_grad=True)
    q, k, v = rand_qkv(1, 2, 2, 5, 5, 3, 3, requires_grad=True)
    mod = S.pointwise(lambda s, b, h, q, kv: s + w[h])
    with pytest.raises(ValueError, match="params"):
        attnkit.attention(q, k, v, score_mod=mod, form="streaming")


# ------------------------------------------------------------------------------------------------
# Normalizers
# ------------------------------------------------------------------------------------------------

def norm_case(name: str, H: int):
    """(attnkit normalizer, reference kind, reference kwargs, learnable tensors)."""
    if name == "softmax":
        return "softmax", "softmax", {}, []
    if name == "softmax-sink":
        s = randn(H, requires_grad=True)
        return N.softmax_sink(s), "sink", {"sink": s}, [s]
    if name == "softmax-sink-init":
        n = N.softmax_sink(H)  # a head count: learnable logits initialised at 0
        (p,) = list(n.parameters())
        assert p.shape == (H,) and p.requires_grad and torch.equal(p.detach(), torch.zeros(H))
        return n, "sink", {"sink": p}, [p]
    if name == "off-by-one":
        return random.choice(["softmax_off_by_one", N.softmax_off_by_one()]), "off_by_one", {}, []
    if name == "relaxed":
        g = random.uniform(0.05, 0.9)
        return N.relaxed(g), "relaxed", {"gamma": g}, []
    if name == "sigmoid":
        return random.choice(["sigmoid", N.sigmoid()]), "sigmoid", {}, []
    if name == "sigmoid-bias":
        b = random.uniform(-3, 1)
        return N.sigmoid(b), "sigmoid", {"bias": b}, []
    if name == "sigmoid-bias-learnable":
        b = randn(H, requires_grad=True)
        return N.sigmoid(b), "sigmoid", {"bias": b}, [b]
    if name in ("relu", "relu2", "none"):
        return random.choice([name, getattr(N, name)()]), name, {}, []
    raise KeyError(name)


NORMS = ["softmax", "softmax-sink", "softmax-sink-init", "off-by-one", "relaxed", "sigmoid", "sigmoid-bias",
         "sigmoid-bias-learnable", "relu", "relu2", "none"]


@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NORMS)
def test_normalizer(name, form, Lq, Lk):
    """Each normalizer in each form (with fully masked rows): output, lse, gradients incl. sink / bias."""
    B, Hq, Hkv = 2, 4, 2
    rm = mask_case(random.choice(["causal-no-first", "streamingllm", "causal-dilated"]), B, Hq, Lq, Lk)
    m = rm.dense(B, Hq, Lq, Lk)
    norm, kind, kw, params = norm_case(name, Hq)
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 4, 3, requires_grad=True)
    check_form(form, q, k, v, m, mask=rm.ak, normalizer=norm, ref_kind=kind, ref_kw=kw, params=params,
               blocks=random.choice([(3, 5), (4, 2), (2, 3)]), what=f"{name} {rm}")


@pytest.mark.parametrize("form", ["materialized", "streaming-blocks", "recurrent"])
@pytest.mark.parametrize("name", ["softmax-sink", "off-by-one", "relaxed", "sigmoid-bias-learnable", "relu",
                                  "relu2", "none"])
def test_normalizer_gradcheck(name, form):
    """gradcheck at float64 w.r.t. q, v and the sink logits / sigmoid bias."""
    B, H, Lq, Lk = 1, 2, 4, 5
    q, k, v = rand_qkv(B, H, 1, Lq, Lk, 2, 2)
    q.requires_grad_()
    v.requires_grad_()
    norm, kind, kw, params = norm_case(name, H)

    def fn(q, v, *ps):
        n = {"softmax-sink": lambda: N.softmax_sink(ps[0]),
             "sigmoid-bias-learnable": lambda: N.sigmoid(ps[0])}.get(name, lambda: norm)()
        return run_form(form, q, k, v, mask=M.causal & ~M.sinks(1), normalizer=n, blocks=(2, 3))

    assert torch.autograd.gradcheck(fn, (q, v, *params))


def test_sigmoid_default_bias_uses_all_keys():
    """Default sigmoid bias is -log Lk (all keys, not visible keys): with a causal mask row i sums
    sigmoid(s_ij - log Lk) v_j."""
    q, k, v = rand_qkv(1, 2, 2, 6, 10, 4, 4)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0
    m = mask_case("causal", 1, 2, 6, 10).dense(1, 2, 6, 10)
    want = (torch.sigmoid(s - math.log(10)) * m) @ v
    assert_close(attnkit.attention(q, k, v, mask="causal", normalizer="sigmoid", backend="reference"), want)


def test_sink_lse_includes_sink_logit():
    """lse of softmax_sink is log(exp σ_h + Σ exp s); off-by-one is log(1 + Σ exp s)."""
    q, k, v = rand_qkv(1, 2, 2, 3, 4, 4, 4)
    sig = torch.tensor([0.3, -1.2], dtype=F64)
    _, lse = attnkit.attention(q, k, v, normalizer=N.softmax_sink(sig), return_lse=True, backend="reference")
    s = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0
    want = torch.log(torch.exp(sig).view(1, 2, 1) + torch.exp(s).sum(-1))
    assert_close(lse, want)
    _, lse1 = attnkit.attention(q, k, v, normalizer="softmax_off_by_one", return_lse=True, backend="reference")
    assert_close(lse1, torch.log(1 + torch.exp(s).sum(-1)))


PAIRS = [("ssmax-learnable", "relu2"), ("alibi-learnable", "softmax-sink"), ("t5-bidirectional", "relaxed"),
         ("softcap", "sigmoid-bias-learnable"), ("pointwise", "off-by-one"), ("compose", "relu"),
         ("temperature-learnable", "none"), ("ssmax-scalar", "relaxed"), ("list", "softmax-sink-init")]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mod_name,norm_name", PAIRS)
def test_mod_with_normalizer(mod_name, norm_name, form):
    """Score mod and normalizer together, under per-batch / per-head masks where the form allows."""
    B, Hq, Hkv = 2, 4, 1
    Lq, Lk = random.choice(SHAPES)
    names = ["causal-no-first", "streamingllm", "causal-dilated"] if form == "recurrent" else \
        ["prefix-batch", "predicate-bh", "doc-batch-unsorted", "window-or-doc", "cu_seqlens", "anti-causal"]
    if Lq > Lk:
        names = [n for n in names if "doc" not in n and n != "cu_seqlens"]
    rm = mask_case(random.choice(names), B, Hq, Lq, Lk)
    m = rm.dense(B, Hq, Lq, Lk)
    mod, ref, mparams = mod_case(mod_name, Hq, Lq, Lk)
    norm, kind, kw, nparams = norm_case(norm_name, Hq)
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 4, 3, requires_grad=True)
    check_form(form, q, k, v, m, mask=rm.ak, score_mod=mod, ref_mod=ref, normalizer=norm, ref_kind=kind,
               ref_kw=kw, params=mparams + nparams, blocks=random.choice([(3, 5), (4, 2), (2, 3), (1, 4)]),
               what=f"{mod_name}+{norm_name} {rm} Lq={Lq} Lk={Lk}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_half_precision_with_mods_and_sink(dtype, form):
    """Low-precision inputs with ALiBi + softcap and a large sink logit: output in the input dtype, close
    to the float64 reference of the same inputs."""
    H = 4
    q, k, v = rand_qkv(1, H, 2, 10, 10, 8, 8, dtype=dtype)
    sink = torch.tensor([8.0, -8.0, 0.5, 2.0], dtype=F64)
    mods = [S.alibi(), S.softcap(4.0)]
    out = attnkit.attention(q, k, v, mask="causal", score_mod=mods, normalizer=N.softmax_sink(sink), form=form)
    assert out.dtype == dtype
    sl = torch.tensor(alibi_slopes_ref(H), dtype=F64).view(1, -1, 1, 1)
    m = mask_case("causal", 1, H, 10, 10).dense(1, H, 10, 10)
    ro, _, _ = ref_attention(q.to(F64), k.to(F64), v.to(F64), m, kind="sink", sink=sink,
                             mod=lambda s, P: 4.0 * torch.tanh((s - sl * (P.q - P.kv).abs()) / 4.0))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert_close(out, ro, atol=tol, rtol=tol)
