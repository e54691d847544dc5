"""Fused Triton differential attention on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

    s_i = mod(scale · q_i k_iᵀ) on visible pairs (q = [q1 | q2], k = [k1 | k2], halves of d = D/2)
    A_i = softmax over the visible keys of each row (rows with no visible key: all 0)
    out_h = A1_h V − λ_h · A2_h V

Every case runs ``differential_attention(..., backend="triton")`` at float64 and checks that the fused
differential kernel ran (``attnkit.last_backend() == "triton/fused-differential"``), its output and the
gradients of q, k, v, λ and learnable score-mod parameters against :func:`ref_differential`, written here
from the definition (conftest's loop-built masks, an explicit masked softmax, K/V repeated for GQA),
never through attnkit. Outputs are poisoned with NaN before the kernels write them. The interpreter runs
32×16 forward, 16×32 dK/dV and 32×16 dQ tiles: lengths 37, 50, 70 leave ragged last blocks.
"""
from __future__ import annotations

import math
import os
import random

_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # the kernels are decorated as interpreted functions at import

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

triton = pytest.importorskip("triton")

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.ops.softmax import fused as KA  # noqa: E402
from attnkit import differential_attention  # noqa: E402

from conftest import F64, Pos, RMask, mask_case, one_thread, t5_bucket_ref  # noqa: E402

FUSED = "triton/fused-differential"
ATOL, RTOL = 1e-10, 1e-9


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter consults it while running
    monkeypatch.setattr(KA, "POISON", True)


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


# ------------------------------------------------------------------------------------------------
# reference and comparison
# ------------------------------------------------------------------------------------------------

def ref_differential(q, k, v, lam, m, *, scale=None, mod=None):
    """float64 ``A1 V − λ_h A2 V`` from the definition; ``m`` bool ``[B|1, H|1, Lq, Lk]`` (visible pairs),
    ``mod(s, Pos) -> s`` a reference score mod applied to both maps. Returns ``[B, Hq, Lq, Dv]``."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    B, Hq, Lq, D = q.shape
    Lk, G, d = k.shape[2], Hq // k.shape[1], D // 2
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    m = m.expand(B, Hq, Lq, Lk)
    pos = Pos(B, Hq, Lq, Lk, m)
    maps = []
    for half in (slice(0, d), slice(d, D)):
        s = sc * torch.einsum("bhid,bhjd->bhij", q[..., half], k[..., half])
        if mod is not None:
            s = mod(s, pos)
        s = torch.where(m, s, 0.0)  # masked pairs take no part (and pass no gradient)
        mx = torch.where(m, s, -math.inf).amax(-1, keepdim=True).detach()
        mx = torch.where(torch.isfinite(mx), mx, 0.0)  # rows without a visible key
        e = torch.where(m, torch.exp(s - mx), 0.0)
        den = e.sum(-1, keepdim=True)
        maps.append(e / torch.where(den > 0, den, 1.0))
    lam_h = lam.to(F64).reshape(1, -1, 1, 1) if torch.is_tensor(lam) else lam
    return (maps[0] - lam_h * maps[1]) @ v


def qkv(B, Hq, Hkv, Lq, Lk, D, Dv):
    """Fresh float64 q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] requiring grad."""
    mk = lambda *s: torch.randn(*s, dtype=F64).requires_grad_()  # noqa: E731
    return mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, Dv)


def head_lam(H: int) -> torch.Tensor:
    """A learnable per-head λ in [0.2, 0.8)."""
    return (0.2 + 0.6 * torch.rand(H, dtype=F64)).requires_grad_()


def fused(q, k, v, lam, **kw):
    """The fused path: (output, name of the backend that ran)."""
    out = differential_attention(q, k, v, lam, backend="triton", **kw)
    return out, attnkit.last_backend()


def compare(q, k, v, lam, rm: RMask, *, mod=None, ref_mod=None, params=(), scale=None, form="auto",
            atol=ATOL, rtol=RTOL):
    """Fused differential vs :func:`ref_differential`: output and the gradients of <out, g> w.r.t. q, k, v,
    λ (when a tensor requiring grad) and ``params``; then that the fused differential kernel ran."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    out, ran = fused(q, k, v, lam, mask=rm.ak, score_mod=mod, scale=scale, form=form)
    ref = ref_differential(q, k, v, lam, rm.dense(B, Hq, Lq, Lk), scale=scale, mod=ref_mod)
    what = f"{rm} {B}x{Hq}/{k.shape[1]} Lq={Lq} Lk={Lk} D={q.shape[-1]} Dv={v.shape[-1]}"
    assert out.dtype == q.dtype and out.shape == ref.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite (unwritten?) output"
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda s: f"{what} out: {s}")
    inputs = [q, k, v] + ([lam] if torch.is_tensor(lam) and lam.requires_grad else []) + list(params)
    names = ["dq", "dk", "dv"] + (["dlam"] if len(inputs) > 3 + len(params) else []) \
        + [f"dparam{i}" for i in range(len(params))]
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), inputs, allow_unused=True)
    for name, a, b, x in zip(names, got, want, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert torch.isfinite(a).all(), f"{what}: non-finite {name}"
        assert a.dtype == x.dtype and a.shape == x.shape, f"{what}: {name} {a.dtype} {tuple(a.shape)}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda s: f"{what} {name}: {s}")
    assert ran == FUSED, f"{what}: ran {ran!r}, not the fused differential kernel"
    return out, got


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------

def _sinks_or_window(B, H, Lq, Lk):
    return mask_case("sinks", B, H, Lq, Lk) | mask_case("window", B, H, Lq, Lk)


MASKS = [  # (name, Lq, Lk)
    ("causal", 50, 50), ("full", 37, 37), ("window", 70, 70), ("window2", 37, 37), ("chunked", 37, 37),
    ("prefix", 37, 37), ("prefix-batch", 37, 37), ("cu_seqlens", 50, 50), ("sinks|window", 50, 50),
    ("streamingllm", 37, 37), ("predicate-bh", 37, 50), ("causal", 37, 70), ("dilated", 37, 37),
]


@pytest.mark.parametrize("name,Lq,Lk", MASKS)
def test_masks(name, Lq, Lk):
    """Every mask kind (in-kernel leaves, a predicate through per-tile bitmaps, causal cross), GQA or two
    batches, a learnable per-head λ."""
    B, Hq, Hkv = random.choice([(1, 2, 1), (2, 1, 1)])
    rm = _sinks_or_window(B, Hq, Lq, Lk) if name == "sinks|window" else mask_case(name, B, Hq, Lq, Lk)
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, 32, 16)
    compare(q, k, v, head_lam(Hq), rm)


@pytest.mark.parametrize("form", ["auto", "streaming"])
def test_forms_run_fused(form):
    q, k, v = qkv(1, 2, 1, 37, 37, 16, 16)
    compare(q, k, v, head_lam(2), mask_case("causal", 1, 2, 37, 37), form=form)


# ------------------------------------------------------------------------------------------------
# fully masked rows
# ------------------------------------------------------------------------------------------------

def _rows_hidden(q, kv):
    """Rows q ≡ 2 (mod 5) see nothing; others see keys with (q + kv) % 3 != 0 (ints or tensors)."""
    return ((q % 5) != 2) & (((q + kv) % 3) != 0)


EMPTY_ROWS = {  # name -> (RMask builder, Lq, Lk)
    "predicate": (lambda B, H, Lq, Lk: RMask(M.predicate(lambda b, h, q, kv: _rows_hidden(q, kv)),
                                             lambda b, h, q, kv: bool(_rows_hidden(q, kv)), "predicate(rows)"),
                  50, 37),
    "window-cross": (lambda B, H, Lq, Lk: RMask(M.sliding_window(4), lambda b, h, q, kv: q - 4 <= kv <= q,
                                                "sliding_window(4)"), 70, 37),  # first 33 rows before all keys
    "causal-no-first": (lambda B, H, Lq, Lk: mask_case("causal-no-first", B, H, Lq, Lk), 37, 37),
    "anti-causal": (lambda B, H, Lq, Lk: mask_case("anti-causal", B, H, Lq, Lk), 50, 50),
}


@pytest.mark.parametrize("name", list(EMPTY_ROWS))
def test_fully_masked_rows(name):
    """Rows with no visible key: output exactly 0, dq rows exactly 0, nothing NaN; the rest as the reference."""
    build, Lq, Lk = EMPTY_ROWS[name]
    B, Hq, Hkv = 1, 2, 1
    rm = build(B, Hq, Lq, Lk)
    empty = ~rm.dense(B, Hq, Lq, Lk).any(-1)  # [B, Hq, Lq]
    assert empty.any() and not empty.all(), "the case must have both empty and non-empty rows"
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, 32, 16)
    out, (dq, *_) = compare(q, k, v, head_lam(Hq), rm)
    assert (out.detach()[empty] == 0).all(), "rows without a visible key must give 0"
    assert (dq[empty] == 0).all(), "rows without a visible key must give dq = 0"


# ------------------------------------------------------------------------------------------------
# score mods (learnable parameters get gradients)
# ------------------------------------------------------------------------------------------------

def _t5_buckets(Lq, Lk, bidirectional, nb, md):
    """Bucket of every (i, j) from the T5 definition by loops, at aligned query positions."""
    return torch.tensor([[t5_bucket_ref(j - (i + Lk - Lq), bidirectional, nb, md) for j in range(Lk)]
                         for i in range(Lq)])


def mod_case(name: str, H: int, Lq: int, Lk: int):
    """(attnkit score mod, reference ``fn(s, Pos)``, learnable tensors) with fresh random parameters."""
    per_head = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    if name == "softcap":
        c = random.uniform(0.5, 3.0)
        return S.softcap(c), lambda s, P: c * torch.tanh(s / c), []
    if name == "alibi":
        sl = (0.1 + torch.rand(H, dtype=F64)).requires_grad_()
        return S.alibi(sl), lambda s, P: s - per_head(sl) * (P.q - P.kv).abs(), [sl]
    if name in ("relative_bias", "relative_bias-causal"):
        bidir = name == "relative_bias"
        nb, md = (8, 12) if bidir else (6, 20)
        table = torch.randn(nb, H, dtype=F64).requires_grad_()
        bk = _t5_buckets(Lq, Lk, bidir, nb, md)
        return (S.relative_bias(H, num_buckets=nb, max_distance=md, bidirectional=bidir, table=table),
                lambda s, P: s + table[bk].permute(2, 0, 1).unsqueeze(0), [table])
    if name == "temperature":
        t = (0.5 + torch.rand(H, dtype=F64)).requires_grad_()
        return S.temperature(t), lambda s, P: s / per_head(t), [t]
    if name == "temperature-scalar":
        t = torch.tensor(random.uniform(0.5, 1.5), dtype=F64, requires_grad=True)
        return S.temperature(t), lambda s, P: s / t, [t]
    if name == "ssmax":
        a = (0.2 + torch.rand(H, dtype=F64)).requires_grad_()
        return S.ssmax(a), lambda s, P: s * per_head(a) * torch.log(P.n.clamp(min=1)), [a]
    if name == "composed":  # order matters: temperature, softcap, then ALiBi
        t = (0.5 + torch.rand(H, dtype=F64)).requires_grad_()
        sl = (0.1 + torch.rand(H, dtype=F64)).requires_grad_()
        return ([S.temperature(t), S.softcap(2.0), S.alibi(sl)],
                lambda s, P: 2.0 * torch.tanh(s / per_head(t) / 2.0) - per_head(sl) * (P.q - P.kv).abs(), [t, sl])
    raise KeyError(name)


MODS = ["softcap", "alibi", "relative_bias", "relative_bias-causal", "temperature", "temperature-scalar", "ssmax",
        "composed"]


@pytest.mark.parametrize("name", MODS)
def test_score_mods(name):
    """Each score mod on both maps, with a causal or sinks | window mask, self or causal cross."""
    Hq = 2
    Lq, Lk = random.choice([(37, 37), (21, 50)])
    mod, ref_mod, params = mod_case(name, Hq, Lq, Lk)
    rm = random.choice([mask_case("causal", 1, Hq, Lq, Lk), _sinks_or_window(1, Hq, Lq, Lk)])
    q, k, v = qkv(1, Hq, random.choice([1, 2]), Lq, Lk, 32, 16)
    compare(q, k, v, head_lam(Hq), rm, mod=mod, ref_mod=ref_mod, params=params)


# ------------------------------------------------------------------------------------------------
# λ, heads, shapes, layouts
# ------------------------------------------------------------------------------------------------

LAMS = {
    "float": lambda H: random.choice([-1, 1]) * random.uniform(0.2, 0.8),
    "0-d-grad": lambda H: torch.tensor(random.uniform(0.2, 0.8), dtype=F64, requires_grad=True),
    "per-head-grad": head_lam,
    "per-head-constant": lambda H: 0.2 + 0.6 * torch.rand(H, dtype=F64),
}


@pytest.mark.parametrize("kind", list(LAMS))
def test_lambda_kinds(kind):
    """λ as a float, a 0-d tensor and a per-head tensor (with and without grad); a custom scale."""
    Hq, L = 2, 21
    q, k, v = qkv(1, Hq, 1, L, L, 32, 16)
    compare(q, k, v, LAMS[kind](Hq), mask_case("causal", 1, Hq, L, L), scale=random.uniform(0.1, 0.4))


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
def test_gqa_mqa(Hq, Hkv):
    q, k, v = qkv(1, Hq, Hkv, 37, 37, 32, 16)
    compare(q, k, v, head_lam(Hq), mask_case("causal", 1, Hq, 37, 37))


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk", [(1, 1, 1, 1, 1), (2, 2, 1, 1, 37), (1, 2, 2, 1, 70)])
def test_single_token(B, Hq, Hkv, Lq, Lk):
    """T = 1 and a decode step (one query at the end of the keys), causal."""
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, 32, 16)
    compare(q, k, v, head_lam(Hq), mask_case("causal", B, Hq, Lq, Lk))


@pytest.mark.parametrize("D,Dv", [(48, 20), (32, 48), (10, 8), (2, 3)])
def test_head_dims(D, Dv):
    """Dv != 2d, d not a power of two (24, 5) and d = 1."""
    q, k, v = qkv(1, 2, 1, 37, 37, D, Dv)
    compare(q, k, v, head_lam(2), mask_case("causal", 1, 2, 37, 37))


def test_non_contiguous_bthd_layout():
    """layout="bthd" on strided views (last dim sliced out of wider rows); output [B, T, Hq, Dv]."""
    B, T, Hq, Hkv, D, Dv = 2, 37, 2, 1, 32, 16
    bases = [torch.randn(B, T, h, w + 8, dtype=F64, requires_grad=True) for h, w in ((Hq, D), (Hkv, D), (Hkv, Dv))]
    q, k, v = (b[..., :w] for b, w in zip(bases, (D, D, Dv)))
    assert not any(t.is_contiguous() for t in (q, k, v))
    lam = head_lam(Hq)
    out, ran = fused(q, k, v, lam, mask=M.causal, layout="bthd")
    m = mask_case("causal", B, Hq, T, T).dense(B, Hq, T, T)
    ref = ref_differential(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lam, m).transpose(1, 2)
    assert out.shape == (B, T, Hq, Dv)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    g = torch.randn_like(ref)
    for name, a, b in zip(["dq", "dk", "dv", "dlam"], torch.autograd.grad((out * g).sum(), bases + [lam]),
                          torch.autograd.grad((ref * g).sum(), bases + [lam])):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda s: f"{name}: {s}")
    assert ran == FUSED


def test_saves_no_score_map():
    """Autograd keeps no [Lq, Lk]-sized tensor for backward (recompute, not a stored map)."""
    q, k, v = qkv(1, 1, 1, 70, 70, 16, 16)
    lam = head_lam(1)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        _, ran = fused(q, k, v, lam, mask=M.causal)
    assert sizes and max(sizes) < 70 * 70, f"saved tensors of {max(sizes)} elements"
    assert ran == FUSED


def test_gradcheck_float64():
    """torch.autograd.gradcheck through the fused path on q, k, v, λ (tiny shape)."""
    q, k, v = qkv(1, 2, 1, 5, 7, 8, 4)
    lam = head_lam(2)

    def f(q, k, v, lam):
        return differential_attention(q, k, v, lam, mask=M.causal & M.sliding_window(3), backend="triton")

    assert torch.autograd.gradcheck(f, (q, k, v, lam), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert attnkit.last_backend() == FUSED


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_odd_head_dim_is_refused():
    q, k, v = qkv(1, 2, 1, 8, 8, 5, 4)
    with pytest.raises(ValueError, match="even, got 5"):
        differential_attention(q, k, v, 0.5, backend="triton")


@pytest.mark.parametrize("lam,exc,match", [
    (torch.rand(3, dtype=F64), ValueError, r"shape \[2\].*\(3,\)"),
    (torch.rand(2, 1, dtype=F64), ValueError, "scalar or a per-head"),
    (torch.tensor([1, 2]), TypeError, "floating"),
    ("0.5", TypeError, "lam must be a float or a tensor"),
])
def test_bad_lambda_is_refused(lam, exc, match):
    q, k, v = qkv(1, 2, 1, 8, 8, 8, 4)
    with pytest.raises(exc, match=match):
        differential_attention(q, k, v, lam, backend="triton")


def test_return_weights_is_refused_on_triton():
    q, k, v = qkv(1, 2, 1, 8, 8, 8, 4)
    with pytest.raises(ValueError, match="return_weights"):
        differential_attention(q, k, v, 0.5, backend="triton", return_weights=True)


# after every import above: the rest of the session keeps its environment (the fixture sets it per test)
if _env is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _env
