"""Context parallelism (attnkit.distributed): sharding helpers, the ring's plan, the in-process replay of the ring,
and the real thing on 2 and 4 gloo processes (tests/dist_cases.py: outputs and gradients against the
single-process float64 result, odd lengths, errors that reach every rank instead of hanging)."""
from __future__ import annotations

import os
import random

_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # if this module imports attnkit first, its kernels run in the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

import attnkit  # noqa: E402
import attnkit.distributed as cp  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.distributed.ring import RingPlan, chunk_visibility  # noqa: E402
from attnkit.distributed.sim import run_ranks, simulate_linear, simulate_softmax, Timer  # noqa: E402

from conftest import one_thread  # noqa: E402

if _env is None:  # after every triton.jit: the rest of the session keeps its environment
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _env

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


# ------------------------------------------------------------------------------------------------
# Sharding helpers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("lb", [None, "zigzag"])
def test_layout_partitions_the_sequence(n, lb):
    T = random.randint(1, 40)
    lay = cp.ShardLayout.for_sequence(T, n, lb)
    assert lay.total % (n * (2 if lb else 1)) == 0 and T <= lay.total < T + n * (2 if lb else 1)
    perm = lay.permutation()
    assert sorted(perm.tolist()) == list(range(lay.total))  # every position exactly once
    for r in range(n):
        pos = lay.positions(r)
        assert pos.numel() == lay.local_len
        want = (list(range(r * lay.chunk, (r + 1) * lay.chunk)) + list(range((2 * n - 1 - r) * lay.chunk,
                                                                             (2 * n - r) * lay.chunk))
                if lb else list(range(r * lay.local_len, (r + 1) * lay.local_len)))
        assert pos.tolist() == want
    inv = cp.inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(lay.total)) and torch.equal(inv[perm], torch.arange(lay.total))


def test_zigzag_balances_causal_pairs():
    """Every rank sees the same number of (query, key) pairs under a causal mask."""
    n, T = 4, 64
    lay = cp.ShardLayout.for_sequence(T, n, "zigzag")
    counts = [int((lay.positions(r) + 1).sum()) for r in range(n)]
    assert len(set(counts)) == 1
    contiguous = [int((cp.ShardLayout.for_sequence(T, n).positions(r) + 1).sum()) for r in range(n)]
    assert max(contiguous) > 3 * min(contiguous)


@pytest.mark.parametrize("lb", [None, "zigzag"])
def test_shard_unshard_roundtrip_with_padding(lb):
    n, T = 3, random.randint(5, 30)
    x = torch.randn(2, 3, T, 4, dtype=F64, requires_grad=True)
    parts = [cp.shard(x, r, n, load_balance=lb, pad_value=float("nan")) for r in range(n)]
    assert len({p.shape for p in parts}) == 1
    lay = cp.ShardLayout.for_sequence(T, n, lb)
    for r, p in enumerate(parts):  # padded rows hold the pad value, real rows the data
        pos = lay.positions(r)
        assert torch.isnan(p[:, :, pos >= T]).all() and torch.equal(p[:, :, pos < T], x[:, :, pos[pos < T]])
    y = cp.unshard(parts, load_balance=lb, seq_len=T)
    assert torch.equal(y, x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g)
    bthd = cp.unshard([cp.shard(x.transpose(1, 2), r, n, dim=1, load_balance=lb) for r in range(n)], dim=1,
                      load_balance=lb, seq_len=T)
    assert torch.equal(bthd, x.transpose(1, 2))


def test_zigzag_permutation_and_errors():
    p = cp.zigzag_permutation(8, 2)
    assert p.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="2·world_size"):
        cp.zigzag_permutation(6, 2)
    with pytest.raises(ValueError, match="even"):
        cp.ShardLayout(2, 3, "zigzag")
    with pytest.raises(ValueError, match="load_balance"):
        cp.ShardLayout(2, 4, "headtail")
    with pytest.raises(ValueError, match="exceeds"):
        cp.ShardLayout(2, 4, None, seq_len=9)
    with pytest.raises(ValueError, match="world_size"):
        cp.padded_length(10, 0)


def test_cu_seqlens_per_rank():
    cu = torch.tensor([0, 3, 10, 13])
    assert cp.pad_cu_seqlens(cu, 16).tolist() == [0, 3, 10, 13, 16]
    assert cp.pad_cu_seqlens(cu, 13).tolist() == [0, 3, 10, 13]
    with pytest.raises(ValueError, match="beyond"):
        cp.pad_cu_seqlens(cu, 12)
    lay = cp.ShardLayout.for_sequence(13, 2, "zigzag")  # 16 positions, chunks of 4: rank 0 holds [0,4) [12,16)
    assert cp.local_cu_seqlens(cu, lay, 0).tolist() == [0, 3, 4, 5, 8]
    assert cp.local_cu_seqlens(cu, lay, 1).tolist() == [0, 4, 6, 8]  # [4,8) [8,12): the piece join is a boundary
    contiguous = cp.ShardLayout.for_sequence(13, 2)  # [0,7) [7,14)
    assert cp.local_cu_seqlens(cu, contiguous, 0).tolist() == [0, 3, 7]
    assert cp.local_cu_seqlens(cu, contiguous, 1).tolist() == [0, 3, 6, 7]


# ------------------------------------------------------------------------------------------------
# The plan: exact visibility, skipped steps
# ------------------------------------------------------------------------------------------------

def _brute_visibility(mask, B, H, lay):
    T, c = lay.total, lay.chunk
    dense = mask.dense(M.Geometry(B, H, T, T), "cpu").any(0).any(0)
    nc = T // c
    d = dense.view(nc, c, nc, c)
    return d.any(3).any(1), d.all(3).all(1)


@pytest.mark.parametrize("mask", [M.causal, M.full, M.sliding_window(5), M.sliding_window(2, 7), M.prefix_lm(9),
                                  M.chunked(6), M.causal & (M.dilated(3) | M.sinks(2)), "doc",
                                  M.predicate(lambda b, h, q, kv: (q + kv) % 5 != 0, "mod5")])
@pytest.mark.parametrize("lb", [None, "zigzag"])
def test_chunk_visibility_is_exact(mask, lb):
    n = random.choice([2, 3, 4])
    lay = cp.ShardLayout.for_sequence(random.randint(10, 48), n, lb)  # >= 10: prefix_lm(9) fits
    if mask == "doc":
        cuts = sorted(random.sample(range(1, lay.total), 4))
        mask = M.document(cu_seqlens=torch.tensor([0] + cuts + [lay.total]))
    vis, full = chunk_visibility(mask, 1, 2, lay)
    bv, bf = _brute_visibility(mask, 1, 2, lay)
    assert torch.equal(vis, bv) and torch.equal(full, bf)


def test_plan_skips_what_the_mask_cannot_see():
    n, L = 8, 16
    lay = cp.ShardLayout(n, L)
    assert RingPlan.build(M.causal, 1, 1, lay).steps == n - 1
    win = RingPlan.build(M.sliding_window(L - 1), 1, 1, lay)  # sees at most the previous piece
    assert win.steps == 1 and win.pair_fraction() == (2 * n - 1) / n ** 2
    docs = M.document(cu_seqlens=torch.arange(0, n * L + 1, L))  # one document per rank
    assert RingPlan.build(docs, 1, 1, lay).steps == 0
    two = M.document(cu_seqlens=torch.arange(0, n * L + 1, 2 * L))  # documents spanning 2 ranks
    assert RingPlan.build(two & M.causal, 1, 1, lay).t_max == [1, 0] * (n // 2)
    full = RingPlan.build(M.full, 1, 1, lay)
    assert full.steps == n - 1 and full.pair_fraction() == 1.0
    zz = RingPlan.build(M.causal, 1, 1, cp.ShardLayout(n, L, "zigzag"))
    for r in range(n):  # zigzag: after the local step each rank computes exactly 2 of the 4 piece pairs
        assert len(zz.pairs[r][r]) == 3
        assert all(len(zz.pairs[r][s]) == 2 for s in range(n) if s != r)


# ------------------------------------------------------------------------------------------------
# The ring replayed in one process (same per-block code as the real ring)
# ------------------------------------------------------------------------------------------------

def _ref_and_grads(q, k, v, dout, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = attnkit.attention(q, k, v, backend="reference", **kw)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), dout))


CASES = [
    dict(mask=M.causal), dict(mask=None), dict(mask=M.sliding_window(4)), dict(mask=M.sliding_window(3, 5)),
    dict(mask=M.prefix_lm(7)), dict(mask=M.chunked(5)), dict(mask=M.causal, score_mod=S.alibi()),
    dict(mask=M.causal, score_mod=S.softcap(2.0)), dict(mask=M.causal, normalizer="sigmoid"),
    dict(mask=M.sliding_window(6), normalizer="relu"), dict(mask=None, normalizer="relu2"),
    dict(mask=M.causal, normalizer="none"), dict(mask=M.causal, normalizer="softmax_off_by_one"),
    dict(mask=M.causal & ~M.sliding_window(2)),  # rows 0..2 see nothing
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("lb", [None, "zigzag"])
def test_replayed_ring_matches_single_call(case, lb):
    kw = dict(CASES[case])
    n = random.choice([2, 3, 4])
    T = random.randint(8, 40)  # >= 8: prefix_lm(7) fits
    lay = cp.ShardLayout.for_sequence(T, n, lb)
    B, Hq, Hkv, D = 2, 4, 2, 8
    q, k, v = (torch.randn(B, h, T, D, dtype=F64) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, T, D, dtype=F64)
    o_ref, dq_ref, dk_ref, dv_ref = _ref_and_grads(q, k, v, dout, **kw)
    pad = lambda x: torch.cat([x, torch.randn(*x.shape[:2], lay.total - T, D, dtype=F64)], 2)  # noqa: E731
    out, _, (dq, dk, dv, _) = run_ranks(pad(q), pad(k), pad(v), world_size=n, load_balance=lb,
                                        seq_len=T if lay.total != T else None, backend="reference", dout=dout, **kw)
    for got, want in ((out, o_ref), (dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_replayed_ring_sink_and_lse_gradients():
    """The sink logit is counted once (not once per ring step); lse and its gradient match."""
    n, T, H = 4, 24, 2
    sink = torch.randn(H, dtype=F64)
    q, k, v = (torch.randn(1, H, T, 8, dtype=F64) for _ in range(3))
    o_ref, lse_ref = attnkit.attention(q, k, v, mask=M.sliding_window(5), normalizer=N.softmax_sink(sink.clone()),
                                       backend="reference", return_lse=True)
    out, lse, _ = run_ranks(q, k, v, world_size=n, mask=M.sliding_window(5), normalizer=N.softmax_sink(sink),
                            backend="reference")
    torch.testing.assert_close(out, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_replayed_ring_with_fused_kernels(monkeypatch):
    """The ring's calls through the fused Triton kernels (interpreter): q/kv offsets (a positional score mod),
    lse and its gradient, a sink logit, padding."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before triton's import: the kernels are decorated for it
    pytest.importorskip("triton")
    kw = dict(mask=M.causal, normalizer=N.softmax_sink(torch.randn(2, dtype=F64)), score_mod=S.alibi())
    n, T, D = 2, 13, 16
    lb = None  # one pair per ring step (the interpreter is slow); offsets as in zigzag
    lay = cp.ShardLayout.for_sequence(T, n, lb)
    q, k, v = (torch.randn(1, 2, T, D, dtype=F64) for _ in range(3))
    dout = torch.randn(1, 2, T, D, dtype=F64)
    o_ref, dq_ref, dk_ref, dv_ref = _ref_and_grads(q, k, v, dout, **kw)
    pad = lambda x: torch.cat([x, torch.randn(1, 2, lay.total - T, D, dtype=F64)], 2)  # noqa: E731
    out, _, (dq, dk, dv, _) = run_ranks(pad(q), pad(k), pad(v), world_size=n, load_balance=lb, seq_len=T,
                                        backend="triton", dout=dout, **kw)
    assert attnkit.last_backend() == "triton/fused"
    for got, want in ((out, o_ref), (dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Single process (no process group): the calls work as world size 1
# ------------------------------------------------------------------------------------------------

def test_world_size_one_without_process_group():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=F64, requires_grad=True) for _ in range(3))
    o = cp.context_parallel_attention(q, k, v, mask="causal", load_balance=None, backend="reference")
    torch.testing.assert_close(o, attnkit.attention(q, k, v, mask="causal", backend="reference"))
    g = torch.randn(1, 2, 9, 4, dtype=F64)
    o2, s = cp.context_parallel_linear_attention(q, k, v, rule="gla", gate=-torch.rand(1, 2, 9, 4, dtype=F64),
                                                 output_final_state=True)
    o3, s3 = attnkit.linear_attention(q, k, v, rule="gla", gate=-torch.rand(1, 2, 9, 4, dtype=F64) * 0,
                                      output_final_state=True)
    assert o2.shape == o3.shape and s.shape == s3.shape
    torch.autograd.grad(o2, (q, k, v), g)


def test_simulation_smoke_cpu():
    """The single-GPU simulation's code path on the CPU (no timing asserted: structure only)."""
    tm = Timer("cpu", warmup=0, reps=1)
    r = simulate_softmax(64, 4, B=1, Hq=2, Hkv=2, D=8, dtype=torch.float32, device="cpu", mask=M.causal,
                         backward=True, timer=tm, backend="reference")
    assert r["ring_steps"] == 3 and len(r["fwd_steps"]) == 4 and len(r["bwd_steps"]) == 5 and r["efficiency"] > 0
    assert r["t_n"] >= sum(r["fwd_steps"]) and r["t_n_kept"] > 0
    assert r["distinct_cells"] <= 3  # zigzag causal: one diagonal cell kind, one full-pair kind (+ self)
    w = simulate_softmax(64, 4, B=1, Hq=2, Hkv=2, D=8, dtype=torch.float32, device="cpu",
                         mask=M.sliding_window(7), load_balance=None, timer=tm, backend="reference")
    assert w["ring_steps"] == 1
    lin = simulate_linear(64, 2, rule="gated_delta", B=1, H=2, D=8, dtype=torch.float32, device="cpu",
                          backward=True, timer=tm, chunk_size=16)
    assert lin["t_local"] > 0 and lin["efficiency"] > 0


# ------------------------------------------------------------------------------------------------
# Real process groups (gloo): see tests/dist_cases.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job", ["softmax2", "linear2", "softmax4", "linear4"])
def test_gloo(job):
    from dist_cases import JOBS, launch

    seed = int(os.environ.get("ATTNKIT_SEED") or random.SystemRandom().randrange(2 ** 31))
    res = launch(int(job[-1]), job, seed)
    names = [name for name, _ in JOBS[job]]
    assert sorted(res) == sorted(names), f"cases that did not report: {sorted(set(names) - set(res))}"
    failed = {k: v for k, v in res.items() if v}
    assert not failed, f"{len(failed)} of {len(res)} cases failed (ATTNKIT_SEED={seed}):\n" + "\n".join(
        f"--- {k}: {v}" for k, v in failed.items())
