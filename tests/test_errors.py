"""Bad input raises ValueError / TypeError whose message names what was expected (never a wrong answer)."""
from __future__ import annotations

import pytest
import torch

import attnkit
import attnkit.masks as M
import attnkit.normalizers as N
import attnkit.scores as S
from attnkit.catalog import get_variant
from conftest import F64, rand_qkv, run_form


def qkv(B=1, Hq=4, Hkv=2, Lq=6, Lk=6, D=4, Dv=4, dtype=F64):
    return rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=dtype)


def attn(q, k, v, **kw):
    kw.setdefault("backend", "reference")
    return attnkit.attention(q, k, v, **kw)


# ------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_wrong_rank(which, layout):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which][0]
    want = r"4-D \[B, H, T, D\]" if layout == "bhtd" else r"4-D \[B, T, H, D\]"
    with pytest.raises(ValueError, match=f"{which} must be {want}.*got shape"):
        attn(t["q"], t["k"], t["v"], layout=layout)


def test_heads_not_multiple():
    q, k, v = qkv(Hq=6, Hkv=4)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        attn(q, k, v)


@pytest.mark.parametrize("kw,match", [
    (dict(k_heads=3), "same number of heads"),
    (dict(k_len=5), "same length"),
    (dict(k_dim=3), "share the head dim"),
    (dict(batch=2), "batch sizes differ"),
])
def test_inconsistent_shapes(kw, match):
    q, k, v = qkv()
    if "k_heads" in kw:
        k = torch.randn(1, 1, 6, 4, dtype=F64)
    if "k_len" in kw:
        k = torch.randn(1, 2, 5, 4, dtype=F64)
    if "k_dim" in kw:
        k = torch.randn(1, 2, 6, 3, dtype=F64)
    if "batch" in kw:
        v = torch.randn(2, 2, 6, 4, dtype=F64)
    with pytest.raises(ValueError, match=match):
        attn(q, k, v)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must share a dtype.*float64.*float32"):
        attn(q, k.float(), v)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_integer_and_other_dtypes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="float64/float32/bfloat16/float16"):
        attn(q.to(dtype), k.to(dtype), v.to(dtype))


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device.*meta"):
        attn(q, k.to("meta"), v)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attn(q.tolist(), k, v)


def test_empty_dims():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="empty dimension"):
        attn(q[:, :, :0], k, v)


@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_batch_size_zero(form):
    """Issue 10, defect 7: batch size 0 gave a reshape error."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="B >= 1"):
        attnkit.attention(q[:0], k[:0], v[:0], mask="causal", form=form)


# ------------------------------------------------------------------------------------------------
# Issue 10, defect 7: values and shapes that were accepted and gave NaN, an IndexError or a silent detach
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,exc,match", [
    (lambda: S.softcap(float("inf")), ValueError, "positive number"),
    (lambda: S.softcap(float("nan")), ValueError, "positive number"),
    (lambda: S.alibi(torch.tensor([0.5, float("nan")])), ValueError, "alibi slopes must be finite"),
    (lambda: S.ssmax(float("nan")), ValueError, "ssmax s must be finite"),
    (lambda: S.ssmax(torch.tensor([1.0, float("inf")])), ValueError, "ssmax s must be finite"),
    (lambda: S.temperature(float("nan")), ValueError, "temperature must be finite"),
    (lambda: S.temperature(torch.tensor([1.0, float("inf")])), ValueError, "temperature must be finite"),
    (lambda: N.sigmoid(torch.zeros(2, 3)), ValueError, r"per-head 1-D floating tensor \[H\]"),
    (lambda: N.sigmoid(float("nan")), ValueError, "sigmoid bias must be finite"),
    (lambda: N.sigmoid("x"), TypeError, "sigmoid bias must be a float"),
    (lambda: N.relaxed(torch.tensor(0.1, requires_grad=True)), TypeError, "learnable gamma"),
    (lambda: N.relaxed(torch.tensor([0.1, 0.2])), ValueError, "one number"),
])
def test_bad_values_refused(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_relaxed_gamma_tensor_without_grad_is_a_number():
    q, k, v = qkv()
    a = attnkit.attention(q, k, v, normalizer=N.relaxed(torch.tensor(0.25)))
    b = attnkit.attention(q, k, v, normalizer=N.relaxed(0.25))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_predicate_of_the_wrong_shape(form):
    q, k, v = qkv()
    bad = M.predicate(lambda b, h, q, kv: (kv <= q)[..., :1, :].expand(3, 1, 1, -1), name="wrong")
    with pytest.raises(ValueError, match="broadcastable to the index grid"):
        attnkit.attention(q, k, v, mask=bad, form=form)


@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_pointwise_returning_integers(form):
    q, k, v = qkv()
    mod = S.pointwise(lambda s, b, h, qi, kv: (s > 0).long(), name="ints")
    with pytest.raises(TypeError, match="must return a floating tensor"):
        attnkit.attention(q, k, v, mask="causal", score_mod=mod, form=form)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,exc,match", [
    (lambda: M.sliding_window(-1), ValueError, "left must be >= 0, got -1"),
    (lambda: M.sliding_window(3, -2), ValueError, "right must be >= 0, got -2"),
    (lambda: M.sliding_window(2.5), TypeError, "must be an int"),
    (lambda: M.chunked(0), ValueError, "block must be >= 1"),
    (lambda: M.dilated(0), ValueError, "rate must be >= 1"),
    (lambda: M.sinks(-1), ValueError, "must be >= 0"),
    (lambda: M.prefix_lm(-3), ValueError, "prefix_len must be >= 0"),
    (lambda: M.prefix_lm([2, -1]), ValueError, "prefix_len must be >= 0"),
    (lambda: M.prefix_lm(torch.tensor([1.5])), TypeError, "must hold integers"),
    (lambda: M.prefix_lm(torch.ones(2, 2, dtype=torch.long)), ValueError, "1-D per-batch"),
    (lambda: M.document(torch.tensor([0.0, 1.0])), TypeError, "must hold integers"),
    (lambda: M.document(torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, r"\[Lk\] or \[B, Lk\]"),
    (lambda: M.document(), ValueError, "exactly one of doc_ids or cu_seqlens"),
    (lambda: M.document(torch.zeros(3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3])), ValueError,
     "exactly one"),
    (lambda: M.document(cu_seqlens=torch.tensor([1, 4])), ValueError, "must start at 0"),
    (lambda: M.document(cu_seqlens=torch.tensor([0, 4, 2])), ValueError, "non-decreasing"),
    (lambda: M.document(cu_seqlens=torch.tensor([0])), ValueError, "at least 2 entries"),
    (lambda: M.predicate(3), TypeError, "needs a callable"),
    (lambda: M.as_mask("causual"), ValueError, r"unknown mask name 'causual'.*expected one of"),
    (lambda: M.as_mask(3), TypeError, "mask must be a Mask"),
])
def test_bad_mask_construction(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("mask,match", [
    (lambda: M.prefix_lm(7), r"prefix_len 7 is longer than the sequence \(Lk=6\)"),
    (lambda: M.prefix_lm([1, 2, 3]), "prefix_len has 3 entries but the batch has 1"),
    (lambda: M.document(torch.zeros(5, dtype=torch.long)), "doc_ids length is 5 but Lk is 6"),
    (lambda: M.document(torch.zeros(3, 6, dtype=torch.long)), "doc_ids batch is 3 but the batch has 1"),
    (lambda: M.document(cu_seqlens=torch.tensor([0, 2, 7])), r"cu_seqlens\[-1\] is 7 but Lk is 6"),
    (lambda: M.causal & M.document(cu_seqlens=torch.tensor([0, 5])), r"cu_seqlens\[-1\] is 5 but Lk is 6"),
    (lambda: ~M.prefix_lm(9), "longer than the sequence"),
])
@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_mask_does_not_fit_sizes(mask, match, form):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        attn(q, k, v, mask=mask(), form=form)
    with pytest.raises(ValueError, match=match):
        mask().block_map(1, 4, 6, 6, 4, 4)


def test_document_needs_lq_le_lk():
    q, k, v = qkv(Lq=8, Lk=6)
    with pytest.raises(ValueError, match="document mask needs Lq <= Lk"):
        attn(q, k, v, mask=M.document(cu_seqlens=torch.tensor([0, 3, 6])))


def test_predicate_must_return_bool():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must return a bool tensor"):
        attn(q, k, v, mask=M.predicate(lambda b, h, q, kv: (kv <= q).int()))


# ------------------------------------------------------------------------------------------------
# Score mods and normalizers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mod,match", [
    (lambda: S.alibi(torch.rand(3)), "alibi slopes has 3 per-head values but there are 4 query heads"),
    (lambda: S.temperature(torch.rand(5) + 0.5), "temperature has 5 per-head values but there are 4"),
    (lambda: S.ssmax(torch.rand(2)), "ssmax s has 2 per-head values but there are 4"),
    (lambda: S.relative_bias(2), "built for 2 heads but there are 4 query heads"),
])
@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_per_head_score_params_wrong_length(mod, match, form):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        attn(q, k, v, mask="causal", score_mod=mod(), form=form)


@pytest.mark.parametrize("norm,match", [
    (lambda: N.softmax_sink(torch.zeros(3)), "sink logits have 3 entries but there are 4 query heads"),
    (lambda: N.softmax_sink(7), "sink logits have 7 entries"),
    (lambda: N.sigmoid(torch.zeros(2)), "sigmoid bias has 2 entries but there are 4 query heads"),
])
@pytest.mark.parametrize("form", ["materialized", "streaming", "recurrent"])
def test_per_head_normalizer_params_wrong_length(norm, match, form):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        attn(q, k, v, mask="causal", normalizer=norm(), form=form)


@pytest.mark.parametrize("build,exc,match", [
    (lambda: S.softcap(0.0), ValueError, "positive number"),
    (lambda: S.softcap(-2), ValueError, "positive number"),
    (lambda: S.temperature(0.0), ValueError, "must be > 0"),
    (lambda: S.temperature(torch.tensor([1.0, -1.0])), ValueError, "must be > 0"),
    (lambda: S.temperature(torch.tensor([1, 2])), TypeError, "float or floating tensor"),
    (lambda: S.ssmax(torch.ones(2, 2)), ValueError, "scalar or a per-head 1-D"),
    (lambda: S.relative_bias(4, num_buckets=3), ValueError, "num_buckets must be >= 4"),
    (lambda: S.relative_bias(4, num_buckets=9, bidirectional=True), ValueError, "even when bidirectional"),
    (lambda: S.relative_bias(4, num_buckets=32, max_distance=8), ValueError, "max_distance must exceed"),
    (lambda: S.relative_bias(4, 8, 20, table=torch.zeros(8, 3)), ValueError, r"table must be \[8, 4\]"),
    (lambda: S.pointwise(5), TypeError, "needs a callable"),
    (lambda: S.pointwise(lambda s, *a: s, params=[1.0]), TypeError, "params must be tensors"),
    (lambda: S.compose(S.softcap(1.0), lambda s: s), TypeError, "takes ScoreMods"),
    (lambda: N.relaxed(1.0), ValueError, r"gamma must be in \[0, 1\)"),
    (lambda: N.relaxed(-0.1), ValueError, r"gamma must be in \[0, 1\)"),
    (lambda: N.softmax_sink("x"), TypeError, "per-head tensor or a head count"),
    (lambda: N.softmax_sink(torch.zeros(2, 2)), ValueError, "1-D per-head"),
    (lambda: N.as_normalizer("softmaxx"), ValueError, r"unknown normalizer 'softmaxx'.*expected one of"),
    (lambda: N.as_normalizer("softmax_sink"), ValueError, "needs parameters"),
    (lambda: N.as_normalizer(3), TypeError, "must be a name or a Normalizer"),
])
def test_bad_mod_or_normalizer(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_plain_function_as_score_mod():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"wrap it as attnkit.scores.pointwise\(fn\)"):
        attn(q, k, v, score_mod=lambda s, b, h, q, kv: s)


# ------------------------------------------------------------------------------------------------
# Forms, backends, options
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(form="chunk"), r"form must be one of \('auto', 'materialized', 'streaming', 'recurrent'\), got 'chunk'"),
    (dict(backend="cuda"), r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"),
    (dict(layout="btdh"), "layout must be 'bhtd' or 'bthd'"),
    (dict(normalizer="soft-max"), "unknown normalizer 'soft-max'"),
    (dict(mask="sliding"), "unknown mask name 'sliding'"),
    (dict(return_weights=True, form="streaming"), "return_weights needs form='materialized'.*streaming"),
    (dict(return_weights=True, form="recurrent"), "return_weights needs form='materialized'.*recurrent"),
    (dict(return_lse=True, normalizer="sigmoid"), "return_lse needs a softmax-family normalizer.*'sigmoid'"),
    (dict(return_lse=True, normalizer="relu2"), "return_lse needs a softmax-family normalizer.*'relu2'"),
    (dict(return_lse=True, normalizer="none"), "return_lse needs a softmax-family normalizer"),
    (dict(form="recurrent", mask="full"), "recurrent form needs a mask without look-ahead"),
])
def test_bad_options(kw, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        attn(q, k, v, **kw)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale must be a finite float"):
        attn(q, k, v, scale=scale)


def test_triton_backend_materialized_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='triton' runs the fused"):
        attnkit.attention(q, k, v, form="materialized", backend="triton")


@pytest.mark.parametrize("bq,bk", [(0, 4), (4, 0), (-1, 3)])
def test_bad_streaming_blocks(bq, bk):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        run_form("streaming-blocks", q, k, v, mask="causal", blocks=(bq, bk))


@pytest.mark.parametrize("name", ["softmaxx", "", "Softmax", "flash"])
def test_unknown_variant(name):
    with pytest.raises(ValueError, match=f"unknown variant {name!r}.*known: .*softmax"):
        get_variant(name)
