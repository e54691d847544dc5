"""The FlexAttention peer calls attnkit's own masks and score mods (no second implementation).

Masks: the peer's ``mask_mod`` (the attnkit mask plus the end-alignment offset), evaluated the way Flex
evaluates it (nested ``torch.func.vmap`` over 0-d int32 indices) and through Flex's own
``create_block_mask``, against the definition written as Python loops (conftest's ``RMask.dense``).
Score mods: eager ``flex_attention`` on the CPU in float64 with the peer's ``score_mod`` / ``mask_mod``
against ``attnkit.attention(backend="reference")``, and the vmapped score mod elementwise against the
block form. Ragged lengths, Lq != Lk, GQA and fully masked rows throughout; fresh random inputs.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch.func import vmap
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

import attnkit
import attnkit.masks as M
import attnkit.scores as S
from attnkit.tools.peers import flex_mods
from conftest import F64, MASK_NAMES, assert_close, mask_case, mask_shape_params, rand_qkv
from test_scores_normalizers import MODS, mod_case

SHAPES = [(37, 37), (5, 12), (12, 5), (1, 9), (20, 37)]
I32 = torch.int32


def on_grid(fn, B, H, Lq, Lk, score=None):
    """``fn`` over every (b, h, q_idx, kv_idx) the way Flex calls it: nested vmap, 0-d int32 indices."""
    idx = [torch.arange(n, dtype=I32) for n in (B, H, Lq, Lk)]
    lead = () if score is None else (0,)
    f = fn
    for level in reversed(range(4)):  # innermost vmap runs over kv_idx
        f = vmap(f, in_dims=lead + tuple(0 if i == level else None for i in range(4)))
    return f(*idx) if score is None else f(score, *idx)


def peer_mask_mod(rm, B, H, Lq, Lk):
    mask = M.as_mask(rm.ak)
    mask_mod, _ = flex_mods(mask, None, B, H, Lq, Lk, torch.device("cpu"))
    if mask_mod is None:  # the full mask: no mask_mod at all
        assert mask.kind == "full", f"{rm}: no mask_mod for a {mask.kind} mask"
        return lambda b, h, q, kv: kv >= 0
    return mask_mod


@pytest.mark.parametrize("name,Lq,Lk", mask_shape_params(MASK_NAMES, SHAPES))
def test_mask_mod_on_grid(name, Lq, Lk):
    """The peer's mask_mod at every (b, h, q_idx, kv_idx) under vmap equals the definition."""
    B, H = 2, 3
    rm = mask_case(name, B, H, Lq, Lk)
    got = on_grid(peer_mask_mod(rm, B, H, Lq, Lk), B, H, Lq, Lk)
    want = rm.dense(B, H, Lq, Lk)
    assert got.dtype == torch.bool and got.shape == want.shape, f"{rm}: {got.dtype} {tuple(got.shape)}"
    bad = (got != want).nonzero()[:5].tolist()
    assert not bad, f"{rm} Lq={Lq} Lk={Lk}: mask_mod differs from the definition at [b,h,i,j] {bad}"


def block_level(m, bq, bk):
    """[B, H, nq, nk]: does block (i, j) hold a visible pair?"""
    B, H, Lq, Lk = m.shape
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    pad = torch.zeros(B, H, nq * bq, nk * bk, dtype=torch.bool)
    pad[..., :Lq, :Lk] = m
    return pad.view(B, H, nq, bq, nk, bk).any(-1).any(-2)


@pytest.mark.parametrize("name,Lq,Lk", mask_shape_params(MASK_NAMES, [(37, 37), (12, 29), (29, 12)]))
def test_create_block_mask(name, Lq, Lk):
    """Flex's own create_block_mask from the peer's mask_mod (B, H as the peer passes them, broadcast where
    the mask ignores them) lists exactly the blocks the definition makes non-empty."""
    B, H, blk = 2, 3, 8
    rm = mask_case(name, B, H, Lq, Lk)
    mask = M.as_mask(rm.ak)
    want = block_level(rm.dense(B, H, Lq, Lk), blk, blk)
    mask_mod = peer_mask_mod(rm, B, H, Lq, Lk)
    Bp, Hp = mask.bh_shape(M.Geometry(B, H, Lq, Lk), "cpu")
    if (Bp, Hp) == (1, 1):  # the mask claims not to depend on b, h: the definition must agree
        assert (want == want[:1, :1]).all(), f"{rm}: bh_shape (1, 1) but the definition depends on b / h"
    for bb, hh in ((B, H), (B if Bp > 1 else None, H if Hp > 1 else None)):
        bm = create_block_mask(mask_mod, bb, hh, Lq, Lk, device="cpu", BLOCK_SIZE=blk, _compile=False)
        got = bm.to_dense().bool()[..., :want.shape[2], :want.shape[3]].expand_as(want)
        bad = (got != want).nonzero()[:5].tolist()
        assert not bad, f"{rm} Lq={Lq} Lk={Lk} B={bb} H={hh}: block mask differs at [b,h,i,j] blocks {bad}"


FLEX_MASKS = ["full", "causal", "window2", "prefix-batch", "doc-batch-unsorted", "predicate-bh", "anti-causal",
              "causal-no-first", "streamingllm", "window-or-doc"]


@pytest.mark.parametrize("Lq,Lk", [(37, 37), (5, 12), (12, 5), (1, 9)])
@pytest.mark.parametrize("name", MODS + ["none"])
def test_flex_eager_matches_reference(name, Lq, Lk):
    """Eager (CPU, float64) flex_attention with the peer's score_mod and block mask equals attnkit's
    reference: output (0 on fully masked rows) and lse (-inf exactly there), GQA 4:2."""
    B, Hq, Hkv, D, Dv = 2, 4, 2, 8, 5
    names = [n for n in FLEX_MASKS if not (Lq > Lk and n in ("doc-batch-unsorted", "window-or-doc"))]
    rm = mask_case(random.choice(names), B, Hq, Lq, Lk)
    mask = M.as_mask(rm.ak)
    mod = None if name == "none" else S.as_score_mod(mod_case(name, Hq, Lq, Lk)[0])
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv)
    scale = random.uniform(0.2, 0.6)
    mask_mod, score_mod = flex_mods(mask, mod, B, Hq, Lq, Lk, q.device, score_dtype=F64)
    bm = None if mask_mod is None else create_block_mask(mask_mod, B, Hq, Lq, Lk, device="cpu",
                                                         BLOCK_SIZE=random.choice([8, 16, 128]), _compile=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=True,
                                  return_aux=AuxRequest(lse=True))
    lse = aux.lse
    ro, rl = attnkit.attention(q, k, v, mask=mask, score_mod=mod, scale=scale, form="materialized",
                               backend="reference", return_lse=True)
    what = f"{name} {rm} Lq={Lq} Lk={Lk}"
    assert out.dtype == F64 and torch.isfinite(out).all(), what
    assert_close(out, ro, atol=1e-10, rtol=1e-10, what=f"{what} out")
    empty = ~rm.dense(B, Hq, Lq, Lk).any(-1)
    assert (torch.isneginf(rl) == empty).all(), f"{what}: reference lse -inf pattern"
    assert (torch.isneginf(lse) == empty).all(), f"{what}: flex lse is -inf on other rows than the empty ones"
    assert_close(lse[~empty], rl[~empty], atol=1e-10, rtol=1e-10, what=f"{what} lse")


@pytest.mark.parametrize("Lq,Lk", [(37, 37), (5, 12), (12, 5)])
@pytest.mark.parametrize("name", MODS)
def test_score_mod_on_grid(name, Lq, Lk):
    """The peer's score_mod at every index under vmap equals the mod's block form (one definition)."""
    B, H = 2, 4
    rm = mask_case(random.choice(["prefix-batch", "window2", "predicate-bh", "anti-causal"]), B, H, Lq, Lk)
    mask = M.as_mask(rm.ak)
    mod = S.as_score_mod(mod_case(name, H, Lq, Lk)[0])
    s = torch.randn(B, H, Lq, Lk, dtype=F64)
    _, score_mod = flex_mods(mask, mod, B, H, Lq, Lk, s.device, score_dtype=F64)
    got = on_grid(score_mod, B, H, Lq, Lk, score=s)
    b, h, qq, kv = M.index_grid(M.Geometry(B, H, Lq, Lk), "cpu")
    n = mask.row_counts(B, H, Lq, Lk).to(F64)[..., None] if mod.needs_counts else None
    want = mod(s, S.Idx(b, h, qq, kv, n, Lq, Lk, H))
    assert_close(got, want.expand_as(got), atol=1e-12, rtol=1e-12, what=f"{name} {rm}")


def test_score_mod_without_flex_form():
    """A ScoreMod kind the peer does not know gives no Flex pair (never a wrong peer)."""
    class Custom(S.ScoreMod):
        kind = "custom"

        def forward(self, score, idx):
            return score

    assert flex_mods(M.causal, S.compose(S.softcap(2.0), Custom()), 1, 2, 5, 5, "cpu") is None


def test_detached_peer_parameters():
    """The peer's mods hold detached values of the same parameters; the originals keep their gradients."""
    H = 3
    tau = torch.nn.Parameter(torch.rand(H, dtype=F64) + 0.5)
    sl = (torch.rand(H, dtype=F64) + 0.1).requires_grad_()
    mod = S.compose(S.temperature(tau), S.alibi(sl), S.relative_bias(H, 8, 12))
    d = mod.detached()
    before = [t for t in (mod.items[0].tau, mod.items[1].slopes, mod.items[2].table)]
    after = [d.items[0].tau, d.items[1].slopes, d.items[2].table]
    for a, b in zip(before, after):
        assert a.requires_grad and not b.requires_grad and torch.equal(a, b)
        assert a.data_ptr() == b.data_ptr()  # shares storage: the peer sees updated values
    assert isinstance(mod.items[0].tau, torch.nn.Parameter) and len(list(mod.parameters())) == 2


def test_relative_bias_lookup_grows():
    """T5 buckets by table lookup equal t5_bucket for every offset of each call size, as sizes change."""
    nb, md = random.choice([(8, 12), (16, 40), (32, 128)])
    for bidir in (True, False):
        mod = S.relative_bias(2, nb, md, bidir)
        for Lq, Lk in [(3, 5), (40, 7), (1, 300), (9, 9), (200, 2)]:
            rel = torch.arange(1 - Lk, Lq)
            assert torch.equal(mod.buckets(rel, 1 - Lk, Lq - 1), S.t5_bucket(rel, nb, md, bidir)), (Lq, Lk, bidir)


def test_held_tensors_move_once():
    """Per-batch prefix lengths and document ids: one copy per device, reused by every call."""
    m = M.prefix_lm(torch.tensor([3, 1])) & M.document(torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]))
    leaves = [leaf for leaf in m.leaves()]
    assert all(leaf._held.get().device.type == "cpu" for leaf in leaves)
    dev = torch.device("cpu")
    m.on_device(dev)
    first = [leaf._held.on(dev) for leaf in leaves]
    m.dense(M.Geometry(2, 1, 4, 5), dev)
    on_grid(lambda b, h, q, kv: m(b, h, q + 1, kv), 2, 1, 4, 5)
    assert all(leaf._held.on(dev) is t for leaf, t in zip(leaves, first))


def test_compiled_flex_cpu():
    """The Flex peer (``kernels.peers.flex_call``) compiles (Dynamo + Inductor's Flex lowering, here on the CPU):
    every built-in score mod together, per-batch prefix and document ids; float32 output against the float64
    reference."""
    from attnkit.tools.peers import flex_call
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 48, 80, 16
    ids = torch.sort(torch.randint(0, 4, (B, Lk)), dim=1).values
    mask = (M.prefix_lm(torch.randint(0, Lk, (B,))) & M.document(ids)) | M.sinks(2)
    mod = S.compose(S.temperature(torch.rand(Hq) + 0.5), S.alibi(), S.relative_bias(Hq, 16, 64),
                    S.ssmax(torch.rand(Hq) + 0.2), S.softcap(4.0))
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, D, dtype=torch.float32)
    out = flex_call(mask, mod, B, Hq, Hkv, Lq, Lk, q.device, D ** -0.5)(q, k, v)  # the benchmarks' Flex peer
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=mask, score_mod=mod, form="materialized",
                            backend="reference")
    assert_close(out, ref, atol=2e-5, rtol=1e-4, what="compiled flex")


def _window_reference(q, k, v, w, scale):
    """float64 softmax attention under ``causal & sliding_window(w)`` from the definition: query row i sits at
    position i + Lk - Lq and sees keys j with pos - w <= j <= pos; a row without keys gives 0."""
    Lq, Lk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    pos = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    seen = (j <= pos) & (j >= pos - w)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def test_compiled_flex_one_compile_per_mask_structure():
    """The Flex peer compiles once for a mask structure: other lengths (Lq = Lk, Lq != Lk, one block of queries,
    Lq > Lk with key-less rows) and other window sizes reuse the kernel (Dynamo's graph count grows by one), and
    every call equals the float64 definition. (Head dim 64: torch 2.13's compiled CPU Flex returns garbage rows for
    some small shapes at head dim <= 16, static or dynamic, e.g. B=1 H=2 Lq=40 Lk=56 D=16.)"""
    from torch._dynamo.utils import counters
    from attnkit.tools.peers import flex_call
    B, Hq, Hkv, D = 2, 4, 2, 64
    before = counters["stats"]["unique_graphs"]
    for Lq, Lk, w in [(48, 48, 5), (96, 200, 17), (130, 130, 40), (70, 20, 3), (33, 301, 100)]:
        mask = M.causal & M.sliding_window(w) & ~M.sinks(0)  # ~sinks(0): every key; a structure only this test has
        q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, D, dtype=torch.float32)
        fn = flex_call(mask, None, B, Hq, Hkv, Lq, Lk, q.device, D ** -0.5)
        with torch.no_grad():
            out = fn(q, k, v)
        assert fn.compiled == "dynamic", (Lq, Lk, fn.dynamic_error)
        assert_close(out, _window_reference(q, k, v, w, D ** -0.5), atol=2e-6, rtol=1e-5,
                     what=f"compiled flex Lq={Lq} Lk={Lk} w={w}")
    assert counters["stats"]["unique_graphs"] - before == 1, "the Flex peer recompiled for a new length or window"


def test_compiled_flex_static_fallback(monkeypatch):
    """Where the dynamic-shape compile fails, the peer compiles for the shape instead, says so, and is exact."""
    from attnkit.tools import peers as P

    def broken(*a, **kw):
        raise RuntimeError("simulated Inductor failure on dynamic shapes")
    monkeypatch.setitem(P._flex, True, broken)
    B, Hq, Lq, Lk, D, w = 1, 2, 40, 56, 64, 7
    q, k, v = rand_qkv(B, Hq, Hq, Lq, Lk, D, D, dtype=torch.float32)
    fn = P.flex_call(M.causal & M.sliding_window(w), None, B, Hq, Hq, Lq, Lk, q.device, D ** -0.5)
    with torch.no_grad():
        out = fn(q, k, v)
        again = fn(q, k, v)
    assert fn.compiled == "static" and "simulated" in fn.dynamic_error
    assert_close(out, _window_reference(q, k, v, w, D ** -0.5), atol=2e-6, rtol=1e-5, what="static fallback")
    assert torch.equal(out, again)
