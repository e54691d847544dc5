"""Aaren: prefix softmax as an RNN. Per-token queries equal attnkit.attention with the causal mask."""
from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.ops.linear import AarenState, linear_attention, step
from test_linear_reference import F64, assert_rel, grads_of, leaves

LEARNED_FORMS = ["parallel", "scan", "chunk", "recurrent"]


def ref_prefix_softmax(query, k, v, scale=None):
    """o_t = Σ_{i≤t} e^{s_i} v_i / Σ_{i≤t} e^{s_i}, s_i = scale·query·k_i, by explicit loops over t."""
    B, Hkv, T, D = k.shape
    H = query.shape[-2]
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    qv = query if query.dim() == 3 else query[None].expand(B, H, D)
    s = torch.einsum("bhtd,bhd->bht", k, qv) * (scale or 1 / math.sqrt(D))
    outs = [torch.softmax(s[:, :, :t + 1], -1)[..., None].mul(v[:, :, :t + 1]).sum(2) for t in range(T)]
    return torch.stack(outs, 2), s


def case(B=2, Hq=4, Hkv=2, T=27, D=5, Dv=3, big=1.0):
    return {"k": torch.randn(B, Hkv, T, D, dtype=F64), "v": torch.randn(B, Hkv, T, Dv, dtype=F64),
            "query": big * torch.randn(Hq, D, dtype=F64)}


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
def test_per_token_queries_equal_causal_softmax(form):
    """Aaren over per-token queries is causal softmax attention: compare with the core API, incl. GQA."""
    B, Hq, Hkv, T, D, Dv = 2, 4, 2, 33, 6, 5
    q, k, v = (torch.randn(B, Hq, T, D, dtype=F64), torch.randn(B, Hkv, T, D, dtype=F64),
               torch.randn(B, Hkv, T, Dv, dtype=F64))
    want = attnkit.attention(q, k, v, mask=masks.causal, form="materialized")
    inp = leaves({"q": q, "k": k, "v": v})
    o, st = linear_attention(inp["q"], inp["k"], inp["v"], rule="aaren", form=form, chunk_size=8)
    assert st is None
    assert_rel(o, want, 1e-12, form)
    ref_in = leaves({"q": q, "k": k, "v": v})
    g_ref = grads_of(attnkit.attention(ref_in["q"], ref_in["k"], ref_in["v"], mask=masks.causal), None, ref_in)
    g = grads_of(o, None, inp)
    for key in g_ref:
        assert_rel(g[key], g_ref[key], 1e-10, f"d/d{key}")
    if form == "parallel":
        o2, _, w = linear_attention(q, k, v, rule="aaren", form="parallel", return_weights=True)
        assert_rel(w.sum(-1), torch.ones_like(w.sum(-1)), 1e-12, "rows sum to 1")
        assert bool((w.triu(1) == 0).all())


@pytest.mark.parametrize("form", LEARNED_FORMS)
def test_learned_query_forms(form):
    """All forms equal the definition (outputs, final state, gradients w.r.t. query, k, v, initial state)."""
    c = case(big=3.0)  # large scores exercise the running max
    st0 = AarenState(torch.randn(2, 4, dtype=F64), torch.randn(2, 4, 3, dtype=F64), 1 + torch.rand(2, 4, dtype=F64))
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        inp = leaves(dict(c, m0=st0.max, u0=st0.num, w0=st0.den), dtype)
        o, st = linear_attention(None, inp["k"], inp["v"], rule="aaren", query=inp["query"], form=form, chunk_size=8,
                                 initial_state=AarenState(inp["m0"], inp["u0"], inp["w0"]), output_final_state=True)
        # reference: the initial state is a virtual first token (score m0, value u0/w0, weight w0)
        ref_in = leaves(dict(c, m0=st0.max, u0=st0.num, w0=st0.den))
        o_plain, s = ref_prefix_softmax(ref_in["query"], ref_in["k"], ref_in["v"])
        w = torch.exp(s - ref_in["m0"][..., None])  # weights relative to the state's max
        num = torch.cumsum(w[..., None] * ref_in["v"].repeat_interleave(2, 1), 2) + ref_in["u0"][:, :, None]
        den = torch.cumsum(w, 2) + ref_in["w0"][..., None]
        o_ref = num / den[..., None]
        assert_rel(o, o_ref, tol, f"{form} {dtype}")
        # final state (m, u, w) is defined up to the choice of m: compare u/w and w·e^m
        assert_rel(st.num / st.den[..., None], num[:, :, -1] / den[:, :, -1, None], tol, "state u/w")
        assert_rel(st.den * torch.exp(st.max - ref_in["m0"]), den[:, :, -1], tol, "state w·e^m")
        g_ref = grads_of(o_ref, None, ref_in)
        g = grads_of(o, None, inp)
        for key in g_ref:
            assert_rel(g[key], g_ref[key], tol, f"{form} {dtype} d/d{key}")
    o_nostate, _ = linear_attention(None, c["k"], c["v"], rule="aaren", query=c["query"], form=form, chunk_size=8)
    assert_rel(o_nostate, ref_prefix_softmax(c["query"], c["k"], c["v"])[0], 1e-10, "no initial state")


@pytest.mark.parametrize("form", LEARNED_FORMS)
def test_learned_query_split_step_varlen(form):
    c = case(B=1, T=40)
    o_all, st_all = linear_attention(None, c["k"], c["v"], rule="aaren", query=c["query"], form=form,
                                     output_final_state=True, chunk_size=8)
    for cut in (1, 8, 21):
        o1, s1 = linear_attention(None, c["k"][:, :, :cut], c["v"][:, :, :cut], rule="aaren", query=c["query"],
                                  form=form, output_final_state=True, chunk_size=8)
        o2, s2 = linear_attention(None, c["k"][:, :, cut:], c["v"][:, :, cut:], rule="aaren", query=c["query"],
                                  form=form, initial_state=s1, output_final_state=True, chunk_size=8)
        assert_rel(torch.cat([o1, o2], 2), o_all, 1e-12, f"cut {cut}")
        assert_rel(s2.num / s2.den[..., None], st_all.num / st_all.den[..., None], 1e-12, "state")
    st, outs = None, []
    for t in range(40):
        o_t, st = step(st, None, c["k"][:, :, t], c["v"][:, :, t], rule="aaren", query=c["query"])
        outs.append(o_t)
    assert_rel(torch.stack(outs, 2), o_all, 1e-12, "step loop")
    cu = [0, 3, 4, 40]
    o, st = linear_attention(None, c["k"], c["v"], rule="aaren", query=c["query"], form=form,
                             cu_seqlens=torch.tensor(cu), output_final_state=True, chunk_size=8)
    assert st.max.shape == (3, 4)
    for a, b in zip(cu, cu[1:]):
        assert_rel(o[:, :, a:b], ref_prefix_softmax(c["query"], c["k"][:, :, a:b], c["v"][:, :, a:b])[0], 1e-10,
                   f"doc {a}:{b}")


def test_gradcheck_and_batched_query():
    c = case(B=2, Hq=2, Hkv=1, T=5, D=3, Dv=2)
    qb = torch.randn(2, 2, 3, dtype=F64)
    for form in LEARNED_FORMS:
        f = lambda k, v, q: linear_attention(None, k, v, rule="aaren", query=q, form=form, chunk_size=2)[0]
        assert torch.autograd.gradcheck(f, (c["k"].requires_grad_(), c["v"].requires_grad_(), qb.requires_grad_()),
                                        atol=1e-8, rtol=1e-6, fast_mode=True)
    o = linear_attention(None, c["k"], c["v"], rule="aaren", query=qb, form="chunk")[0]
    for b in range(2):
        assert_rel(o[b:b + 1], ref_prefix_softmax(qb[b], c["k"][b:b + 1], c["v"][b:b + 1])[0], 1e-12, f"row {b}")


def test_extreme_scores_stay_finite():
    """Scores spanning ±1e4 (float32): the running max keeps every form finite and exact."""
    k = torch.randn(1, 1, 300, 4)
    v = torch.randn(1, 1, 300, 2)
    q = torch.tensor([[4000.0, 0, 0, 0]])
    ref = ref_prefix_softmax(q.double(), k.double(), v.double())[0]
    # float32 scores of size |s| carry an absolute rounding error ~|s|·2⁻²⁴ into every exponent: the bound follows
    tol = max(1e-5, 4 * float((k[0, 0] @ q[0]).abs().max()) * 2.0 ** -24)
    for form in LEARNED_FORMS:
        o, _ = linear_attention(None, k, v, rule="aaren", query=q, form=form, chunk_size=32)
        assert bool(torch.isfinite(o).all()), form
        assert_rel(o, ref, tol, form)


def test_aaren_errors():
    c = case()
    q = torch.randn(2, 4, 27, 5, dtype=F64)
    with pytest.raises(ValueError, match="not both"):
        linear_attention(q, c["k"], c["v"], rule="aaren", query=c["query"])
    with pytest.raises(ValueError, match="no fixed-size state"):
        linear_attention(q, c["k"], c["v"], rule="aaren", output_final_state=True)
    with pytest.raises(ValueError, match="scan"):
        linear_attention(q, c["k"], c["v"], rule="aaren", form="scan")
    with pytest.raises(ValueError, match=r"\[H, Dk\]"):
        linear_attention(None, c["k"], c["v"], rule="aaren", query=torch.randn(4, 6, dtype=F64))
    with pytest.raises(ValueError, match="takes no gate"):
        linear_attention(None, c["k"], c["v"], rule="aaren", query=c["query"], gate=torch.zeros(2, 4, 27))
    with pytest.raises(TypeError, match="AarenState"):
        linear_attention(None, c["k"], c["v"], rule="aaren", query=c["query"], initial_state=torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="causal only"):
        linear_attention(None, c["k"], c["v"], rule="aaren", query=c["query"], causal=False)
