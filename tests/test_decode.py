"""The split-KV decode kernel on CPU through Triton's interpreter, against float64 references built per sequence
from the definitions (conftest's loop-built masks and formulas): every mask leaf and composition, every score mod
and normalizer, GQA / MQA, Lq ∈ {1, 2, 4}, ragged lengths, contiguous and paged caches (scattered pages, per-head
tables, pages smaller / equal / larger than the kernel's key block), forced split counts, lse, float32 / float16,
padded head dims. Outputs are poisoned with NaN before the kernels write them, and cache slots the kernel must not
read (past each sequence's length, pages no table uses, blocks outside a sinks + window band) hold NaN."""
from __future__ import annotations

import math
import os
import random

os.environ["TRITON_INTERPRET"] = "1"  # the kernels below are decorated as interpreted functions

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.dispatch.decode import KVView, decode_attention  # noqa: E402
from attnkit.ops.softmax import decode as DK  # noqa: E402
from attnkit.ops.softmax import fused as KA  # noqa: E402

from conftest import MASK_NAMES, mask_case, one_thread, ref_attention, t5_bucket_ref  # noqa: E402

F64 = torch.float64
NAN = float("nan")
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside Triton's interpreter


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(KA, "POISON", True)


# ------------------------------------------------------------------------------------------------
# caches with NaN wherever the kernel must not read
# ------------------------------------------------------------------------------------------------

class Case:
    """Per-sequence keys / values ``ks[b] [1, Hkv, L_b, D]`` and the same data as the kernel reads it."""

    def __init__(self, B, Hq, Hkv, Lq, lens, D=16, Dv=16, dtype=F64, paged=None, per_head=False):
        self.B, self.Hq, self.Hkv, self.Lq, self.lens, self.D, self.Dv, self.dtype = B, Hq, Hkv, Lq, lens, D, Dv, dtype
        self.q = torch.randn(B, Hq, Lq, D, dtype=dtype)
        self.ks = [torch.randn(1, Hkv, n, D, dtype=dtype) for n in lens]
        self.vs = [torch.randn(1, Hkv, n, Dv, dtype=dtype) for n in lens]
        cap = max(lens) + random.randint(0, 5)
        if paged is None:
            self.k = torch.full((B, Hkv, cap, D), NAN, dtype=dtype)
            self.v = torch.full((B, Hkv, cap, Dv), NAN, dtype=dtype)
            for b, n in enumerate(lens):
                self.k[b, :, :n], self.v[b, :, :n] = self.ks[b][0], self.vs[b][0]
            self.kw = dict(seqlens=torch.tensor(lens, dtype=torch.int32), max_seqlen=max(lens))
            return
        page = paged
        need = [-(-n // page) for n in lens]
        heads = Hkv if per_head else 1
        P = sum(need) * heads + 3  # spare pages stay NaN
        order = torch.randperm(P).tolist()
        npg = max(need) + 1
        table = torch.zeros(B, heads, npg, dtype=torch.int32)
        self.k = torch.full((P, Hkv, page, D), NAN, dtype=dtype)
        self.v = torch.full((P, Hkv, page, Dv), NAN, dtype=dtype)
        for b, n in enumerate(lens):
            for h in range(heads):
                for i in range(need[b]):
                    p = order.pop()
                    table[b, h, i] = p
                    lo, hi = i * page, min(n, (i + 1) * page)
                    hs = slice(h, h + 1) if per_head else slice(None)
                    self.k[p, hs, :hi - lo] = self.ks[b][0, hs, lo:hi]
                    self.v[p, hs, :hi - lo] = self.vs[b][0, hs, lo:hi]
        self.kw = dict(seqlens=torch.tensor(lens, dtype=torch.int32), max_seqlen=max(lens),
                       block_table=table if per_head else table[:, 0])

    def run(self, backend="triton", **kw):
        out = decode_attention(self.q, self.k, self.v, backend=backend, **self.kw, **kw)
        if backend == "triton":
            assert attnkit.last_backend() == "triton/decode"
        return out

    def ref(self, dense_fn, *, mod=None, kind="softmax", scale=None, **nkw):
        """Per sequence: ``ref_attention`` over its own keys with ``dense_fn(b, L_b) -> bool [1, H?, Lq, L_b]``."""
        outs, lses = [], []
        for b, n in enumerate(self.lens):
            m = dense_fn(b, n)
            o, lse, _ = ref_attention(self.q[b:b + 1], self.ks[b], self.vs[b], m, scale=scale,
                                      mod=None if mod is None else (lambda s, pos, b=b: mod(s, pos, b)), kind=kind,
                                      **nkw)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), (torch.cat(lses) if lses[0] is not None else None)


def ragged(B, lo, hi):
    return [random.randint(lo, hi) for _ in range(B)]


def rmask_dense(rm, B, H, Lq):
    return lambda b, n: rm.dense(B, H, Lq, n)[b:b + 1]


def close(out, ref, atol=1e-10, rtol=1e-8):
    assert out.dtype == ref.dtype or out.dtype != F64
    assert torch.isfinite(out).all(), "non-finite (unwritten, or a NaN slot the kernel must not read) output"
    torch.testing.assert_close(out.to(F64), ref.to(F64), atol=atol, rtol=rtol)


GROUPS = [(2, 2), (4, 2), (4, 1), (6, 2)]  # (Hq, Hkv): MHA, GQA, MQA, a group of 3


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MASK_NAMES)
def test_mask_kinds(name):
    B = 2
    Hq, Hkv = random.choice(GROUPS)
    Lq = random.choice([1, 2, 4])
    lens = ragged(B, max(Lq, 3), 40)
    rm = mask_case(name, B, Hq, Lq, max(lens) + 8)  # position-indexed masks (documents) cover the capacity
    c = Case(B, Hq, Hkv, Lq, lens, paged=random.choice([None, 16, 8]))
    out = c.run(mask=rm.ak, splits=random.choice([None, 1, 2, 3]))
    want, _ = c.ref(lambda b, n: rm.dense(B, Hq, Lq, n)[b:b + 1])
    close(out, want)


@pytest.mark.parametrize("Lq", [1, 2, 4])
@pytest.mark.parametrize("group", GROUPS)
def test_gqa_and_query_tokens(group, Lq):
    """Every (query heads, KV heads) grouping with 1, 2 and 4 query tokens: causal, and sinks + window."""
    Hq, Hkv = group
    B = 2
    lens = ragged(B, Lq, 45)
    name = random.choice(["causal", "streamingllm"])
    rm = mask_case(name, B, Hq, Lq, max(lens))
    c = Case(B, Hq, Hkv, Lq, lens, paged=random.choice([None, 16]))
    out, lse = c.run(mask=rm.ak, return_lse=True)
    want, wlse = c.ref(rmask_dense(rm, B, Hq, Lq))
    close(out, want)
    close(lse, wlse)


def test_many_rows_need_row_blocks(monkeypatch):
    """More query rows per KV group (G·Lq) than one program holds: several row blocks over the same keys."""
    monkeypatch.setattr(DK, "MAX_ROWS", 16)
    DK._problems.clear()
    try:
        B, Hq, Hkv, Lq = 1, 8, 1, 4
        lens = [37]
        rm = mask_case("causal", B, Hq, Lq, 37)
        c = Case(B, Hq, Hkv, Lq, lens)
        out = c.run(mask=rm.ak, splits=2)
        close(out, c.ref(rmask_dense(rm, B, Hq, Lq))[0])
    finally:
        DK._problems.clear()


# ------------------------------------------------------------------------------------------------
# score mods and normalizers
# ------------------------------------------------------------------------------------------------

@triton.jit
def _wave(s, b, h, q, kv):
    return s + 0.5 * tl.sin(s) + 0.0078125 * (q - kv).to(tl.float32) * (h + 1).to(tl.float32)


def _wave_torch(s, b, h, q, kv):
    return s + 0.5 * torch.sin(s) + 0.0078125 * (q - kv).to(s.dtype) * (h + 1).to(s.dtype)


def score_mod_case(name, H):
    """``(attnkit mod, reference fn(s, pos, b) -> s)`` written from each mod's definition."""
    r = lambda *s: torch.rand(*s, dtype=F64).add_(0.5)  # noqa: E731
    if name == "softcap":
        return S.softcap(2.0), lambda s, p, b: 2.0 * torch.tanh(s / 2.0)
    if name in ("alibi", "alibi-default"):
        slopes = r(H) if name == "alibi" else None
        from conftest import alibi_slopes_ref
        sl = slopes if slopes is not None else torch.tensor(alibi_slopes_ref(H), dtype=F64)
        return S.alibi(slopes), lambda s, p, b: s - sl.view(1, -1, 1, 1) * (p.q - p.kv).abs().to(F64)
    if name in ("relative_bias", "relative_bias-causal"):
        bi = name == "relative_bias"
        table = torch.randn(8, H, dtype=F64)
        mod = S.relative_bias(H, num_buckets=8, max_distance=12, bidirectional=bi, table=table)

        def ref(s, p, b):
            bucket = torch.tensor([[t5_bucket_ref(int(kv - q), bi, 8, 12) for kv in p.kv.flatten().tolist()]
                                   for q in p.q.flatten().tolist()])
            return s + table[bucket].permute(2, 0, 1)[None]
        return mod, ref
    if name == "ssmax":
        sv = r(H)
        return S.ssmax(sv), lambda s, p, b: s * sv.view(1, -1, 1, 1) * torch.log(p.n.clamp(min=1))
    if name == "temperature":
        tau = r(H)
        return S.temperature(tau), lambda s, p, b: s / tau.view(1, -1, 1, 1)
    if name == "pointwise":
        return (S.pointwise(_wave_torch, triton_fn=_wave),
                lambda s, p, b: s + 0.5 * torch.sin(s) + 0.0078125 * (p.q - p.kv).to(F64) * (p.h + 1).to(F64))
    if name == "composed":
        (m1, f1), (m2, f2), (m3, f3) = (score_mod_case(n, H) for n in ("alibi", "temperature", "softcap"))
        return S.compose(m1, m2, m3), lambda s, p, b: f3(f2(f1(s, p, b), p, b), p, b)
    raise KeyError(name)


MOD_NAMES = ["softcap", "alibi", "alibi-default", "relative_bias", "relative_bias-causal", "ssmax", "temperature",
             "pointwise", "composed"]


@pytest.mark.parametrize("name", MOD_NAMES)
def test_score_mods(name):
    B, Lq = 2, random.choice([1, 2])
    Hq, Hkv = random.choice([(2, 1), (2, 2), (4, 2)])
    lens = ragged(B, Lq + 2, 40)
    mod, fn = score_mod_case(name, Hq)
    mname = random.choice(["causal", "full", "streamingllm"])
    rm = mask_case(mname, B, Hq, Lq, max(lens))
    c = Case(B, Hq, Hkv, Lq, lens, paged=random.choice([None, 16]))
    out = c.run(mask=rm.ak, score_mod=mod, splits=random.choice([1, 3]))
    close(out, c.ref(rmask_dense(rm, B, Hq, Lq), mod=fn)[0])


def normalizer_case(name, H):
    """``(attnkit normalizer, conftest.ref_normalize kind, its keyword arguments)``."""
    sink = torch.randn(H, dtype=F64)
    bias = torch.randn(H, dtype=F64)
    return {
        "softmax": (N.softmax(), "softmax", {}),
        "sink": (N.softmax_sink(sink), "sink", {"sink": sink}),
        "off_by_one": (N.softmax_off_by_one(), "off_by_one", {}),
        "relaxed": (N.relaxed(0.3), "relaxed", {"gamma": 0.3}),
        "sigmoid": (N.sigmoid(), "sigmoid", {}),  # bias −log L_b: each sequence's own key count
        "sigmoid-bias": (N.sigmoid(bias), "sigmoid", {"bias": bias}),
        "relu": (N.relu(), "relu", {}),
        "relu2": (N.relu2(), "relu2", {}),
        "none": (N.none(), "none", {}),
    }[name]


NORM_NAMES = ["softmax", "sink", "off_by_one", "relaxed", "sigmoid", "sigmoid-bias", "relu", "relu2", "none"]


@pytest.mark.parametrize("name", NORM_NAMES)
def test_normalizers(name):
    B, Lq = 2, random.choice([1, 3])
    Hq, Hkv = random.choice([(2, 1), (4, 2)])
    lens = ragged(B, 1, 40)
    norm, kind, nkw = normalizer_case(name, Hq)
    mname = random.choice(["causal", "causal-no-first", "chunked"])  # Lq > L_b and masked rows: no visible key
    rm = mask_case(mname, B, Hq, Lq, max(lens))
    c = Case(B, Hq, Hkv, Lq, lens, paged=random.choice([None, 16]))
    soft = kind in ("softmax", "sink", "off_by_one", "relaxed")
    res = c.run(mask=rm.ak, normalizer=norm, splits=random.choice([1, 2, 3]), return_lse=soft)
    want, wlse = c.ref(rmask_dense(rm, B, Hq, Lq), kind=kind, **nkw)
    if soft:
        out, lse = res
        assert torch.equal(torch.isneginf(lse), torch.isneginf(wlse)), "rows without keys differ"
        fin = torch.isfinite(wlse)
        close(lse[fin], wlse[fin])
    else:
        out = res
    close(out, want)


@pytest.mark.parametrize("mod_name,norm_name", [("ssmax", "relu"), ("ssmax", "relaxed"), ("alibi", "sigmoid"),
                                                ("softcap", "sink"), ("relative_bias", "relu2"),
                                                ("temperature", "none"), ("pointwise", "off_by_one")])
def test_score_mod_with_normalizer(mod_name, norm_name):
    """A switch meant for one piece never reaches another (counts for ssmax vs relu / relaxed, sink + mods)."""
    B, Hq, Hkv, Lq = 2, 2, 1, random.choice([1, 2])
    lens = ragged(B, Lq, 33)
    mod, fn = score_mod_case(mod_name, Hq)
    norm, kind, nkw = normalizer_case(norm_name, Hq)
    rm = mask_case(random.choice(["causal", "window"]), B, Hq, Lq, max(lens))
    c = Case(B, Hq, Hkv, Lq, lens)
    out = c.run(mask=rm.ak, score_mod=mod, normalizer=norm, splits=random.choice([1, 2]))
    close(out, c.ref(rmask_dense(rm, B, Hq, Lq), mod=fn, kind=kind, **nkw)[0])


# ------------------------------------------------------------------------------------------------
# paged caches, splits, reads, dtypes, shapes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page,per_head", [(4, False), (16, False), (32, False), (8, True)])
def test_paged_scattered_pages(page, per_head):
    """Pages scattered through the pool in random order (smaller than, equal to and larger than the kernel's
    16-key block; one table per KV head); unused pages and page tails are NaN."""
    B, Hq, Hkv, Lq = 3, 4, 2, random.choice([1, 2])
    lens = ragged(B, Lq, 50)
    rm = mask_case("causal", B, Hq, Lq, max(lens))
    c = Case(B, Hq, Hkv, Lq, lens, paged=page, per_head=per_head)
    out = c.run(mask=rm.ak, splits=2)
    want, _ = c.ref(rmask_dense(rm, B, Hq, Lq))
    close(out, want)
    contiguous = Case.__new__(Case)
    contiguous.__dict__.update(c.__dict__)
    cap = max(lens)
    contiguous.k = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, cap - x.shape[2])) for x in c.ks])
    contiguous.v = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, cap - x.shape[2])) for x in c.vs])
    contiguous.kw = dict(seqlens=c.kw["seqlens"])
    assert torch.equal(contiguous.run(mask=rm.ak, splits=2), out), "paged and contiguous differ"


def test_splits_agree_and_match():
    """Every split count (1 … more splits than blocks) gives the reference result; the merge is exact to rounding."""
    B, Hq, Hkv, Lq = 2, 4, 2, 2
    lens = [45, 17]
    rm = mask_case("causal", B, Hq, Lq, 45)
    c = Case(B, Hq, Hkv, Lq, lens)
    want, wlse = c.ref(rmask_dense(rm, B, Hq, Lq))
    for ns in (1, 2, 3, 5):
        out, lse = c.run(mask=rm.ak, splits=ns, return_lse=True)
        close(out, want)
        close(lse, wlse)


@pytest.mark.parametrize("Lq", [1, 3])
def test_reads_only_the_blocks_the_mask_needs(monkeypatch, Lq):
    """The kernel's trace of key-block reads: sinks + window read the sinks' blocks and the band's blocks, each once
    per KV head and row block, and nothing else; a plain causal mask reads every block of each sequence once."""
    monkeypatch.setattr(DK, "TRACE", True)
    B, Hq, Hkv = 2, 4, 2
    lens = [100, 75]
    n_sink, w = 3, 9
    mask = M.causal & (M.sliding_window(w) | M.sinks(n_sink))
    c = Case(B, Hq, Hkv, Lq, lens, paged=random.choice([None, 16]))
    assert DK.support(mask, Lq) == (n_sink, w + Lq)
    out = c.run(mask=mask, splits=random.choice([1, 2, 3]))
    trace = DK.last_trace
    for b, n in enumerate(lens):
        want = torch.zeros(trace.shape[-1], dtype=torch.int32)
        want[0] = 1  # the sinks' block
        want[(n - w - Lq) // 16:-(-n // 16)] = 1  # the band's blocks
        assert torch.equal(trace[b], want.expand(Hkv, -1)), f"sequence {b}: {trace[b].tolist()}"
    dense = lambda b, n: torch.tensor([[[(j < n_sink or q - w <= j) and j <= q for j in range(n)]  # noqa: E731
                                        for q in range(n - Lq, n)]])[None]
    close(out, c.ref(dense)[0])
    c.run(mask=M.causal, splits=2)
    for b, n in enumerate(lens):
        assert (DK.last_trace[b, :, :-(-n // 16)] == 1).all() and (DK.last_trace[b, :, -(-n // 16):] == 0).all()


def test_full_blocks_are_seen_whole():
    """Keys the kernel reads with no element mask (FULL blocks) are visible to every query row, for every mask case
    and a few lengths; and the common decode masks do get FULL blocks."""
    for name in MASK_NAMES:
        for Lq in (1, 3):
            for L in (1, 5, 37, 64):
                rm = mask_case(name, 1, 2, Lq, L)
                if rm.needs_lq_le_lk and Lq > L:
                    continue
                m = M.as_mask(rm.ak)
                FS, FHB, FA, FB = DK.full_support(m, Lq)
                full = torch.tensor([j < min(FS, L - FHB) or L - FA <= j < L - FB for j in range(L)])
                seen = rm.dense(1, 2, Lq, L).all(0).all(0).all(0)
                assert not (full & ~seen).any(), f"{rm} Lq={Lq} L={L}: ({FS}, {FHB}, {FA}, {FB}) claims unseen keys"
    L = 100
    assert DK.full_support(M.causal, 1)[:2] == (DK.INF_W, 0)
    FS, FHB, FA, FB = DK.full_support(M.causal & (M.sliding_window(20) | M.sinks(4)), 2)
    assert (FS, FHB) == (4, 1) and (L - FA, L - FB) == (L - 21, L - 1)


def test_nonfinite_values_reach_only_what_sees_them():
    """The prefill kernels' rule in decode too: a NaN / inf value of a key no query row sees changes nothing; one a
    row sees makes that row NaN (never ±inf); compared with attnkit's materialized reference."""
    B, Hq, Hkv, Lq = 2, 2, 1, 2
    lens = [40, 33]
    mask = M.causal & (M.sliding_window(6) | M.sinks(2))
    c = Case(B, Hq, Hkv, Lq, lens)
    c.v[0, :, 10, 3] = float("inf")  # hidden from both rows of sequence 0
    c.k[1, :, 20, 0] = NAN  # hidden
    c.v[1, :, 32, 1] = NAN  # seen by the last row of sequence 1 (its own key)
    c.ks = [c.k[b:b + 1, :, :n] for b, n in enumerate(lens)]
    c.vs = [c.v[b:b + 1, :, :n] for b, n in enumerate(lens)]
    out = c.run(mask=mask, splits=2)
    want = torch.cat([attnkit.attention(c.q[b:b + 1], c.ks[b], c.vs[b], mask=mask, backend="reference",
                                        form="materialized") for b in range(B)])
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out).any()
    assert not torch.isinf(out).any()
    fin = ~torch.isnan(want)
    torch.testing.assert_close(out[fin], want[fin], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
def test_float32_and_float16(dtype, tol):
    B, Hq, Hkv, Lq = 2, 4, 2, random.choice([1, 2])
    lens = ragged(B, Lq, 40)
    rm = mask_case("causal", B, Hq, Lq, max(lens))
    c = Case(B, Hq, Hkv, Lq, lens, dtype=dtype, paged=random.choice([None, 16]))
    mod, fn = score_mod_case("softcap", Hq)
    out = c.run(mask=rm.ak, score_mod=mod, splits=2)
    assert out.dtype == dtype
    close(out, c.ref(rmask_dense(rm, B, Hq, Lq), mod=fn)[0], atol=tol, rtol=tol)


def test_bfloat16_refused_under_the_interpreter():
    c = Case(1, 2, 1, 1, [9], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        c.run(mask=M.causal)


def test_head_dims_padded_and_noncontiguous_layouts():
    """D = 24, Dv = 40 (padded to 32 / 64 in-kernel); q given as [B, Lq, H, D] (bthd), k / v strided views."""
    B, Hq, Hkv, Lq, D, Dv = 2, 4, 2, 2, 24, 40
    lens = [30, 21]
    c = Case(B, Hq, Hkv, Lq, lens, D=D, Dv=Dv)
    rm = mask_case("causal", B, Hq, Lq, 30)
    want, _ = c.ref(rmask_dense(rm, B, Hq, Lq))
    qt = c.q.transpose(1, 2).contiguous()  # [B, Lq, Hq, D]
    kbig = torch.full((B, c.k.shape[2], Hkv, D + 3), NAN, dtype=F64)
    kbig[..., :D] = c.k.transpose(1, 2)
    k = kbig[..., :D].transpose(1, 2)  # non-contiguous view [B, Hkv, cap, D]
    out = decode_attention(qt, k, c.v, seqlens=lens, mask=rm.ak, layout="bthd", backend="triton")
    assert out.shape == (B, Lq, Hq, Dv)
    close(out.transpose(1, 2), want)


def test_rows_without_keys_and_one_key():
    """L_b = 1 and L_b < Lq: the leading query rows of a causal mask see no key (output 0, lse −inf)."""
    B, Hq, Hkv, Lq = 2, 2, 1, 4
    lens = [1, 3]
    rm = mask_case("causal", B, Hq, Lq, 3)
    c = Case(B, Hq, Hkv, Lq, lens)
    out, lse = c.run(mask=rm.ak, return_lse=True, splits=2)
    want, wlse = c.ref(rmask_dense(rm, B, Hq, Lq))
    close(out, want)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(wlse)) and torch.isneginf(lse).any()
    assert (out[torch.isneginf(lse)] == 0).all()


def test_kv_view_and_cache_objects():
    """A KVView, and max_seqlen below the capacity, give the same result as the tensors."""
    B, Hq, Hkv, Lq = 2, 2, 2, 1
    lens = [12, 20]
    c = Case(B, Hq, Hkv, Lq, lens)
    out = c.run(mask=M.causal)
    view = KVView(c.k, c.v, torch.tensor(lens, dtype=torch.int32), 20, None, lens)
    assert torch.equal(decode_attention(c.q, view, mask=M.causal, backend="triton"), out)
    assert torch.equal(decode_attention(c.q, c.k, c.v, seqlens=lens, mask=M.causal, backend="triton"), out)


# ------------------------------------------------------------------------------------------------
# dispatch: backends, what ran, errors
# ------------------------------------------------------------------------------------------------

def test_reference_backend_and_auto_on_cpu():
    """``backend="reference"`` (and ``auto`` on CPU) equals the loop-built reference for ragged, paged batches with
    batch-dependent masks (each sequence is evaluated as its own batch row)."""
    B, Hq, Hkv, Lq = 3, 2, 1, 2
    lens = ragged(B, Lq, 30)
    rm = mask_case(random.choice(["prefix-batch", "doc-batch-unsorted", "predicate-bh"]), B, Hq, Lq, max(lens) + 2)
    c = Case(B, Hq, Hkv, Lq, lens, paged=8)
    want, _ = c.ref(rmask_dense(rm, B, Hq, Lq))
    close(c.run(backend="reference", mask=rm.ak), want)
    assert attnkit.last_backend() == "reference/materialized"
    close(c.run(backend="auto", mask=rm.ak), want)
    assert attnkit.last_backend() == "reference/materialized"


def test_errors():
    c = Case(2, 4, 2, 1, [10, 12], paged=4)
    q, k, v = c.q, c.k, c.v
    sl = c.kw["seqlens"]
    table = c.kw["block_table"]
    with pytest.raises(ValueError, match="outside the pool"):
        bad = table.clone()
        bad[1, 0] = k.shape[0] + 3
        decode_attention(q, k, v, seqlens=sl, block_table=bad, backend="reference")
    with pytest.raises(ValueError, match="exceeds"):  # too narrow a table for max_seqlen
        decode_attention(q, k, v, seqlens=sl, block_table=table[:, :2], max_seqlen=12)
    with pytest.raises(ValueError, match="seqlens"):
        decode_attention(q, k, v, seqlens=[10, 0], block_table=table)
    with pytest.raises(ValueError, match="needs seqlens"):
        decode_attention(q, k, v, block_table=table)
    with pytest.raises(ValueError, match="block_table must be"):
        decode_attention(q, k, v, seqlens=sl, block_table=table.float())
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], k, v, seqlens=sl, block_table=table)
    with pytest.raises(ValueError, match="1 to 128"):
        decode_attention(torch.randn(2, 4, 129, 16, dtype=F64), torch.randn(2, 2, 200, 16, dtype=F64),
                         torch.randn(2, 2, 200, 16, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        decode_attention(q.float(), k, v, seqlens=sl, block_table=table)
    with pytest.raises(ValueError, match="backend='sdpa'"):
        decode_attention(q, k, v, seqlens=sl, block_table=table, backend="sdpa")
    with pytest.raises(ValueError, match="backend must be"):
        decode_attention(q, k, v, seqlens=sl, block_table=table, backend="flex")
    with pytest.raises(ValueError, match="layer_idx"):
        from attnkit.cache import ContiguousKVCache
        decode_attention(q, ContiguousKVCache(4))
    with pytest.raises(ValueError, match="return_lse"):
        decode_attention(q, k, v, seqlens=sl, block_table=table, normalizer="relu", return_lse=True)
    with pytest.raises(ValueError, match="exceeds"):
        decode_attention(q, torch.randn(2, 2, 8, 16, dtype=F64), torch.randn(2, 2, 8, 16, dtype=F64), max_seqlen=9)


def test_unsupported_pointwise_without_twin_falls_back_or_raises():
    """A pointwise score mod without a Triton twin: ``triton`` names what is supported; ``auto`` (the reference on
    CPU) is exact."""
    c = Case(1, 2, 1, 1, [14])
    mod = S.pointwise(lambda s, b, h, q, kv: s * 0.5)
    with pytest.raises(ValueError, match="Triton twin"):
        c.run(mask=M.causal, score_mod=mod)
    want, _ = c.ref(lambda b, n: torch.ones(1, 1, 1, n, dtype=torch.bool), mod=lambda s, p, b: s * 0.5)
    close(c.run(backend="auto", mask=M.causal, score_mod=mod), want)


def test_support_is_conservative():
    """The block range of every composed mask covers every key it can show to the last Lq rows."""
    Lq = 3
    for name in MASK_NAMES:
        if name == "none":
            continue
        for L in (5, 37, 64):
            rm = mask_case(name, 1, 2, Lq, L)
            m = rm.dense(1, 2, Lq, L).any(0).any(0).any(0)  # keys visible to any of the last Lq rows
            Sv, W = DK.support(M.as_mask(rm.ak), Lq)
            cover = torch.tensor([j < Sv or j >= L - W for j in range(L)])
            assert not (m & ~cover).any(), f"{rm}: support ({Sv}, {W}) misses keys at L={L}"
    assert DK.support(M.causal & (M.sliding_window(8) | M.sinks(4)), 1) == (4, 9)
    assert DK.support(M.sinks(2), 2) == (2, 0)
    assert DK.support(M.causal, 1)[1] >= 1 << 30
    assert math.isfinite(DK.support(M.sliding_window(3, 2) & M.causal, 4)[1])


def test_route_for_attention():
    """What ``attnkit.attention`` should send to ``decode_attention`` (``route``): few query rows over many keys, no
    gradient, default positions; deterministic calls keep to the kernel; ``auto`` on CPU keeps the reference."""
    from attnkit.dispatch.decode import ROUTE_MIN_K, route
    sm = N.as_normalizer("softmax")
    q = torch.randn(2, 4, 1, 16, dtype=F64)
    k = torch.randn(2, 2, ROUTE_MIN_K, 16, dtype=F64)
    assert route(q, k, k, "triton", None, sm, None, None) == "triton"
    assert route(q, k, k, "triton", None, sm, None, True) == "triton"
    assert route(q, k, k, "auto", None, sm, None, None) is None  # CPU: auto runs the reference
    assert route(q, k[:, :, :ROUTE_MIN_K - 1], k, "triton", None, sm, None, None) is None
    assert route(torch.randn(2, 4, 17, 16, dtype=F64), k, k, "triton", None, sm, None, None) is None
    assert route(q, k, k, "triton", None, sm, (None, 5), None) is None
    assert route(q.clone().requires_grad_(), k, k, "triton", None, sm, None, None) is None
    assert route(q, k, k, "triton", S.alibi(torch.rand(4, dtype=F64).requires_grad_()), sm, None, None) is None
    with torch.no_grad():
        assert route(q.clone().requires_grad_(), k, k, "triton", None, sm, None, None) == "triton"
    assert route(q, k, k, "reference", None, sm, None, None) is None


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("lse", [False, True])
def test_attention_routes_decode_calls(layout, lse):
    """attnkit.attention on a decode-shaped call without gradients runs the decode kernel (recorded as such) and
    equals the float64 reference: GQA, a sliding window + ALiBi, ragged Lk, both layouts, with and without lse."""
    from attnkit.dispatch.decode import ROUTE_MIN_K
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, random.randint(1, 3), ROUTE_MIN_K + random.randint(1, 90), 16
    q = torch.randn(B, Hq, Lq, D, dtype=F64)
    k, v = torch.randn(B, Hkv, Lk, D, dtype=F64), torch.randn(B, Hkv, Lk, D, dtype=F64)
    kw = dict(mask=M.sliding_window(100), score_mod=S.alibi(torch.rand(Hq, dtype=F64)))
    args = (q, k, v) if layout == "bhtd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    res = attnkit.attention(*args, backend="triton", layout=layout, return_lse=lse, **kw)
    assert attnkit.last_backend().startswith("triton/decode"), attnkit.last_backend()
    want = attnkit.attention(q, k, v, backend="reference", form="materialized", return_lse=lse, **kw)
    out, want_out = (res[0], want[0]) if lse else (res, want)
    if layout == "bthd":
        out = out.transpose(1, 2)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    if lse:
        torch.testing.assert_close(res[1], want[1], rtol=1e-9, atol=1e-9)
