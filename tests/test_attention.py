"""attnkit.attention in every form against the float64 reference: masks x forms, gradients, lse, weights,
GQA, layouts, dtypes, non-contiguous inputs, T=1, Lq != Lk, fully masked rows, recurrent == parallel.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.dispatch import softmax as api
import attnkit.masks as M
import attnkit.ops.softmax as SM
from conftest import (F64, FORMS, MASK_NAMES, assert_close, check_form, lookahead, mask_case, mask_problem,
                      mask_shape_params, rand_qkv, ref_attention, run_form)

TILES = [(3, 5), (4, 2), (7, 3), (2, 7), (5, 16)]


def tiles():
    return random.choice(TILES)


def case(name, B, H, Lq, Lk):
    """A mask case and its loop-built dense mask [B, H, Lq, Lk]."""
    rm = mask_case(name, B, H, Lq, Lk)
    assert not (rm.needs_lq_le_lk and Lq > Lk)
    return rm, rm.dense(B, H, Lq, Lk)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,Lq,Lk", mask_shape_params(MASK_NAMES, [(11, 11), (6, 15), (15, 6)]))
def test_mask_x_form(name, form, Lq, Lk):
    """Every mask in every form: output, lse and gradients of q, k, v against the reference (GQA 2:1, Dv != D)."""
    B, Hq, Hkv = 2, 4, 2
    rm, m = case(name, B, Hq, Lq, Lk)
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 5, 3, requires_grad=True)
    if form == "recurrent" and lookahead(m, Lq, Lk):
        with pytest.raises(ValueError, match="look-ahead"):
            run_form(form, q, k, v, mask=rm.ak)
        return
    check_form(form, q, k, v, m, mask=rm.ak, blocks=tiles(), what=repr(rm))


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 9), (9, 1), (4, 4)])
@pytest.mark.parametrize("form", FORMS)
def test_tiny_lengths(form, Lq, Lk):
    """T=1, decoding one token over a cache (Lq=1), and Lq > Lk with a single key."""
    for name in ("full", "causal", "window", "streamingllm"):
        rm, m = case(name, 1, 2, Lq, Lk)
        q, k, v = rand_qkv(1, 2, 1, Lq, Lk, 4, 4, requires_grad=True)
        if form == "recurrent" and lookahead(m, Lq, Lk):
            continue  # look-ahead masks are refused by the recurrent form (test_mask_x_form checks the error)
        check_form(form, q, k, v, m, mask=rm.ak, blocks=(1, 1), what=f"{rm} Lq={Lq} Lk={Lk}")


def test_decode_sees_whole_cache():
    """One query over n cached keys with the causal mask is attention over all n keys."""
    q, k, v = rand_qkv(2, 4, 2, 1, 13, 6, 6)
    for form in ("materialized", "streaming", "recurrent"):
        a = attnkit.attention(q, k, v, mask="causal", form=form)
        b = attnkit.attention(q, k, v, mask=None, form=form if form != "recurrent" else "materialized")
        assert_close(a, b, what=form)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("form", FORMS)
def test_gqa_ratios(ratio, form):
    Hq = 8
    rm, m = case("streamingllm", 2, Hq, 9, 12)
    q, k, v = rand_qkv(2, Hq, Hq // ratio, 9, 12, 4, 6, requires_grad=True)
    check_form(form, q, k, v, m, mask=rm.ak, blocks=tiles(), what=f"GQA {ratio}")


@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_gqa_does_not_repeat_kv_and_equals_mha(form):
    """GQA equals MHA with K/V repeated per query head (the user-visible definition)."""
    q, k, v = rand_qkv(1, 6, 2, 7, 7, 4, 4)
    a = attnkit.attention(q, k, v, mask="causal", form=form)
    b = attnkit.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask="causal", form=form)
    assert_close(a, b, what=form)


@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_layout_bthd(form):
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 7, 10
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_() for t in rand_qkv(B, Hq, Hkv, Lq, Lk, 4, 5))
    out, lse = attnkit.attention(q, k, v, mask="causal", form=form, layout="bthd", return_lse=True)
    assert out.shape == (B, Lq, Hq, 5)
    m = mask_case("causal", B, Hq, Lq, Lk).dense(B, Hq, Lq, Lk)
    ro, rl, _ = ref_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m)
    assert_close(out, ro.transpose(1, 2), what="bthd out")
    assert lse.shape == (B, Hq, Lq)
    assert_close(lse[torch.isfinite(rl)], rl[torch.isfinite(rl)], what="bthd lse")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ro.transpose(1, 2), (q, k, v), g)
    for a, b in zip(got, want):
        assert_close(a, b, what="bthd grads")


@pytest.mark.parametrize("form", FORMS)
def test_noncontiguous_inputs(form):
    """Transposed and strided views give the reference result, and the same as contiguous copies."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 9, 11, 4
    q = torch.randn(B, Lq, Hq, D, dtype=F64).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Hkv, Lk, 2 * D, dtype=F64)[..., ::2].requires_grad_()
    v = torch.randn(B, Hkv, 3, Lk, dtype=F64).transpose(-1, -2).requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    rm, m = case("causal-dilated", B, Hq, Lq, Lk)
    check_form(form, q, k, v, m, mask=rm.ak, blocks=tiles(), what="non-contiguous")
    qc, kc, vc = (t.detach().contiguous() for t in (q, k, v))
    assert_close(run_form(form, q, k, v, mask=rm.ak, blocks=(3, 5)), run_form(form, qc, kc, vc, mask=rm.ak,
                                                                                 blocks=(3, 5)))


TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (4e-2, 4e-2), torch.float16: (4e-3, 4e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_dtypes(dtype, form):
    """Outputs and gradients in the input dtype, close to the float64 reference of the same (rounded) inputs."""
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 13, 17
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 8, 8, dtype=dtype, requires_grad=True)
    rm, m = case("causal-no-first", B, Hq, Lq, Lk)
    with SM.streaming_blocks(3, 5):  # several odd tiles through the public API (which casts the dtype)
        out = attnkit.attention(q, k, v, mask=rm.ak, form=form)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, 8)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    ro, _, _ = ref_attention(q64, k64, v64, m)
    atol, rtol = TOL[dtype]
    assert_close(out, ro, atol=atol, rtol=rtol, what=f"{dtype} out")
    g = torch.randn_like(ro)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ro, (q64, k64, v64), g.to(dtype).to(F64))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, b, atol=4 * atol, rtol=4 * rtol, what=f"{dtype} grad")


@pytest.mark.parametrize("Lq,Lk", [(8, 8), (5, 12), (12, 5)])
def test_return_weights(Lq, Lk):
    """Materialized weights equal the definition; rows sum to 1 over visible keys, 0 on fully masked rows."""
    B, Hq = 2, 4
    rm, m = case("streamingllm", B, Hq, Lq, Lk)
    q, k, v = rand_qkv(B, Hq, 2, Lq, Lk, 4, 4)
    out, lse, w = attnkit.attention(q, k, v, mask=rm.ak, form="materialized", return_lse=True, return_weights=True)
    ro, rl, rp = ref_attention(q, k, v, m)
    assert w.shape == (B, Hq, Lq, Lk)
    assert_close(w, rp, what="weights")
    assert torch.equal(w[~m.expand_as(w)], torch.zeros_like(w[~m.expand_as(w)]))
    rows = m.any(-1)
    assert_close(w.sum(-1)[rows], torch.ones_like(w.sum(-1)[rows]))
    assert_close(out, ro)
    out2, w2 = attnkit.attention(q, k, v, mask=rm.ak, return_weights=True)  # auto picks materialized
    assert_close(out2, out)
    assert_close(w2, w)


@pytest.mark.parametrize("form", FORMS)
def test_fully_masked_rows_zero_not_nan(form):
    """No visible key anywhere: zeros out, -inf lse, zero (not NaN) gradients."""
    q, k, v = rand_qkv(1, 2, 1, 5, 7, 3, 3, requires_grad=True)
    mask = (~M.full) if form != "recurrent" else (M.causal & ~M.causal)
    out, lse = run_form(form, q, k, v, mask=mask, blocks=(2, 3), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    gs = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for gx in gs:
        assert torch.equal(gx, torch.zeros_like(gx))


def test_custom_scale():
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 4, 4, requires_grad=True)
    rm, m = case("causal", 1, 2, 6, 6)
    for form in FORMS:
        check_form(form, q, k, v, m, mask=rm.ak, scale=0.37, what="scale=0.37")


def test_auto_form_and_last_backend(monkeypatch):
    """form='auto': materialized for small problems, streaming above the limit; same numbers; recorded."""
    q, k, v = rand_qkv(1, 2, 1, 20, 30, 4, 4)
    a = attnkit.attention(q, k, v, mask="causal")
    assert attnkit.last_backend() == "reference/materialized"
    monkeypatch.setattr(api, "AUTO_DENSE_LIMIT", 100)
    b = attnkit.attention(q, k, v, mask="causal")
    assert attnkit.last_backend() == "reference/streaming"
    assert_close(a, b)


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_forms(form):
    """torch.autograd.gradcheck at float64: end-aligned causal cross with a fully masked row, GQA 2:1."""
    q, k, v = rand_qkv(1, 2, 1, 5, 4, 3, 2, requires_grad=True)  # Lq > Lk: row 0 sees no key
    mask = M.causal & (M.sliding_window(2) | M.sinks(1))
    fn = lambda q, k, v: run_form(form, q, k, v, mask=mask, blocks=(2, 3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    q, k, v = rand_qkv(1, 2, 1, 4, 6, 3, 2, requires_grad=True)
    fn = lambda q, k, v: run_form(form, q, k, v, mask=mask, blocks=(3, 2), return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


LOOKAHEAD = {
    "full": M.full,
    "window(1, 1)": M.sliding_window(1, 1),
    "chunked(3)": M.chunked(3),
    "prefix_lm(4)": M.prefix_lm(4),
    "document": M.document(torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])),
    "predicate(kv == q + 1)": M.predicate(lambda b, h, q, kv: kv == q + 1),
    "~causal": ~M.causal,
    "causal | sinks(3)": M.causal | M.sinks(3),
}


@pytest.mark.parametrize("name", list(LOOKAHEAD))
def test_recurrent_refuses_lookahead(name):
    q, k, v = rand_qkv(1, 2, 2, 9, 9, 4, 4)
    with pytest.raises(ValueError, match="recurrent form needs a mask without look-ahead"):
        attnkit.attention(q, k, v, mask=LOOKAHEAD[name], form="recurrent")


@pytest.mark.parametrize("form", ["materialized", "streaming-blocks", "recurrent"])
def test_gradient_through_lse_alone(form):
    """A loss on lse only (finite rows): dq, dk equal the reference; dv is zero."""
    rm, m = case("causal-no-first", 2, 4, 8, 8)
    q, k, v = rand_qkv(2, 4, 2, 8, 8, 4, 4, requires_grad=True)
    _, lse = run_form(form, q, k, v, mask=rm.ak, blocks=(3, 2), return_lse=True)
    _, rl, _ = ref_attention(q, k, v, m)
    g = torch.randn_like(rl)
    fin = torch.isfinite(rl)
    got = torch.autograd.grad((torch.where(fin, lse, 0.0) * g).sum(), (q, k, v), allow_unused=True)
    want = torch.autograd.grad((torch.where(fin, rl, 0.0) * g).sum(), (q, k))
    assert_close(got[0], want[0], what="dq")
    assert_close(got[1], want[1], what="dk")
    assert got[2] is None or torch.equal(got[2], torch.zeros_like(v))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(mask_problem(max_len=14), st.sampled_from(["materialized", "streaming-blocks", "recurrent"]))
def test_random_composed_masks_in_every_form(problem, form):
    """Property: any composition of masks gives the reference output and gradients in every form."""
    rm, Bs, Hs, Lq, Lk, bq, bk = problem
    Hq = 2 * Hs
    m = rm.dense(Bs, Hq, Lq, Lk)
    q, k, v = rand_qkv(Bs, Hq, Hs, Lq, Lk, 3, 2, requires_grad=True)
    if form == "recurrent" and lookahead(m, Lq, Lk):
        with pytest.raises(ValueError, match="look-ahead"):
            run_form(form, q, k, v, mask=rm.ak)
        return
    check_form(form, q, k, v, m, mask=rm.ak, blocks=(bq, bk), what=repr(rm))


@pytest.mark.parametrize("name", ["causal", "window", "streamingllm", "causal-dilated", "causal-no-first"])
@pytest.mark.parametrize("Lq,Lk", [(10, 10), (3, 12), (12, 3)])
def test_recurrent_equals_parallel(name, Lq, Lk):
    """Attention as an RNN: token by token over a growing cache equals the parallel forms (causal-type masks)."""
    rm, m = case(name, 2, 4, Lq, Lk)
    assert not lookahead(m, Lq, Lk)
    q, k, v = rand_qkv(2, 4, 2, Lq, Lk, 4, 4)
    rec, lse_r = run_form("recurrent", q, k, v, mask=rm.ak, return_lse=True)
    for form in ("materialized", "streaming-blocks"):
        par, lse_p = run_form(form, q, k, v, mask=rm.ak, blocks=(4, 3), return_lse=True)
        assert_close(rec, par, what=f"{rm} recurrent vs {form}")
        assert torch.equal(torch.isneginf(lse_r), torch.isneginf(lse_p))
        assert_close(lse_r[torch.isfinite(lse_r)], lse_p[torch.isfinite(lse_p)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["materialized", "streaming-blocks", "recurrent"])
def test_large_scores_are_stable(dtype, form):
    """Scores of magnitude ~1e3 (near one-hot rows): no overflow, close to the float64 reference."""
    q, k, v = rand_qkv(1, 2, 1, 12, 12, 8, 4, dtype=dtype)
    q, k = (q * 30).requires_grad_(), (k * 30).requires_grad_()
    v.requires_grad_()
    if form == "streaming-blocks" and dtype != F64:
        form = "streaming"  # the engine's tiles are driven directly only at float64; attention() casts
    rm, m = case("causal", 1, 2, 12, 12)
    out, lse = run_form(form, q, k, v, mask=rm.ak, blocks=(5, 3), return_lse=True)
    ro, rl, _ = ref_attention(q.detach(), k.detach(), v.detach(), m)
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == F64 else dict(atol=1e-4, rtol=1e-4)
    assert_close(out, ro, **tol, what="out")
    assert_close(lse, rl, **tol, what="lse")
    for gx in torch.autograd.grad(out.sum() + lse.sum(), (q, k, v)):
        assert torch.isfinite(gx).all()
