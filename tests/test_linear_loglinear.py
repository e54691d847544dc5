"""Log-linear attention (Fenwick levels) over its three bases, against the pairwise definition."""
from __future__ import annotations

import pytest
import torch

from attnkit.ops.linear import LogLinearState, linear_attention, step
from test_linear_reference import F64, assert_rel, grads_of, leaves, make_case, ref_pairwise

BASES = ["linear", "scalar_gate", "gated_delta"]
FORMS = ["parallel", "chunk", "recurrent"]


def ll_case(base, B=2, T=29, D=4, Dv=3, L=None):
    c = make_case(base, B=B, Hk=2, Hv=2, T=T, D=D, Dv=Dv, initial_state=False)
    L = L or (T - 1).bit_length() + 1
    c["level_weights"] = 0.3 + torch.rand(B, 2, T, L, dtype=F64)
    return c


def ll_call(base, c, form, state=None, **kw):
    args = {k: c[k] for k in ("gate", "beta") if c.get(k) is not None}
    return linear_attention(c["q"], c["k"], c["v"], rule="log_linear", base=base, level_weights=c["level_weights"],
                            form=form, initial_state=state, output_final_state=True,
                            qk_l2norm=base == "gated_delta", **args, **kw)


def sl(c, a, b):
    return {k: (v[:, :, a:b] if v is not None else None) for k, v in c.items()}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("base", BASES)
def test_forms_match_definition(base, form):
    """Outputs, level states and gradients (q, k, v, gate, β, λ) against the definition
    o_t = Σ_s λ_t^{ℓ(t,s)} q_tᵀ P_{t←s} β_s k_s v_sᵀ."""
    c = ll_case(base)
    ref_in = leaves(c)
    o_ref, _, lv_ref = ref_pairwise(base, ref_in["q"], ref_in["k"], ref_in["v"], ref_in["gate"], ref_in["beta"],
                                    ref_in["level_weights"])
    g_ref = grads_of(o_ref, lv_ref, ref_in)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        inp = leaves(c, dtype)
        o, st = ll_call(base, inp, form, chunk_size=8)
        assert isinstance(st, LogLinearState) and st.position.tolist() == [29, 29]
        assert_rel(o, o_ref, tol, f"{form} output")
        assert_rel(st.levels, lv_ref, tol, f"{form} levels")
        g = grads_of(o, st.levels, inp)
        for key in g_ref:
            assert_rel(g[key], g_ref[key], tol, f"{form} d/d{key}")


@pytest.mark.parametrize("base", BASES)
def test_unit_level_weights_give_the_base_rule(base):
    c = ll_case(base)
    c["level_weights"] = torch.ones_like(c["level_weights"])
    o, st = ll_call(base, c, "chunk", chunk_size=4)
    args = {k: c[k] for k in ("gate", "beta") if c.get(k) is not None}
    o_base, S_base = linear_attention(c["q"], c["k"], c["v"], rule=base, form="recurrent", output_final_state=True,
                                      qk_l2norm=base == "gated_delta", **args)
    assert_rel(o, o_base, 1e-10, "output")
    assert_rel(st.levels.sum(2), S_base, 1e-10, "levels sum to the base state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("base", BASES)
def test_splitting_invariance(base, form):
    """Resuming from a LogLinearState at any position (aligned or not with the chunks) equals one pass."""
    c = ll_case(base, T=45)
    o_all, st_all = ll_call(base, c, form, chunk_size=8)
    for cut in (1, 8, 13, 32, 44):
        o1, st1 = ll_call(base, sl(c, 0, cut), form, chunk_size=8)
        assert st1.position.tolist() == [cut, cut]
        o2, st2 = ll_call(base, sl(c, cut, 45), form, state=st1, chunk_size=8)
        assert_rel(torch.cat([o1, o2], 2), o_all, 1e-10, f"cut {cut}")
        assert_rel(st2.levels, st_all.levels, 1e-10, f"cut {cut} levels")
    # three pieces through different forms
    _, sa = ll_call(base, sl(c, 0, 5), "recurrent")
    ob, sb = ll_call(base, sl(c, 5, 27), "chunk", state=sa, chunk_size=4)
    oc, sc = ll_call(base, sl(c, 27, 45), "parallel", state=sb)
    assert_rel(torch.cat([ob, oc], 2), o_all[:, :, 5:], 1e-10, "mixed forms")
    assert_rel(sc.levels, st_all.levels, 1e-10, "mixed forms levels")


@pytest.mark.parametrize("base", BASES)
def test_step_and_chunk_sizes(base):
    c = ll_case(base, B=1, T=70)
    o_rec, st_rec = ll_call(base, c, "recurrent")
    for C in (16, 32, 64, 128):
        o, st = ll_call(base, c, "chunk", chunk_size=C)
        assert_rel(o, o_rec, 1e-10, f"C={C}")
        assert_rel(st.levels, st_rec.levels, 1e-10, f"C={C} levels")
    st, outs = None, []
    for t in range(70):
        o_t, st = step(st, c["q"][:, :, t], c["k"][:, :, t], c["v"][:, :, t], rule="log_linear", base=base,
                       level_weights=c["level_weights"][:, :, t],
                       gate=None if c["gate"] is None else c["gate"][:, :, t],
                       beta=None if c["beta"] is None else c["beta"][:, :, t], qk_l2norm=base == "gated_delta")
        outs.append(o_t)
    assert_rel(torch.stack(outs, 2), o_rec, 1e-12, "step loop")
    assert st.position.tolist() == [70]


@pytest.mark.parametrize("base", BASES)
def test_varlen_and_attention_matrix(base):
    cu = [0, 9, 10, 33]
    c = ll_case(base, B=1, T=33, L=7)
    o, st = ll_call(base, c, "chunk", chunk_size=8, cu_seqlens=torch.tensor(cu))
    assert st.position.tolist() == [9, 1, 23]
    for i in range(3):
        oi, si = ll_call(base, sl(c, cu[i], cu[i + 1]), "parallel")
        assert_rel(o[:, :, cu[i]:cu[i + 1]], oi, 1e-10, f"doc {i}")
        assert_rel(st.levels[i:i + 1], si.levels, 1e-10, f"doc {i} levels")
    o_par, _, M = ll_call(base, c, "parallel", return_weights=True)
    _, M_ref, _ = ref_pairwise(base, c["q"], c["k"], c["v"], c["gate"], c["beta"], c["level_weights"])
    assert_rel(M, M_ref, 1e-10, "λ-weighted implicit matrix")
    assert_rel(M @ c["v"], o_par, 1e-10, "M V == o")


@pytest.mark.parametrize("base", BASES)
def test_gradcheck(base):
    c = ll_case(base, B=1, T=6, D=3, Dv=2)
    keys = [k for k in ("q", "k", "v", "gate", "beta", "level_weights") if c[k] is not None]
    _, st0 = ll_call(base, sl(c, 0, 3), "recurrent")
    levels0 = st0.levels.detach().clone()

    def f(*xs):
        inp = dict(c, **dict(zip(keys[:-1], xs[:-2])), level_weights=xs[-2])
        o, st = ll_call(base, sl(inp, 3, 6), "chunk", state=LogLinearState(xs[-1], st0.position), chunk_size=2)
        return o, st.levels

    xs = tuple(c[k].clone().requires_grad_() for k in keys) + (levels0.requires_grad_(),)
    assert torch.autograd.gradcheck(f, xs, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_capacity_and_state_errors():
    c = ll_case("linear", B=1, T=20, L=5)  # 5 levels serve positions < 16
    with pytest.raises(ValueError, match="L=5 levels"):
        ll_call("linear", c, "chunk")
    c = ll_case("linear", B=1, T=10, L=5)
    _, st = ll_call("linear", c, "recurrent")
    with pytest.raises(ValueError, match="reaches position 19"):
        ll_call("linear", c, "chunk", state=st)
    with pytest.raises(TypeError, match="LogLinearState"):
        ll_call("linear", c, "chunk", state=st.levels)
    with pytest.raises(ValueError, match=r"initial_state.levels must have shape"):
        ll_call("linear", c, "chunk", state=LogLinearState(st.levels[:, :, :4], st.position))
    c2 = ll_case("linear", B=2, T=4, L=5)
    _, s2 = ll_call("linear", c2, "chunk")
    with pytest.raises(ValueError, match="one position for all rows"):
        ll_call("linear", c2, "chunk", state=LogLinearState(s2.levels, torch.tensor([4, 3])))
    with pytest.raises(ValueError, match="needs level_weights"):
        linear_attention(c["q"], c["k"], c["v"], rule="log_linear")
    with pytest.raises(ValueError, match="base must be one of"):
        linear_attention(c["q"], c["k"], c["v"], rule="log_linear", base="kda", level_weights=c["level_weights"])
