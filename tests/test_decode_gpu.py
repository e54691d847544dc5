"""The split-KV decode kernel on a CUDA GPU (marked ``gpu``; skipped without CUDA). Run this file on its own
(``pytest tests/test_decode_gpu.py``): the CPU test modules decorate the kernels for the interpreter.

Real shapes (thousands of keys, many splits, D = 128, the compiled kernels' 64-key blocks and pipelining) in
bf16 / fp16 / fp32 against the float64 reference computed per sequence on the same GPU
(``attnkit.attention(..., backend="reference", form="materialized")``), with ``‖x − ref‖ / ‖ref‖`` tolerances of
``tests/test_triton_gpu.py``: bf16 ≤ 1e-2, fp16 ≤ 3e-3, fp32 ≤ 1e-3 (TF32 products). Every mask kind of the
decode benchmarks, every score mod and normalizer, GQA / MQA / MHA, Lq ∈ {1, 2, 4}, ragged lengths, paged caches
with scattered pages of 16 and 64 keys, NaN in every slot the kernel must not read, outputs poisoned, and what
``backend="auto"`` runs.
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

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.cache import ContiguousKVCache, PagedKVCache  # noqa: E402
from attnkit.dispatch.decode import decode_attention  # noqa: E402
from attnkit.ops.softmax import decode as DK  # noqa: E402
from attnkit.ops.softmax import fused as KA  # noqa: E402

DEV = "cuda"
F64 = torch.float64
NAN = float("nan")
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(KA, "POISON", True)


def rel(a, b) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def make(B, Hq, Hkv, Lq, lens, dtype, D=128, Dv=128, page=None):
    """q, the per-sequence float64 keys / values, and the cache (NaN past each length and in unused pages)."""
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype)
    ks = [torch.randn(1, Hkv, n, D, device=DEV, dtype=dtype) for n in lens]
    vs = [torch.randn(1, Hkv, n, Dv, device=DEV, dtype=dtype) for n in lens]
    cap = max(lens)
    if page is None:
        k = torch.full((B, Hkv, cap + 7, D), NAN, device=DEV, dtype=dtype)
        v = torch.full((B, Hkv, cap + 7, Dv), NAN, device=DEV, dtype=dtype)
        for b, n in enumerate(lens):
            k[b, :, :n], v[b, :, :n] = ks[b][0], vs[b][0]
        return q, ks, vs, dict(k=k, v=v, seqlens=torch.tensor(lens, device=DEV, dtype=torch.int32), max_seqlen=cap)
    need = [-(-n // page) for n in lens]
    P = sum(need) + 5
    order = torch.randperm(P).tolist()
    table = torch.zeros(B, max(need), dtype=torch.int32)
    k = torch.full((P, Hkv, page, D), NAN, device=DEV, dtype=dtype)
    v = torch.full((P, Hkv, page, Dv), NAN, device=DEV, dtype=dtype)
    for b, n in enumerate(lens):
        for i in range(need[b]):
            p = order.pop()
            table[b, i] = p
            lo, hi = i * page, min(n, (i + 1) * page)
            k[p, :, :hi - lo], v[p, :, :hi - lo] = ks[b][0, :, lo:hi], vs[b][0, :, lo:hi]
    return q, ks, vs, dict(k=k, v=v, seqlens=torch.tensor(lens, device=DEV, dtype=torch.int32), max_seqlen=cap,
                           block_table=table.to(DEV))


def reference(q, ks, vs, **kw):
    """Per sequence, float64, attnkit's materialized reference (queries end-aligned to each sequence)."""
    return torch.cat([attnkit.attention(q[b:b + 1].to(F64), ks[b].to(F64), vs[b].to(F64), backend="reference",
                                        form="materialized", **kw) for b in range(q.shape[0])])


def run(q, cache, **kw):
    c = dict(cache)
    out = decode_attention(q, c.pop("k"), c.pop("v"), backend="triton", **c, **kw)
    assert attnkit.last_backend() == "triton/decode"
    return out


VARIANTS = {
    "plain": dict(mask=M.causal),
    "sliding_window": dict(mask=M.causal & M.sliding_window(700)),
    "sinks_window": dict(mask=M.causal & (M.sliding_window(500) | M.sinks(4))),
    "softcap": dict(mask=M.causal, score_mod=S.softcap(30.0)),
    "alibi": dict(mask=M.causal, score_mod=S.alibi()),
    "sigmoid": dict(mask=M.causal, normalizer=N.sigmoid()),
    "chunked": dict(mask=M.chunked(128)),
    "prefix_lm": dict(mask=M.prefix_lm(300)),
    "dilated": dict(mask=M.causal & M.dilated(3)),
    "document": dict(mask=M.document(cu_seqlens=torch.tensor([0, 1000, 2500, 6000])) & M.causal),
    "predicate": dict(mask=M.predicate(lambda b, h, q, kv: ((q - kv) % 5 != 1) & (kv <= q), "not5")),
    "t5": dict(mask=M.causal, score_mod=S.relative_bias(8, num_buckets=32, max_distance=256)),
    "ssmax": dict(mask=M.causal, score_mod=S.ssmax(0.43)),
    "temperature": dict(mask=M.causal, score_mod=S.temperature(torch.rand(8).add_(0.5))),
    "sink": dict(mask=M.causal, normalizer=N.softmax_sink(torch.randn(8))),
    "off_by_one": dict(mask=M.causal, normalizer="softmax_off_by_one"),
    "relaxed": dict(mask=M.causal, normalizer=N.relaxed(0.1)),
    "relu": dict(mask=M.causal, normalizer="relu"),
    "relu2": dict(mask=M.causal, normalizer="relu2"),
    "none": dict(mask=M.causal & M.sliding_window(64), normalizer="none"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_bf16(name):
    """Every mask family / score mod / normalizer at thousands of keys, ragged, GQA 8:2, bf16."""
    B, Hq, Hkv, Lq = 3, 8, 2, random.choice([1, 2])
    lens = [random.randint(2000, 6000) for _ in range(B)]
    q, ks, vs, cache = make(B, Hq, Hkv, Lq, lens, torch.bfloat16, page=random.choice([None, 16, 64]))
    kw = VARIANTS[name]
    out = run(q, cache, **kw)
    assert torch.isfinite(out).all()
    err = rel(out, reference(q, ks, vs, **kw))
    assert err <= TOL[torch.bfloat16], f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [(32, 8), (32, 32), (8, 1)])
@pytest.mark.parametrize("Lq", [1, 2, 4])
def test_dtypes_groups_and_query_tokens(dtype, group, Lq):
    Hq, Hkv = group
    B = 2
    lens = [random.randint(Lq, 9000), random.randint(Lq, 300)]
    q, ks, vs, cache = make(B, Hq, Hkv, Lq, lens, dtype, page=random.choice([None, 16]))
    out, lse = run(q, cache, mask=M.causal, return_lse=True)
    ref, rlse = zip(*[attnkit.attention(q[b:b + 1].to(F64), ks[b].to(F64), vs[b].to(F64), mask=M.causal,
                                        backend="reference", form="materialized", return_lse=True)
                      for b in range(B)])
    assert rel(out, torch.cat(ref)) <= TOL[dtype]
    fin = torch.isfinite(torch.cat(rlse))
    torch.testing.assert_close(lse[fin].to(F64), torch.cat(rlse)[fin], atol=3e-2 if dtype != torch.float32 else 1e-3,
                               rtol=1e-3)


@pytest.mark.parametrize("page", [16, 64])
def test_paged_equals_contiguous_at_scale(page):
    """Paged (scattered pages) and contiguous caches of the same keys: bitwise the same output with the same
    split count (the same blocks in the same order)."""
    B, Hq, Hkv, Lq = 8, 32, 8, 1
    lens = [random.randint(1000, 20000) for _ in range(B)]
    q, ks, vs, paged = make(B, Hq, Hkv, Lq, lens, torch.bfloat16, page=page)
    _, _, _, contig = make(B, Hq, Hkv, Lq, lens, torch.bfloat16)
    for b, n in enumerate(lens):
        contig["k"][b, :, :n], contig["v"][b, :, :n] = ks[b][0], vs[b][0]
    a = run(q, paged, mask=M.causal, splits=7)
    c = run(q, contig, mask=M.causal, splits=7)
    assert torch.equal(a, c)
    assert rel(a, reference(q, ks, vs, mask=M.causal)) <= TOL[torch.bfloat16]


def test_split_counts_and_heuristic():
    B, Hq, Hkv, Lq = 1, 32, 8, 1
    lens = [65536]
    q, ks, vs, cache = make(B, Hq, Hkv, Lq, lens, torch.bfloat16)
    ref = reference(q, ks, vs, mask=M.causal)
    for ns in (None, 1, 3, 64, 300):
        assert rel(run(q, cache, mask=M.causal, splits=ns), ref) <= TOL[torch.bfloat16], ns
    pb = DK.problem(q, cache["k"], cache["v"], M.causal, None, N.softmax(), 0.1, False, 65536)
    cfg = DK.config_for(pb)
    assert DK.splits_for(pb, 65536, cfg) > 1  # one sequence of 8 KV heads is split to fill the GPU


def test_sinks_window_skip_unread_blocks():
    """NaN in every key outside the sinks' and the window's blocks: the compiled kernel never loads them."""
    B, Hq, Hkv, Lq = 2, 8, 2, 1
    lens = [50000, 30000]
    q, ks, vs, cache = make(B, Hq, Hkv, Lq, lens, torch.bfloat16)
    mask = M.causal & (M.sliding_window(1000) | M.sinks(4))
    for b, n in enumerate(lens):
        cache["k"][b, :, 256:n - 1300] = NAN
        cache["v"][b, :, 256:n - 1300] = NAN
    out = run(q, cache, mask=mask)
    assert torch.isfinite(out).all()
    assert rel(out, reference(q, ks, vs, mask=mask)) <= TOL[torch.bfloat16]


def test_auto_routes_and_records():
    """``auto``: exactly-plain softmax over a contiguous cache with one length -> SDPA (cuDNN / flash); a variant, a
    paged cache or ragged lengths -> the kernel. Both are close to the reference."""
    B, Hq, Hkv = 4, 32, 8
    q = torch.randn(B, Hq, 1, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, 4096, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ref = attnkit.attention(q.to(F64), k.to(F64), v.to(F64), backend="reference")
    out = decode_attention(q, k, v, mask=M.causal)
    assert attnkit.last_backend().startswith("sdpa-") and attnkit.last_backend().endswith("/decode")
    assert rel(out, ref) <= TOL[torch.bfloat16]
    out = decode_attention(q, k, v, mask=M.causal, score_mod=S.softcap(30.0))
    assert attnkit.last_backend() == "triton/decode"
    out = decode_attention(q, k, v, mask=M.causal, seqlens=[4096, 4000, 100, 4096])
    assert attnkit.last_backend() == "triton/decode"


def test_layer_decoding_through_caches():
    """An attention layer decoding bf16 through contiguous and paged caches equals its full forward."""
    from attnkit.nn import Attention
    layer = Attention(1024, 16, 4, backend="auto").to(DEV, torch.bfloat16)
    x = torch.randn(2, 600, 1024, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
        for cache in (ContiguousKVCache(600), PagedKVCache(num_pages=128, page_size=16)):
            outs = [layer(x[:, :590], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(590, 600)]
            assert rel(torch.cat(outs, 1)[:, 590:], full[:, 590:]) <= 2e-2, type(cache).__name__


def test_paged_page_selection_at_scale():
    """Top-k page selection on a bf16 paged cache of thousands of keys: equal to attention over the selected pages."""
    B, Hq, Hkv, D, P, k = 2, 32, 8, 128, 16, 64
    lens = [5000, 3001]
    cache = PagedKVCache(num_pages=700, page_size=P, select_pages=k)
    ids = cache.add_sequences(B)
    ks = [torch.randn(1, Hkv, n, D, device=DEV, dtype=torch.bfloat16) for n in lens]
    vs = [torch.randn(1, Hkv, n, D, device=DEV, dtype=torch.bfloat16) for n in lens]
    for s, kk, vv in zip(ids, ks, vs):
        with cache.batch([s]):
            cache.append(0, kk, vv)
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
    with cache.batch(ids):
        view = cache.kv_view(0, q)
        out = decode_attention(q, view, mask=M.causal, backend="triton")
        ref = decode_attention(q, view, mask=M.causal, backend="reference")  # gathers the selected pages
    assert view.block_table.shape == (B, Hkv, k) and view.max_len <= k * P
    assert rel(out, ref) <= TOL[torch.bfloat16]


def test_cuda_graph_capture():
    """A decode step through the kernel can be captured in a CUDA graph and replayed."""
    B, Hq, Hkv, Lq = 4, 32, 8, 1
    lens = [8000, 7000, 3000, 100]
    q, ks, vs, cache = make(B, Hq, Hkv, Lq, lens, torch.bfloat16)
    kw = dict(mask=M.causal, score_mod=S.softcap(30.0))
    want = run(q, cache, **kw)
    c = dict(cache)
    kk, vv = c.pop("k"), c.pop("v")
    fn = lambda: decode_attention(q, kk, vv, backend="triton", check=False, **c, **kw)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
