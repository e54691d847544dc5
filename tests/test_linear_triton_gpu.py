"""Fused linear-family Triton kernels on a CUDA GPU (marked ``gpu``; skipped without CUDA). Run this file on its
own: the CPU test module decorates the kernels for the interpreter.

    ATTNKIT_LINEAR_GPU_OUT=benchmarks/results/linear-gpu-tests pytest -q -s tests/test_linear_triton_gpu.py

Every kernel against attnkit's float64 reference (``linear_attention`` chunk form, float64 on the same GPU, on the
inputs as rounded to the dtype tested): ``‖x − ref‖ / ‖ref‖`` of outputs ≤ 1e-2 (bf16), 3e-3 (fp16), 2e-4 (fp32:
the kernels multiply fp32 with 3xTF32) and twice that for every gradient (q, k, v, gate, β, initial state), plus
the worst 64-token block of each at 4x the bound: a wrong gradient in one chunk (the Triton 3.6 Hopper
miscompile fla refuses its gated chunk backward for) cannot hide in a long sequence's average. The measured
errors go to a table printed at the end and, with ``ATTNKIT_LINEAR_GPU_OUT``, to JSON + markdown there.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("run on its own: TRITON_INTERPRET=1 is set in this session", allow_module_level=True)
triton = pytest.importorskip("triton")

import attnkit  # noqa: E402
from attnkit.ops.linear import triton as LT  # noqa: E402
from attnkit.ops.linear.triton import chunkwise as CK  # noqa: E402
from attnkit.ops.linear.triton import recurrent as FR  # noqa: E402

from conftest import alibi_slopes_ref  # noqa: E402

DEV = "cuda"
F64 = torch.float64
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 2e-4}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RULES = ["linear", "linear_elu_norm", "retention", "lightning", "scalar_gate", "gla", "hgrn2", "delta",
         "gated_delta", "kda"]
DELTA = {"delta", "gated_delta", "kda"}
RESULTS = []


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(CK, "_POISON", True)
    monkeypatch.setattr(FR, "_POISON", True)


@pytest.fixture(autouse=True, scope="module")
def _report():
    """Print the measured errors at the end; write them as JSON + markdown under $ATTNKIT_LINEAR_GPU_OUT."""
    yield
    if not RESULTS:
        return
    lines = ["| test | tensor | rel. error | worst block | bound | ok |", "|---|---|---|---|---|---|"]
    for r in RESULTS:
        lines.append(f"| {r['test']} | {r['tensor']} | {r['rel']:.2e} | {r['block']:.2e} | {r['bound']:.0e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    head = (f"# Linear Triton kernels vs float64 on {torch.cuda.get_device_name()} "
            f"(torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})\n\n")
    print("\n" + head + "\n".join(lines))
    out = os.environ.get("ATTNKIT_LINEAR_GPU_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "linear_gpu_tests.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           results=RESULTS), f, indent=1)
        with open(os.path.join(out, "linear_gpu_tests.md"), "w") as f:
            f.write(head + "\n".join(lines) + "\n")


def rel(a, b) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def worst_block(a, b, dim: int = 2, block: int = 64) -> float:
    """Largest ``‖a − b‖ / ‖b‖`` over 64-token blocks along ``dim`` (blocks whose reference is ~0 skipped)."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    if a.dim() <= dim or a.shape[dim] <= block:
        return rel(a, b)
    worst, scale = 0.0, float(b.norm()) / math.sqrt(max(1, b.shape[dim] // block))
    for s in range(0, a.shape[dim], block):
        ab, bb = a.narrow(dim, s, min(block, a.shape[dim] - s)), b.narrow(dim, s, min(block, a.shape[dim] - s))
        n = float(bb.norm())
        if n > 1e-3 * scale:
            worst = max(worst, float((ab - bb).norm()) / n)
    return worst


def close(test: str, tensor: str, got, want, bound: float, dim: int = 2) -> None:
    assert got is not None, f"{test} {tensor}: missing"
    assert torch.isfinite(got).all(), f"{test} {tensor}: non-finite values (unwritten poison?)"
    e, w = rel(got, want), worst_block(got, want, dim)
    ok = e <= bound and w <= 4 * bound
    RESULTS.append(dict(test=test, tensor=tensor, rel=e, block=w, bound=bound, ok=ok))
    assert ok, f"{test} {tensor}: rel {e:.2e} (bound {bound:.0e}), worst 64-token block {w:.2e} (bound {4 * bound:.0e})"


# ------------------------------------------------------------------------------------------------
# Cases and the call mapping (as dispatch does it)
# ------------------------------------------------------------------------------------------------

def make(name: str, B: int, Hk: int, Hv: int, T: int, D: int, Dv: int, dtype, h0: bool = True, strong=False):
    """Inputs rounded to ``dtype`` (float64 copies for the reference)."""
    H = max(Hk, Hv)
    r = lambda *s: torch.randn(*s, device=DEV, dtype=F64)  # noqa: E731
    c = {"q": r(B, Hk, T, D), "k": None if name == "hgrn2" else r(B, Hk, T, D), "v": r(B, Hv, T, Dv),
         "gate": None, "beta": None, "initial_state": None}
    if name in ("scalar_gate", "gated_delta"):
        c["gate"] = F.logsigmoid(3.0 + r(B, H, T))
    elif name in ("gla", "hgrn2", "kda"):
        c["gate"] = F.logsigmoid(4.0 + r(B, H, T, D))
    elif name == "retention":
        c["gate"] = torch.log1p(-torch.rand(H, device=DEV, dtype=F64) * 0.1)
    if strong and c["gate"] is not None and c["gate"].dim() > 1:
        g = c["gate"]
        c["gate"] = torch.where(torch.rand_like(g) < 0.2, -20.0 * (0.5 + 0.5 * torch.rand_like(g)), g)
    if name in DELTA:
        c["beta"] = torch.rand(B, H, T, device=DEV, dtype=F64)
    if h0:
        S0 = 0.2 * r(B, H, D, Dv + (name == "linear_elu_norm"))
        if name == "linear_elu_norm":
            S0[..., -1] = 1 + torch.rand(B, H, D, device=DEV, dtype=F64)
        c["initial_state"] = S0
    low = {k_: (v_.to(dtype) if v_ is not None else None) for k_, v_ in c.items()}
    if name == "retention":  # a per-head decay is a parameter kept in float32: its gradient sums B·T terms
        low["gate"] = c["gate"].float()
    ref = {k_: (v_.to(F64) if v_ is not None else None) for k_, v_ in low.items()}
    return low, ref


def ref_kwargs(name: str) -> dict:
    kw = {"rule": "linear" if name == "linear_elu_norm" else name}
    if name == "linear_elu_norm":
        kw.update(feature_map="elu", normalize=True)
    if name in DELTA:
        kw["qk_l2norm"] = True
    if name == "lightning":
        kw.update(layer_idx=1, num_layers=3)
    return kw


def kernel_call(fn, name: str, inp: dict, **kw):
    """The kernels on the user's tensors: feature map / hgrn2 keys applied here, fixed decays as a [H] gate."""
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["gate"]
    B, Hk, T, D = q.shape
    H = max(Hk, v.shape[1])
    args = dict(delta=name in DELTA, qk_l2norm=name in DELTA, beta=inp["beta"], scale=D ** -0.5,
                initial_state=inp["initial_state"], output_final_state=True)
    if name == "linear_elu_norm":
        q, k = F.elu(q) + 1, F.elu(k) + 1
        args["normalize"] = True
    if name == "lightning":  # the reference's default decays at layer 1 of 3: −m_h (1 − 1/2 + 1e-5)
        g = torch.tensor([-m * (0.5 + 1e-5) for m in alibi_slopes_ref(H)], device=DEV, dtype=q.dtype)
    if name == "hgrn2":
        q = q.repeat_interleave(H // Hk, 1)
        k = -torch.expm1(g)
        args["scale"] = 1.0
    args["gate"] = g
    args.update(kw)
    return fn(q, k, v, **args)


def leaves(c: dict) -> dict:
    return {k_: (v_.detach().clone().requires_grad_() if v_ is not None else None) for k_, v_ in c.items()}


def compare(test: str, fn, name: str, low: dict, ref: dict, dtype, *, cu=None, ref_form="chunk", tol=None, **kw):
    """Kernel (dtype) vs float64 reference: output, final state, gradients of every input."""
    tol = TOL[dtype] if tol is None else tol
    a, r = leaves(low), leaves(ref)
    o, S = kernel_call(fn, name, a, cu_seqlens=cu, **kw)
    rargs = {k_: r[k_] for k_ in ("gate", "beta", "initial_state") if r[k_] is not None}
    ro, rS = attnkit.linear_attention(r["q"], r["k"], r["v"], form=ref_form, output_final_state=True,
                                      cu_seqlens=cu, **ref_kwargs(name), **rargs)
    assert o.dtype == dtype
    close(test, "o", o, ro, tol)
    close(test, "final state", S, rS, tol, dim=1)
    go, gS = torch.randn_like(ro), torch.randn_like(rS)
    names = [k_ for k_ in ("q", "k", "v", "gate", "beta", "initial_state") if a[k_] is not None]
    ga = torch.autograd.grad((o.to(F64) * go).sum() + (S.to(F64) * gS).sum(), [a[n] for n in names])
    gr = torch.autograd.grad((ro * go).sum() + (rS * gS).sum(), [r[n] for n in names])
    for n, x, y in zip(names, ga, gr):
        assert x.dtype == a[n].dtype, f"{test} d{n}: dtype {x.dtype}"
        close(test, f"d{n}", x, y, 2 * tol, dim=2 if x.dim() >= 3 else 0)


# ------------------------------------------------------------------------------------------------
# chunk
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("name", RULES)
def test_chunk(name, dtype):
    """B = 2, q/k heads shared by two state heads (H = 4), T = 1000 (not a multiple of 64), Dk = 128, Dv = 96,
    an initial state; forward and every gradient."""
    low, ref = make(name, 2, 2, 4, 1000, 128, 96, dtype)
    compare(f"chunk {name} {str(dtype)[6:]}", LT.chunk, name, low, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["scalar_gate", "gla", "gated_delta", "kda", "retention"])
def test_chunk_benchmark_shape(name, dtype):
    """The benchmark's shape class (Dk = Dv = 128, 64-token chunks, T = 4096, 16 heads), gated rules: the
    configuration where Triton 3.6 on Hopper miscompiles fla's gated chunk backward."""
    low, ref = make(name, 1, 16, 16, 4096, 128, 128, dtype)
    compare(f"chunk {name} {str(dtype)[6:]} T=4096 H=16", LT.chunk, name, low, ref, dtype)


@pytest.mark.parametrize("name", ["linear_elu_norm", "scalar_gate", "gla", "delta", "gated_delta", "kda"])
def test_chunk_varlen(name):
    """Packed documents of random lengths (one token, 63 / 64 / 65 tokens among them), bf16, against the reference's
    per-document loop; then the same call with two empty documents inserted: identical outputs, and the empty
    documents' final states are zero (no initial state)."""
    lens = [random.randint(2, 700) for _ in range(5)] + [1, 63, 64, 65]
    random.shuffle(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    T = int(cu[-1])
    low, ref = make(name, 1, 4, 4, T, 64, 64, torch.bfloat16, h0=False)
    compare(f"chunk varlen {name}", LT.chunk, name, low, ref, torch.bfloat16, cu=cu)
    with torch.no_grad():
        o1, S1 = kernel_call(LT.chunk, name, low, cu_seqlens=cu)
        cu2 = torch.cat([cu[:1], cu[:3], cu[2:], cu[-1:]])  # an empty document at 0, one after the second, one at the end
        o2, S2 = kernel_call(LT.chunk, name, low, cu_seqlens=cu2)
    assert torch.equal(o1, o2)
    keep = torch.ones(len(cu2) - 1, dtype=torch.bool, device=DEV)
    keep[[0, 3, len(cu2) - 2]] = False
    assert torch.equal(S2[keep], S1) and not S2[~keep].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["gla", "kda", "gated_delta", "scalar_gate"])
def test_chunk_strong_decays(name, dtype):
    """A fifth of the log gates at −10..−20 per token: finite, and within 2x the usual bounds (a cumulative gate
    of −1000 in fp32 leaves 1e-4 of absolute precision in the decays)."""
    low, ref = make(name, 1, 4, 4, 700, 64, 64, dtype, strong=True)
    compare(f"chunk strong {name} {str(dtype)[6:]}", LT.chunk, name, low, ref, dtype, tol=2 * max(TOL[dtype], 5e-4))


def test_chunk_deterministic():
    """Two backward passes give bitwise equal gradients (no atomics)."""
    low, _ = make("kda", 2, 4, 4, 777, 128, 128, torch.bfloat16)
    grads = []
    for _ in range(2):
        a = leaves(low)
        o, S = kernel_call(LT.chunk, "kda", a)
        names = [k_ for k_ in a if a[k_] is not None]
        torch.manual_seed(0)
        grads.append(torch.autograd.grad((o.float() * torch.randn_like(o.float())).sum() + S.sum(),
                                         [a[n] for n in names]))
    for x, y in zip(*grads):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------
# fused_recurrent
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("name", RULES)
def test_recurrent(name, dtype):
    """Short sequences token by token (T = 48), forward and backward, Dk = Dv = 128."""
    low, ref = make(name, 2, 2, 4, 48, 128, 128, dtype)
    compare(f"recurrent {name} {str(dtype)[6:]}", LT.fused_recurrent, name, low, ref, dtype)


@pytest.mark.parametrize("name", RULES)
def test_decode_step(name):
    """The decode path: B = 32, H = 16, 128×128 fp32 states, one token per call written in place, 4 steps, bf16
    inputs, against the reference's recurrent steps."""
    low, ref = make(name, 32, 16, 16, 4, 128, 128, torch.bfloat16)
    q, k, v, g = low["q"], low["k"], low["v"], low["gate"]
    state = low["initial_state"].float().contiguous()
    outs = []
    with torch.no_grad():
        for t in range(4):
            sl = {k_: (x[:, :, t:t + 1] if x is not None and x.dim() >= 3 and k_ != "initial_state" else x)
                  for k_, x in low.items()}
            sl["initial_state"] = state
            o, S = kernel_call(LT.fused_recurrent, name, sl, out_state=state)
            assert S is state
            outs.append(o)
        ro, rS = attnkit.linear_attention(ref["q"], ref["k"], ref["v"], form="recurrent", output_final_state=True,
                                          **ref_kwargs(name), **{k_: ref[k_] for k_ in ("gate", "beta",
                                                                                         "initial_state")
                                                                 if ref[k_] is not None})
    close(f"decode {name}", "o", torch.cat(outs, 2), ro, TOL[torch.bfloat16])
    close(f"decode {name}", "state", state, rS, TOL[torch.bfloat16], dim=1)


def test_chunk_equals_recurrent():
    """The two kernels agree with each other in fp32 (T = 300, KDA): ≤ 1e-4."""
    low, _ = make("kda", 1, 2, 2, 300, 64, 64, torch.float32)
    o1, S1 = kernel_call(LT.chunk, "kda", low)
    o2, S2 = kernel_call(LT.fused_recurrent, "kda", low)
    close("chunk vs recurrent kda fp32", "o", o1, o2, 1e-4)
    close("chunk vs recurrent kda fp32", "state", S1, S2, 1e-4, dim=1)
