"""Every matrix-state rule, every form, against the float64 definitions (test_linear_reference)."""
from __future__ import annotations

import pytest
import torch

from attnkit.ops.linear import linear_attention, step
from test_linear_reference import (F64, RULE_CASES, api_kwargs, assert_rel, grads_of, leaves, make_case,
                                   ref_linear, ref_pairwise)

FORMS = ["parallel", "chunk", "recurrent"]
TENSORS = ("q", "k", "v", "gate", "beta", "initial_state")


def call(name, inp, form, **kw):
    args = {k: inp[k] for k in ("gate", "beta", "initial_state") if inp.get(k) is not None}
    return linear_attention(inp["q"], inp["k"], inp["v"], form=form, output_final_state=True,
                            **api_kwargs(name), **args, **kw)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", RULE_CASES)
def test_forms_match_definition(name, form):
    """Outputs, final states and gradients w.r.t. q, k, v, gate, β, initial state: float64 ≤ 1e-10,
    float32 ≤ 1e-4 (relative to the float64 definition); T=37 over chunks of 16 (a partial last chunk)."""
    case = make_case(name, Hk=2, Hv=2, T=37, D=6, Dv=5)
    ref_in = leaves(case)
    o_ref, S_ref = ref_linear(name, ref_in["q"], ref_in["k"], ref_in["v"], ref_in["gate"], ref_in["beta"],
                              ref_in["initial_state"])
    g_ref = grads_of(o_ref, S_ref, ref_in)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        inp = leaves(case, dtype)
        o, S = call(name, inp, form, chunk_size=16)
        assert o.dtype == dtype and S.dtype == dtype
        assert_rel(o, o_ref, tol, f"{name}/{form}/{dtype} output")
        assert_rel(S, S_ref, tol, f"{name}/{form}/{dtype} final state")
        g = grads_of(o, S, inp)
        assert set(g) == set(g_ref)
        for key in g_ref:
            assert g[key] is not None, key
            assert_rel(g[key], g_ref[key], tol, f"{name}/{form}/{dtype} d/d{key}")


@pytest.mark.parametrize("name", RULE_CASES)
def test_gradcheck(name):
    """torch.autograd.gradcheck of the chunk form (T=5 in chunks of 2) and parallel form, float64."""
    case = make_case(name, B=1, Hk=1, Hv=2, T=5, D=3, Dv=2)
    keys = [k for k in TENSORS if case[k] is not None]
    for form in ("chunk", "parallel"):
        def f(*xs):
            inp = dict(case, **dict(zip(keys, xs)))
            o, S = call(name, inp, form, chunk_size=2)
            return o, S
        xs = tuple(case[k].clone().requires_grad_() for k in keys)
        assert torch.autograd.gradcheck(f, xs, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("name", RULE_CASES)
def test_chunk_sizes_and_ragged_lengths(name):
    """Chunks of 16/32/64/128 over T = 150 (not a multiple of any) equal the recurrent form."""
    case = make_case(name, B=1, Hk=2, Hv=2, T=150, D=8, Dv=4)
    o_ref, S_ref = call(name, case, "recurrent")
    for C in (16, 32, 64, 128):
        o, S = call(name, case, "chunk", chunk_size=C)
        assert_rel(o, o_ref, 1e-10, f"C={C} output")
        assert_rel(S, S_ref, 1e-10, f"C={C} state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", RULE_CASES)
def test_splitting_invariance(name, form):
    """Two pieces with the state passed between them equal one pass (cuts inside and at chunk edges)."""
    T = 41
    case = make_case(name, B=2, T=T, D=5, Dv=3)
    o_all, S_all = call(name, case, form, chunk_size=8)
    for cut in (1, 8, 19, 40):
        a = {k: (v[:, :, :cut] if k in ("q", "k", "v", "beta") or (k == "gate" and v.dim() > 1) else v)
             for k, v in case.items() if v is not None}
        b = {k: (v[:, :, cut:] if k in ("q", "k", "v", "beta") or (k == "gate" and v.dim() > 1) else v)
             for k, v in case.items() if v is not None and k != "initial_state"}
        a.setdefault("k", None)
        b.setdefault("k", None)
        o1, S1 = call(name, a, form, chunk_size=8)
        o2, S2 = call(name, dict(b, initial_state=S1), form, chunk_size=8)
        assert_rel(torch.cat([o1, o2], 2), o_all, 1e-10, f"cut {cut} output")
        assert_rel(S2, S_all, 1e-10, f"cut {cut} state")


def _slice_case(case, a, b, i):
    out = {}
    for k, v in case.items():
        if v is None:
            out[k] = None
        elif k == "initial_state":
            out[k] = v[i:i + 1]
        elif k == "gate" and v.dim() == 1:
            out[k] = v
        else:
            out[k] = v[:, :, a:b]
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", RULE_CASES)
def test_varlen_equals_separate_calls(name, form):
    """cu_seqlens restarts the state per document (from initial_state[i]); final states per document."""
    cu = [0, 7, 8, 30, 45]
    N = len(cu) - 1
    case = make_case(name, B=1, T=cu[-1], D=5, Dv=3, initial_state=False)
    init = make_case(name, B=N, T=1, D=5, Dv=3)["initial_state"]
    case["initial_state"] = init
    o, S = call(name, case, form, chunk_size=4, cu_seqlens=torch.tensor(cu))
    assert S.shape[0] == N
    for i in range(N):
        oi, Si = call(name, _slice_case(case, cu[i], cu[i + 1], i), form, chunk_size=4)
        assert_rel(o[:, :, cu[i]:cu[i + 1]], oi, 1e-12, f"doc {i} output")
        assert_rel(S[i:i + 1], Si, 1e-12, f"doc {i} state")
    # and the documents really are independent: the definition per document
    o_ref, _ = ref_linear(name, *(case[k][:, :, 7:8] if case[k] is not None else None for k in ("q", "k", "v")),
                          _slice_case(case, 7, 8, 1)["gate"], _slice_case(case, 7, 8, 1)["beta"], init[1:2])
    assert_rel(o[:, :, 7:8], o_ref, 1e-10, "one-token document")


@pytest.mark.parametrize("name", RULE_CASES)
def test_step_loop_equals_recurrent_and_chunk(name):
    case = make_case(name, B=2, Hk=1, Hv=2, T=13, D=4, Dv=3)
    o_rec, S_rec = call(name, case, "recurrent")
    o_chk, S_chk = call(name, case, "chunk", chunk_size=4)
    kw = api_kwargs(name)
    S = case["initial_state"]
    outs = []
    for t in range(13):
        g = case["gate"]
        g_t = None if g is None else (g if g.dim() == 1 else g[:, :, t])
        b_t = None if case["beta"] is None else case["beta"][:, :, t]
        k_t = None if case["k"] is None else case["k"][:, :, t]
        o_t, S = step(S, case["q"][:, :, t], k_t, case["v"][:, :, t], gate=g_t, beta=b_t, **kw)
        outs.append(o_t)
    o_step = torch.stack(outs, 2)
    assert_rel(o_step, o_rec, 1e-12, "step vs recurrent")
    assert_rel(S, S_rec, 1e-12, "step state")
    assert_rel(o_chk, o_rec, 1e-10, "chunk vs recurrent")
    assert_rel(S_chk, S_rec, 1e-10, "chunk state")
    g = case["gate"]
    o0, S0 = step(None, case["q"][:, :, 0], None if case["k"] is None else case["k"][:, :, 0], case["v"][:, :, 0],
                  gate=None if g is None else (g if g.dim() == 1 else g[:, :, 0]),
                  beta=None if case["beta"] is None else case["beta"][:, :, 0], **kw)
    o_ref, _ = call(name, dict(_slice_case(case, 0, 1, 0), initial_state=None), "recurrent")
    assert_rel(o0, o_ref[:, :, 0], 1e-12, "step from an empty state")


@pytest.mark.parametrize("heads", [(2, 4), (4, 2), (1, 3)])
@pytest.mark.parametrize("name", ["linear_elu_norm", "gla", "gated_delta", "kda", "retention"])
def test_grouped_heads(name, heads):
    """q/k with Hk heads and v with Hv heads: the state has max(Hk, Hv) heads, each reading head h // ratio."""
    Hk, Hv = heads
    case = make_case(name, B=1, Hk=Hk, Hv=Hv, T=19, D=4, Dv=3)
    o_ref, S_ref = ref_linear(name, case["q"], case["k"], case["v"], case["gate"], case["beta"], case["initial_state"])
    for form in FORMS:
        o, S = call(name, case, form, chunk_size=8)
        assert o.shape[1] == max(Hk, Hv)
        assert_rel(o, o_ref, 1e-10, f"{form} output")
        assert_rel(S, S_ref, 1e-10, f"{form} state")


@pytest.mark.parametrize("name", ["scalar_gate", "kda", "hgrn2", "linear_elu_norm"])
def test_layout_bthd_and_noncontiguous(name):
    case = make_case(name, B=2, T=21, D=4, Dv=3)
    o_ref, S_ref = call(name, case, "chunk", chunk_size=8)
    tr = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() >= 3 else v)
          for k, v in case.items()}  # same values, non-contiguous strides
    o_nc, _ = call(name, tr, "chunk", chunk_size=8)
    assert not tr["q"].is_contiguous()
    assert_rel(o_nc, o_ref, 1e-12, "non-contiguous")
    bthd = {k: (v.transpose(1, 2) if v is not None and v.dim() >= 3 and k != "initial_state" else v)
            for k, v in case.items()}
    for form in FORMS:
        o, S = call(name, bthd, form, chunk_size=8, layout="bthd")
        assert o.shape == (2, 21, 2, 3)
        assert_rel(o.transpose(1, 2), o_ref, 1e-10, f"bthd {form}")
        assert_rel(S, S_ref, 1e-10, f"bthd {form} state")


@pytest.mark.parametrize("name", RULE_CASES)
def test_single_token(name):
    case = make_case(name, B=2, T=1, D=4, Dv=3)
    o_ref, S_ref = ref_linear(name, case["q"], case["k"], case["v"], case["gate"], case["beta"], case["initial_state"])
    for form in FORMS:
        o, S = call(name, case, form)
        assert_rel(o, o_ref, 1e-12, form)
        assert_rel(S, S_ref, 1e-12, form)


@pytest.mark.parametrize("name", [n for n in RULE_CASES if n != "linear_elu_norm"])
def test_return_weights_is_the_implicit_matrix(name):
    """parallel + return_weights gives M with M[t,s] = q_tᵀ A_t⋯A_{s+1} β_s k_s, and o = M V."""
    case = make_case(name, B=1, Hk=1, Hv=2, T=11, D=4, Dv=3, initial_state=False)
    _, M_ref, _ = ref_pairwise(name, case["q"], case["k"], case["v"], case["gate"], case["beta"])
    o, _, M = call(name, case, "parallel", return_weights=True)
    assert M.shape == (1, 2, 11, 11)
    assert_rel(M, M_ref, 1e-10, "implicit matrix")
    assert_rel(M @ case["v"], o, 1e-10, "M V == o")
    assert bool((M.triu(1) == 0).all())


def test_normalized_attention_matrix_rows():
    """Normalized linear attention: the returned matrix is row-normalized (rows sum to ≈ 1 without S_0)."""
    case = make_case("linear_elu_norm", B=1, T=12, D=4, Dv=3, initial_state=False)
    o, _, M = call("linear_elu_norm", case, "parallel", return_weights=True)
    assert_rel(M.sum(-1), torch.ones_like(M.sum(-1)), 1e-5, "row sums")
    assert_rel(M @ case["v"], o, 1e-12, "M V == o")


@pytest.mark.parametrize("normalize", [False, True])
def test_bidirectional_linear(normalize):
    """causal=False: o_t = φ(q_t)ᵀ (S_0 + Σ_all φ(k_s) v_sᵀ) [/ φ(q_t)ᵀ z]; recurrent form refused."""
    B, H, T, D, Dv = 2, 2, 17, 4, 3
    q, k = torch.randn(B, H, T, D, dtype=F64), torch.randn(B, H, T, D, dtype=F64)
    v = torch.randn(B, H, T, Dv, dtype=F64)
    fq, fk = (torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1) if normalize else (q, k)
    fq = fq / D ** 0.5
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1) if normalize else v
    S = fk.transpose(-1, -2) @ vv
    num = fq @ S
    want = num[..., :-1] / (num[..., -1:] + 1e-6) if normalize else num
    kw = dict(feature_map="elu", normalize=True) if normalize else {}
    for form in ("parallel", "chunk"):
        o, S_fin = linear_attention(q, k, v, rule="linear", causal=False, form=form, output_final_state=True, **kw)
        assert_rel(o, want, 1e-12, form)
        assert_rel(S_fin, S, 1e-12, form + " state")
    with pytest.raises(ValueError, match="bidirectional"):
        linear_attention(q, k, v, rule="linear", causal=False, form="recurrent")
    with pytest.raises(ValueError, match="bidirectional"):
        linear_attention(q, k, v, rule="gla", causal=False, gate=torch.zeros(B, H, T, D, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_float32_state(dtype):
    case = make_case("kda", B=1, T=40, D=8, Dv=4)
    half = {k: (v.to(dtype) if v is not None else None) for k, v in case.items()}
    o, S = call("kda", half, "chunk", chunk_size=16)
    assert o.dtype == dtype and S.dtype == torch.float32
    o_ref, S_ref = call("kda", {k: (v.to(dtype).to(F64) if v is not None else None) for k, v in case.items()},
                        "recurrent")
    assert_rel(o, o_ref, 1e-2, "half output")
    assert_rel(S, S_ref, 1e-4, "float32 state")


def test_retention_and_lightning_default_decays():
    """gate=None uses RetNet's γ_h = 1 − 2^(−5−h) and Lightning's −slope_h·(1 − l/(L−1) + 1e-5)."""
    for name in ("retention", "lightning"):
        case = make_case(name, B=1, Hk=4, Hv=4, T=9, D=3, Dv=2)
        case["gate"] = None
        o_ref, S_ref = ref_linear(name, case["q"], case["k"], case["v"], None, None, case["initial_state"])
        o, S = call(name, case, "chunk", chunk_size=4)
        assert_rel(o, o_ref, 1e-12, name)
        assert_rel(S, S_ref, 1e-12, name)
