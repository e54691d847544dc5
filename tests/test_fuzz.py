"""Property-based fuzzer (hypothesis) on CPU: random masks composed with ``& | ~`` of every built-in leaf, every
score mod (and lists of up to three), every normalizer, random shapes (B 1-2, GQA / MQA, T = 1, ragged, Lq != Lk,
D != Dv), strided and ``layout="bthd"`` inputs, against the float64 reference of tests/fuzz_cases.py (written
from the definitions, never through attnkit): output, lse, gradients of q, k, v and every learnable parameter,
in every reference form (materialized, streaming with its default and small odd tiles, recurrent where the mask
has no look-ahead, else a ValueError) and the Triton kernels under Triton's interpreter (float64, outputs
poisoned with NaN before the kernels write them).

The non-finite properties are issue 10's defects 4 and 5 (fixed in b734334; before it the explicit examples fail).

A failure prints a self-contained reproducer (the code that ran: pieces, seeded inputs, the call per form).
Examples per property: see ``EXAMPLES`` (scale them with ``ATTNKIT_FUZZ_EXAMPLES=<multiplier>``).
"""
from __future__ import annotations

import os

_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # the kernels and the pointwise twins are decorated for the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnkit  # noqa: E402
import fuzz_cases as FC  # noqa: E402
from conftest import one_thread  # noqa: E402

try:
    import triton  # noqa: F401
    #: the module whose POISON flag makes the fused launcher fill outputs with NaN before the kernels write them
    KA = FC.first_attr(("attnkit.ops.softmax.fused", "attnkit.ops.softmax.launch", "attnkit.ops.softmax",
                        "attnkit.kernels.attention"), "POISON")[0]
except ImportError:  # pragma: no cover - CI installs triton
    KA = None

if _env is None:  # after every triton.jit: the rest of the session keeps its environment
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _env

F64 = torch.float64
REFERENCE_FORMS = ["materialized", "streaming", "streaming-tiles", "recurrent"]
#: examples per property in CI (multiplied by ATTNKIT_FUZZ_EXAMPLES)
EXAMPLES = {"forms": 100, "triton": 15, "nonfinite": 12, "nan_sink": 10}
needs_triton = pytest.mark.skipif(KA is None, reason="triton is not installed")
#: Triton's interpreter converts 1-element arrays to Python ints (a numpy deprecation, thousands per test)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter consults it while running
    if KA is not None:
        monkeypatch.setattr(KA, "POISON", True)


def close(what, got, want, atol=1e-9, rtol=1e-7):
    torch.testing.assert_close(got.to(F64), want.to(F64), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def close_grads(names, got, want, sel):
    for name, a, b in zip(names, got, want):
        close(name, a, b)


def check_forms(case: FC.Case, forms) -> None:
    """Every form in ``forms`` against the reference (recurrent: ValueError where the mask looks ahead)."""
    FC.note_case(case, forms)
    ns = FC.build(case)
    exp = FC.Expected(case, ns)
    for form in forms:
        if form == "recurrent" and exp.lookahead:
            with pytest.raises(ValueError, match="look-ahead"):
                FC.run(case, ns, form)
            continue
        out, lse = FC.run(case, ns, form)
        if form == "triton":
            assert attnkit.last_backend() == "triton/fused", attnkit.last_backend()
        FC.check_call(exp, ns, out, lse, f"[{form}]", close, close_grads)


# ------------------------------------------------------------------------------------------------
# Finite inputs: every form and the kernels equal the reference
# ------------------------------------------------------------------------------------------------

def test_reference_forms(request):
    """Property: any composed mask x score mods x normalizer x shape gives the reference output, lse and gradients
    in every reference form."""
    def reference_forms(case):
        check_forms(case, REFERENCE_FORMS)

    FC.run_property(request, FC.cases(max_len=24), reference_forms, EXAMPLES["forms"])


@needs_triton
@pytest.mark.parametrize("family", ["softmax", "elementwise"])
def test_triton_interpreter(request, family):
    """Property: the fused Triton kernels (interpreter, float64, poisoned outputs) give the reference output, lse
    and gradients; lengths up to 40 span several of the interpreter's 16/32-wide tiles."""
    def triton_kernels(case):
        check_forms(case, ["triton"])

    FC.run_property(request, FC.cases(max_len=40, triton=True, family=family, max_bh=4), triton_kernels,
                    EXAMPLES["triton"])


# ------------------------------------------------------------------------------------------------
# Non-finite values (issue 10, defects 4 and 5)
# ------------------------------------------------------------------------------------------------

def _causal_nan_v_last() -> FC.Case:
    """The issue's example: causal, NaN only in v at the last key (rows before it cannot see it)."""
    L = 20
    causal = FC.Leaf("M.causal", lambda b, h, q, kv: kv <= q)
    return FC.Case(1, 1, 2, 1, L, L, 8, 8, causal, [], FC.Piece("softmax", "'softmax'"),
                   plants=[("v", 0, 0, L - 1, None, "float('nan')")])


@needs_triton
def test_nonfinite_at_masked_positions(request):
    """Property: NaN / ±inf in k, v at keys some rows cannot see (and in q rows that see no key) change nothing for
    the rows that cannot see them: output, lse and the gradients those rows give (dq of theirs, dk / dv of keys
    only they see, parameters when every row is clean) equal the reference; a row that sees a non-finite value
    is non-finite exactly in the entries the definition makes non-finite. Every form and the kernels."""
    def nonfinite_at_masked_positions(case):
        check_forms(case, REFERENCE_FORMS + ["triton"])

    strategy = FC.planted_cases(FC.cases(max_len=20, triton=True, max_bh=4))
    FC.run_property(request, strategy, nonfinite_at_masked_positions, EXAMPLES["nonfinite"],
                    explicit=[_causal_nan_v_last()])


@st.composite
def nan_sink_cases(draw):
    """A case whose normalizer is softmax_sink with a NaN logit on one head."""
    case = draw(FC.cases(max_len=20, triton=True, family="softmax", max_bh=4))
    h = draw(st.integers(0, case.Hq - 1))
    case.norm = FC.Piece("sink", f"N.softmax_sink(P({draw(st.integers(0, 2 ** 16))}, {case.Hq}, nan_at={h}))",
                         nparams=1)
    return case


def _nan_sink_causal() -> FC.Case:
    causal = FC.Leaf("M.causal", lambda b, h, q, kv: kv <= q)
    return FC.Case(1, 1, 2, 2, 12, 12, 8, 8, causal, [],
                   FC.Piece("sink", "N.softmax_sink(P(3, 2, nan_at=1))", nparams=1))


def check_nan_sink(case: FC.Case, forms) -> None:
    """Every form raises ValueError / TypeError, or none does and: rows of heads with a finite sink logit equal the
    reference; rows of the NaN head that see a key are non-finite (output and lse); every form gives the same
    non-finite entries and the same finite values (the NaN head's rows without keys: zeros or NaN, but alike)."""
    FC.note_case(case, forms)
    ns = FC.build(case)
    exp = FC.Expected(case, ns, raw=True)
    results = {}
    for form in forms:
        try:
            results[form] = FC.run(case, ns, form)
        except (ValueError, TypeError) as e:
            results[form] = e
    if exp.lookahead and "recurrent" in results:
        assert "look-ahead" in str(results.pop("recurrent"))
    raised = sorted(f for f, r in results.items() if isinstance(r, Exception))
    assert not raised or len(raised) == len(results), (
        f"NaN sink logit: {raised} raise ({[str(results[f]) for f in raised]}), the other forms do not")
    if raised:
        return
    nan_rows = torch.isnan(exp.params[-1].detach()).view(1, -1, 1).expand_as(exp.empty)  # the sink is the last P
    first = None
    for form, (out, lse) in results.items():
        ok, seen = ~nan_rows, nan_rows & ~exp.empty
        for name, got, want in (("out", out, exp.out), ("lse", lse, exp.lse)):
            fin = FC.same_nonfinite(f"[{form}] {name} (heads with a finite sink)", got[ok], want[ok], name == "lse")
            close(f"[{form}] {name}", got[ok][fin], want[ok][fin])
            assert not torch.isfinite(got[seen]).any(), f"[{form}] {name}: finite in the NaN-sink head's rows"
        if first is None:
            first = (form, out, lse)
            continue
        for name, got, want in (("out", out, first[1]), ("lse", lse, first[2])):
            fin = FC.same_nonfinite(f"[{form}] {name} vs [{first[0]}]", got, want, name == "lse")
            close(f"[{form}] {name} vs [{first[0]}]", got[fin], want[fin])


@needs_triton
def test_nan_sink_logit_same_in_every_form(request):
    """Property: a NaN sink logit (softmax_sink) raises in every form or propagates identically (check_nan_sink)."""
    def nan_sink_logit(case):
        check_nan_sink(case, REFERENCE_FORMS + ["triton"])

    FC.run_property(request, nan_sink_cases(), nan_sink_logit, EXAMPLES["nan_sink"], explicit=[_nan_sink_causal()])
