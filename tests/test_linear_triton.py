"""Fused linear-family Triton kernels (attnkit.ops.linear.triton) on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``), against attnkit's float64 reference (``linear_attention(form="recurrent")``).

Every rule of the catalog's matrix-state family through ``chunk`` and ``fused_recurrent``: outputs, final states
and the gradients of q, k, v, gate, β and the initial state; flags (initial state, final state), grouped heads,
T not a multiple of the chunk, T = 1, two Dv tiles, packed documents with empty and one-token documents, log
gates down to −20 per token, non-contiguous inputs, float64 / float32 / float16, torch.autograd.gradcheck.
Outputs and gradients are filled with NaN before the kernels write them. Shapes are tiny (16-token chunks):
the interpreter runs every program in Python.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the kernels are decorated as interpreted functions at import

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import attnkit  # noqa: E402
from attnkit.ops.linear import triton as LT  # noqa: E402
from attnkit.ops.linear.triton import chunkwise as CK  # noqa: E402
from attnkit.ops.linear.triton import recurrent as FR  # noqa: E402

from conftest import one_thread  # noqa: E402
from test_linear_reference import (DELTA, F64, RULE_CASES, api_kwargs, grads_of, leaves, make_case,  # noqa: E402
                                   ref_gate_per_token)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
#: the interpreter converts a loop bound held in a 1-element array with int() (numpy >= 1.25 warns)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
TENSORS = ("q", "k", "v", "gate", "beta", "initial_state")


@pytest.fixture(autouse=True, scope="module")
def _fast_device_calls():
    """Interpreter speed only (about half of these tests' CPU time): every device-function call re-patches
    ``triton.language`` (Triton 3.6, ``InterpretedFunction.__call__``). The kernel launch around it has already
    patched ``tl`` for its duration, and the first call into Triton's standard library patches
    ``triton.language.core`` for good (that patch is never restored), so later calls skip it. Nothing changes
    if Triton's internals differ."""
    from triton.runtime import interpreter as I
    fn_cls = getattr(I, "InterpretedFunction", None)
    orig = getattr(fn_cls, "__call__", None)
    if orig is None or not hasattr(fn_cls, "rewrite") or not hasattr(I, "_patch_lang"):
        yield
        return
    tl, core = triton.language, triton.language.core
    core_done = []

    def call(self, *args, **kwargs):
        mods = {id(v) for v in self.fn.__globals__.values() if v is tl or v is core}
        if mods == {id(tl)} or (core_done and mods <= {id(tl), id(core)}):
            return self.rewrite()(*args, **kwargs)
        out = orig(self, *args, **kwargs)
        if id(core) in mods:
            core_done.append(True)
        return out

    fn_cls.__call__ = call
    yield
    fn_cls.__call__ = orig


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(CK, "_POISON", True)
    monkeypatch.setattr(FR, "_POISON", True)


# ------------------------------------------------------------------------------------------------
# The call mapping (what dispatch does for backend="triton") and the reference
# ------------------------------------------------------------------------------------------------

def kernel_args(name: str, inp: dict):
    """(q, k, v, keyword arguments) of the kernels for a rule case, from the user's tensors: the caller applies the
    feature map and derives hgrn2's keys; fixed decays become a ``[H]`` gate; the kernels fuse scale and L2 norm."""
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["gate"]
    B, Hk, T, D = q.shape
    H = max(Hk, v.shape[1])
    kw = dict(delta=name in DELTA, qk_l2norm=name in DELTA, beta=inp["beta"], scale=D ** -0.5,
              initial_state=inp["initial_state"])
    if name == "linear_elu_norm":
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kw["normalize"] = True
    if name in ("retention", "lightning"):
        g = ref_gate_per_token(name, g, 1, H, 1)[0, :, 0].to(q.dtype)
    if name == "hgrn2":
        q = q.repeat_interleave(H // Hk, 1)
        k = -torch.expm1(g)
        kw["scale"] = 1.0
    kw["gate"] = g
    return q, k, v, kw


def run_kernel(fn, name: str, inp: dict, **kw):
    q, k, v, args = kernel_args(name, inp)
    args.update(kw)
    args.setdefault("output_final_state", True)
    return fn(q, k, v, **args)


def run_ref(name: str, inp: dict, **kw):
    args = {key: inp[key] for key in ("gate", "beta", "initial_state") if inp.get(key) is not None}
    return attnkit.linear_attention(inp["q"], inp["k"], inp["v"], form="recurrent", output_final_state=True,
                                    **api_kwargs(name), **args, **kw)


def rel(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (the norm of b floored at 1e-30)."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name, fn, case, *, tol=1e-10, gtol=None, state=True, what="", **kw):
    """Kernel (inputs cast to the case's dtype) vs the float64 reference on the same rounded values: output, final
    state and every gradient; all finite (poisoned buffers must be overwritten)."""
    gtol = tol if gtol is None else gtol
    ref_in = leaves({key: (t.to(F64) if t is not None else None) for key, t in case.items()})
    o_ref, S_ref = run_ref(name, ref_in)
    inp = leaves(case)
    o, S = run_kernel(fn, name, inp, output_final_state=state, **kw)
    assert o.dtype == case["q"].dtype and o.shape == o_ref.shape
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    assert rel(o, o_ref) <= tol, f"{what} output: {rel(o, o_ref):.2e} > {tol}"
    if state:
        assert S.dtype == (F64 if case["q"].dtype == F64 else torch.float32)
        assert rel(S, S_ref) <= tol, f"{what} final state: {rel(S, S_ref):.2e} > {tol}"
    else:
        assert S is None
    g_ref = grads_of(o_ref, S_ref if state else None, ref_in)
    g = grads_of(o, S, inp)
    for key, want in g_ref.items():
        got = g[key]
        assert got is not None and got.dtype == inp[key].dtype, f"{what} d{key}: missing or wrong dtype"
        assert torch.isfinite(got).all(), f"{what} d{key}: non-finite"
        assert rel(got, want) <= gtol, f"{what} d{key}: {rel(got, want):.2e} > {gtol}"


# ------------------------------------------------------------------------------------------------
# chunk
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RULE_CASES)
def test_chunk_matches_reference(name):
    """float64, T = 37 over 16-token chunks (last one partial), Dv = 20 (two 16-wide tiles), Dk = 8 (padded to 16),
    q/k shared by two state heads, an initial state; output, final state, all gradients ≤ 1e-10."""
    check(name, LT.chunk, make_case(name, B=1, Hk=1, Hv=2, T=37, D=8, Dv=20), what=f"{name}")


FLAG_CASES = [(n, (False, False)) for n in ("linear_elu_norm", "retention", "gla", "hgrn2", "delta", "gated_delta",
                                            "kda")] + [(n, f) for n in ("gla", "kda") for f in ((True, False),
                                                                                                (False, True))]


@pytest.mark.parametrize("name,flags", FLAG_CASES)
def test_chunk_state_flags(name, flags):
    """Without an initial state and/or without the final state (the other constexpr branches); two batch rows."""
    h0, ht = flags
    check(name, LT.chunk, make_case(name, B=2, Hk=1, Hv=1, T=20, D=4, Dv=6, initial_state=h0), state=ht,
          what=f"{name} h0={h0} ht={ht}")


LOW_PRECISION = [(n, torch.float32, 2e-5) for n in ("linear_elu_norm", "gla", "gated_delta", "kda")] + \
    [(n, torch.float16, 4e-3) for n in ("scalar_gate", "delta", "kda")]


@pytest.mark.parametrize("name,dtype,tol", LOW_PRECISION)
def test_chunk_low_precision(name, dtype, tol):
    """float32 / float16 inputs (the GPU dtypes the interpreter can run) against float64 on the rounded inputs:
    ‖err‖/‖ref‖ ≤ 2e-5 / 4e-3 (outputs), 2x for gradients."""
    case = make_case(name, B=1, Hk=1, Hv=1, T=35, D=16, Dv=16)
    check(name, LT.chunk, {key: (t.to(dtype) if t is not None else None) for key, t in case.items()},
          tol=tol, gtol=2 * tol, what=f"{name} {dtype}")


@pytest.mark.parametrize("name", ["kda", "linear_elu_norm", "retention"])
def test_chunk_gradcheck(name):
    """torch.autograd.gradcheck (float64) of chunk over two chunks (T = 18), every input including the gate, β and
    the initial state: per-channel gate + delta rule, normalize, a fixed per-head decay ``[H]``."""
    case = make_case(name, B=1, Hk=1, Hv=1, T=18, D=4, Dv=3)
    keys = [key for key in TENSORS if case[key] is not None]

    def f(*xs):
        return run_kernel(LT.chunk, name, dict(case, **dict(zip(keys, xs))))

    xs = tuple(case[key].clone().requires_grad_() for key in keys)
    assert torch.autograd.gradcheck(f, xs, atol=1e-8, rtol=1e-6, fast_mode=True)


def _doc_case(case, cu, i):
    out = {}
    for key, t in case.items():
        if t is None or (key == "gate" and t.dim() == 1):
            out[key] = t
        elif key == "initial_state":
            out[key] = t[i:i + 1]
        else:
            out[key] = t[:, :, cu[i]:cu[i + 1]]
    return out


@pytest.mark.parametrize("fn", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("name", ["linear_elu_norm", "retention", "gla", "delta", "gated_delta", "kda"])
def test_varlen(name, fn):
    """Documents packed with cu_seqlens, an empty and a one-token document among them, a chunk boundary inside a
    document: each document equals its own reference call from initial_state[i]; output, final states and all
    gradients; an empty document's final state is its initial state (and its gradient flows straight through)."""
    cu = [0, 7, 7, 8, 30] if fn == "chunk" else [0, 3, 3, 4, 9]
    N = len(cu) - 1
    case = make_case(name, B=1, Hk=1, Hv=1, T=cu[-1], D=4, Dv=5, initial_state=False)
    case["initial_state"] = make_case(name, B=N, Hk=1, Hv=1, T=1, D=4, Dv=5)["initial_state"]
    inp = leaves(case)
    o, S = run_kernel(getattr(LT, fn), name, inp, cu_seqlens=torch.tensor(cu))
    assert torch.isfinite(o).all() and S.shape[0] == N
    ref_in = leaves(case)
    outs, finals = [], []
    for i in range(N):
        if cu[i] == cu[i + 1]:
            finals.append(ref_in["initial_state"][i:i + 1])
            continue
        oi, Si = run_ref(name, _doc_case(ref_in, cu, i))
        outs.append(oi)
        finals.append(Si)
    o_ref, S_ref = torch.cat(outs, 2), torch.cat(finals, 0)
    assert rel(o, o_ref) <= 1e-10 and rel(S, S_ref) <= 1e-10
    g, g_ref = grads_of(o, S, inp), grads_of(o_ref, S_ref, ref_in)
    for key in g_ref:
        assert rel(g[key], g_ref[key]) <= 1e-10, f"d{key}: {rel(g[key], g_ref[key]):.2e}"


@pytest.mark.parametrize("name,dtype", [("gla", F64), ("kda", F64), ("scalar_gate", torch.float32),
                                        ("gated_delta", torch.float32), ("kda", torch.float32)])
def test_chunk_strong_decays(name, dtype):
    """Log gates down to −20 per token (a third of the tokens, one head entirely): no overflow, no NaN, and the
    same output and gradients as the float64 reference (exponents are differences inside a chunk, never
    positive)."""
    case = make_case(name, B=1, Hk=2, Hv=2, T=37, D=8, Dv=6)
    g = case["gate"]
    strong = torch.rand_like(g) < 1 / 3
    strong[:, 1] = True
    case["gate"] = torch.where(strong, torch.full_like(g, -20.0) * torch.rand_like(g).add(0.5).clamp(max=1.0), g)
    assert float(case["gate"].min()) <= -19.0
    tol = 1e-10 if dtype == F64 else 3e-5
    check(name, LT.chunk, {key: (t.to(dtype) if t is not None else None) for key, t in case.items()}, tol=tol,
          gtol=2 * tol, what=f"{name} strong decays {dtype}")


@pytest.mark.parametrize("fn", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("name", RULE_CASES)
def test_single_token(name, fn):
    check(name, getattr(LT, fn), make_case(name, B=2, Hk=1, Hv=1, T=1, D=4, Dv=3), what=f"{name} T=1")


@pytest.mark.parametrize("name", ["gla", "gated_delta", "scalar_gate", "delta"])
@pytest.mark.parametrize("fn", ["chunk", "recurrent"])
def test_expanded_cotangents(name, fn):
    """``loss = o.sum() + S.sum()``: autograd hands the backward stride-0 (expanded) gradients of the output and of the
    final state; the kernels read them densely and gave garbage dk/dv/dgate (found wiring the dispatcher)."""
    case = make_case(name, B=1, Hk=1, Hv=1, T=20, D=16, Dv=16, initial_state=False)
    ref_in = leaves({key: (t.clone() if t is not None else None) for key, t in case.items()})
    o_ref, S_ref = run_ref(name, ref_in)
    inp = leaves(case)
    o, S = run_kernel(LT.chunk if fn == "chunk" else LT.fused_recurrent, name, inp)
    keys = [key for key, t in inp.items() if t is not None and t.requires_grad]
    got = torch.autograd.grad(o.sum() + S.sum(), [inp[key] for key in keys])
    want = torch.autograd.grad(o_ref.sum() + S_ref.sum(), [ref_in[key] for key in keys])
    for key, a, b in zip(keys, got, want):
        assert rel(a, b) <= 1e-10, f"d{key}: {rel(a, b):.2e}"


@pytest.mark.parametrize("name", ["gla", "kda"])
def test_chunk_noncontiguous(name):
    """The same values with [B, T, H, D] storage (a transposed view, as layout='bthd' gives) and a non-contiguous
    gate / β: the kernels read strides, no copy; equal to the contiguous call."""
    case = make_case(name, B=1, Hk=2, Hv=2, T=21, D=4, Dv=3)
    tr = {key: (t.transpose(1, 2).contiguous().transpose(1, 2) if t is not None and t.dim() >= 3
                and key != "initial_state" else t) for key, t in case.items()}
    assert not tr["q"].is_contiguous() and not tr["v"].is_contiguous()
    a, b = leaves(case), leaves(tr)
    o1, S1 = run_kernel(LT.chunk, name, a)
    o2, S2 = run_kernel(LT.chunk, name, b)
    assert rel(o2, o1) <= 1e-13 and rel(S2, S1) <= 1e-13
    g1, g2 = grads_of(o1, S1, a), grads_of(o2, S2, b)
    for key in g1:
        assert rel(g2[key], g1[key]) <= 1e-13, key
    o_ref, _ = run_ref(name, case)
    assert rel(o1, o_ref) <= 1e-10


# ------------------------------------------------------------------------------------------------
# fused_recurrent
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RULE_CASES)
def test_recurrent_matches_reference(name):
    """Token by token, forward and backward, T = 7, Dv = 20 (two tiles: the partial sums of dq, dk, dg, dβ added
    on the host), shared q/k heads, an initial state."""
    check(name, LT.fused_recurrent, make_case(name, B=1, Hk=1, Hv=2, T=7, D=8, Dv=20), what=name)


@pytest.mark.parametrize("name", RULE_CASES)
def test_decode_steps_in_place(name):
    """Three decode steps (T = 1) writing the new state into the old one (out_state=initial_state, no autograd)
    equal the reference's recurrent form over the three tokens."""
    case = make_case(name, B=2, Hk=1, Hv=2, T=3, D=8, Dv=20)
    o_ref, S_ref = run_ref(name, case)
    q, k, v, kw = kernel_args(name, case)
    state = case["initial_state"].clone()
    outs = []
    with torch.no_grad():
        for t in range(3):
            sl = lambda x: None if x is None else x[:, :, t:t + 1]  # noqa: E731
            gate = kw["gate"] if kw["gate"] is None or kw["gate"].dim() == 1 else sl(kw["gate"])
            args = dict(kw, gate=gate, beta=sl(kw["beta"]), initial_state=state)
            o, S = LT.fused_recurrent(sl(q), sl(k), sl(v), output_final_state=True, out_state=state, **args)
            assert S is state
            outs.append(o)
    assert rel(torch.cat(outs, 2), o_ref) <= 1e-12 and rel(state, S_ref) <= 1e-12


def test_recurrent_low_precision():
    """float32 and float16 through the recurrent kernels (gated delta and GLA): ≤ 2e-5 / 4e-3 of float64."""
    for name in ("gated_delta", "gla"):
        case = make_case(name, B=1, Hk=1, Hv=1, T=6, D=16, Dv=16)
        for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 4e-3)):
            check(name, LT.fused_recurrent, {key: (t.to(dtype) if t is not None else None) for key, t in case.items()},
                  tol=tol, gtol=2 * tol, what=f"{name} {dtype}")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    q = torch.randn(1, 2, 5, 4, dtype=F64)
    v = torch.randn(1, 2, 5, 3, dtype=F64)
    with pytest.raises(ValueError, match="4-D"):
        LT.chunk(q[0], q, v)
    with pytest.raises(TypeError, match="share a dtype"):
        LT.chunk(q, q.float(), v)
    with pytest.raises(ValueError, match="gate"):
        LT.chunk(q, q, v, gate=torch.zeros(1, 2, 4, dtype=F64))
    with pytest.raises(ValueError, match="beta"):
        LT.chunk(q, q, v, delta=True)
    with pytest.raises(ValueError, match="beta belongs"):
        LT.chunk(q, q, v, beta=torch.rand(1, 2, 5, dtype=F64))
    with pytest.raises(ValueError, match="normalize"):
        LT.chunk(q, q, v, delta=True, beta=torch.rand(1, 2, 5, dtype=F64), normalize=True)
    with pytest.raises(ValueError, match="initial_state"):
        LT.chunk(q, q, v, initial_state=torch.zeros(1, 2, 4, 4, dtype=F64))
    with pytest.raises(ValueError, match="chunk_size"):
        LT.chunk(q, q, v, chunk_size=48)
    with pytest.raises(ValueError, match="batch 1"):
        LT.chunk(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                 cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        LT.chunk(q, q, v, cu_seqlens=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="Dk <= 256"):
        big = torch.randn(1, 1, 2, 300, dtype=F64)
        LT.chunk(big, big, v[:, :1, :2])
    with pytest.raises(TypeError, match="bfloat16"):
        LT.chunk(q.bfloat16(), q.bfloat16(), v.bfloat16())
    with pytest.raises(ValueError, match="no_grad"):
        LT.fused_recurrent(q.requires_grad_(), q, v, output_final_state=True,
                           out_state=torch.zeros(1, 2, 4, 3, dtype=F64))
