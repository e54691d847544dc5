"""Head-structure variants against float64 references written from their formulas:
differential attention, multi-token attention (convolved score map + head mixing), 2-simplicial attention.

The references here never call attnkit's code paths: masks come from conftest's Python predicates
(``RMask.dense``), scores from explicit einsums with K repeated for GQA, the MTA convolution from a loop
over its taps (itself pinned by a plain Python loop over every entry), the simplicial logits from a
three-way einsum over every (i, j, k).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.graph import saved_tensors_hooks

import attnkit.masks as M
from attnkit.catalog import Spec, get_variant
from attnkit import differential_attention
from attnkit import multi_token_attention
from attnkit.ops.simplicial import WINDOW1, WINDOW2, simplicial_attention
from conftest import (F64, RMask, assert_close, mask_case, one_thread, rand_qkv, randn, ref_attention, ref_normalize,
                      ref_scores)

FORMS3 = ["materialized", "streaming", "recurrent"]


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def rmask(name, B, H, Lq, Lk):
    rm = mask_case(name, B, H, Lq, Lk)
    return rm, rm.dense(B, H, Lq, Lk)


def no_lookahead(m: torch.Tensor, Lq: int, Lk: int) -> bool:
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    return not bool((m & (torch.arange(Lk).view(1, -1) > i)).any())


def grads(out, inputs, g):
    return torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)


def compare(got_fn, ref_fn, inputs, *, atol=1e-9, rtol=1e-7, what=""):
    """Output and gradients of <out, g> w.r.t. every input, attnkit vs reference; no NaN anywhere."""
    out, ref = got_fn(*inputs), ref_fn(*inputs)
    assert out.shape == ref.shape and out.dtype == inputs[0].dtype, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert_close(out, ref, atol=atol, rtol=rtol, what=f"{what} out")
    g = torch.randn_like(ref)
    for i, (a, b) in enumerate(zip(grads(out, inputs, g), grads(ref, inputs, g))):
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        assert torch.isfinite(a).all(), f"{what}: non-finite grad of input {i}"
        assert_close(a, b, atol=atol, rtol=rtol, what=f"{what} grad of input {i}")
    return out


def max_saved_numel(fn, *args) -> int:
    """Largest tensor autograd saves for backward while running ``fn``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return max(sizes)


# ================================================================================================
# Differential attention
# ================================================================================================

def ref_differential(q, k, v, lam, m, scale=None):
    """A1 V − λ_h A2 V from the split halves, each map by conftest's float64 softmax reference."""
    d = q.shape[-1] // 2
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    o1, _, p1 = ref_attention(q[..., :d], k[..., :d], v, m, scale=sc)
    o2, _, p2 = ref_attention(q[..., d:], k[..., d:], v, m, scale=sc)
    lam_h = lam.to(F64).view(1, -1, 1, 1) if torch.is_tensor(lam) else lam
    return o1 - lam_h * o2, p1 - lam_h * p2


@pytest.mark.parametrize("form", FORMS3)
@pytest.mark.parametrize("name,Lq,Lk", [("causal", 9, 9), ("causal", 5, 12), ("window", 10, 10), ("full", 7, 11),
                                        ("chunked", 8, 8), ("causal-no-first", 6, 6), ("anti-causal", 6, 6)])
def test_differential_vs_reference(name, Lq, Lk, form):
    """GQA 4:2, Dv != D/2, per-head λ (learnable): output and grads of q, k, v, λ in every form."""
    B, Hq, Hkv = 2, 4, 2
    rm, m = rmask(name, B, Hq, Lq, Lk)
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 6, 5, requires_grad=True)
    lam = (0.2 + 0.6 * torch.rand(Hq, dtype=F64)).requires_grad_()
    if form == "recurrent" and not no_lookahead(m, Lq, Lk):
        with pytest.raises(ValueError, match="look-ahead"):
            differential_attention(q, k, v, lam, mask=rm.ak, form=form)
        return
    compare(lambda q, k, v, lam: differential_attention(q, k, v, lam, mask=rm.ak, form=form, backend="reference"),
            lambda q, k, v, lam: ref_differential(q, k, v, lam, m)[0], [q, k, v, lam], what=f"{rm} {form}")


def test_differential_scalar_lambda_scale_score_mod_and_weights():
    """λ as a float and as a 0-d tensor, a custom scale, a score mod applied to both maps, and the weights
    A1 − λ·A2 with out = W·V."""
    from attnkit.scores import softcap
    B, Hq, L = 1, 2, 7
    q, k, v = rand_qkv(B, Hq, Hq, L, L, 8, 3)
    m = mask_case("causal", B, Hq, L, L).dense(B, Hq, L, L)
    lam = 0.3 + 0.5 * random.random()
    d = 4
    sc = 0.37
    # reference with softcap written out: 30·tanh(s/30)
    s1 = 30 * torch.tanh(ref_scores(q[..., :d], k[..., :d], sc) / 30)
    s2 = 30 * torch.tanh(ref_scores(q[..., d:], k[..., d:], sc) / 30)
    w = ref_normalize(s1, m)[0] - lam * ref_normalize(s2, m)[0]
    for lam_arg in (lam, torch.tensor(lam, dtype=F64)):
        out, weights = differential_attention(q, k, v, lam_arg, mask=M.causal, scale=sc, score_mod=softcap(30.0),
                                              return_weights=True)
        assert_close(weights, w, what="differential weights")
        assert_close(out, w @ v, what="differential out = W V")


def test_differential_streaming_lengths_past_one_block():
    """Lengths above the engine's 512 block and not a multiple of it; causal cross (Lq < Lk)."""
    q, k, v = rand_qkv(1, 2, 1, 530, 700, 4, 3, requires_grad=True)
    lam = torch.rand(2, dtype=F64, requires_grad=True)
    m = mask_case("causal", 1, 2, 530, 700).dense(1, 2, 530, 700)
    compare(lambda *a: differential_attention(*a, mask=M.causal, form="streaming"),
            lambda q, k, v, lam: ref_differential(q, k, v, lam, m)[0], [q, k, v, lam], what="long streaming")


@pytest.mark.parametrize("form", FORMS3)
def test_differential_gradcheck(form):
    q, k, v = rand_qkv(1, 2, 1, 4, 5, 4, 2, requires_grad=True)
    lam = torch.rand(2, dtype=F64, requires_grad=True)
    assert gradcheck(lambda *a: differential_attention(*a, mask=M.causal, form=form), (q, k, v, lam))


@pytest.mark.parametrize("form", FORMS3)
def test_differential_layout_and_noncontiguous(form):
    B, Hq, Hkv, L = 2, 4, 1, 6
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, 6, 4)
    lam = torch.rand(Hq, dtype=F64)
    want = differential_attention(q, k, v, lam, mask=M.causal, form=form)
    assert_close(want, ref_differential(q, k, v, lam, mask_case("causal", B, Hq, L, L).dense(B, Hq, L, L))[0])
    got = differential_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lam, mask=M.causal,
                                 form=form, layout="bthd")
    assert got.shape == (B, L, Hq, 4)
    assert_close(got.transpose(1, 2), want, what="bthd")
    qn = torch.randn(B, Hq, 12, L, dtype=F64).transpose(2, 3)[..., ::2]  # strided, non-contiguous
    qn.copy_(q)
    assert not qn.is_contiguous()
    assert_close(differential_attention(qn, k, v, lam, mask=M.causal, form=form), want, what="non-contiguous")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_differential_low_precision(dtype):
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 8, 4)
    lam = torch.rand(2, dtype=F64)
    want = ref_differential(q, k, v, lam, mask_case("causal", 1, 2, 8, 8).dense(1, 2, 8, 8))[0]
    for form in FORMS3:
        out = differential_attention(q.to(dtype), k.to(dtype), v.to(dtype), lam.to(dtype), mask=M.causal, form=form)
        assert out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert_close(out, want, atol=tol, rtol=tol, what=f"{dtype} {form}")


@pytest.mark.parametrize("lam,exc,match", [
    (torch.rand(3, dtype=F64), ValueError, r"per-head tensor of shape \[2\].*\(3,\)"),
    (torch.rand(2, 2, dtype=F64), ValueError, "scalar or a per-head"),
    (torch.tensor([1, 2]), TypeError, "floating"),
    ("0.5", TypeError, "lam must be a float or a tensor"),
    (True, TypeError, "lam must be a float or a tensor"),
    (torch.rand(2, dtype=F64, device="meta"), ValueError, "meta"),
])
def test_differential_bad_lambda(lam, exc, match):
    q, k, v = rand_qkv(1, 2, 1, 4, 4, 4, 4)
    with pytest.raises(exc, match=match):
        differential_attention(q, k, v, lam)


def test_differential_bad_shapes():
    q, k, v = rand_qkv(1, 2, 1, 4, 4, 5, 4)
    with pytest.raises(ValueError, match="must be even, got 5"):
        differential_attention(q, k, v, 0.5)
    q, k, v = rand_qkv(1, 3, 2, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        differential_attention(q, k, v, 0.5)
    q, k, v = rand_qkv(1, 2, 1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="return_weights needs form='materialized'"):
        differential_attention(q, k, v, 0.5, form="streaming", return_weights=True)


# ================================================================================================
# Multi-token attention
# ================================================================================================

def conv_loops(s0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """C[b,h,i,j] = Σ_{a<cq} Σ_{c<ck} θ_h[a,c]·S0[i−a, j+⌊ck/2⌋−c], a Python loop over every entry."""
    B, H, Lq, Lk = s0.shape
    cq, ck = theta.shape[1:]
    out = torch.zeros(B, H, Lq, Lk, dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    acc = 0.0
                    for a in range(cq):
                        for c in range(ck):
                            ii, jj = i - a, j + ck // 2 - c
                            if 0 <= ii < Lq and 0 <= jj < Lk:
                                acc += float(theta[h, a, c]) * float(s0[b, h, ii, jj])
                    out[b, h, i, j] = acc
    return out


def conv_taps(s0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The same sum, one shifted copy of S0 per tap (differentiable; pinned to conv_loops below)."""
    B, H, Lq, Lk = s0.shape
    cq, ck = theta.shape[1:]
    i, j = torch.arange(Lq), torch.arange(Lk)
    out = torch.zeros(B, H, Lq, Lk, dtype=F64)
    for a in range(cq):
        for c in range(ck):
            ii, jj = i - a, j + ck // 2 - c
            ok = ((ii >= 0).view(-1, 1) & ((jj >= 0) & (jj < Lk)).view(1, -1)).to(F64)
            shifted = s0[:, :, ii.clamp(0, Lq - 1)][:, :, :, jj.clamp(0, Lk - 1)] * ok
            out = out + theta[:, a, c].to(F64).view(1, H, 1, 1) * shifted
    return out


def ref_mta(q, k, v, theta, m, W=None, scale=None, kind="softmax", U=None):
    """Multi-token attention from its formula: Mask_0, convolution, pre-softmax head mixing U,
    Mask_−∞ + normalizer, post-softmax head mixing W, · V_h."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    m = m.expand(B, Hq, Lq, Lk)
    s0 = torch.where(m, ref_scores(q, k, scale), torch.zeros((), dtype=F64))
    c = conv_taps(s0, theta)
    if U is not None:
        gp = U.shape[1]
        c = torch.stack([sum(U[h // gp, h % gp, j].to(F64) * c[:, (h // gp) * gp + j] for j in range(gp))
                         for h in range(Hq)], 1)
    p, _ = ref_normalize(c, m, kind)
    if W is not None:
        g = W.shape[1]
        p = torch.einsum("nhl,bnlij->bnhij", W.to(F64), p.reshape(B, Hq // g, g, Lq, Lk)).reshape(B, Hq, Lq, Lk)
    return p @ v.to(F64).repeat_interleave(Hq // v.shape[1], dim=1), p


def test_mta_conv_reference_is_the_formula():
    """The tap-shift reference equals the formula's entry-by-entry loop (pins the orientation: queries look
    back, keys centred at ⌊ck/2⌋), and attnkit's materialized weights equal softmax of that convolution."""
    B, H, L = 1, 2, 6
    s0 = torch.randn(B, H, L, L, dtype=F64)
    theta = torch.randn(H, 3, 4, dtype=F64)
    assert_close(conv_taps(s0, theta), conv_loops(s0, theta), what="conv taps vs loops")
    # a one-hot kernel moves scores exactly as the formula says
    q, k, v = rand_qkv(B, H, H, L, L, 3, 2)
    s = ref_scores(q, k)
    for a, c in [(0, 2), (1, 2), (2, 0), (0, 3)]:
        theta = torch.zeros(H, 3, 4, dtype=F64)
        theta[:, a, c] = 1.0
        _, w = multi_token_attention(q, k, v, theta, mask=M.full, return_weights=True)
        shift = torch.full_like(s, -math.inf)  # C[i,j] = S[i−a, j+2−c], 0 outside
        for i in range(L):
            for j in range(L):
                ii, jj = i - a, j + 2 - c
                shift[:, :, i, j] = s[:, :, ii, jj] if 0 <= ii < L and 0 <= jj < L else 0.0
        assert_close(w, torch.softmax(shift, -1), what=f"one-hot tap ({a},{c})")


HEAD_MIX = {  # (Hq, Hkv, g): no mixing, mixing inside GQA groups, across GQA groups, not nesting with them
    "none": (4, 2, None), "inside": (4, 2, 2), "across": (4, 2, 4), "mha-pairs": (4, 4, 2), "non-nesting": (6, 3, 3),
}


def mta_inputs(Hq, Hkv, g, Lq, Lk, cq, ck, D=4, Dv=3, B=2):
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, requires_grad=True)
    theta = randn(Hq, cq, ck, requires_grad=True)
    W = None if g is None else randn(Hq // g, g, g, requires_grad=True)
    return q, k, v, theta, W


@pytest.mark.parametrize("form", FORMS3 + ["streaming-odd-blocks"])
@pytest.mark.parametrize("mix", list(HEAD_MIX))
@pytest.mark.parametrize("name,Lq,Lk", [("causal", 9, 9), ("causal", 5, 11), ("full", 8, 6), ("window2", 10, 10),
                                        ("causal-no-first", 7, 7), ("anti-causal", 6, 6)])
def test_mta_vs_reference(name, Lq, Lk, mix, form):
    """Every form against the formula: output and grads of q, k, v, θ and W (head mixing)."""
    Hq, Hkv, g = HEAD_MIX[mix]
    rm, m = rmask(name, 2, Hq, Lq, Lk)
    cq, ck = random.randint(1, 4), random.randint(1, 6)
    q, k, v, theta, W = mta_inputs(Hq, Hkv, g, Lq, Lk, cq, ck)
    inputs = [q, k, v, theta] + ([W] if W is not None else [])
    kw = dict(mask=rm.ak)
    if form == "streaming-odd-blocks":
        kw.update(form="streaming", block_q=random.choice([1, 2, 3]), block_k=random.choice([2, 3, 5]))
    else:
        kw.update(form=form)
    if form == "recurrent" and not no_lookahead(m, Lq, Lk):
        with pytest.raises(ValueError, match="look-ahead"):
            multi_token_attention(q, k, v, theta, head_mix=W, **kw)
        return
    out = compare(lambda q, k, v, th, W=None: multi_token_attention(q, k, v, th, head_mix=W, **kw),
                  lambda q, k, v, th, W=None: ref_mta(q, k, v, th, m, W)[0], inputs,
                  what=f"{rm} mix={mix} cq={cq} ck={ck} {kw}")
    empty = ~m.expand(2, Hq, Lq, Lk).any(-1)
    assert (out[empty] == 0).all(), "fully masked rows must give zeros"


@pytest.mark.parametrize("form", FORMS3)
@pytest.mark.parametrize("kind,normalizer", [("sigmoid", "sigmoid"), ("relu2", "relu2"), ("softmax", "softmax")])
def test_mta_normalizers_and_scale(kind, normalizer, form):
    Hq, Hkv, g = HEAD_MIX["inside"]
    rm, m = rmask("causal", 2, Hq, 8, 8)
    q, k, v, theta, W = mta_inputs(Hq, Hkv, g, 8, 8, 3, 5)
    compare(lambda *a: multi_token_attention(*a[:4], head_mix=a[4], mask=M.causal, normalizer=normalizer, scale=0.7,
                                             form=form, block_q=3, block_k=3),
            lambda *a: ref_mta(*a[:4], m, a[4], scale=0.7, kind=kind)[0], [q, k, v, theta, W], what=f"{kind} {form}")


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 7), (7, 1)])
@pytest.mark.parametrize("form", FORMS3)
def test_mta_tiny_lengths(Lq, Lk, form):
    rm, m = rmask("causal", 1, 2, Lq, Lk)
    q, k, v, theta, W = mta_inputs(2, 1, 2, Lq, Lk, 3, 3, B=1)
    compare(lambda *a: multi_token_attention(*a[:4], head_mix=a[4], form=form, block_q=1, block_k=1),
            lambda *a: ref_mta(*a[:4], m, a[4])[0], [q, k, v, theta, W], what=f"Lq={Lq} Lk={Lk} {form}")


@pytest.mark.parametrize("form", FORMS3)
@pytest.mark.parametrize("Hq,Hkv,gp", [(4, 2, 2), (4, 4, 4), (6, 3, 3)])
def test_mta_pre_softmax_head_mixing(form, Hq, Hkv, gp):
    """head_mix_pre mixes convolved scores across heads before the mask and the normalizer (and composes
    with post-softmax mixing): output and grads of q, k, v, θ, U, W against the formula."""
    q, k, v, theta, W = mta_inputs(Hq, Hkv, 2, 7, 9, 2, 3)
    U = randn(Hq // gp, gp, gp, requires_grad=True)
    rm, m = rmask("causal", 2, Hq, 7, 9)
    kw = dict(mask=rm.ak, form=form) if form != "streaming" else dict(mask=rm.ak, form=form, block_q=3, block_k=4)
    compare(lambda q, k, v, th, U, W: multi_token_attention(q, k, v, th, head_mix=W, head_mix_pre=U, **kw),
            lambda q, k, v, th, U, W: ref_mta(q, k, v, th, m, W=W, U=U)[0], [q, k, v, theta, U, W])
    with pytest.raises(ValueError, match="head_mix_pre must be"):
        multi_token_attention(q, k, v, theta, head_mix_pre=randn(1, 3, 3))


def test_mta_causal_output_ignores_future_keys():
    """Under the causal mask no output depends on a later key or value (Mask_0 before the convolution),
    even though the key convolution reads ⌊ck/2⌋ keys to the right."""
    q, k, v, theta, W = (t.detach() if t is not None else t for t in mta_inputs(4, 2, 2, 10, 10, 3, 7))
    out = multi_token_attention(q, k, v, theta, head_mix=W)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 5 * torch.randn_like(k2[:, :, 6:])
    v2[:, :, 6:] += 5 * torch.randn_like(v2[:, :, 6:])
    out2 = multi_token_attention(q, k2, v2, theta, head_mix=W)
    assert_close(out[:, :, :6], out2[:, :, :6], what="rows before the change")
    assert not torch.allclose(out[:, :, 6:], out2[:, :, 6:])


@pytest.mark.parametrize("form", FORMS3)
def test_mta_gradcheck(form):
    q, k, v, theta, W = mta_inputs(4, 2, 2, 5, 5, 2, 3, D=2, Dv=2, B=1)
    assert gradcheck(lambda *a: multi_token_attention(*a[:4], head_mix=a[4], form=form, block_q=2, block_k=3),
                     (q, k, v, theta, W))


def test_mta_weights():
    """return_weights gives Â (mixed) with out = Â_h V_h; without mixing the rows sum to 1."""
    rm, m = rmask("causal", 2, 4, 7, 9)
    q, k, v, theta, W = (t.detach() for t in mta_inputs(4, 2, 2, 7, 9, 2, 3))
    want_out, want_w = ref_mta(q, k, v, theta, m, W)
    out, w = multi_token_attention(q, k, v, theta, head_mix=W, return_weights=True)
    assert_close(w, want_w, what="mixed weights")
    assert_close(out, want_out, what="out")
    _, w0 = multi_token_attention(q, k, v, theta, return_weights=True)
    assert_close(w0.sum(-1), torch.ones(2, 4, 7, dtype=F64), what="row sums")


def test_mta_layout_noncontiguous_and_low_precision():
    rm, m = rmask("causal", 2, 4, 6, 6)
    q, k, v, theta, W = (t.detach() for t in mta_inputs(4, 2, 2, 6, 6, 2, 3))
    want = ref_mta(q, k, v, theta, m, W)[0]
    got = multi_token_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), theta, head_mix=W,
                                layout="bthd")
    assert_close(got.transpose(1, 2), want, what="bthd")
    thn = torch.randn(3, 2, 4, dtype=F64).permute(2, 1, 0)  # non-contiguous kernel [4, 2, 3]
    thn.copy_(theta)
    qn = torch.randn(2, 4, 4, 12, dtype=F64).transpose(2, 3)[:, :, ::2]  # non-contiguous q [2, 4, 6, 4]
    qn.copy_(q)
    assert not (thn.is_contiguous() or qn.is_contiguous())
    for form in FORMS3:
        assert_close(multi_token_attention(qn, k, v, thn, head_mix=W, form=form, block_q=4, block_k=4), want,
                     what=f"non-contiguous {form}")
        out = multi_token_attention(q.float(), k.float(), v.float(), theta.float(), head_mix=W.float(), form=form)
        assert out.dtype == torch.float32
        assert_close(out, want, atol=1e-4, rtol=1e-4, what=f"float32 {form}")


def test_mta_streaming_memory():
    """The streaming backward keeps inputs and outputs, never an Lq x Lk map."""
    L = 96
    q, k, v, theta, W = mta_inputs(2, 2, 2, L, L, 3, 5, D=4, Dv=4, B=1)
    biggest = max_saved_numel(lambda: multi_token_attention(q, k, v, theta, head_mix=W, form="streaming",
                                                            block_q=16, block_k=16).sum().backward())
    assert biggest < L * L, f"saved a tensor of {biggest} entries (Lq·Lk = {L * L})"


@pytest.mark.parametrize("kw,exc,match", [
    (dict(kernel=torch.randn(2, 3)), ValueError, r"θ of shape \[Hq, cq, ck\]"),
    (dict(kernel=torch.randn(3, 2, 3)), ValueError, r"\[Hq=2, cq>=1, ck>=1\]"),
    (dict(kernel=torch.randn(2, 0, 3)), ValueError, "cq>=1"),
    (dict(kernel=torch.ones(2, 2, 3, dtype=torch.long)), TypeError, "floating"),
    (dict(kernel=[[1.0]]), TypeError, "kernel must be a torch.Tensor"),
    (dict(head_mix=torch.randn(1, 2, 3)), ValueError, r"\[Hq/g, g, g\]"),
    (dict(head_mix=torch.randn(2, 2, 2)), ValueError, r"\[Hq/g, g, g\] with Hq=2"),
    (dict(head_mix=torch.randn(2, 2)), ValueError, "head_mix must be W"),
    (dict(form="chunk"), ValueError, "form must be one of"),
    (dict(form="streaming", return_weights=True), ValueError, "return_weights needs form='materialized'"),
    (dict(form="recurrent", mask=M.full), ValueError, "look-ahead"),
    (dict(normalizer="softmx"), ValueError, "unknown normalizer"),
    (dict(mask=3), TypeError, "mask must be"),
    (dict(scale="x"), TypeError, "scale"),
])
def test_mta_bad_inputs(kw, exc, match):
    q, k, v = rand_qkv(1, 2, 1, 5, 5, 4, 4)
    kw = {"kernel": torch.randn(2, 2, 3, dtype=F64), **kw}
    with pytest.raises(exc, match=match):
        multi_token_attention(q, k, v, kw.pop("kernel"), **kw)


# ================================================================================================
# 2-simplicial attention
# ================================================================================================

def window(w: int, right: int = 0) -> RMask:
    """Sliding window of w past keys (diagonal included) and ``right`` future keys, from its definition."""
    return RMask(M.sliding_window(w - 1, right), lambda b, h, q, kv: q - (w - 1) <= kv <= q + right,
                 f"window({w}, {right})")


def ref_simplicial(q, k1, v1, k2, v2, m1, m2, scale=None):
    """A_ijk = scale Σ_d q_id k1_jd k2_kd; softmax jointly over visible (j, k); o_i = Σ_jk P_ijk v1_j ∘ v2_k."""
    B, Hq, Lq, D = q.shape
    G = Hq // k1.shape[1]
    k1, v1, k2, v2 = (t.to(F64).repeat_interleave(G, dim=1) for t in (k1, v1, k2, v2))
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    A = sc * torch.einsum("bhid,bhjd,bhkd->bhijk", q.to(F64), k1, k2)
    m = m1.expand(B, Hq, -1, -1).unsqueeze(-1) & m2.expand(B, Hq, -1, -1).unsqueeze(-2)
    P, _ = ref_normalize(A.flatten(-2), m.flatten(-2))
    return torch.einsum("bhijk,bhjd,bhkd->bhid", P.view_as(A), v1, v2)


def simp_inputs(B, Hq, Hkv, Lq, Lk1, Lk2, D, Dv, requires_grad=True):
    return [randn(*s, requires_grad=requires_grad) for s in
            ((B, Hq, Lq, D), (B, Hkv, Lk1, D), (B, Hkv, Lk1, Dv), (B, Hkv, Lk2, D), (B, Hkv, Lk2, Dv))]


SIMP_MASKS = {  # name -> (mask1, mask2) builders of (B, H, Lq, Lk)
    "windows": lambda *s: (window(4), window(2)),
    "windows-wide": lambda *s: (window(7), window(5)),
    "causal-window": lambda *s: (mask_case("causal", *s), window(3)),
    "bidirectional": lambda *s: (window(3, 2), window(2, 1)),
    "full-causal": lambda *s: (mask_case("full", *s), mask_case("causal", *s)),
    "first-row-empty": lambda *s: (window(3), mask_case("causal-no-first", *s)),
    "dilated-streamingllm": lambda *s: (mask_case("causal-dilated", *s), mask_case("streamingllm", *s)),
}


@pytest.mark.parametrize("form", FORMS3)
@pytest.mark.parametrize("masks", list(SIMP_MASKS))
@pytest.mark.parametrize("Lq,Lk1,Lk2", [(9, 9, 9), (5, 11, 8), (10, 7, 10)])
def test_simplicial_vs_reference(Lq, Lk1, Lk2, masks, form):
    """GQA 4:2, Lq != Lk1 != Lk2, odd tile sizes: output and grads of q, k1, v1, k2, v2 in every form."""
    B, Hq, Hkv = 2, 4, 2
    r1, r2 = SIMP_MASKS[masks](B, Hq, Lq, Lk1)
    r2 = SIMP_MASKS[masks](B, Hq, Lq, Lk2)[1] if Lk2 != Lk1 else r2
    m1, m2 = r1.dense(B, Hq, Lq, Lk1), r2.dense(B, Hq, Lq, Lk2)
    xs = simp_inputs(B, Hq, Hkv, Lq, Lk1, Lk2, 4, 3)
    kw = dict(mask1=r1.ak, mask2=r2.ak, form=form, block_q=random.choice([1, 2, 3]),
              block_k1=random.choice([2, 3, 4]), block_k2=random.choice([1, 2, 5]))
    if form == "recurrent" and not (no_lookahead(m1, Lq, Lk1) and no_lookahead(m2, Lq, Lk2)):
        with pytest.raises(ValueError, match="look-ahead"):
            simplicial_attention(*xs, **kw)
        return
    out = compare(lambda *a: simplicial_attention(*a, **kw), lambda *a: ref_simplicial(*a, m1, m2), xs,
                  what=f"{r1} x {r2} {kw}")
    empty = ~(m1.expand(B, Hq, -1, -1).any(-1) & m2.expand(B, Hq, -1, -1).any(-1))
    assert (out[empty] == 0).all(), "rows without a visible pair must give zeros"


def test_simplicial_default_windows():
    """Defaults: causal windows of WINDOW1 and WINDOW2 keys (diagonal included), scale 1/sqrt(D)."""
    B, H, L = 1, 2, 45
    xs = simp_inputs(B, H, H, L, L, L, 4, 2, requires_grad=False)
    m1 = window(WINDOW1).dense(B, H, L, L)
    m2 = window(WINDOW2).dense(B, H, L, L)
    want = ref_simplicial(*xs, m1, m2)
    for form in FORMS3:
        assert_close(simplicial_attention(*xs, form=form), want, what=f"default windows {form}")
    assert_close(simplicial_attention(*xs, scale=0.3), ref_simplicial(*xs, m1, m2, scale=0.3), what="scale")


@pytest.mark.parametrize("form", FORMS3)
def test_simplicial_gradcheck(form):
    xs = simp_inputs(1, 2, 1, 5, 5, 6, 2, 2)
    kw = dict(mask1=M.sliding_window(3), mask2=M.sliding_window(2), form=form, block_q=2, block_k1=3, block_k2=2)
    assert gradcheck(lambda *a: simplicial_attention(*a, **kw), xs)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 6), (6, 1)])
@pytest.mark.parametrize("form", FORMS3)
def test_simplicial_tiny_lengths(Lq, Lk, form):
    xs = simp_inputs(1, 2, 1, Lq, Lk, Lk, 3, 2)
    m1, m2 = window(3).dense(1, 2, Lq, Lk), window(2).dense(1, 2, Lq, Lk)
    compare(lambda *a: simplicial_attention(*a, mask1=M.sliding_window(2), mask2=M.sliding_window(1), form=form,
                                            block_q=1, block_k1=1, block_k2=1),
            lambda *a: ref_simplicial(*a, m1, m2), xs, what=f"Lq={Lq} Lk={Lk} {form}")


def test_simplicial_layout_noncontiguous_low_precision():
    B, H, L = 2, 2, 12
    xs = simp_inputs(B, H, 1, L, L, L, 4, 3, requires_grad=False)
    m1, m2 = window(WINDOW1).dense(B, H, L, L), window(WINDOW2).dense(B, H, L, L)
    want = ref_simplicial(*xs, m1, m2)
    got = simplicial_attention(*(x.transpose(1, 2) for x in xs), layout="bthd")
    assert got.shape == (B, L, H, 3)
    assert_close(got.transpose(1, 2), want, what="bthd")
    nc = []
    for x in xs:
        y = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=F64)[..., ::2]
        y.copy_(x)
        assert not y.is_contiguous()
        nc.append(y)
    for form in FORMS3:
        kw = dict(form=form, block_q=5, block_k1=4, block_k2=3)
        assert_close(simplicial_attention(*nc, **kw), want, what=f"non-contiguous {form}")
        out = simplicial_attention(*(x.float() for x in xs), **kw)
        assert out.dtype == torch.float32
        assert_close(out, want, atol=1e-5, rtol=1e-5, what=f"float32 {form}")
        out = simplicial_attention(*(x.bfloat16() for x in xs), **kw)
        assert out.dtype == torch.bfloat16
        assert_close(out, want, atol=6e-2, rtol=6e-2, what=f"bfloat16 {form}")


def test_simplicial_streaming_memory():
    """Streaming saves only inputs, output and lse for backward (no Lq·Lk, let alone Lq·Lk² tensor) and
    still matches the reference gradients."""
    L = 160
    xs = simp_inputs(1, 1, 1, L, L, L, 4, 4)
    kw = dict(mask1=M.causal, mask2=M.sliding_window(9), form="streaming", block_q=8, block_k1=8, block_k2=8)
    biggest = max_saved_numel(lambda: simplicial_attention(*xs, **kw).sum().backward())
    assert biggest <= L * 4, f"saved a tensor of {biggest} entries"
    m1 = mask_case("causal", 1, 1, L, L).dense(1, 1, L, L)
    compare(lambda *a: simplicial_attention(*a, **kw), lambda *a: ref_simplicial(*a, m1, window(10).dense(1, 1, L, L)),
            xs, what="streaming with a full causal mask1")


def test_simplicial_streaming_skips_empty_block_pairs(monkeypatch):
    """Tiles visited per query block are only those non-empty in both block maps: with windows the count
    grows linearly in L (O(L·w1·w2) work), not quadratically."""
    import attnkit.ops.simplicial.reference as S
    counts = {}
    real = S._tile_logits

    def counting(pb, *a):
        counts[pb.Lq] = counts.get(pb.Lq, 0) + 1
        return real(pb, *a)

    monkeypatch.setattr(S, "_tile_logits", counting)
    for L in (64, 128):
        xs = simp_inputs(1, 1, 1, L, L, L, 2, 2, requires_grad=False)
        simplicial_attention(*xs, mask1=M.sliding_window(7), mask2=M.sliding_window(3), form="streaming",
                             block_q=8, block_k1=8, block_k2=4)
    # per 8-row query block: 2 key-blocks of set 1 x 3 key-blocks of set 2 (fewer at the start)
    assert counts[64] <= 6 * 8 and counts[128] <= 6 * 16 and counts[128] >= 2 * counts[64] - 6


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda xs: xs.__setitem__(slice(3, 5), [t.repeat(1, 2, 1, 1) for t in xs[3:5]]), ValueError,
     "k1 and k2 must have the same number of heads, got 1 and 2"),
    (lambda xs: xs.__setitem__(4, xs[4][..., :2]), ValueError, "share the value dim"),
    (lambda xs: xs.__setitem__(3, xs[3].float()), TypeError, "share a dtype"),
    (lambda xs: xs.__setitem__(1, xs[1][0]), ValueError, "4-D"),
    (lambda xs: xs.__setitem__(2, xs[2][:, :, :3]), ValueError, "same length"),
    (lambda xs: xs.__setitem__(0, xs[0].to("meta")), ValueError, "one device"),
])
def test_simplicial_bad_tensors(mutate, exc, match):
    xs = simp_inputs(1, 2, 1, 5, 5, 5, 4, 3, requires_grad=False)
    mutate(xs)
    with pytest.raises(exc, match=match):
        simplicial_attention(*xs)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(block_q=0), ValueError, "block_q must be >= 1"),
    (dict(block_k2=2.5), TypeError, "block_k2 must be an int"),
    (dict(form="chunk"), ValueError, "form must be one of"),
    (dict(form="recurrent", mask2=M.full), ValueError, "look-ahead"),
    (dict(mask1="window"), ValueError, "unknown mask name"),
    (dict(mask2=M.prefix_lm(9)), ValueError, "longer than the sequence"),
    (dict(scale=float("nan")), TypeError, "scale"),
])
def test_simplicial_bad_options(kw, exc, match):
    xs = simp_inputs(1, 2, 1, 5, 5, 5, 4, 3, requires_grad=False)
    with pytest.raises(exc, match=match):
        simplicial_attention(*xs, **kw)


# ================================================================================================
# Registry: the contract `attnkit check` relies on
# ================================================================================================

PATTERNS = ["self", "causal-self", "cross", "causal-cross"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["differential", "multi_token", "simplicial"])
def test_registered_variant_forms_agree(name, dtype):
    """make_inputs gives leaves without grad; every supported form matches reference_form in output and in
    the gradients of every floating input (as `attnkit check` runs it); unsupported forms give a reason."""
    v = get_variant(name)
    assert v.family == "softmax" and set(v.forms) == set(FORMS3) and v.paper and v.time and v.memory and v.cache
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for pattern in PATTERNS:
        spec = Spec.for_pattern(pattern, 24, Hq=4, Hkv=2, D=8, Dv=8, dtype=dtype)
        inputs = v.make_inputs(spec)
        tensors = {key: t for key, t in inputs.items() if torch.is_tensor(t) and t.is_floating_point()}
        assert all(t.is_leaf and not t.requires_grad and t.dtype == dtype for t in tensors.values())
        assert v.flops(spec) > 0 and v.cache_bytes_per_token(spec) > 0
        results = {}
        for form in v.forms:
            reason = v.unsupported(spec, form)
            if reason is not None:
                assert form == "recurrent" and not spec.causal and "causal" in reason
                continue
            ins = {key: (t.clone().requires_grad_() if key in tensors else t) for key, t in inputs.items()}
            out = v(**ins, form=form, backend="reference")
            out = out[0] if isinstance(out, tuple) else out
            g = torch.autograd.grad(out.square().sum(), [ins[key] for key in tensors])
            results[form] = (out.detach(), g)
        ref_out, ref_g = results[v.reference_form]
        for form, (out, g) in results.items():
            assert_close(out, ref_out, atol=tol, rtol=tol, what=f"{name} {pattern} {form}")
            for key, a, b in zip(tensors, g, ref_g):
                scale = max(1.0, float(b.abs().max()))
                assert_close(a / scale, b / scale, atol=tol, rtol=tol, what=f"{name} {pattern} {form} d{key}")
    with pytest.raises(ValueError, match="reference backend only|backend"):
        v(**v.make_inputs(Spec(Lq=8, Lk=8, D=8, Dv=8)), form="materialized", backend="triton")
