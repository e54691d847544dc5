"""Fused Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``), against float64
references: the loop-built masks / formulas of conftest (independent of attnkit) and attnkit's own
reference backend. Forward and backward (q, k, v and learnable parameters), every mask kind, score
mod and normalizer, GQA, T=1, lengths that are not multiples of the blocks (the interpreter runs
16/32-wide blocks), fully masked rows, Lq != Lk, Dv != D, varlen. Outputs are poisoned with NaN
before the kernels write them. Shapes are tiny: the interpreter runs every program in Python.
"""
from __future__ import annotations

import os
import random

_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # the kernels below are decorated as interpreted functions

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import attnkit  # noqa: E402
from attnkit.dispatch import backends as kernels  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.ops.softmax import fused as KA  # noqa: E402

from conftest import MASK_NAMES, mask_case, ref_attention, t5_bucket_ref  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter consults it while running
    monkeypatch.setattr(KA, "POISON", True)


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=F64):
    mk = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, Dv)


def _params(*mods):
    out = []
    for m in mods:
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + [x for mm in m.modules() for x in vars(mm).values()
                                             if isinstance(x, torch.Tensor)]:
                if t.requires_grad and all(t is not o for o in out):
                    out.append(t)
    return out


def _run(q, k, v, backend, lse, **kw):
    res = attnkit.attention(q, k, v, backend=backend, return_lse=lse,
                            **({"form": "materialized"} if backend == "reference" else {}), **kw)
    if backend == "triton":
        assert attnkit.last_backend() == "triton/fused"
    return res if lse else (res, None)


def compare(q, k, v, *, atol=1e-9, rtol=1e-7, params=(), ref=None, **kw):
    """Triton vs a float64 reference (attnkit's reference backend, or ``ref(q, k, v) -> (out, lse)``):
    output, lse (-inf on the same rows), and gradients of q, k, v and ``params``."""
    norm = N.as_normalizer(kw.get("normalizer", "softmax"))
    lse_on = norm.family == "softmax"
    out, lse = _run(q, k, v, "triton", lse_on, **kw)
    if ref is None:
        ro, rl = _run(q, k, v, "reference", lse_on, **kw)
    else:
        ro, rl = ref(q, k, v)
    assert out.dtype == q.dtype and out.shape == ro.shape
    assert torch.isfinite(out).all(), "non-finite (unwritten?) output"
    torch.testing.assert_close(out.to(F64), ro.to(F64), atol=atol, rtol=rtol)
    go = torch.randn_like(ro)
    loss, rloss = (out * go).sum(), (ro * go).sum()
    if lse_on:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)), "rows without keys differ"
        fin = torch.isfinite(rl)
        torch.testing.assert_close(lse[fin].to(F64), rl[fin].to(F64), atol=atol, rtol=rtol)
        gl = torch.randn_like(rl)
        loss = loss + (torch.where(fin, lse, 0.0) * gl).sum()
        rloss = rloss + (torch.where(fin, rl, 0.0) * gl).sum()
    inputs = [q, k, v, *params]
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    want = torch.autograd.grad(rloss, inputs, allow_unused=True)
    for name, a, b, x in zip(["dq", "dk", "dv"] + [f"param{i}" for i in range(len(params))], got, want, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert torch.isfinite(a).all(), f"non-finite {name}"
        torch.testing.assert_close(a.to(F64), b.to(F64), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return out, lse


# ------------------------------------------------------------------------------------------------
# masks: every kind against the loop-built reference (independent of attnkit)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MASK_NAMES)
def test_mask_kinds(name):
    B, Hq, Hkv = random.choice([(1, 2, 1), (2, 2, 2)])
    Lk = random.randint(17, 40)
    Lq = random.choice([Lk, random.randint(1, Lk), random.randint(Lk, 45)])
    rm = mask_case(name, B, Hq, Lq, Lk)
    if rm.needs_lq_le_lk:
        Lq = min(Lq, Lk)
        rm = mask_case(name, B, Hq, Lq, Lk)
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, 16, 16)
    dense = rm.dense(B, Hq, Lq, Lk)

    def ref(q, k, v):
        o, lse, _ = ref_attention(q, k, v, dense)
        return o, lse

    out, lse = compare(q, k, v, mask=rm.ak, ref=ref)
    empty = ~dense.any(-1)  # rows without a visible key: zeros and lse = -inf
    assert (out.detach()[empty] == 0).all() and torch.isneginf(lse[empty]).all()


def test_mask_composition_many_leaves_uses_bitmap():
    """Five leaves (more than the in-kernel truth table takes) go through per-tile bitmaps."""
    B, H, Lq, Lk = 1, 2, 33, 47
    m = (M.causal & (M.sliding_window(6) | M.sinks(2) | M.dilated(5))) | (M.chunked(4) & ~M.prefix_lm(3))
    from attnkit.ops.softmax import plan
    assert plan.mask_plan(m, B, "cpu").mode == plan.MODE_BITMAP
    q, k, v = _qkv(B, H, H, Lq, Lk, 16, 16)
    compare(q, k, v, mask=m)


def test_bitmap_mask_full_at_ragged_edges():
    """A predicate that is true everywhere: FULL tiles, whose ragged last blocks are checked for bounds only."""
    m = M.predicate(lambda b, h, q, kv: (q * 7 + kv * 3) % 5 != 0) | M.dilated(5)  # 2(q-kv) = 0 mod 5 <=> q = kv
    q, k, v = _qkv(1, 1, 1, 37, 41, 16, 16)
    compare(q, k, v, mask=m)


def test_full_blocks_outside_the_longest_run_are_listed_partial():
    """Kernels walk a row's FULL blocks as one range: a second FULL run (sinks | window) is listed PARTIAL,
    and every non-empty block is still listed exactly once, in both orientations."""
    from attnkit.ops.softmax import plan
    m = M.sinks(16) | M.sliding_window(40)
    B, H, L = 1, 2, 150
    mp = plan.mask_plan(m, B, "cpu")
    for transpose in (False, True):
        lists = plan.block_lists(mp, B, H, L, L, 16, 16, transpose, "cpu")
        st = m.block_map(B, H, L, L, 16, 16).state.expand(1, 1, 10, 10)
        st = st.transpose(-1, -2) if transpose else st
        runs = 0
        for r in range(st.shape[-2]):
            n_full, n_part = lists.cnt[0, 0, r].tolist()
            full = lists.idx[0, 0, r, 0, :n_full].tolist()
            part = lists.idx[0, 0, r, 1, :n_part].tolist()
            assert full == list(range(full[0], full[0] + n_full)) if full else True
            assert sorted(full + part) == [c for c in range(10) if st[0, 0, r, c] != M.EMPTY]
            runs += sum(1 for c in part if st[0, 0, r, c] == M.FULL)
        assert runs > 0  # the case does exercise a demoted FULL block
    q, k, v = _qkv(B, H, H, L, L, 16, 16)
    compare(q, k, v, mask=m)


def test_predicate_bitmap_built_once():
    calls = []

    def fn(b, h, q, kv):
        calls.append(1)
        return (q - kv) % 3 != 1

    m = M.predicate(fn)
    q, k, v = _qkv(1, 2, 2, 20, 35, 16, 16)
    with torch.no_grad():
        a = attnkit.attention(q, k, v, mask=m, backend="triton")
        n = len(calls)
        b = attnkit.attention(q, k, v, mask=m, backend="triton")
    assert len(calls) == n, "the predicate was evaluated again for the same mask and sizes"
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# score mods (learnable parameters get gradients)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _wave(s, b, h, q, kv):
    return s + 0.5 * tl.sin(s) + 0.0078125 * (q - kv).to(tl.float32) * (h + 1).to(tl.float32)


@triton.jit
def _dwave(s, b, h, q, kv):
    return 1.0 + 0.5 * tl.cos(s)


def _wave_torch(s, b, h, q, kv):
    return s + 0.5 * torch.sin(s) + 0.0078125 * (q - kv).to(s.dtype) * (h + 1).to(s.dtype)


def _score_mod(name, H):
    r = lambda *s: torch.rand(*s, dtype=F64).add_(0.5).requires_grad_()  # noqa: E731
    return {
        "softcap": lambda: S.softcap(2.0),
        "alibi-default": lambda: S.alibi(),
        "alibi-learnable": lambda: S.alibi(r(H)),
        "relative_bias": lambda: S.relative_bias(H, num_buckets=8, max_distance=12,
                                                 table=torch.randn(8, H, dtype=F64).requires_grad_()),
        "relative_bias-causal": lambda: S.relative_bias(H, num_buckets=8, max_distance=20, bidirectional=False,
                                                        table=torch.randn(8, H, dtype=F64).requires_grad_()),
        "ssmax": lambda: S.ssmax(r(H)),
        "temperature-scalar": lambda: S.temperature(r(())),
        "pointwise": lambda: S.pointwise(_wave_torch, triton_fn=(_wave, _dwave)),
        "composed": lambda: S.compose(S.alibi(r(H)), S.temperature(r(H)), S.softcap(3.0), S.ssmax(r(())))
    }[name]()


@pytest.mark.parametrize("name", ["softcap", "alibi-default", "alibi-learnable", "relative_bias",
                                  "relative_bias-causal", "ssmax", "temperature-scalar", "pointwise", "composed"])
def test_score_mods(name):
    H = 2
    sm = _score_mod(name, H)
    Lk = random.randint(20, 40)
    Lq = random.randint(1, Lk)
    mask = random.choice([M.causal, M.full, M.sliding_window(7) | M.sinks(2)])
    q, k, v = _qkv(1, H, random.choice([1, 2]), Lq, Lk, 16, 16)
    compare(q, k, v, mask=mask, score_mod=sm, params=_params(sm))


def test_score_mod_on_float32_is_tf32_free_in_interpreter():
    """float32 inputs: the interpreter computes exact float32 products."""
    H = 2
    sm = S.softcap(4.0)
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(2, H, 1, 29, 29, 24, 16))
    compare(q, k, v, mask=M.causal, score_mod=sm, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# normalizers
# ------------------------------------------------------------------------------------------------

def _normalizer(name, H):
    return {
        "softmax": lambda: N.softmax(),
        "sink-learnable": lambda: N.softmax_sink(torch.randn(H, dtype=F64).requires_grad_()),
        "off_by_one": lambda: N.softmax_off_by_one(),
        "relaxed": lambda: N.relaxed(0.3),
        "sigmoid": lambda: N.sigmoid(),
        "sigmoid-learnable": lambda: N.sigmoid(torch.randn(H, dtype=F64).requires_grad_()),
        "relu": lambda: N.relu(),
        "relu2": lambda: N.relu2(),
        "none": lambda: N.none(),
    }[name]()


@pytest.mark.parametrize("name", ["sink-learnable", "off_by_one", "relaxed", "sigmoid", "sigmoid-learnable",
                                  "relu", "relu2", "none"])
def test_normalizers(name):
    H = 2
    norm = _normalizer(name, H)
    Lk = random.randint(18, 40)
    Lq = random.choice([Lk, random.randint(Lk, 44)])  # Lq > Lk: leading rows see no key under causal
    mask = random.choice([M.causal, M.chunked(5), M.causal & ~M.sinks(1)])
    q, k, v = _qkv(1, H, 1, Lq, Lk, 16, 24)
    compare(q, k, v, mask=mask, normalizer=norm, params=_params(norm))


MOD_KINDS = ["softcap", "alibi-learnable", "relative_bias", "ssmax", "temperature-scalar", "pointwise"]
NORM_KINDS = ["softmax", "sink-learnable", "off_by_one", "relaxed", "sigmoid", "sigmoid-learnable", "relu", "relu2",
              "none"]


@pytest.mark.parametrize("norm_name", NORM_KINDS)
@pytest.mark.parametrize("mod_name", MOD_KINDS)
def test_every_score_mod_with_every_normalizer(mod_name, norm_name):
    """A kernel switch meant for one piece must not reach another (ssmax loads the row counts; only relu, relu2
    and relaxed may divide by them): each score mod with each normalizer, output and gradients."""
    H = 2
    sm, norm = _score_mod(mod_name, H), _normalizer(norm_name, H)
    Lk = random.randint(9, 24)
    Lq = random.randint(1, Lk)
    mask = random.choice([M.causal, M.full, M.sliding_window(5) | M.sinks(1)])
    q, k, v = _qkv(1, H, random.choice([1, 2]), Lq, Lk, 16, 16)
    compare(q, k, v, mask=mask, score_mod=sm, normalizer=norm, params=_params(sm, norm))


def test_bf16_refused_under_the_interpreter():
    """Triton's interpreter multiplies bf16 bit patterns in tl.dot (garbage ~1e8): refuse, clearly."""
    q, k, v = (t.detach().to(torch.bfloat16) for t in _qkv(1, 1, 1, 8, 8, 16, 16))
    with pytest.raises(ValueError, match="bfloat16.*interpreter"):
        attnkit.attention(q, k, v, backend="triton")


# ------------------------------------------------------------------------------------------------
# shapes and layouts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,Dv", [
    (1, 1, 1, 1, 1, 16, 16),        # T = 1
    (2, 4, 1, 1, 37, 16, 16),       # decode step, MQA
    (1, 4, 2, 33, 33, 80, 48),      # GQA, head dim 80, Dv != D
    (1, 2, 2, 49, 21, 8, 16),       # Lq > Lk (fully masked rows under causal), head dim < 16
])
def test_shapes(B, Hq, Hkv, Lq, Lk, D, Dv):
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, Dv)
    compare(q, k, v, mask=M.causal, scale=0.3)


POSITION_MASKS = ["causal", "window", "window2", "chunked", "prefix", "prefix-batch", "doc", "cu_seqlens", "sinks",
                  "dilated", "predicate-bh", "streamingllm"]


@pytest.mark.parametrize("where", ["triton", "materialized", "streaming", "recurrent"])
@pytest.mark.parametrize("mask_name", POSITION_MASKS)
def test_positions_place_queries_and_keys(where, mask_name):
    """``q_offset`` / ``kv_offset``: a shard of queries and of keys of a longer sequence sees the masks and the
    positional score mods (ALiBi, T5 bias) at its global positions, against a float64 reference evaluated at those
    positions; document / prefix tensors are indexed by global position."""
    B, H, L = 2, 2, random.randint(24, 44)
    lq, lk = random.randint(1, L), random.randint(1, L)
    a, c = random.randint(0, L - lq), random.randint(0, L - lk)
    rm = mask_case(mask_name, B, H, L, L)  # fn(b, h, q_pos, kv_pos) over the global sequence
    m = torch.tensor([[[[bool(rm.fn(b, h, a + i, c + j)) for j in range(lk)] for i in range(lq)] for h in range(H)]
                      for b in range(B)])
    slopes = torch.rand(H, dtype=F64).add_(0.2).requires_grad_()
    table = torch.randn(8, H, dtype=F64).requires_grad_()
    mod = S.compose(S.alibi(slopes), S.relative_bias(H, num_buckets=8, max_distance=12, table=table))
    qp = (torch.arange(lq) + a).view(1, 1, -1, 1)
    kp = (torch.arange(lk) + c).view(1, 1, 1, -1)
    bucket = torch.tensor([[t5_bucket_ref(int(kk - qq), True, 8, 12) for kk in range(c, c + lk)]
                           for qq in range(a, a + lq)])

    def ref_mod(s, _pos):
        return s - slopes.view(1, -1, 1, 1) * (qp - kp).abs().to(F64) + table[bucket, :].permute(2, 0, 1)[None]

    kind = random.choice(["softmax", "relu", "sigmoid"])
    norm = {"softmax": N.softmax(), "relu": N.relu(), "sigmoid": N.sigmoid(-1.5)}[kind]
    q, k, v = _qkv(B, H, random.choice([1, H]), lq, lk, 16, 8)
    kw = dict(mask=rm.ak, score_mod=mod, normalizer=norm, q_offset=a, kv_offset=c)
    if where == "recurrent" and bool((m & (kp > qp)).any()):
        with pytest.raises(ValueError, match="look-ahead"):
            attnkit.attention(q, k, v, form="recurrent", **kw)
        return
    ro, rl, _ = ref_attention(q, k, v, m, mod=ref_mod, kind=kind, **({"bias": -1.5} if kind == "sigmoid" else {}))
    if where == "triton":
        compare(q, k, v, ref=lambda *_: (ro, rl), params=[slopes, table], **kw)
        return
    out = attnkit.attention(q, k, v, form=where, backend="reference", **kw)
    torch.testing.assert_close(out, ro, atol=1e-10, rtol=1e-9)
    go = torch.randn_like(ro)
    inputs = [q, k, v, slopes, table]
    got = torch.autograd.grad((out * go).sum(), inputs, allow_unused=True)  # unused (no visible key): zero
    want = torch.autograd.grad((ro * go).sum(), inputs, allow_unused=True)
    for x, y, t in zip(got, want, inputs):
        torch.testing.assert_close(torch.zeros_like(t) if x is None else x, torch.zeros_like(t) if y is None else y,
                                   atol=1e-10, rtol=1e-9)


def test_positions_are_validated():
    q, k, v = _qkv(1, 1, 1, 4, 6, 16, 16)
    with pytest.raises(TypeError, match="q_offset"):
        attnkit.attention(q, k, v, q_offset=1.5)
    with pytest.raises(TypeError, match="kv_offset"):
        attnkit.attention(q, k, v, kv_offset=None)
    doc = M.document(torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]))
    with pytest.raises(ValueError, match="cover"):
        attnkit.attention(q, k, v, mask=doc, q_offset=5, kv_offset=0)  # query positions 5..8 > 7


def _in_place_cases(B, L, H):
    """(name, mask, score_mod, normalizer, update): tensors a cached kernel plan was built from, then changed in
    place — the kernels must follow exactly as the reference forms do."""
    ids = torch.tensor([sorted(random.randint(0, 3) for _ in range(L)) for _ in range(B)])
    pl = torch.tensor([random.randint(0, L // 2) for _ in range(B)], dtype=torch.int32)
    cu = torch.tensor([0, L // 3, L // 2, L])
    table = torch.randn(8, H, dtype=F64)
    big = torch.randn(8, 40, dtype=F64)  # > 256 entries: keyed by identity and version, not by value
    slopes = torch.rand(H, dtype=F64)
    bias = torch.randn(H, dtype=F64)
    rb_big = S.relative_bias(40, num_buckets=8, max_distance=12, table=big)
    return [
        ("doc_ids", M.document(ids), None, None,
         lambda: ids.copy_(torch.tensor([sorted(random.randint(0, 3) for _ in range(L)) for _ in range(B)]))),
        ("prefix_int32", M.prefix_lm(pl) | M.causal & M.sliding_window(3), None, None,
         lambda: pl.copy_(torch.tensor([random.randint(L // 2, L) for _ in range(B)], dtype=torch.int32))),
        ("cu_seqlens", M.document(cu_seqlens=cu) & M.causal, None, None,
         lambda: cu.copy_(torch.tensor([0, 2, L - 3, L]))),
        ("relbias_copy", M.causal, S.relative_bias(H, num_buckets=8, max_distance=12, table=table), None,
         lambda: table.copy_(torch.randn(8, H, dtype=F64))),
        ("relbias_big_state_dict", M.full, rb_big, None,
         lambda: rb_big.load_state_dict({"table": torch.randn(8, 40, dtype=F64)}, strict=False)
         if isinstance(rb_big.table, torch.nn.Parameter) else rb_big.table.copy_(torch.randn(8, 40, dtype=F64))),
        ("alibi_slopes", M.causal, S.alibi(slopes), None, lambda: slopes.mul_(3.0)),
        ("sigmoid_bias", M.causal, None, N.sigmoid(bias), lambda: bias.add_(1.0)),
    ]


@pytest.mark.parametrize("case", ["doc_ids", "prefix_int32", "cu_seqlens", "relbias_copy", "relbias_big_state_dict",
                                  "alibi_slopes", "sigmoid_bias"])
def test_in_place_updates_reach_the_kernels(case):
    """Issue 10, defect 3: a cached plan must not keep stale copies of document ids, prefix lengths, cu_seqlens, a
    frozen relative-bias table (copy_ / load_state_dict), slopes or a sigmoid bias updated in place."""
    B, L = 2, random.randint(18, 30)
    H = 40 if case == "relbias_big_state_dict" else 2
    name, mask, mod, norm, update = next(c for c in _in_place_cases(B, L, H) if c[0] == case)
    kw = dict(mask=mask, score_mod=mod, normalizer=norm if norm is not None else "softmax")
    # float32 inputs: the kernels' parameter buffers are then copies (float32) of the float64 tensors, as on a GPU
    q, k, v = (t.detach().float() for t in _qkv(B, H, 1, L, L, 16, 16))
    first = attnkit.attention(q, k, v, backend="triton", **kw)  # builds and caches the plan
    torch.testing.assert_close(first, attnkit.attention(q, k, v, backend="reference", **kw), atol=2e-5, rtol=2e-5)
    update()
    out = attnkit.attention(q, k, v, backend="triton", **kw)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    assert not torch.allclose(ref, first, atol=1e-3), "the update did not change the function (test is vacuous)"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_gradient_through_lse_only():
    q, k, v = _qkv(1, 2, 1, 21, 30, 16, 16)
    grads = []
    for backend in ("triton", "reference"):
        _, lse = attnkit.attention(q, k, v, mask=M.causal, backend=backend, return_lse=True)
        grads.append(torch.autograd.grad(lse[torch.isfinite(lse)].sum(), [q, k]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_non_contiguous_bthd_layout():
    q, k, v = (torch.randn(2, 27, H, 16, dtype=F64).requires_grad_() for H in (4, 2, 2))
    out = attnkit.attention(q, k, v, mask=M.causal, layout="bthd", backend="triton")
    ref = attnkit.attention(q, k, v, mask=M.causal, layout="bthd", backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(out)
    a = torch.autograd.grad((out * g).sum(), [q, k, v])
    b = torch.autograd.grad((ref * g).sum(), [q, k, v])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9)


def test_varlen_matches_separate_sequences():
    """Packed [total, H, D] with cu_seqlens == each sequence on its own (an independent check)."""
    lens = [5, 17, 1, 23]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    T = int(cu[-1])
    q, k, v = (torch.randn(T, H, 16, dtype=F64).requires_grad_() for H in (2, 1, 1))
    out = attnkit.varlen_attention(q, k, v, cu, causal=True, backend="triton")
    assert out.shape == (T, 2, 16)
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        parts.append(attnkit.attention(q[a:b].unsqueeze(0), k[a:b].unsqueeze(0), v[a:b].unsqueeze(0),
                                       mask=M.causal, layout="bthd", backend="reference")[0])
    ref = torch.cat(parts)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad((out * g).sum(), [q, k, v]), torch.autograd.grad((ref * g).sum(), [q, k, v])):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("mask", [M.full, M.causal])
def test_negative_scale(mask):
    """FULL blocks take the row max of the raw products; a negative scale flips it to the row min."""
    q, k, v = _qkv(2, 2, 1, 37, 45, 16, 16)
    compare(q, k, v, mask=mask, scale=-0.3)


def test_cached_problem_follows_parameter_values():
    """A repeated call reuses its cached Problem but never stale parameter values: learnable tensors are
    re-read every call; small constant CPU tensors are part of the cache key (a new value, a new plan)."""
    H = 2
    slopes = torch.rand(H, dtype=F64).add_(0.5).requires_grad_()
    tau = torch.tensor([0.7, 1.3], dtype=F64)
    sm_l, sm_c = S.alibi(slopes), S.temperature(tau)
    q, k, v = _qkv(1, H, 1, 19, 23, 16, 16)
    for step in range(3):
        for sm, params in ((sm_l, [slopes]), (sm_c, [])):
            compare(q, k, v, mask=M.causal, score_mod=sm, params=params)
        with torch.no_grad():
            slopes.mul_(1.7)
            tau.add_(0.25)
    pb1 = KA.problem(q, k, v, M.sliding_window(5), S.softcap(3.0), N.softmax(), 0.25, True)
    pb2 = KA.problem(q, k, v, M.sliding_window(5), S.softcap(3.0), N.softmax(), 0.25, True)
    assert pb1 is pb2, "structurally equal masks / mods / normalizers share one cached Problem"
    assert KA.problem(q, k, v, M.sliding_window(6), S.softcap(3.0), N.softmax(), 0.25, True) is not pb1


def test_direct_launch_protocol(monkeypatch):
    """After the first launch of a specialization a Phase calls the compiled kernel as Triton's JIT does: a 3-D
    grid and every parameter in signature order (runtime ones, then the constexprs); a new specialization goes
    through the JIT again. (On the GPU the direct path runs from the second call on; here it is faked.)"""
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *a: calls.append(("direct", grid, a))

    class Param:
        def __init__(self, name, constexpr):
            self.name, self.is_constexpr = name, constexpr

    class Jit:
        params = [Param("X", False), Param("n", False), Param("A", True), Param("B", True)]

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("jit", grid, a, kw)) or Compiled()

    interpreting = KA.tuning.interpreting
    monkeypatch.setattr(KA.tuning, "interpreting", lambda: False)
    ph = KA.Phase(Jit(), KA.tuning.Config(16, 16, 4, 2), (3, 2, 1), dict(B=7, A=5), ())
    ph.launch(("s",), (1, 2))
    ph.launch(("s",), (3, 4))
    ph.launch(("t",), (5, 6))
    assert calls == [("jit", (3, 2, 1), (1, 2), dict(B=7, A=5, num_warps=4, num_stages=2)),
                     ("direct", (3, 2, 1), (3, 4, 5, 7)),
                     ("jit", (3, 2, 1), (5, 6), dict(B=7, A=5, num_warps=4, num_stages=2))]
    monkeypatch.setattr(KA.tuning, "interpreting", interpreting)
    q, k, v = _qkv(1, 2, 1, 19, 23, 16, 16)
    out = attnkit.attention(q, k, v, mask=M.causal, backend="triton")
    out.backward(torch.ones_like(out))
    pb = KA.problem(q, k, v, M.causal, None, N.softmax(), 0.25, True)
    assert pb.phases and all(len(ph.grid) == 3 for ph in pb.phases.values()), "compiled kernels read grid[2]"


@pytest.mark.parametrize("case", ["gqa_relbias", "document_learnable", "differential"])
def test_one_backward_launch_matches_two(case, monkeypatch):
    """dK/dV and dQ programs in one launch (the default) give bit-identical gradients to two launches: the same
    programs, only scheduled together; learnable-parameter partial sums included."""
    H, Hkv = 4, 2
    slopes = torch.rand(H, dtype=F64).add_(0.5).requires_grad_()
    q, k, v = _qkv(2, H, Hkv, 21, 37, 16, 24)
    lam = torch.rand(H, dtype=F64, requires_grad=True)
    if case == "gqa_relbias":
        rb = S.relative_bias(H, num_buckets=8, max_distance=16)
        kw, params = dict(mask=M.causal, score_mod=[rb]), _params(rb)
    elif case == "document_learnable":
        ids = torch.randint(0, 3, (37,)).sort().values
        kw, params = dict(mask=M.document(ids) & M.sliding_window(9), score_mod=[S.alibi(slopes)]), [slopes]
    else:
        q, k, v = _qkv(2, H, Hkv, 21, 37, 32, 24)  # two maps of head dim 16
        kw, params = dict(mask=M.causal), [lam]
    inputs = [q, k, v] + params
    seen = []
    for split in (False, True):
        monkeypatch.setattr(KA, "SPLIT_BWD", split)
        KA._problems.clear()
        if case == "differential":
            from attnkit import differential_attention
            out = differential_attention(q, k, v, lam, backend="triton", **kw)
        else:
            out = attnkit.attention(q, k, v, backend="triton", **kw)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
        seen.append((out, torch.autograd.grad((out * g).sum(), inputs)))
        pb = list(KA._problems.values())[-1]
        assert ("dkdv" in pb.phases) == split and any(isinstance(k, tuple) and k[0] == "bwd" for k in pb.phases) \
            != split
    (o1, g1), (o2, g2) = seen
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("why", ["warps_differ", "out_of_resources"])
def test_backward_falls_back_to_two_launches(why, monkeypatch):
    """dK/dV and dQ run as two launches when their tile choices need different warps (one launch has one
    count), or when the one-launch build runs out of resources; gradients stay exact either way."""
    from triton.runtime.errors import OutOfResources
    launched = []
    launch = KA.Phase.launch

    def spy(self, sig, args):
        launched.append(self.cx.get("PHASE"))
        if why == "out_of_resources" and self.cx.get("PHASE") == 2:
            raise OutOfResources(300000, 232448, "shared memory")
        return launch(self, sig, args)

    monkeypatch.setattr(KA.Phase, "launch", spy)
    if why == "warps_differ":
        base = KA.tuning.defaults
        monkeypatch.setattr(KA.tuning, "defaults", lambda phase, *a: KA.tuning.Config(32, 16, 8, 2)
                            if phase == "dq" else base(phase, *a))
    KA._problems.clear()
    slopes = torch.rand(4, dtype=F64).add_(0.5).requires_grad_()
    q, k, v = _qkv(2, 4, 2, 21, 37, 16, 24)
    compare(q, k, v, mask=M.causal, score_mod=S.alibi(slopes), params=[slopes])
    pb = [p for p in KA._problems.values() if p.need_grad][-1]
    assert pb.split_bwd and "dkdv" in pb.phases and 0 in launched and 1 in launched
    assert (2 in launched) == (why == "out_of_resources")


def test_gradcheck_float64():
    sink = torch.randn(2, dtype=F64, requires_grad=True)
    slopes = torch.rand(2, dtype=F64, requires_grad=True)
    q, k, v = _qkv(1, 2, 1, 5, 7, 4, 4)

    def f(q, k, v, sink, slopes):
        return attnkit.attention(q, k, v, mask=M.causal & M.sliding_window(3), backend="triton",
                                 score_mod=[S.alibi(slopes), S.softcap(3.0)], normalizer=N.softmax_sink(sink))

    assert torch.autograd.gradcheck(f, (q, k, v, sink, slopes), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# dispatch and errors
# ------------------------------------------------------------------------------------------------

def test_auto_on_cpu_runs_the_reference_quietly(recwarn):
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, 16)
    attnkit.attention(q, k, v, mask=M.causal)
    assert attnkit.last_backend().startswith("reference/")
    assert not [w for w in recwarn if "slow path" in str(w.message)]


def test_triton_refuses_pointwise_without_twin():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, 16)
    with pytest.raises(ValueError, match="no Triton twin"):
        attnkit.attention(q, k, v, score_mod=S.pointwise(_wave_torch), backend="triton")


def test_triton_refuses_backward_without_derivative():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, 16)
    with pytest.raises(ValueError, match="derivative"):
        attnkit.attention(q, k, v, score_mod=S.pointwise(_wave_torch, triton_fn=_wave), backend="triton")
    with torch.no_grad():  # forward-only use needs no derivative
        out = attnkit.attention(q, k, v, score_mod=S.pointwise(_wave_torch, triton_fn=_wave), backend="triton")
        ref = attnkit.attention(q, k, v, score_mod=S.pointwise(_wave_torch), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


def test_learnable_parameter_with_frozen_qkv():
    """Only a score-mod parameter needs a gradient (q, k, v frozen): the call is planned for gradients, so a
    pointwise mod without its derivative is refused instead of giving a silently wrong parameter gradient, and
    the parameter's gradient matches the reference."""
    q, k, v = (t.detach() for t in _qkv(1, 4, 2, 21, 21, 16, 16))
    slopes = torch.rand(4, dtype=F64).add_(0.5).requires_grad_()
    with pytest.raises(ValueError, match="derivative"):
        attnkit.attention(q, k, v, mask=M.causal, backend="triton",
                          score_mod=[S.alibi(slopes), S.pointwise(_wave_torch, triton_fn=_wave)])
    got, want = (torch.autograd.grad(attnkit.attention(q, k, v, mask=M.causal, score_mod=S.alibi(slopes),
                                                       backend=be).square().sum(), slopes)[0]
                 for be in ("triton", "reference"))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_parameter_unfrozen_after_a_first_call():
    """A relative-bias table frozen at the first call and unfrozen later gets its gradient (the cached plan of the
    frozen call is not reused for it)."""
    q, k, v = _qkv(1, 2, 2, 20, 20, 16, 16)
    rb = S.relative_bias(2, num_buckets=8, max_distance=16).double()
    rb.requires_grad_(False)
    attnkit.attention(q, k, v, mask=M.causal, score_mod=rb, backend="triton")
    rb.requires_grad_(True)
    grads = []
    for be in ("triton", "reference"):
        out = attnkit.attention(q, k, v, mask=M.causal, score_mod=rb, backend=be)
        grads.append(torch.autograd.grad(out.square().sum(), list(rb.parameters()))[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-9)


def test_kernels_run_contract_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kernels.tuning, "interpreting", lambda: False)
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, 16)
    kw = dict(mask=M.causal, score_mod=None, normalizer=N.softmax(), scale=0.25, return_lse=False)
    assert kernels.run("auto", q, k, v, **kw) is None
    with pytest.raises(ValueError, match="CUDA"):
        kernels.run("triton", q, k, v, **kw)


# after every triton.jit above: the rest of the session keeps its environment (fixture sets it per test)
if _env is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _env
