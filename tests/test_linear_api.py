"""linear_attention's contract: clear errors for bad input, feature maps, and the registered variants."""
from __future__ import annotations

import math

import pytest
import torch

from attnkit.catalog import Spec, get_variant, variants
from attnkit.ops.linear import (ALL_RULES, Favor, feature_maps, linear_attention, step)
from test_linear_reference import F64, assert_rel, grads_of, leaves

B, H, T, D, Dv = 2, 2, 10, 4, 3


def qkv(dtype=F64):
    return (torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype),
            torch.randn(B, H, T, Dv, dtype=dtype))


def gate(*shape):
    return torch.nn.functional.logsigmoid(torch.randn(*shape, dtype=F64))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rule="nope"), ValueError, "unknown rule"),
    (dict(rule="linear", form="streaming"), ValueError, "form must be one of"),
    (dict(rule="linear", layout="bhdt"), ValueError, "layout must be"),
    (dict(rule="linear", chunk_size=48), ValueError, "power of two"),
    (dict(rule="linear", chunk_size=0), ValueError, "power of two"),
    (dict(rule="linear", backend="triton"), ValueError, "backend"),
    (dict(rule="linear", scale=float("nan")), TypeError, "scale"),
    (dict(rule="linear", gate=torch.zeros(B, H, T)), ValueError, "takes no gate"),
    (dict(rule="gla"), ValueError, "needs gate"),
    (dict(rule="gla", gate=torch.zeros(B, H, T, dtype=F64)), ValueError, r"gate must be 4-D \[B, H, T, Dk\]"),
    (dict(rule="gla", gate=torch.zeros(B, H, T, D + 1, dtype=F64)), ValueError, "gate must have shape"),
    (dict(rule="scalar_gate", gate=torch.full((B, H, T), 0.1, dtype=F64)), ValueError, "must be ≤ 0"),
    (dict(rule="scalar_gate", gate=torch.full((B, H, T), float("nan"), dtype=F64)), ValueError, "finite"),
    (dict(rule="retention", gate=torch.zeros(H + 1, dtype=F64)), ValueError, r"\[H\]"),
    (dict(rule="lightning", layer_idx=3, num_layers=3), ValueError, "layer_idx < num_layers"),
    (dict(rule="delta"), ValueError, "needs beta"),
    (dict(rule="delta", beta=torch.full((B, H, T), 2.5, dtype=F64)), ValueError, r"beta must lie in \[0.0, 2.0\]"),
    (dict(rule="delta", beta=torch.full((B, H, T), -0.1, dtype=F64)), ValueError, "beta must lie in"),
    (dict(rule="gla", gate=torch.zeros(B, H, T, D, dtype=F64), beta=torch.ones(B, H, T, dtype=F64)), ValueError,
     "takes no beta"),
    (dict(rule="delta", beta=torch.ones(B, H, T, dtype=F64), normalize=True, feature_map="elu"), ValueError,
     "normalize=True needs an additive rule"),
    (dict(rule="linear", normalize=True), ValueError, "positive feature map"),
    (dict(rule="linear", feature_map="cosine"), ValueError, "unknown feature_map"),
    (dict(rule="linear", feature_map=3), TypeError, "feature_map must be"),
    (dict(rule="linear", initial_state=torch.zeros(B, H, D, Dv + 1, dtype=F64)), ValueError,
     "initial_state must have shape"),
    (dict(rule="linear", initial_state=torch.zeros(B, H, D, dtype=F64)), ValueError, "initial_state must be 4-D"),
    (dict(rule="linear", form="chunk", return_weights=True), ValueError, "return_weights needs form='parallel'"),
    (dict(rule="linear", query=torch.zeros(H, D)), ValueError, "aaren's learned query"),
    (dict(rule="linear", level_weights=torch.ones(B, H, T, 5, dtype=F64)), ValueError, "belong to rule 'log_linear'"),
])
def test_bad_arguments(kwargs, exc, match):
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        linear_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        linear_attention(q.tolist(), k, v, rule="linear")
    with pytest.raises(ValueError, match="q must be 4-D"):
        linear_attention(q[0], k, v, rule="linear")
    with pytest.raises(TypeError, match="must share a dtype"):
        linear_attention(q, k.float(), v, rule="linear")
    with pytest.raises(TypeError, match="float64/float32"):
        linear_attention(q.long(), k.long(), v.long(), rule="linear")
    with pytest.raises(ValueError, match="k must have the shape of q"):
        linear_attention(q, k[:, :, :-1], v, rule="linear")
    with pytest.raises(ValueError, match="v must have batch"):
        linear_attention(q, k, v[:, :, :-1], rule="linear")
    with pytest.raises(ValueError, match="must divide one another"):
        linear_attention(q, k, torch.randn(B, 3, T, Dv, dtype=F64), rule="linear")
    with pytest.raises(ValueError, match="hgrn2 derives its keys"):
        linear_attention(q, k, v, rule="hgrn2", gate=gate(B, H, T, D))
    with pytest.raises(TypeError, match="needs per-token queries"):
        linear_attention(None, k, v, rule="linear")


@pytest.mark.parametrize("cu, match", [
    ([0, 5, 5, 10], "strictly increase"), ([1, 5, 10], "start at 0"), ([0, 5, 9], "end at T=10"), ([0], "start at 0"),
])
def test_bad_cu_seqlens(cu, match):
    q, k, v = (t[:1] for t in qkv())
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, rule="linear", cu_seqlens=torch.tensor(cu))


def test_bad_cu_seqlens_types_and_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch 1"):
        linear_attention(q, k, v, rule="linear", cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        linear_attention(q[:1], k[:1], v[:1], rule="linear", cu_seqlens=torch.tensor([0.0, 4.0, 10.0]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        linear_attention(q[:1], k[:1], v[:1], rule="linear", cu_seqlens=torch.tensor([0, 4, 10]),
                         initial_state=torch.zeros(3, H, D, Dv, dtype=F64))


def test_step_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 3-D \[B, H, Dk\] \(one token\)"):
        step(None, q, k, v, rule="linear")
    with pytest.raises(TypeError, match="layout, form and cu_seqlens do not apply"):
        step(None, q[:, :, 0], k[:, :, 0], v[:, :, 0], rule="linear", form="chunk")


# ------------------------------------------------------------------------------------------------
# Feature maps
# ------------------------------------------------------------------------------------------------

def test_taylor2_kernel_identity():
    x, y = torch.randn(7, 5, dtype=F64), torch.randn(7, 5, dtype=F64)
    fx, fy = feature_maps.taylor2(x), feature_maps.taylor2(y)
    s = (x * y).sum(-1) / math.sqrt(5)
    assert fx.shape == (7, 1 + 5 + 25)
    assert_rel((fx * fy).sum(-1), 1 + s + s * s / 2, 1e-12, "φ(x)·φ(y)")


def test_elu_relu_maps():
    x = torch.randn(50, dtype=F64)
    assert_rel(feature_maps.elu(x), torch.where(x > 0, x + 1, torch.exp(x)), 1e-14, "elu+1")
    assert bool((feature_maps.relu(x) >= 0).all()) and feature_maps.elu.positive and not feature_maps.identity.positive


def test_favor_is_seeded_positive_and_unbiased():
    d = 4
    x, y = 0.5 * torch.randn(3, d, dtype=F64), 0.5 * torch.randn(3, d, dtype=F64)
    fm = Favor(num_features=1 << 16, seed=7)
    est = (fm(x) * fm(y)).sum(-1)
    assert bool((fm(x) > 0).all())
    assert_rel(est, torch.exp((x * y).sum(-1) / math.sqrt(d)), 0.05, "E[φ(x)·φ(y)] = exp(x·y/√d)")
    w = fm.projection(d)  # rows must be N(0, I) marginally: mean 0 (std of the mean 1/256), identity covariance
    assert float(w.mean(0).abs().max()) < 0.03
    assert torch.allclose(w.T @ w / w.shape[0], torch.eye(d, dtype=F64), atol=0.05)
    again = Favor(num_features=1 << 16, seed=7)
    assert torch.equal(again(x), fm(x))
    w0 = fm.projection(d).clone()
    fm.redraw()
    assert fm.seed == 8 and not torch.equal(fm.projection(d), w0)
    fm.redraw(seed=7)
    assert torch.equal(fm.projection(d), w0)
    # orthogonal blocks: rows within a block are orthogonal
    w = Favor(num_features=d, seed=1).projection(d)
    gram = w @ w.T
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros_like(gram), atol=1e-12)


def test_feature_map_changes_state_width():
    q, k, v = qkv()
    fm = Favor(num_features=12, seed=3)
    o, S = linear_attention(q, k, v, rule="linear", feature_map=fm, normalize=True, output_final_state=True)
    assert S.shape == (B, H, 12, Dv + 1)
    o2, S2 = linear_attention(q, k, v, rule="linear", feature_map=fm, normalize=True, output_final_state=True,
                              form="recurrent")
    assert_rel(o, o2, 1e-12, "favor chunk vs recurrent")


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

NAMES = ["linear", "linear_elu", "linear_relu", "linear_favor", "linear_taylor2", "retention", "lightning",
         "scalar_gate", "gla", "hgrn2", "delta", "gated_delta", "kda", "log_linear", "log_linear_scalar_gate",
         "log_linear_gated_delta", "aaren", "aaren_causal"]


def test_every_rule_is_registered():
    names = [v.name for v in variants("linear")]
    assert names == NAMES
    assert {v.rule for v in variants("linear")} == set(ALL_RULES)
    for v in variants("linear"):
        assert v.family == "linear" and v.paper and v.summary and v.cache and v.time and v.memory
        assert v.reference_form in v.forms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_make_inputs_contract(dtype):
    spec = Spec(B=2, Hq=4, Hkv=2, Lq=20, Lk=20, D=8, Dv=6, dtype=dtype, device="meta")
    for v in variants("linear"):  # every tensor on spec.device (a meta device catches CPU-built ones)
        assert all(t.device.type == "meta" for t in v.make_inputs(spec).values() if isinstance(t, torch.Tensor)), v.name
    spec = Spec(B=2, Hq=4, Hkv=2, Lq=20, Lk=20, D=8, Dv=6, dtype=dtype)
    for v in variants("linear"):
        inp = v.make_inputs(spec)
        for key, t in inp.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                assert t.is_leaf and not t.requires_grad and t.dtype == dtype, (v.name, key)
                assert bool(torch.isfinite(t).all()), (v.name, key)
        if "gate" in inp and inp["gate"] is not None:
            assert bool((inp["gate"] <= 0).all()), v.name
        if "beta" in inp:
            assert bool(((inp["beta"] > 0) & (inp["beta"] < 1)).all()), v.name
        out = v.fn(**inp, form=v.reference_form, backend="reference")
        o = out[0] if isinstance(out, tuple) else out
        assert o.shape == (2, 4, 20, 6) and o.dtype == dtype and bool(torch.isfinite(o).all()), v.name
        assert (v.state_bytes or v.cache_bytes_per_token)(spec) > 0 and v.flops(spec) > 0


def test_unsupported_patterns():
    for v in variants("linear"):
        causal = Spec.for_pattern("causal-self", 64)
        assert all(v.unsupported(causal, f) is None for f in v.forms), v.name
        assert "cross" in v.unsupported(Spec.for_pattern("causal-cross", 64), "chunk")
        full = Spec.for_pattern("self", 64)
        if v.name == "linear":
            assert v.unsupported(full, "chunk") is None and v.unsupported(full, "parallel") is None
            assert "recurrent" in v.unsupported(full, "recurrent")
        elif v.rule != "linear":
            assert "causal only" in v.unsupported(full, "chunk")  # incl. aaren (a prefix scan)
        assert "parallel form" in v.unsupported(Spec.for_pattern("causal-self", 4096, Hq=4, Hkv=4), "parallel")
    assert "O(T³)" in get_variant("log_linear_gated_delta").unsupported(Spec(Lq=4096, Lk=4096, Hq=1, Hkv=1),
                                                                         "parallel")
    assert "features" in get_variant("linear_taylor2").unsupported(Spec(D=128, Dv=128), "chunk")


def test_state_bytes_constant_in_T_except_log_linear_and_kv():
    s1, s2 = Spec(Lq=1024, Lk=1024, D=64, Dv=64), Spec(Lq=4096, Lk=4096, D=64, Dv=64)
    for v in variants("linear"):
        if v.name in ("log_linear", "log_linear_scalar_gate", "log_linear_gated_delta"):
            assert v.state_bytes(s2) == v.state_bytes(s1) * 13 / 11
        elif v.name == "aaren_causal":  # per-token queries keep a KV cache, not a fixed state
            assert v.state_bytes is None and v.cache_bytes_per_token(s2) == v.cache_bytes_per_token(s1) > 0
        else:
            assert v.state_bytes(s2) == v.state_bytes(s1)
    assert get_variant("gated_delta").state_bytes(s1) == 64 * 64 * 4


def test_registered_forms_agree_like_attnkit_check():
    """What `attnkit check` does: float64 inputs, grad on every floating tensor, each form vs reference_form."""
    spec = Spec(B=1, Hq=2, Hkv=2, Lq=19, Lk=19, D=4, Dv=3, dtype=F64)
    for v in variants("linear"):
        base = v.make_inputs(spec)
        res = {}
        for form in v.forms:
            inp = leaves(base)
            out = v.fn(**inp, form=form, backend="reference")
            o = out[0] if isinstance(out, tuple) else out
            res[form] = (o, grads_of(o, None, inp))
        o_ref, g_ref = res[v.reference_form]
        for form, (o, g) in res.items():
            assert_rel(o, o_ref, 1e-10, f"{v.name} {form}")
            for key in g_ref:
                assert_rel(g[key], g_ref[key], 1e-10, f"{v.name} {form} d/d{key}")
