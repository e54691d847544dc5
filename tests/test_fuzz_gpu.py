"""The attention fuzzer on a CUDA GPU (marked ``gpu``; skipped without CUDA): the properties of tests/test_fuzz.py
for the real Triton kernels in bfloat16, float16 and float32 against the float64 reference of tests/fuzz_cases.py,
with lengths past the GPU tiles (up to 300) and head dims up to 256. Run it on its own
(``pytest -q tests/test_fuzz_gpu.py``): the CPU fuzzer decorates the kernels for Triton's interpreter.

Tolerances as tests/test_triton_gpu.py (its ``TOL``, ``rel`` and ``grads_close``): outputs and lse by relative
norm, gradients within twice that or twice the error of the same reference computed in low precision (here:
tests/fuzz_cases.py's reference in float32 on the inputs as rounded to the kernel's dtype, output rounded to it).
Every new mask / mod / normalizer combination compiles kernels: a few seconds per example.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("run on its own: TRITON_INTERPRET=1 is set in this session", allow_module_level=True)
pytest.importorskip("triton")

import fuzz_cases as FC  # noqa: E402

if any(type(f).__name__ == "InterpretedFunction" for pair in FC.TWINS.values() for f in pair):
    pytest.skip("run on its own: tests/test_fuzz.py decorated the pointwise twins for the interpreter",
                allow_module_level=True)
_tuning = FC.first_attr(("attnkit.ops.utils.tuning", "attnkit.kernels.tuning"), "interpreting")[1]
if _tuning():
    pytest.skip("run on its own: the kernels were imported for Triton's interpreter", allow_module_level=True)

from hypothesis import assume  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_triton_gpu import TOL, grads_close, rel  # noqa: E402

import attnkit  # noqa: E402

KA = FC.first_attr(("attnkit.ops.softmax.fused", "attnkit.ops.softmax.launch", "attnkit.ops.softmax",
                    "attnkit.kernels.attention"), "POISON")[0]
DEV = "cuda"
F64 = torch.float64
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
#: examples per property (multiplied by ATTNKIT_FUZZ_EXAMPLES)
EXAMPLES = {"kernels": 10, "nonfinite": 8, "nan_sink": 6}
LENGTHS = st.one_of(st.integers(1, 64), st.integers(65, 300))
DIMS = st.sampled_from([1, 8, 16, 24, 40, 64, 72, 80, 96, 128, 160, 200, 256])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(KA, "POISON", True)


def low_precision_grads(case: FC.Case, ns: dict, exp: FC.Expected, dtype: torch.dtype):
    """Gradients of the reference computed in float32 from the inputs in ``dtype`` (planted values zeroed), output
    rounded to ``dtype``: the error a low-precision reference itself makes (grads_close's second bound)."""
    xs = [torch.nan_to_num(FC.logical(ns[n], case.layout).detach(), nan=0.0, posinf=0.0, neginf=0.0)
          .requires_grad_() for n in "qkv"]
    ro, rl = FC.reference(case, *xs, exp.params, vis=exp.vis, compute=torch.float32)
    outs, gos = exp.cotangents(ro.to(dtype), rl)
    grads = torch.autograd.grad(outs, xs + exp.params, gos, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs + exp.params)]


def check_kernel(case: FC.Case, dtype: torch.dtype) -> None:
    """The fused kernels in ``dtype`` against the float64 reference (see the module doc)."""
    FC.note_case(case, ["triton"], dev=DEV, dtype=dtype, pdtype=torch.float32)
    ns = FC.build(case, DEV, dtype, torch.float32)
    exp = FC.Expected(case, ns)
    # float16 holds at most 65504: weights or outputs near that are the format's limit, not the kernels'
    assume(dtype != torch.float16 or exp.magnitude < 1e4)
    gc = low_precision_grads(case, ns, exp, dtype)
    tol = TOL[dtype]

    def close(what, got, want):
        err = rel(got, want)
        assert err <= tol, f"{what}: rel err {err:.2e} > {tol}"

    def close_grads(names, got, want, sel):
        order = FC.grad_names(len(exp.params))
        short = [n.split()[-1] for n in names]  # "dq", "dk", "dv", "dparam0", ...: grads_close keys on them
        low = [gc[order.index(n)] if m is None else gc[order.index(n)][m] for n, m in zip(short, sel)]
        grads_close([n.replace("dparam", "param") for n in short], got, want, low, tol)

    out, lse = FC.run(case, ns, "triton")
    assert attnkit.last_backend() == "triton/fused", attnkit.last_backend()
    FC.check_call(exp, ns, out, lse, "[triton]", close, close_grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels(request, dtype):
    """Property: the fused kernels give the reference output, lse and gradients (q, k, v, learnable parameters)."""
    def kernels_gpu(case):
        check_kernel(case, dtype)

    FC.run_property(request, FC.cases(lengths=LENGTHS, dims=DIMS, triton=True), kernels_gpu, EXAMPLES["kernels"])


def _causal_nan_v_last() -> FC.Case:
    L = 300
    causal = FC.Leaf("M.causal", lambda b, h, q, kv: kv <= q)
    return FC.Case(1, 1, 2, 1, L, L, 64, 64, causal, [], FC.Piece("softmax", "'softmax'"),
                   plants=[("v", 0, 0, L - 1, None, "float('nan')")])


def test_nonfinite_at_masked_positions(request):
    """Property (tests/test_fuzz.py's): NaN / ±inf at keys a row cannot see (and in q rows that see no key) change
    nothing for that row, in the kernels too."""
    def nonfinite_gpu(case):
        check_kernel(case, torch.bfloat16)

    FC.run_property(request, FC.planted_cases(FC.cases(lengths=LENGTHS, dims=DIMS, triton=True)), nonfinite_gpu,
                    EXAMPLES["nonfinite"], explicit=[_causal_nan_v_last()])


@st.composite
def nan_sink_cases(draw):
    case = draw(FC.cases(lengths=LENGTHS, dims=DIMS, triton=True, family="softmax"))
    h = draw(st.integers(0, case.Hq - 1))
    case.norm = FC.Piece("sink", f"N.softmax_sink(P({draw(st.integers(0, 2 ** 16))}, {case.Hq}, nan_at={h}))",
                         nparams=1)
    return case


def check_nan_sink_kernel(case: FC.Case, dtype: torch.dtype) -> None:
    """A NaN sink logit: a ValueError, or rows of that head that see a key are non-finite (output and lse) and every
    other row equals the reference."""
    FC.note_case(case, ["triton"], dev=DEV, dtype=dtype, pdtype=torch.float32)
    ns = FC.build(case, DEV, dtype, torch.float32)
    exp = FC.Expected(case, ns, raw=True)
    try:
        out, lse = FC.run(case, ns, "triton")
    except ValueError:
        return
    nan_rows = torch.isnan(exp.params[-1].detach()).view(1, -1, 1).expand_as(exp.empty)  # the sink is the last P
    ok, seen = ~nan_rows, nan_rows & ~exp.empty
    for name, got, want in (("out", out, exp.out), ("lse", lse, exp.lse)):
        fin = FC.same_nonfinite(f"{name} (heads with a finite sink)", got[ok], want[ok], name == "lse")
        err = rel(got[ok][fin], want[ok][fin])
        assert err <= TOL[dtype], f"{name} (heads with a finite sink): rel err {err:.2e} > {TOL[dtype]}"
        assert not torch.isfinite(got[seen]).any(), f"{name}: finite in the NaN-sink head's rows that see a key"


def test_nan_sink_logit(request):
    """Property: a NaN sink logit raises, or propagates: rows of that head that see a key are non-finite, every other
    row equals the reference (the kernels' half of tests/test_fuzz.py's property; the cross-form half is there)."""
    def nan_sink_gpu(case):
        check_nan_sink_kernel(case, torch.bfloat16)

    FC.run_property(request, nan_sink_cases(), nan_sink_gpu, EXAMPLES["nan_sink"])
