"""Caches: contiguous and paged KV caches (appends, ragged batches, capacity and block-table errors, memory
accounting, paged == contiguous == no cache), the fixed-memory recurrent-state cache, the eviction policies
(StreamingLLM, H2O, SnapKV, compositions, per-layer budgets) against a dense reference that applies the same
selection on the full cache, StreamingLLM's cache positions under RoPE, constant memory over long streams, and the
block cache of diffusion-LM decoding."""
from __future__ import annotations

import gc
import math
import os
import random

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F

from attnkit import masks as M
from attnkit.cache import (H2O, BlockCache, ContiguousKVCache, DynamicCache, HeavyHitters, ModelCache, PagedKVCache,
                           Policy, PolicyCache, Recent, RecurrentStateCache, Sinks, SnapKV, StreamingLLM)
from attnkit.dispatch.decode import decode_attention
from attnkit.nn import Attention, LinearAttention
from attnkit.ops.softmax import fused as KA

from conftest import one_thread, ref_attention

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(KA, "POISON", True)


def kv(B, H, T, D=8, Dv=8):
    return torch.randn(B, H, T, D, dtype=F64), torch.randn(B, H, T, Dv, dtype=F64)


# ------------------------------------------------------------------------------------------------
# contiguous
# ------------------------------------------------------------------------------------------------

def test_contiguous_appends_reads_and_capacity():
    c = ContiguousKVCache(10)
    k1, v1 = kv(2, 3, 4, 8, 5)
    k2, v2 = kv(2, 3, 1, 8, 5)
    a, b = c.update(0, k1, v1)
    assert torch.equal(a, k1) and torch.equal(b, v1) and c.seq_len(0) == 4 and c.seq_len(1) == 0
    a, b = c.update(0, k2, v2)
    assert torch.equal(a, torch.cat([k1, k2], 2)) and torch.equal(b, torch.cat([v1, v2], 2))
    assert a.data_ptr() == c.update(0, *kv(2, 3, 0, 8, 5))[0].data_ptr()  # views of one buffer, never reallocated
    with pytest.raises(ValueError, match="max_len=10"):
        c.update(0, *kv(2, 3, 6, 8, 5))
    assert c.seq_len(0) == 5  # a refused append changes nothing
    with pytest.raises(ValueError, match="heads"):
        c.update(0, *kv(2, 2, 1, 8, 5))
    with pytest.raises(ValueError, match="batch of 2"):
        c.update(1, *kv(3, 3, 1, 8, 5))
    mem = c.memory()
    assert mem["per_token"] == 3 * (8 + 5) * 8 and mem["allocated"] == 2 * 10 * mem["per_token"]
    with pytest.raises(ValueError, match="max_len"):
        ContiguousKVCache(0)


def test_contiguous_ragged_truncate_positions_and_view():
    """A right-padded batched prefill trimmed to ragged lengths; appends go to each sequence's own end."""
    c = ContiguousKVCache(12)
    k1, v1 = kv(2, 2, 6)
    c.update(0, k1, v1)
    c.truncate([6, 3])
    assert c.lengths(0) == [6, 3]
    with pytest.raises(ValueError, match="different numbers"):
        c.seq_len(0)
    assert torch.equal(c.positions(0, 2), torch.tensor([[6, 7], [3, 4]]))
    k2, v2 = kv(2, 2, 2)
    c.append(0, k2, v2)
    view = c.kv_view(0)
    assert view.lens == [8, 5] and view.max_len == 8
    assert torch.equal(view.k[1, :, :5], torch.cat([k1[1, :, :3], k2[1]], 1))
    assert torch.equal(view.k[0, :, :8], torch.cat([k1[0], k2[0]], 1))
    with pytest.raises(ValueError, match="different numbers"):
        c.read(0)
    with pytest.raises(ValueError, match="cannot truncate"):
        c.truncate([9, 1])
    with pytest.raises(ValueError, match="one length per batch row"):
        c.truncate([1])


# ------------------------------------------------------------------------------------------------
# paged
# ------------------------------------------------------------------------------------------------

def test_paged_sequences_pages_and_errors():
    c = PagedKVCache(num_pages=6, page_size=4, max_seqs=3)
    a, b = c.add_sequences(2)
    ka, va = kv(1, 2, 7)
    kb, vb = kv(1, 2, 2)
    with c.batch([a]):
        c.append(0, ka, va)
    with c.batch([b]):
        c.append(0, kb, vb)
    assert c.free_pages == 3 and len(c.block_table(a)) == 2 and len(c.block_table(b)) == 1
    with c.batch([b, a]):  # decode both together: different lengths, rows in any order
        assert c.lengths(0) == [2, 7]
        k1, v1 = kv(2, 2, 1)
        c.append(0, k1, v1)
        view = c.kv_view(0)
        from attnkit.dispatch.decode import gather
        got_a = gather(view, 1, 8)[0]
        assert torch.equal(got_a, torch.cat([ka, k1[1:2]], 2))
        assert torch.equal(gather(view, 0, 3)[1], torch.cat([vb, v1[0:1]], 2))
    with c.batch([a]):
        with pytest.raises(ValueError, match="out of pages"):
            c.append(0, *kv(1, 2, 16))
        assert c.lengths(0) == [8] and c.free_pages == 3  # nothing allocated by the refused append
    c.free([a])
    assert c.free_pages == 5
    (d,) = c.add_sequences(1)
    with c.batch([d]):
        c.append(0, *kv(1, 2, 17))  # reuses a's pages
    assert c.free_pages == 0 and d == a  # ids are block-table rows, reused after free
    with pytest.raises(ValueError, match="not in the cache"):
        c.free([2])
    with pytest.raises(ValueError, match="distinct live"):
        c.use([b, b])
    with pytest.raises(ValueError, match="at most 3 sequences"):
        c.add_sequences(2)
    with pytest.raises(ValueError, match="active batch"):
        with c.batch([b]):
            c.append(0, *kv(2, 2, 1))


def test_paged_block_table_validation():
    c = PagedKVCache(num_pages=8, page_size=4)
    a, b = c.add_sequences(2)
    with c.batch([a]):
        c.append(0, *kv(1, 1, 6))
    with c.batch([b]):
        c.append(0, *kv(1, 1, 3))
    pa, pb = c.block_table(a), c.block_table(b)
    with pytest.raises(ValueError, match="outside the pool"):
        c.set_block_table(a, [pa[0], 8])
    with pytest.raises(ValueError, match="another sequence"):
        c.set_block_table(a, [pa[0], pb[0]])
    with pytest.raises(ValueError, match="repeats"):
        c.set_block_table(a, [pa[0], pa[0]])
    with pytest.raises(ValueError, match="cannot hold"):
        c.set_block_table(a, [pa[0]])
    free = [p for p in range(8) if p not in pa + pb]
    c.set_block_table(a, [pa[0], pa[1], free[0]])  # one more page: kept
    assert c.block_table(a) == [pa[0], pa[1], free[0]] and c.free_pages == 8 - 4


def _layer(Hq=4, Hkv=2, d=16, rope=True, **kw):
    torch.manual_seed(random.randrange(2 ** 31))
    return Attention(d, Hq, Hkv, rope=rope, **kw).double()


def _decode_all(layer, x, cache, prefill, step=1):
    outs = [layer(x[:, :prefill], cache=cache)]
    for t in range(prefill, x.shape[1], step):
        outs.append(layer(x[:, t:t + step], cache=cache))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paged_equals_contiguous_equals_no_cache(backend):
    """The same decode through a paged cache, a contiguous cache and a growing one, and the full forward (float64):
    paged == contiguous bit for bit (same kernel or reference on the same keys), both == no cache to rounding."""
    layer = _layer(mask=M.sliding_window(5) | M.sinks(2), backend=backend)
    x = torch.randn(2, 11, 16, dtype=F64)
    full = layer(x)
    res = {}
    for name, cache in [("paged", PagedKVCache(16, 4)), ("contiguous", ContiguousKVCache(11)),
                        ("dynamic", DynamicCache())]:
        res[name] = _decode_all(layer, x, cache, 6, step=random.choice([1, 2]) if name != "dynamic" else 1)
    torch.testing.assert_close(res["paged"], res["contiguous"], rtol=0, atol=1e-15)
    for name in res:
        torch.testing.assert_close(res[name], full, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_paged_ragged_batch_equals_each_sequence_alone():
    """Sequences prefilled separately (different prompt lengths), decoded together in one batch: each equals that
    sequence decoded alone; the RoPE positions of each continue from its own length."""
    layer = _layer(backend="reference")
    xs = [torch.randn(1, n, 16, dtype=F64) for n in (3, 8, 5)]
    steps = [torch.randn(3, 1, 16, dtype=F64) for _ in range(4)]
    cache = PagedKVCache(32, 4)
    ids = cache.add_sequences(3)
    for s, x in zip(ids, xs):
        with cache.batch([s]):
            layer(x, cache=cache)
    with cache.batch(ids):
        got = torch.cat([layer(st, cache=cache) for st in steps], 1)
    for i, x in enumerate(xs):
        want = layer(torch.cat([x] + [st[i:i + 1] for st in steps], 1))[:, -4:]
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paged_top_k_page_selection_vs_dense_reference(backend):
    """Quest / TokenSelect-style selection: each (sequence, KV head) attends to the k pages with the largest bound
    Σ_d max(q_d·max_d, q_d·min_d) (summed over the group), first and last pages always; equal to masked attention over
    the whole cache with the same pages, computed here from the keys; unselected pages are never read (NaN there)."""
    B, Hq, Hkv, D, P, k = 2, 4, 2, 8, 4, 3
    lens = [23, 14]
    cache = PagedKVCache(32, P, select_pages=k)
    ids = cache.add_sequences(B)
    ks = [torch.randn(1, Hkv, n, D, dtype=F64) for n in lens]
    vs = [torch.randn(1, Hkv, n, D, dtype=F64) for n in lens]
    for s, kk, vv in zip(ids, ks, vs):
        with cache.batch([s]):
            cache.append(0, kk[:, :, :-1], vv[:, :, :-1])
    q = torch.randn(B, Hq, 1, D, dtype=F64)
    with cache.batch(ids):
        cache.append(0, torch.cat([kk[:, :, -1:] for kk in ks]), torch.cat([vv[:, :, -1:] for vv in vs]))
        view = cache.kv_view(0, q)
        chosen = []
        for b, n in enumerate(lens):  # the reference selection, from the keys themselves
            npg = -(-n // P)
            kp = torch.stack([ks[b][0, :, i * P:min(n, (i + 1) * P)].amax(1) for i in range(npg)], 1)  # [Hkv, npg, D]
            kn = torch.stack([ks[b][0, :, i * P:min(n, (i + 1) * P)].amin(1) for i in range(npg)], 1)
            qg = q[b, :, 0].view(Hkv, Hq // Hkv, D)
            score = (torch.maximum(qg[:, :, None] * kp[:, None], qg[:, :, None] * kn[:, None])).sum((1, 3))
            score[:, 0] = score[:, -1] = math.inf
            chosen.append([sorted(score[h].topk(min(k, npg)).indices.tolist()) for h in range(Hkv)])
        pool_pages = {p for s in ids for p in cache.block_table(s)}
        for b, s in enumerate(ids):
            for h in range(Hkv):
                for i, page in enumerate(cache.block_table(s)):
                    if i not in chosen[b][h]:  # an unselected page: NaN for this head (a read would show)
                        view.k[page, h] = float("nan")
                        view.v[page, h] = float("nan")
        out = decode_attention(q, view, mask=M.causal, backend=backend)
    assert pool_pages and torch.isfinite(out).all()
    for b, n in enumerate(lens):
        m = torch.zeros(1, Hq, 1, n, dtype=torch.bool)
        for hq in range(Hq):
            for i in chosen[b][hq // (Hq // Hkv)]:
                m[0, hq, 0, i * P:min(n, (i + 1) * P)] = True
        want, _, _ = ref_attention(q[b:b + 1], ks[b], vs[b], m)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-10, atol=1e-12)


def test_paged_selection_in_a_layer():
    """A layer over a selecting paged cache: with k at least every page it equals the full forward; with fewer pages
    it attends to fewer keys (a different, finite result)."""
    layer = _layer(rope=True, backend="reference")
    x = torch.randn(2, 30, 16, dtype=F64)
    full = layer(x)
    all_pages = _decode_all(layer, x, PagedKVCache(32, 4, select_pages=8), 24)
    torch.testing.assert_close(all_pages, full, rtol=1e-10, atol=1e-12)
    few = _decode_all(layer, x, PagedKVCache(32, 4, select_pages=3), 24)
    assert torch.isfinite(few).all() and not torch.allclose(few[:, 24:], full[:, 24:])
    with pytest.raises(ValueError, match="select_pages"):
        PagedKVCache(8, 4, select_pages=1)


# ------------------------------------------------------------------------------------------------
# recurrent states
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["gated_delta", "log_linear", "aaren"])
def test_recurrent_state_cache_in_place(rule):
    """A linear layer decodes through fixed buffers: same outputs as the growing cache, same tensors every step."""
    torch.manual_seed(random.randrange(2 ** 31))
    layer = LinearAttention(16, 2, rule, num_levels=6, backend="reference").double() if rule == "log_linear" else \
        LinearAttention(16, 2, rule, backend="reference").double()
    x = torch.randn(2, 9, 16, dtype=F64)
    want = _decode_all(layer, x, DynamicCache(), 4)
    sc = RecurrentStateCache()
    outs = [layer(x[:, :4], cache=ModelCache(DynamicCache(), sc))]
    ptrs = None
    for t in range(4, 9):
        outs.append(layer(x[:, t:t + 1], cache=ModelCache(DynamicCache(), sc)))
        now = [s.data_ptr() for s in _tensors(sc.get(0))]
        assert ptrs is None or now == ptrs
        ptrs = now
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-10, atol=1e-12)
    assert sc.reallocations == 0
    rec = sc.get(0).recurrent
    per_head = {"gated_delta": 8 * 8 * 8, "aaren": (8 + 2) * 8}.get(rule)
    if per_head is not None:  # float64 here: 8 bytes a value
        from attnkit.cache.state import state_bytes
        assert state_bytes(rec) == 2 * 2 * per_head


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple):
        return [t for y in x for t in _tensors(y)]
    return []


# ------------------------------------------------------------------------------------------------
# policies against a dense reference
# ------------------------------------------------------------------------------------------------

class DenseReference:
    """The full cache (never evicted) plus the kept set per (sequence, KV head), with the selection rules written
    from the papers: attention over the whole cache masked to the kept tokens."""

    def __init__(self, kind, B, Hkv, **p):
        self.kind, self.p, self.B, self.Hkv = kind, p, B, Hkv
        self.k = self.v = None
        self.kept = torch.zeros(B, Hkv, 0, dtype=torch.bool)
        self.score = torch.zeros(B, Hkv, 0, dtype=F64)

    def step(self, q, k, v, extra_mask=None):
        T = k.shape[2]
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        B, Hq, _, _ = q.shape
        N = self.k.shape[2]
        self.kept = torch.cat([self.kept, torch.ones(B, self.Hkv, T, dtype=torch.bool)], 2)
        self.score = torch.cat([self.score, torch.zeros(B, self.Hkv, T, dtype=F64)], 2)
        G = Hq // self.Hkv
        vis = self.kept.repeat_interleave(G, 1)[:, :, None, :].expand(B, Hq, T, N).clone()
        qpos = torch.arange(N - T, N).view(T, 1)
        kpos = torch.arange(N).view(1, N)
        vis &= kpos <= qpos
        if extra_mask is not None:
            vis &= extra_mask(qpos, kpos)
        out, _, p = ref_attention(q, self.k, self.v, vis)
        pg = p.reshape(B, self.Hkv, G, T, N)
        if self.kind == "h2o":
            self.score += pg.sum((2, 3))
        if self.kind == "snap" and T > 1:
            w = self.p["window"]
            obs = pg[:, :, :, max(0, T - w):].sum((2, 3))
            pre = N - w
            pooled = F.avg_pool1d(obs[..., :pre].reshape(-1, 1, pre), self.p["kernel"], 1, self.p["kernel"] // 2,
                                  count_include_pad=False).reshape(B, self.Hkv, pre)
            self.score[..., :pre] = pooled
        self.evict(N, T)
        return out

    def evict(self, N, T):
        pos = torch.arange(N).expand(self.B, self.Hkv, N)
        kept_n = int(self.kept[0, 0].sum())
        if self.kind == "streaming":
            S, W = self.p["sinks"], self.p["window"]
            if kept_n > S + W:
                self.kept &= (pos < S) | (pos >= N - W)
            return
        if self.kind == "h2o":
            heavy, W = self.p["heavy"], self.p["recent"]
            if kept_n <= heavy + W:
                return
            protect = self.kept & (pos >= N - W)
            cand = self.score.masked_fill(~self.kept | protect, -math.inf)
            top = cand.topk(heavy, -1).indices
            new = protect.clone()
            new.scatter_(-1, top, True)
            self.kept = new
            return
        if self.kind == "snap":
            kk, w = self.p["k"], self.p["window"]
            if T == 1 or kept_n <= kk + w:
                return
            protect = pos >= N - w
            cand = self.score.masked_fill(protect, -math.inf)
            new = protect.clone()
            new.scatter_(-1, cand.topk(kk, -1).indices, True)
            self.kept = new


def _policy_run(policy, ref, layer, x, prefill, extra_mask=None):
    cache = PolicyCache(policy)
    q_all, k_all, v_all = layer.project(x)
    outs, want = [], []
    for a, b in [(0, prefill)] + [(t, t + 1) for t in range(prefill, x.shape[1])]:
        o = layer.heads(x[:, a:b], cache=cache)
        outs.append(o)
        r = ref.step(q_all[:, :, a:b], k_all[:, :, a:b], v_all[:, :, a:b],
                     extra_mask if b - a > 1 else None)
        want.append(r.transpose(1, 2))
        assert cache.cached(layer.layer_idx) == int(ref.kept[0, 0].sum())
        kept = torch.zeros_like(ref.kept)
        kept.scatter_(-1, cache.positions_kept(layer.layer_idx), True)
        assert torch.equal(kept, ref.kept), f"kept sets differ after tokens [{a}, {b})"
    return torch.cat(outs, 1), torch.cat(want, 1), cache


def test_streaming_llm_vs_dense_reference():
    B, Hq, Hkv = 2, 4, 2
    S, W = 2, 5
    layer = _layer(Hq, Hkv, rope=False, backend="reference")
    x = torch.randn(B, 20, 16, dtype=F64)
    ref = DenseReference("streaming", B, Hkv, sinks=S, window=W)
    got, want, cache = _policy_run(StreamingLLM(S, W), ref, layer, x, 9,
                                   extra_mask=lambda qp, kp: (kp < S) | (kp >= qp - W))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert cache.cached(0) == S + W and cache.evicted == 20 - S - W


def test_h2o_vs_dense_reference():
    """H2O keeps original positions: the layer caches keys rotated by them, the reference rotates the same way."""
    B, Hq, Hkv = 2, 4, 2
    layer = _layer(Hq, Hkv, rope=True, backend="reference")
    x = torch.randn(B, 18, 16, dtype=F64)
    ref = DenseReference("h2o", B, Hkv, heavy=3, recent=2)
    got, want, cache = _h2o_rope_run(layer, x, ref, torch.arange(18))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert cache.cached(0) == 5 and cache.seq_len(0) == 18  # kept per (sequence, KV head): checked in the run


def _h2o_rope_run(layer, x, ref, pos):
    cache = PolicyCache(H2O(3, 2))
    q, k, v = layer.project(x)
    q, k = layer.rope(q, pos), layer.rope(k, pos)
    outs, want = [], []
    for a, b in [(0, 8)] + [(t, t + 1) for t in range(8, x.shape[1])]:
        outs.append(layer.heads(x[:, a:b], cache=cache))
        want.append(ref.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]).transpose(1, 2))
        kept = torch.zeros_like(ref.kept)
        kept.scatter_(-1, cache.positions_kept(0), True)
        assert torch.equal(kept, ref.kept)
    return torch.cat(outs, 1), torch.cat(want, 1), cache


def test_snapkv_vs_dense_reference():
    B, Hq, Hkv = 1, 4, 2
    layer = _layer(Hq, Hkv, rope=False, backend="reference")
    x = torch.randn(B, 24, 16, dtype=F64)
    ref = DenseReference("snap", B, Hkv, k=4, window=3, kernel=3)
    got, want, cache = _policy_run(Policy(SnapKV(4, window=3, kernel=3)), ref, layer, x, 18)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert cache.cached(0) == 7 + 6  # compressed prompt, then the 6 decoded tokens appended


def test_composed_policy_and_per_layer_budgets():
    """Sinks + heavy hitters + recent (union, exact budget), and a different policy per layer of a model."""
    B, Hkv = 1, 1
    layer = _layer(2, 1, rope=False, backend="reference")
    x = torch.randn(B, 16, 16, dtype=F64)
    pol = Sinks(1) + HeavyHitters(2) + Recent(2)
    assert pol.budget == 5
    cache = PolicyCache(pol)
    layer.heads(x[:, :6], cache=cache)
    for t in range(6, 16):
        layer.heads(x[:, t:t + 1], cache=cache)
        kept = cache.positions_kept(0)[0, 0].tolist()
        assert len(kept) == 5 and kept[0] == 0 and kept[-2:] == [t - 1, t]
    from attnkit.nn import HybridLM
    from attnkit.nn.model import HybridConfig
    m = HybridLM(HybridConfig(vocab_size=32, d_model=16, n_heads=2, layers="A", n_layers=2)).double()
    pc = PolicyCache({0: StreamingLLM(1, 3), 1: H2O(2, 4)})
    m.generate(torch.randint(0, 32, (2, 9)), 5, cache=pc)
    assert pc.cached(0) == 4 and pc.cached(1) == 6
    with pytest.raises(ValueError, match="no policy for layer 2"):
        PolicyCache({0: StreamingLLM()}).policy(2)
    with pytest.raises(ValueError, match="do not combine"):
        SnapKV(4) + HeavyHitters(2)


def test_streaming_llm_positions_within_the_cache_under_rope():
    """StreamingLLM rotates every kept key by its slot in the cache and the query by the next slot (the paper's
    positions within the cache), not by original positions."""
    B, Hq, Hkv, S, W = 1, 2, 1, 2, 3
    layer = _layer(Hq, Hkv, rope=True, backend="reference")
    x = torch.randn(B, 12, 16, dtype=F64)
    cache = PolicyCache(StreamingLLM(S, W))
    layer.heads(x[:, :4], cache=cache)
    q, k, v = layer.project(x)
    kept = list(range(4))
    for t in range(4, 12):
        got = layer.heads(x[:, t:t + 1], cache=cache)
        keys = kept + [t]
        n = len(keys)
        kr = layer.rope(k[:, :, keys], torch.arange(n))
        qr = layer.rope(q[:, :, t:t + 1], torch.tensor([n - 1]))
        want, _, _ = ref_attention(qr, kr, v[:, :, keys], torch.ones(1, 1, 1, n, dtype=torch.bool))
        torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-10, atol=1e-12)
        kept = keys[:S] + keys[S:][-W:] if n > S + W else keys
    assert cache.seq_len(0) == S + W  # the next token's position: its cache slot


def test_streaming_llm_memory_constant_over_a_long_stream():
    """Synthetic appends through a StreamingLLM cache for 3000 steps (benchmarks/decode_gpu.py --streaming-memory
    runs 100k): bytes held, live tensors and the kept count never grow."""
    B, H, D = 2, 2, 8
    cache = PolicyCache(StreamingLLM(4, 60))
    cache.update(0, *kv(B, H, 100, D, D))
    cache.observe(0, None)
    gc.collect()
    base_tensors = _live_tensors()
    base_mem = cache.memory()
    for _ in range(3000):
        cache.update(0, *kv(B, H, 1, D, D))
        cache.observe(0, None)
    gc.collect()
    assert cache.memory() == base_mem and cache.cached(0) == 64
    assert _live_tensors() <= base_tensors
    assert cache.positions_kept(0)[0, 0].tolist() == list(range(4)) + list(range(3100 - 60, 3100))


def _live_tensors():
    import warnings
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


# ------------------------------------------------------------------------------------------------
# block cache (diffusion-LM decoding)
# ------------------------------------------------------------------------------------------------

def test_block_cache_recomputes_only_the_active_block():
    """Block-causal decoding: each denoising step of the active block (new tokens each time) attends to the
    committed blocks and the whole block; it equals the full forward of committed + current block under chunked(c)."""
    c = 4
    layer = _layer(4, 2, causal=False, mask=M.chunked(c), backend=random.choice(["reference", "triton"]))
    cache = BlockCache(16)
    committed = torch.empty(2, 0, 16, dtype=F64)
    for block in range(3):
        for step in range(2):
            xb = torch.randn(2, c, 16, dtype=F64)
            got = layer(xb, cache=cache)
            want = layer(torch.cat([committed, xb], 1))[:, -c:]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            assert cache.seq_len(0) == block * c
        assert cache.commit() == (block + 1) * c
        committed = torch.cat([committed, xb], 1)
    with pytest.raises(ValueError, match="max_len"):
        for _ in range(2):
            layer(torch.randn(2, c, 16, dtype=F64), cache=cache)
            cache.commit()
