"""Strong decays: log gates down to −20 per step over 8k tokens in float32 and bfloat16 stay finite
and accurate (chunk form); the T×T parallel form and the recurrent form likewise at 2k tokens."""
from __future__ import annotations

import pytest
import torch

from attnkit.ops.linear import linear_attention
from test_linear_reference import F64, assert_rel

RULES = ["scalar_gate", "gla", "hgrn2", "gated_delta", "kda"]


def strong_case(rule, T, D=16, Dv=8, dtype=torch.float32):
    q, k, v = torch.randn(1, 1, T, D), torch.randn(1, 1, T, D), torch.randn(1, 1, T, Dv)
    channel = rule in ("gla", "hgrn2", "kda")
    g = -20 * torch.rand(1, 1, T, *((D,) if channel else ()))
    g[:, :, ::3] = 0.0  # runs of no decay next to −20 steps: long sums of very different sizes
    g[:, :, 100:400] = -1e-4
    kw = {"gate": g}
    if rule in ("gated_delta", "kda"):
        kw.update(beta=torch.rand(1, 1, T), qk_l2norm=True)
    args = {"q": q, "k": None if rule == "hgrn2" else k, "v": v}
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) else x
    return {a: cast(x) for a, x in args.items()}, {a: cast(x) for a, x in kw.items()}


def run(rule, args, kw, form, **extra):
    return linear_attention(args["q"], args["k"], args["v"], rule=rule, form=form, output_final_state=True, **kw,
                            **extra)


def as64(d):
    return {a: (x.to(F64) if isinstance(x, torch.Tensor) else x) for a, x in d.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_chunk_form_with_gates_down_to_minus_20(rule, dtype):
    args, kw = strong_case(rule, 8192, dtype=dtype)
    o, S = run(rule, args, kw, "chunk", chunk_size=64)
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(S).all())
    o64, S64 = run(rule, as64(args), as64(kw), "chunk", chunk_size=128)  # same inputs, float64
    assert_rel(o, o64, 1e-4 if dtype == torch.float32 else 1e-2, "output")
    assert_rel(S, S64, 1e-4, "final state (float32 in both cases)")


@pytest.mark.parametrize("rule", ["scalar_gate", "kda"])
def test_parallel_and_recurrent_forms_with_strong_gates(rule):
    args, kw = strong_case(rule, 2048)
    o64, _ = run(rule, as64(args), as64(kw), "chunk", chunk_size=32)
    for form in ("parallel", "recurrent"):
        o, S = run(rule, args, kw, form)
        assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(S).all()), form
        assert_rel(o, o64, 1e-4, form)
    _, _, M = run(rule, args, kw, "parallel", return_weights=True)
    assert bool(torch.isfinite(M).all())


def test_log_linear_with_strong_gates():
    args, kw = strong_case("gated_delta", 2048)
    lam = torch.rand(1, 1, 2048, 12)
    o, st = run("log_linear", args, kw, "chunk", base="gated_delta", level_weights=lam)
    o64, st64 = run("log_linear", as64(args), as64(kw), "chunk", base="gated_delta", level_weights=lam.double(),
                    chunk_size=32)
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(st.levels).all())
    assert_rel(o, o64, 1e-4, "output")
