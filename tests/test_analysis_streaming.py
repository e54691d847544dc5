"""attnkit.analysis.stats at tile sizes where the fast paths run: grouped top-k candidates (tiles of whole column
groups), trimmed partial tiles, the base-2 reference moving across its band, ties, and the threaded walk; every
statistic against the float64 definitions of tests/test_analysis.py."""
from __future__ import annotations

import random

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit import scores as S
from attnkit.analysis import attention_stats, map_stats
from attnkit.analysis.stats import GROUP, RowStats, group_max
from conftest import F64, mask_case, one_thread, rand_qkv, ref_normalize, ref_scores
from test_analysis import NORMS, STATS, check_stats, ref_stats

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

MASKS = ["causal", "window", "streamingllm", "causal-no-first", "prefix-batch", "doc-batch-unsorted"]


def _case(norm, mname, Lq, Lk, B=1, Hkv=2, G=2, D=8):
    q, k, _ = rand_qkv(B, Hkv * G, Hkv, Lq, Lk, D, 1)
    rm = mask_case(mname, B, Hkv * G, Lq, Lk)
    ak_norm, nkw = NORMS[norm](Hkv * G)
    vis = rm.dense(B, Hkv * G, Lq, Lk)
    p, _ = ref_normalize(ref_scores(q, k), vis, **nkw)
    return q, k, rm, ak_norm, vis, p


@pytest.mark.parametrize("norm", ["softmax", "sink", "off_by_one", "relaxed", "sigmoid", "relu"])
def test_long_rows_grouped_topk_every_normalizer(norm):
    """Rows of 150-300 keys in tiles of whole column groups (and of odd widths): GQA, Lq != Lk, fully masked
    rows, sliding windows and sinks (partial tiles cut to their visible columns)."""
    for mname in random.sample(MASKS, 3):
        Lk = random.randint(150, 300)
        Lq = Lk if mname == "causal-no-first" else random.randint(Lk // 2, Lk)
        q, k, rm, ak_norm, vis, p = _case(norm, mname, Lq, Lk)
        n_sink, window, K = random.randint(0, 6), random.randint(1, 40), random.randint(1, 8)
        bq, bk = random.choice([16, 37, 64]), random.choice([32, 64, 128, 96, 100])
        st = attention_stats(q, k, mask=rm.ak, normalizer=ak_norm, sink_tokens=n_sink, window=window, topk=K,
                             block_q=bq, block_k=bk)
        ref = ref_stats(p, vis, n_sink, window, K, q0=Lk - Lq)
        check_stats(st, ref, p, vis, what=f"{norm} {rm} blocks {bq}x{bk}")
        check_stats(map_stats(p, visible=vis, sink_tokens=n_sink, window=window, topk=K), ref, p, vis,
                    what=f"map_stats {norm} {rm}")


def test_scores_crossing_the_reference_band():
    """Scores from −150 to +150 along the keys (the running max crosses ±16 in base 2: the reference moves and the
    sums are rescaled, several times per row), rows far below the band, softcap + ALiBi on top."""
    B, H, Lq, Lk = 1, 2, 96, 320
    a = torch.linspace(-150.0, 150.0, Lk, dtype=F64)
    a = a + torch.randn(Lk, dtype=F64)
    b = torch.randn(B, H, Lq, dtype=F64) * 20
    b[:, :, :10] -= 400  # rows whose every score is far below the band
    q = torch.stack([torch.ones_like(b), b], -1)  # s_ij = a_j + b_i with scale 1
    k = torch.stack([a, torch.ones_like(a)], -1).expand(B, H, Lk, 2).contiguous()
    for mods in (None, [S.softcap(200.0), S.alibi()]):
        st = attention_stats(q, k, mask="causal", score_mod=mods, scale=1.0, sink_tokens=3, window=17, topk=5,
                             block_q=32, block_k=64)
        s = ref_scores(q, k, scale=1.0)
        if mods is not None:
            qp, kp = torch.arange(Lk - Lq, Lk)[:, None], torch.arange(Lk)[None, :]
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=F64).view(1, H, 1, 1)
            s = 200.0 * torch.tanh(s / 200.0) - slopes * (qp - kp).abs().to(F64)
        vis = torch.tril(torch.ones(Lq, Lk, dtype=torch.bool), diagonal=Lk - Lq)[None, None]
        p, _ = ref_normalize(s, vis.expand(B, H, Lq, Lk))
        ref = ref_stats(p, vis, 3, 17, 5, q0=Lk - Lq)
        check_stats(st, ref, p, vis, atol=1e-10, what=f"band crossing, mods={mods}")
        st32 = attention_stats(q.float(), k.float(), mask="causal", score_mod=mods, scale=1.0, sink_tokens=3,
                               window=17, topk=5, block_q=32, block_k=64)
        for name in STATS:
            torch.testing.assert_close(getattr(st32, name).double(), ref[name], atol=2e-4, rtol=1e-4,
                                       equal_nan=True, msg=f"float32 {name}")


def test_all_scores_tied():
    """Every score equal (q = 0): every group of every tile qualifies for the top-k (the dense fallback); the k
    listed keys are visible ones, each with weight 1/n."""
    B, H, Lq, Lk = 1, 2, 70, 200
    q = torch.zeros(B, H, Lq, 8, dtype=F64)
    k = torch.randn(B, H, Lk, 8, dtype=F64)
    qp, kp = torch.arange(Lk - Lq, Lk)[:, None], torch.arange(Lk)[None, :]
    for mask, vis in (("causal", kp <= qp), (M.sliding_window(20), (kp <= qp) & (kp >= qp - 20))):
        for bk in (64, 256):  # 4 column groups per tile (fewer than k: a plain top-k), 16 (from the k best groups)
            st = attention_stats(q, k, mask=mask, topk=6, block_q=32, block_k=bk)
            v = vis[None, None]
            p, _ = ref_normalize(ref_scores(q, k), v.expand(B, H, Lq, Lk))
            check_stats(st, ref_stats(p, v, 4, 64, 6, q0=Lk - Lq), p, v, what=f"ties {mask} block_k {bk}")


def test_threads_give_the_same_result():
    """The threaded walk (query tiles shared out, a forked sink each) equals the one-thread walk bit for bit, and
    restores the caller's intra-op thread count."""
    q, k, _ = rand_qkv(2, 4, 2, 150, 230, 8, 1, dtype=torch.float32)
    before = torch.get_num_threads()
    for norm in ("softmax", "relaxed", "sigmoid"):
        kw = dict(mask=M.causal | M.sinks(2), normalizer=attnkit.normalizers.relaxed(0.2) if norm == "relaxed"
                  else norm, topk=5, window=9, block_q=16, block_k=64)
        one = attention_stats(q, k, threads=1, **kw)
        two = attention_stats(q, k, threads=3, **kw)
        assert torch.get_num_threads() == before
        for name, t in one.tensors().items():
            assert torch.equal(t.nan_to_num(0.5), getattr(two, name).nan_to_num(0.5)), f"{norm}: {name}"
    with pytest.raises(ValueError, match="threads"):
        attention_stats(q, k, threads=0)


def test_group_max_is_the_max_of_strided_groups():
    x = torch.randn(3, 5, 4 * GROUP)
    g = group_max(x)
    G = x.shape[-1] // GROUP
    for j in range(G):
        torch.testing.assert_close(g[..., j], x[..., j::G].amax(-1))
    y = torch.randn(2, 3, GROUP + 3)  # not whole groups: each column its own group
    assert group_max(y) is y
    assert isinstance(attention_stats(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)), RowStats)
