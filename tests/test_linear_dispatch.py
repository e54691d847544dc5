"""``attnkit.linear_attention`` / ``linear_step`` pick the fused linear kernels (Triton's interpreter here) exactly
where they compute the requested function, record what ran, and refuse or fall back clearly elsewhere: every rule
through the public API against the reference backend, outputs, final states and gradients (float64)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the kernels are decorated as interpreted functions at import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import attnkit  # noqa: E402

from conftest import one_thread  # noqa: E402
from test_linear_reference import F64, RULE_CASES, api_kwargs, leaves, make_case  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _call(inp, name, backend, **kw):
    args = {key: inp[key] for key in ("gate", "beta", "initial_state") if inp.get(key) is not None}
    return attnkit.linear_attention(inp["q"], inp["k"], inp["v"], output_final_state=True, backend=backend,
                                    **api_kwargs(name), **args, **kw)


def _close(name, case, **kw):
    ref_in, inp = leaves(case), leaves(case)
    o_ref, S_ref = _call(ref_in, name, "reference", **kw)
    assert attnkit.last_backend() == f"reference/{kw.get('form', 'chunk')}"
    o, S = _call(inp, name, "triton", **kw)
    assert attnkit.last_backend() == f"triton/fused-{kw.get('form', 'chunk')}"
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-9)
    go, gs = torch.randn_like(o_ref), torch.randn_like(S_ref)
    keys = [key for key, t in inp.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad((o * go).sum() + (S * gs).sum(), [inp[key] for key in keys])
    want = torch.autograd.grad((o_ref * go).sum() + (S_ref * gs).sum(), [ref_in[key] for key in keys])
    for key, a, b in zip(keys, got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8, msg=lambda m: f"d{key}: {m}")


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", RULE_CASES)
def test_every_rule_through_the_public_api(name, form):
    """Grouped heads (q/k over 1 head, v over 2), T not a multiple of the chunk, an initial state, a chunk size the
    kernels take (16) and, for the recurrent form, one they ignore."""
    _close(name, make_case(name, B=1, Hk=1, Hv=2, T=29, D=8, Dv=6), form=form, chunk_size=16 if form == "chunk" else 64)


@pytest.mark.parametrize("fm", ["relu", "favor", "taylor2"])
def test_feature_maps_and_normalize(fm):
    case = make_case("linear", B=1, Hk=2, Hv=2, T=21, D=4, Dv=5, initial_state=False)
    ref_in, inp = leaves(case), leaves(case)
    kw = dict(rule="linear", feature_map=fm, normalize=True, output_final_state=True)
    o_ref, S_ref = attnkit.linear_attention(ref_in["q"], ref_in["k"], ref_in["v"], backend="reference", **kw)
    o, S = attnkit.linear_attention(inp["q"], inp["k"], inp["v"], backend="triton", **kw)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-9)


def test_bthd_layout_and_cu_seqlens():
    T, H, D = 23, 2, 8
    q, k, v = (torch.randn(1, T, H, D, dtype=F64) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, dtype=F64))
    beta = torch.rand(1, T, H, dtype=F64)
    cu = torch.tensor([0, 5, 6, 17, T])
    kw = dict(rule="gated_delta", gate=g, beta=beta, qk_l2norm=True, layout="bthd", cu_seqlens=cu,
              output_final_state=True)
    o, S = attnkit.linear_attention(q, k, v, backend="triton", **kw)
    o_ref, S_ref = attnkit.linear_attention(q, k, v, backend="reference", **kw)
    assert o.shape == (1, T, H, D) and S.shape == (4, H, D, D)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-9)


def test_linear_step_runs_the_fused_recurrent_kernel():
    B, H, D = 2, 2, 8
    case = make_case("kda", B=B, Hk=H, Hv=H, T=1, D=D, Dv=D)
    S = case["initial_state"]
    q, k, v, g, beta = (case[key][:, :, 0] for key in ("q", "k", "v", "gate", "beta"))
    o, S1 = attnkit.linear_step(S, q, k, v, rule="kda", gate=g, beta=beta, qk_l2norm=True, backend="triton")
    assert attnkit.last_backend() == "triton/fused-recurrent"
    o_ref, S_ref = attnkit.linear_step(S, q, k, v, rule="kda", gate=g, beta=beta, qk_l2norm=True,
                                       backend="reference")
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(S1, S_ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kw,why", [
    (dict(rule="linear", form="parallel"), "form 'parallel'"),
    (dict(rule="linear", causal=False), "causal=False"),
    (dict(rule="linear", form="parallel", return_weights=True), "form 'parallel'"),
    (dict(rule="aaren"), "rule 'aaren' has no fused kernel"),
])
def test_triton_refuses_what_the_kernels_do_not_compute(kw, why):
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=F64) for _ in range(3))
    with pytest.raises(ValueError, match=f"{why}.*Supported: rules linear"):
        attnkit.linear_attention(q, k, v, backend="triton", **kw)


def test_auto_on_cpu_runs_the_reference_quietly(recwarn, monkeypatch):
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=F64) for _ in range(3))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # another module may have restored an unset variable
    attnkit.linear_attention(q, k, v, rule="linear", backend="auto")
    assert attnkit.last_backend() == "reference/chunk"
    assert not [w for w in recwarn if "slow path" in str(w.message)]
