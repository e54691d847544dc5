"""Fused Triton kernels on a CUDA GPU (marked ``gpu``; skipped without CUDA). Run this file on its own
(``pytest tests/test_triton_gpu.py``): the CPU test module decorates the kernels for the interpreter.

Tolerances on ``‖x − ref‖ / ‖ref‖`` against the float64 reference (attnkit's reference backend at
float64 on the same GPU): outputs bf16 ≤ 1e-2, fp16 ≤ 3e-3, fp32 ≤ 1e-3 (TF32 products); gradients
twice that (they sum longer products in the same precision).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("run on its own: TRITON_INTERPRET=1 is set in this session", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import attnkit  # noqa: E402
from attnkit.dispatch import backends as kernels  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.ops.softmax import fused as KA  # noqa: E402

DEV = "cuda"
F64 = torch.float64
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(KA, "POISON", True)


def rel(a, b) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _rms(t) -> float:
    return float(t.detach().to(F64).pow(2).mean().sqrt())


def grads_close(names, ga, gb, gc, tol: float, skip=()) -> None:
    """Kernel gradients ``ga`` vs the float64 reference's ``gb``; ``gc``: the reference's own gradients computed in
    the kernel's dtype.

    Rows (of dq / dk / dv: one query or key each) whose reference is exactly zero are measured apart: every term
    of them cancels (a row that sees one key has ``dq = scale·p·(dP − delta)·k = 0``), while the kernel's delta
    comes from the rounded output (FlashAttention-2's ``delta = Σ dO·O``) and leaves a residue of that rounding
    there, so their RMS may be up to ``2·tol`` times dv's (the call's gradient scale). The other rows pass
    with ``‖a − b‖ ≤ 2·tol·‖b‖``, or with an error no larger than twice the low-precision reference's own
    ``‖c − b‖`` (FlashAttention's test criterion). Names in ``skip`` are checked by the caller."""
    scale = {n: _rms(b) for n, b in zip(names, gb) if b is not None}.get("dv", 0.0)
    for name, a, b, c in zip(names, ga, gb, gc):
        if name in skip:
            continue
        if b is None:
            assert a is None or not a.any(), f"{name}: nonzero gradient where the reference has none"
            continue
        assert a is not None and torch.isfinite(a).all(), name
        a, c = a.detach().to(F64), (c.detach().to(F64) if c is not None else b)
        if name in ("dq", "dk", "dv") and b.dim() > 1:
            zero = (b == 0).all(-1)
            if zero.any():
                assert _rms(a[zero]) <= 2 * tol * scale, (
                    f"{name}: rows with a zero reference have RMS {_rms(a[zero]):.2e} > 2·{tol}·{scale:.2e}")
            a, b, c = a[~zero], b[~zero], c[~zero]
        if b.numel() == 0 or float(b.norm()) == 0:
            continue
        err = float((a - b).norm())
        bound, low = 2 * tol * float(b.norm()), float((c - b).norm())
        assert err <= max(bound, 2 * low), (f"{name} rel err {err / float(b.norm()):.2e} > 2·max({tol}, "
                                            f"low-precision reference {low / float(b.norm()):.2e})")


def _params(*mods):
    out = []
    for m in mods:
        if isinstance(m, torch.nn.Module):
            for mm in m.modules():
                for t in list(mm._parameters.values()) + [x for x in vars(mm).values() if isinstance(x, torch.Tensor)]:
                    if t is not None and t.requires_grad and all(t is not o for o in out):
                        out.append(t)
    return out


def check(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, *, grad=True, **kw):
    """Triton (``dtype``) vs the float64 reference: output, lse, grads of q, k, v and learnable params."""
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, device=DEV, dtype=dtype)
    norm = N.as_normalizer(kw.get("normalizer", "softmax"))
    lse_on = norm.family == "softmax"
    params = _params(kw.get("score_mod"), norm)
    xs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    rs = [t.to(F64).requires_grad_(grad) for t in (q, k, v)]
    res = attnkit.attention(*xs, backend="triton", return_lse=lse_on, **kw)
    assert attnkit.last_backend() == "triton/fused"
    out, lse = res if lse_on else (res, None)
    ref = attnkit.attention(*rs, backend="reference", form="materialized", return_lse=lse_on, **kw)
    ro, rl = ref if lse_on else (ref, None)
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    assert rel(out, ro) <= tol, f"out rel err {rel(out, ro):.2e} > {tol}"
    if lse_on:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
        fin = torch.isfinite(rl)
        assert rel(lse[fin], rl[fin]) <= tol
    if not grad:
        return
    g = torch.randn_like(ro)
    ga = torch.autograd.grad((out * g.to(dtype)).sum(), xs + params, allow_unused=True)
    gb = torch.autograd.grad((ro * g).sum(), rs + params, allow_unused=True)
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    low = attnkit.attention(*ys, backend="reference", form="materialized", **kw)
    gc = torch.autograd.grad((low * g.to(dtype)).sum(), ys + params, allow_unused=True)
    grads_close(["dq", "dk", "dv"] + [f"param{i}" for i in range(len(params))], ga, gb, gc, tol)


PATTERNS = {
    "full": dict(mask=M.full),
    "causal": dict(mask=M.causal),
    "window": dict(mask=M.sliding_window(100)),
    "softcap": dict(mask=M.causal, score_mod=S.softcap(30.0)),
    "softcap-tight": dict(mask=M.causal, score_mod=S.softcap(1.5)),
    "alibi": dict(mask=M.causal, score_mod=S.alibi()),
    "document": dict(mask=M.document(cu_seqlens=torch.tensor([0, 100, 350, 351, 777])) & M.causal),
    "prefix": dict(mask=M.prefix_lm(190)),
    "streamingllm": dict(mask=M.causal & (M.sliding_window(64) | M.sinks(4))),
    "predicate": dict(mask=M.predicate(lambda b, h, q, kv: ((q // 37 + kv // 53 + h) % 3) != 0)),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_patterns_bf16(name):
    check(2, 4, 2, 777, 777, 128, 128, torch.bfloat16, **PATTERNS[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["causal", "softcap"])
def test_patterns_other_dtypes(name, dtype):
    check(1, 4, 1, 555, 555, 64, 64, dtype, **PATTERNS[name])


@pytest.mark.parametrize("causal", [False, True])
def test_cab_cross(causal):
    check(2, 4, 4, 256, 1024, 128, 128, torch.bfloat16, mask=M.causal if causal else M.full)


@pytest.mark.parametrize("D,Dv", [(16, 16), (80, 80), (96, 64), (256, 256), (32, 200)])
def test_head_dims(D, Dv):
    check(1, 2, 1, 300, 413, D, Dv, torch.bfloat16, mask=M.causal)


@pytest.mark.parametrize("name", ["sink", "relaxed", "sigmoid", "relu2"])
def test_normalizers(name):
    H = 4
    norm = {"sink": lambda: N.softmax_sink(torch.randn(H, device=DEV).requires_grad_()),
            "relaxed": lambda: N.relaxed(0.2), "sigmoid": lambda: N.sigmoid(torch.randn(H, device=DEV).requires_grad_()),
            "relu2": lambda: N.relu2()}[name]()
    check(1, H, 2, 400, 500, 64, 64, torch.bfloat16, mask=M.causal, normalizer=norm)


def learnable_mod(name: str, H: int):
    """A score mod with a fresh learnable per-head parameter (or relative-bias table) on the GPU."""
    return {"alibi": lambda: S.alibi(torch.rand(H, device=DEV).add(0.1).requires_grad_()),
            "relbias": lambda: S.relative_bias(H, table=torch.randn(32, H, device=DEV).requires_grad_()),
            "ssmax": lambda: S.ssmax(torch.rand(H, device=DEV).add(0.2).requires_grad_()),
            "temperature": lambda: S.temperature(torch.rand(H, device=DEV).add(0.5).requires_grad_())}[name]()


@pytest.mark.parametrize("name", ["alibi", "relbias", "ssmax", "temperature"])
def test_learnable_mods(name):
    H = 4
    sm = learnable_mod(name, H)
    check(1, H, 4, 333, 333, 64, 64, torch.float32, mask=M.causal, score_mod=sm)


def test_fully_masked_rows_and_decode():
    check(2, 4, 1, 300, 200, 64, 64, torch.bfloat16, mask=M.causal)  # first 100 rows see nothing
    check(4, 8, 2, 1, 999, 128, 128, torch.bfloat16, mask=M.causal)  # one decode step


_LEAVES = [lambda L: M.causal, lambda L: M.sliding_window(random.randint(0, 300), random.randint(0, 50)),
           lambda L: M.chunked(random.randint(16, 200)), lambda L: M.prefix_lm(random.randint(0, L)),
           lambda L: M.sinks(random.randint(1, 8)), lambda L: M.dilated(random.randint(2, 5)),
           lambda L: M.document(torch.tensor(sorted(random.randint(0, 5) for _ in range(L)))),
           lambda L: M.predicate(lambda b, h, q, kv: (q * 7 + kv * 3 + h) % 5 != 0)]
_MODS = [lambda H: S.softcap(random.uniform(2, 30)), lambda H: S.alibi(), lambda H: S.temperature(random.uniform(0.5, 2)),
         lambda H: S.relative_bias(H).to(DEV), lambda H: S.ssmax(0.4)]


def random_mask(L: int, depth: int = 3):
    """A random boolean composition (``& | ~``) of random leaves for length ``L``."""
    if depth == 0 or random.random() < 0.35:
        return random.choice(_LEAVES)(L)
    op = random.choice("&|~")
    a = random_mask(L, depth - 1)
    return ~a if op == "~" else (a & random_mask(L, depth - 1) if op == "&" else a | random_mask(L, depth - 1))


@pytest.mark.parametrize("i", range(12))
def test_random_composition(i):
    L, H = random.randint(200, 700), 4

    m = random_mask(L)
    mods = random.sample(_MODS, random.randint(0, 2))  # distinct kinds (one relative_bias at most)
    mods = [f(H) for f in mods]
    print(f"mask {m!r}, mods {mods}, L={L}")  # shown when the test fails
    dtype = random.choice([torch.bfloat16, torch.float16])
    D = random.choice([64, 128])
    check(1, H, random.choice([1, 2, 4]), L, L, D, D, dtype, mask=m, score_mod=mods or None)


def _check_views(q, k, v, **kw):
    """Triton on (possibly strided / misaligned) ``[B, T, H, D]`` views vs the float64 reference, with grads."""
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    rs = [t.detach().to(F64).requires_grad_() for t in (q, k, v)]
    out = attnkit.attention(*xs, layout="bthd", backend="triton", **kw)
    ref = attnkit.attention(*rs, layout="bthd", backend="reference", form="materialized", **kw)
    assert rel(out, ref) <= 1e-2
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * g.to(out.dtype)).sum(), xs), torch.autograd.grad((ref * g).sum(), rs)):
        assert rel(a, b) <= 2e-2


def test_repeated_calls_launch_the_compiled_kernel_directly():
    """Later calls of one signature launch the compiled kernels directly (no Triton binding); fresh inputs,
    a strided view and a view whose data pointer is not 16-byte aligned each get their own specialization."""
    B, H, L, D = 2, 4, 300, 64
    mask, sm = M.causal, S.alibi()
    for _ in range(3):
        check(B, H, 2, L, L, D, D, torch.bfloat16, mask=mask, score_mod=sm)
    pb = [p for p in KA._problems.values() if (p.B, p.Hq, p.Hkv, p.Lq, p.D, p.dtype) == (B, H, 2, L, D, torch.bfloat16)
          and p.mods.packed][-1]
    bwd = [pb.phases["dkdv"], pb.phases[("dq", False, 1)]] if pb.split_bwd else [pb.phases[("bwd", False, 1)]]
    assert pb.phases["fwd"].compiled and all(ph.compiled for ph in bwd)
    for _ in range(2):
        big = [torch.randn(B, L, h, D + 8, device=DEV, dtype=torch.bfloat16) for h in (H, 2, 2)]
        _check_views(*(t[..., :D] for t in big), mask=mask, score_mod=sm)  # strided, aligned
        odd = [torch.randn(B * L * h * D + 1, device=DEV, dtype=torch.bfloat16)[1:].view(B, L, h, D) for h in (H, 2, 2)]
        assert odd[0].data_ptr() % 16 != 0
        _check_views(*odd, mask=mask, score_mod=sm)  # contiguous, misaligned


def test_deterministic_backward():
    q, k, v = (torch.randn(2, 8, 1000, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sl = torch.rand(8, device=DEV, requires_grad=True)
    grads = []
    for _ in range(2):
        out = attnkit.attention(q, k, v, mask=M.causal, score_mod=S.alibi(sl), backend="triton")
        grads.append(torch.autograd.grad(out.float().square().sum(), [q, k, v, sl]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_auto_dispatch_reports_what_ran():
    q, k, v = (torch.randn(2, 8, 512, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    out = attnkit.attention(q, k, v, mask=M.causal)
    name = attnkit.last_backend()
    assert name.split("/")[0] in {"triton"} | {f"sdpa-{b}" for b in kernels.SDPA_AUTO}
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=M.causal, backend="reference")
    assert rel(out, ref) <= 1e-2
    attnkit.attention(q, k, v, mask=M.sliding_window(64))
    assert attnkit.last_backend() == "triton/fused"


def test_varlen_gpu():
    cu = torch.tensor([0, 300, 301, 1000, 1500], device=DEV)
    q, k, v = (torch.randn(1500, H, 64, device=DEV, dtype=torch.bfloat16) for H in (8, 2, 2))
    out = attnkit.varlen_attention(q, k, v, cu, backend="triton")
    parts = [attnkit.attention(q[a:b].unsqueeze(0).double(), k[a:b].unsqueeze(0).double(),
                               v[a:b].unsqueeze(0).double(), mask=M.causal, layout="bthd", backend="reference")[0]
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert rel(out, torch.cat(parts)) <= 1e-2


def test_memory_is_linear_in_length():
    """fwd+bwd extra memory at T=16k stays within a small multiple of the inputs (no T×T anywhere)."""
    from attnkit.tools.timing import peak_memory
    T, H, D = 16384, 4, 64
    q, k, v = (torch.randn(1, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step():
        out = attnkit.attention(q, k, v, mask=M.causal, backend="triton")
        out.backward(torch.ones_like(out))

    step()
    io = 4 * q.numel() * q.element_size()
    assert peak_memory(step, DEV) <= 3 * io


# ------------------------------------------------------------------------------------------------
# differential attention: A1·V − λ_h·A2·V in one fused call ("triton/fused-differential")
# ------------------------------------------------------------------------------------------------

from attnkit import differential_attention  # noqa: E402

FUSED_DIFF = "triton/fused-differential"


def _diff_ref(q, k, v, lam, **kw):
    """float64 ``(A1 V − λ_h A2 V, A2 V)`` ``[B, Hq, Lq, Dv]``: each map by attnkit's reference backend
    (materialized) on the q/k halves, which it scales by 1/sqrt(d) as differential attention does."""
    d = q.shape[-1] // 2
    o1 = attnkit.attention(q[..., :d], k[..., :d], v, backend="reference", form="materialized", **kw)
    o2 = attnkit.attention(q[..., d:], k[..., d:], v, backend="reference", form="materialized", **kw)
    return o1 - (lam.reshape(1, -1, 1, 1) if torch.is_tensor(lam) else lam) * o2, o2.detach()


def _lam(kind: str, H: int, dtype: torch.dtype):
    """λ as a float, a learnable 0-d tensor or a learnable per-head tensor [H] in ``dtype``."""
    if kind == "float":
        return random.uniform(0.2, 0.8)
    if kind == "scalar":
        return torch.tensor(random.uniform(0.2, 0.8), device=DEV, dtype=dtype, requires_grad=True)
    return (0.2 + 0.6 * torch.rand(H, device=DEV, dtype=dtype)).requires_grad_()


def _diff_grads(out, ro, o2, xs, rs, names, low):
    """Compare the gradients of <out, g> (inputs ``xs``) with those of <ro, g> (float64 inputs ``rs``) by
    :func:`grads_close`; ``low(ys)``: the reference output in the kernel's dtype from copies ``ys`` of ``xs``.

    dλ_h = −<g_h, O2_h> is one dot product per head whose terms cancel: its error is bounded by ‖g‖·‖δO2‖
    (Cauchy–Schwarz), so it is measured relative to ‖g‖·‖O2‖, not to its own size."""
    tol = TOL[out.dtype]
    g = torch.randn_like(ro)
    ga = torch.autograd.grad((out * g.to(out.dtype)).sum(), xs, allow_unused=True)
    gb = torch.autograd.grad((ro * g).sum(), rs, allow_unused=True)
    ys = [t.detach().clone().requires_grad_() if i < 3 or n == "dlam" else t for i, (t, n) in enumerate(zip(xs, names))]
    lo = low(ys)
    gc = torch.autograd.grad((lo * g.to(lo.dtype)).sum(), ys, allow_unused=True)
    grads_close(names, ga, gb, gc, tol, skip=("dlam",))
    if "dlam" in names:
        a, b = ga[names.index("dlam")], gb[names.index("dlam")]
        diff, scale = float((a.detach().to(F64) - b).norm()), float(g.norm() * o2.norm())
        if scale == 0:  # no row sees a key (an all-empty mask): O2 = 0, so dλ = 0 exactly, and the kernel's zeros too
            assert diff == 0, f"dlam should be exactly 0 where no row sees a key, got |dlam - ref| = {diff:.2e}"
        else:
            assert diff / scale <= 2 * tol, f"dlam rel err {diff / scale:.2e} > {2 * tol}"


def check_differential(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, *, lam="per-head", lam_dtype=torch.float32, grad=True,
                       **kw):
    """Fused differential (``dtype``) vs :func:`_diff_ref`: output, grads of q, k, v, λ and learnable params."""
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, device=DEV, dtype=dtype)
    lx = _lam(lam, Hq, lam_dtype)
    lr = lx.detach().to(F64).requires_grad_() if torch.is_tensor(lx) else lx
    params = _params(kw.get("score_mod"))
    xs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    rs = [t.to(F64).requires_grad_(grad) for t in (q, k, v)]
    out = differential_attention(*xs, lx, backend="triton", **kw)
    # one fused call where d or Dv is a power of two >= 16, else two single-map fused calls (kernels.run_differential)
    fused = kernels._even(D // 2) or kernels._even(Dv)
    assert attnkit.last_backend() == (FUSED_DIFF if fused else "triton/fused"), attnkit.last_backend()
    ro, o2 = _diff_ref(*rs, lr, **kw)
    assert out.dtype == dtype and out.shape == ro.shape and torch.isfinite(out).all()
    tol = TOL[dtype]
    assert rel(out, ro) <= tol, f"out rel err {rel(out, ro):.2e} > {tol}"
    if grad:
        lams = ([lx], [lr], ["dlam"]) if torch.is_tensor(lx) else ([], [], [])
        names = ["dq", "dk", "dv"] + lams[2] + [f"param{i}" for i in range(len(params))]
        _diff_grads(out, ro, o2, xs + lams[0] + params, rs + lams[1] + params, names,
                    lambda ys: _diff_ref(*ys[:3], ys[3] if lams[0] else lx, **kw)[0])


def _diff_patterns(L: int) -> dict:
    """PATTERNS with the document boundaries placed inside length L."""
    doc = dict(mask=M.document(cu_seqlens=torch.tensor([0, L // 5, L // 2, L // 2 + 1, L])) & M.causal)
    return {**PATTERNS, "document": doc}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_differential_patterns_bf16(name):
    L = random.randint(300, 700)
    check_differential(2, 4, 2, L, L, 128, 128, torch.bfloat16, **_diff_patterns(L)[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,Dv,Hkv", [(128, 128, 2), (64, 128, 1)])
def test_differential_dtypes(D, Dv, Hkv, dtype):
    L = random.randint(300, 700)
    check_differential(2, 4, Hkv, L, L, D, Dv, dtype, mask=M.causal)


@pytest.mark.parametrize("lam", ["float", "scalar", "per-head"])
@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.bfloat16])
def test_differential_lambda(lam, lam_dtype):
    check_differential(1, 4, 2, 413, 413, 128, 64, torch.bfloat16, lam=lam, lam_dtype=lam_dtype,
                       mask=M.sliding_window(100), scale=0.1)


@pytest.mark.parametrize("name", ["alibi", "relbias", "ssmax", "temperature"])
def test_differential_learnable_mods(name):
    H = 4
    sm = learnable_mod(name, H)
    check_differential(1, H, 2, 333, 333, 64, 64, torch.float32, mask=M.causal, score_mod=sm)


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,mask", [
    (2, 4, 4, 256, 1024, M.full), (2, 4, 4, 256, 1024, M.causal),  # CAB cross patterns
    (2, 4, 1, 300, 200, M.causal),  # first 100 rows see nothing
    (4, 8, 2, 1, 999, M.causal),  # one decode step
])
def test_differential_cross_and_decode(B, Hq, Hkv, Lq, Lk, mask):
    check_differential(B, Hq, Hkv, Lq, Lk, 128, 128, torch.bfloat16, mask=mask)


@pytest.mark.parametrize("D,Dv", [(32, 32), (160, 96), (192, 128), (256, 256), (512, 128), (96, 200)])
def test_differential_head_dims(D, Dv):
    """q/k head dim 2d from 32 to 512 (d = 80, 96 not powers of two), Dv != 2d."""
    check_differential(1, 2, 1, 300, 413, D, Dv, torch.bfloat16, mask=M.causal)


@pytest.mark.parametrize("D,Dv", [(10, 19), (16, 19), (16, 40), (24, 40), (48, 40), (48, 19), (64, 19)])
def test_differential_padded_head_dims(D, Dv):
    """Head dims where d and Dv are both padded inside the kernel (d < 16 or not a power of two, Dv not a power of
    two): the single fused call compiled for sm_90 gave wrong dQ or an illegal address there (triton 3.6), so these
    run as two single-map fused calls; (64, 19) keeps one fused call (d = 32, a power of two)."""
    check_differential(2, 4, 2, 37, 37, D, Dv, torch.bfloat16, mask=M.causal)


@pytest.mark.parametrize("i", range(8))
def test_differential_random_composition(i):
    L, H = random.randint(200, 700), 4

    m = random_mask(L)
    mods = [f(H) for f in random.sample(_MODS, random.randint(0, 2))]
    print(f"mask {m!r}, mods {mods}, L={L}")  # shown when the test fails
    dtype = random.choice([torch.bfloat16, torch.float16])
    D, Dv = random.choice([64, 128]), random.choice([64, 128])
    check_differential(1, H, random.choice([1, 2, 4]), L, L, D, Dv, dtype, lam=random.choice(["float", "per-head"]),
                       mask=m, score_mod=mods or None)


def test_differential_all_empty_mask():
    """No row sees a key (issue 10, defect 8: the dλ check divided 0 by 0): zeros out, zero gradients, dλ = 0."""
    check_differential(1, 4, 2, 300, 300, 64, 64, torch.bfloat16, lam="per-head",
                       mask=M.sinks(3) & (~M.prefix_lm(29) & M.sliding_window(124, 29)))


def test_differential_strided_bthd_views():
    """layout="bthd" on views with the head dim sliced out of wider rows; output [B, T, Hq, Dv]."""
    B, T, Hq, Hkv, D, Dv = 2, 500, 4, 2, 128, 64
    base = [torch.randn(B, T, h, w + 8, device=DEV, dtype=torch.bfloat16) for h, w in ((Hq, D), (Hkv, D), (Hkv, Dv))]
    xs = [t[..., :w].detach().requires_grad_() for t, w in zip(base, (D, D, Dv))]
    rs = [t.detach().to(F64).requires_grad_() for t in xs]
    lx = _lam("per-head", Hq, torch.float32)
    lr = lx.detach().to(F64).requires_grad_()
    out = differential_attention(*xs, lx, mask=M.causal, layout="bthd", backend="triton")
    assert attnkit.last_backend() == FUSED_DIFF and out.shape == (B, T, Hq, Dv)
    ro, o2 = _diff_ref(*(t.transpose(1, 2) for t in rs), lr, mask=M.causal)
    ro = ro.transpose(1, 2)
    assert rel(out, ro) <= TOL[torch.bfloat16]
    _diff_grads(out, ro, o2, xs + [lx], rs + [lr], ["dq", "dk", "dv", "dlam"],
                lambda ys: _diff_ref(*(t.transpose(1, 2) for t in ys[:3]), ys[3], mask=M.causal)[0].transpose(1, 2))


def test_differential_deterministic_backward():
    q, k, v = (torch.randn(2, 8, 1000, 128 if i < 2 else 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for i in range(3))
    lam = torch.rand(8, device=DEV, requires_grad=True)
    sl = torch.rand(8, device=DEV, requires_grad=True)
    grads = []
    for _ in range(2):
        out = differential_attention(q, k, v, lam, mask=M.causal, score_mod=S.alibi(sl), backend="triton")
        grads.append(torch.autograd.grad(out.float().square().sum(), [q, k, v, lam, sl]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Non-finite values on the GPU (issue 10, defects 4/5): compiled kernels vs the float64 reference on the same inputs
# ------------------------------------------------------------------------------------------------

def _nonfinite_close(name, a, b, tol):
    """Same NaN pattern as the float64 reference, no ±inf, and the finite entries within ``tol``."""
    a, b = a.detach().to(F64), b.detach()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs from the reference"
    assert not torch.isinf(a).any(), f"{name}: ±inf in the kernel's result"
    fin = torch.isfinite(b)
    if fin.any() and float(b[fin].norm()) > 0:
        assert rel(a[fin], b[fin]) <= 2 * tol, f"{name}: rel err {rel(a[fin], b[fin]):.2e} on the finite entries"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask,where", [
    (M.causal, "last_key"),  # seen by the last row only
    (M.sliding_window(64), "last_key"),
    (M.sliding_window(64), "early_value"),  # seen by rows within the window only
    (M.full, "row_of_q"),  # one query row non-finite: its row only
])
def test_nonfinite_values_reach_only_rows_that_see_them(mask, where, dtype):
    """Outputs and gradients of the compiled kernels (PARTIAL and FULL blocks, L not a multiple of a block) have
    NaN exactly where the float64 reference has it and match it elsewhere."""
    B, H, L, D = 1, 2, random.randint(257, 400), 64
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=dtype) for _ in range(3))
    if where == "last_key":
        k[..., L - 1, 3] = float("inf")
        v[..., L - 1, 5] = float("nan")
    elif where == "early_value":
        v[..., 7, 1] = float("nan")
    else:
        q[..., 11, 2] = float("nan")
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    rs = [t.to(F64).requires_grad_() for t in (q, k, v)]
    out = attnkit.attention(*xs, mask=mask, backend="triton")
    assert attnkit.last_backend() == "triton/fused"
    ref = attnkit.attention(*rs, mask=mask, backend="reference", form="materialized")
    g = torch.randn_like(ref)
    ga = torch.autograd.grad((out * g.to(dtype)).sum(), xs)
    gb = torch.autograd.grad((ref * g).sum(), rs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + ga, (ref,) + gb):
        _nonfinite_close(name, a, b, TOL[dtype])
