"""attnkit.analysis: streaming row statistics and block maps against float64 computations from the materialized
map (conftest's references, written from the definitions), the implicit maps of every linear rule against the
parallel form's matrix, rollout and flow against hand-computed graphs, and plots that decode and are not blank."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks as M
from attnkit import normalizers as N
from attnkit import scores as S
from attnkit.analysis import attention_stats, head_summary, map_stats
from attnkit.analysis.flow import flow, residual_maps, rollout
from attnkit.analysis.linear_maps import linear_block_map, linear_map, linear_stats
from attnkit.analysis.maps import attention_map, block_average, block_map
from conftest import F64, mask_case, one_thread, rand_qkv, ref_normalize, ref_scores

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

STATS = ("mass", "entropy", "sink", "window", "distance")


# ------------------------------------------------------------------------------------------------
# float64 statistics straight from a map (the definitions of attnkit.analysis.stats)
# ------------------------------------------------------------------------------------------------

def ref_stats(p, vis, n_sink, window, K, q0, k0=0):
    """Row statistics of weights ``p [B,H,Lq,Lk]`` (0 where not visible) by the definitions: π = |p| / Σ|p|."""
    B, H, Lq, Lk = p.shape
    vis = vis.expand(B, H, Lq, Lk)
    a = p.abs()
    Z = a.sum(-1)
    ok = Z > 0
    pi = a / torch.where(ok, Z, torch.ones_like(Z))[..., None]
    plogp = torch.where(pi > 0, pi * torch.log(torch.where(pi > 0, pi, torch.ones_like(pi))), torch.zeros_like(pi))
    Pq = (q0 + torch.arange(Lq, dtype=F64))[:, None]
    Pk = (k0 + torch.arange(Lk, dtype=F64))[None, :]
    d = (Pq - Pk).abs()
    nan = torch.full_like(Z, math.nan)
    out = dict(mass=p.sum(-1), entropy=torch.where(ok, -plogp.sum(-1), nan),
               sink=torch.where(ok, (pi * (Pk < n_sink)).sum(-1), nan),
               window=torch.where(ok, (pi * (d < window)).sum(-1), nan),
               distance=torch.where(ok, (pi * d).sum(-1), nan), valid=ok)
    # top-k: the K largest |p| among visible keys (sorted values; -1 where fewer keys)
    key = torch.where(vis, a, torch.full_like(a, -1.0))
    kk = min(K, Lk)
    tv = key.topk(kk, -1).values if kk else key[..., :0]
    out["topk_abs"] = F.pad(tv, (0, K - kk), value=-1.0)
    return out


def check_stats(st, ref, p, vis, atol=1e-11, what=""):
    assert torch.equal(st.valid, ref["valid"]), what
    for name in STATS:
        a, b = getattr(st, name), ref[name]
        assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern of {name}"
        torch.testing.assert_close(a.nan_to_num(0.0), b.nan_to_num(0.0), atol=atol, rtol=1e-9,
                                   msg=f"{what}: {name}")
    # top-k: listed keys are visible, their weights are the map's, their |weights| the K largest
    got = st.topk_index >= 0
    assert torch.equal(got, ref["topk_abs"] >= 0), f"{what}: top-k count"
    idx = st.topk_index.clamp(min=0)
    B, H, Lq, Lk = p.shape
    assert bool(torch.gather(vis.expand(B, H, Lq, Lk), -1, idx)[got].all()), f"{what}: a masked key in the top-k"
    torch.testing.assert_close(torch.where(got, torch.gather(p, -1, idx), torch.zeros_like(st.topk_weight)),
                               st.topk_weight, atol=atol, rtol=1e-9, msg=f"{what}: top-k weights")
    srt = st.topk_weight.abs().sort(-1, descending=True).values
    torch.testing.assert_close(srt, ref["topk_abs"].clamp(min=0), atol=atol, rtol=1e-9, msg=f"{what}: top-k order")
    assert bool((st.topk_weight[~got] == 0).all())


NORMS = {
    "softmax": lambda H: ("softmax", {"kind": "softmax"}),
    "sink": lambda H: (lambda t: (N.softmax_sink(t), {"kind": "sink", "sink": t}))(torch.randn(H, dtype=F64)),
    "off_by_one": lambda H: ("softmax_off_by_one", {"kind": "off_by_one"}),
    "relaxed": lambda H: (N.relaxed(0.3), {"kind": "relaxed", "gamma": 0.3}),
    "sigmoid": lambda H: ("sigmoid", {"kind": "sigmoid"}),
    "relu": lambda H: ("relu", {"kind": "relu"}),
    "relu2": lambda H: ("relu2", {"kind": "relu2"}),
    "none": lambda H: ("none", {"kind": "none"}),
}
#: always run (fully masked rows, an empty mask, causal); three of the others are drawn each run
MASKS_ALWAYS = ["causal", "anti-causal", "causal-no-first", "empty"]
MASKS_DRAWN = ["full", "window", "chunked", "prefix-batch", "doc-batch-unsorted", "streamingllm", "dilated",
               "predicate-bh"]


@pytest.mark.parametrize("norm", list(NORMS))
def test_streaming_stats_equal_float64_definitions(norm):
    """Every normalizer, random masks (incl. fully masked rows and an empty mask), GQA, Lq != Lk, odd tiles."""
    for mname in MASKS_ALWAYS + random.sample(MASKS_DRAWN, 3):
        B, Hkv, G = random.randint(1, 2), random.randint(1, 2), random.randint(1, 3)
        Lk = random.randint(2, 33)
        Lq = Lk if mname in ("causal-no-first",) else random.randint(1, Lk)
        H, D = Hkv * G, random.choice([4, 8])
        q, k, _ = rand_qkv(B, H, Hkv, Lq, Lk, D, 1)
        rm = mask_case(mname, B, H, Lq, Lk)
        ak_norm, nkw = NORMS[norm](H)
        vis = rm.dense(B, H, Lq, Lk)
        p, _ = ref_normalize(ref_scores(q, k), vis, **nkw)
        n_sink, window, K = random.randint(0, 5), random.randint(1, 9), random.randint(0, 6)
        st = attention_stats(q, k, mask=rm.ak, normalizer=ak_norm, sink_tokens=n_sink, window=window, topk=K,
                             block_q=random.randint(1, 9), block_k=random.randint(1, 70))
        ref = ref_stats(p, vis, n_sink, window, K, q0=Lk - Lq)
        check_stats(st, ref, p, vis, what=f"{norm} {rm}")
        # the same from the materialized map (map_stats) and attnkit's own weights
        _, w = attnkit.attention(q, k, k, mask=rm.ak, normalizer=ak_norm, return_weights=True, form="materialized",
                                 backend="reference")
        check_stats(map_stats(w, visible=vis, sink_tokens=n_sink, window=window, topk=K), ref, p, vis,
                    what=f"map_stats {norm} {rm}")


def test_score_mods_offsets_and_layout():
    """Score mods (softcap + ALiBi), explicit positions (q_offset / kv_offset), bthd layout."""
    B, H, Lq, Lk, D = 2, 4, 13, 29, 8
    q, k, _ = rand_qkv(B, H, 2, Lq, Lk, D, 1)
    q_off, kv_off = 40, 31
    mods = [S.softcap(3.0), S.alibi()]
    st = attention_stats(q.transpose(1, 2), k.transpose(1, 2), layout="bthd", mask=M.causal, score_mod=mods,
                         q_offset=q_off, kv_offset=kv_off, sink_tokens=34, window=12, topk=3, block_q=4, block_k=7)
    qp = (q_off + torch.arange(Lq))[:, None]
    kp = (kv_off + torch.arange(Lk))[None, :]
    vis = (kp <= qp)[None, None]
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=F64).view(1, H, 1, 1)
    s = 3.0 * torch.tanh(ref_scores(q, k) / 3.0) - slopes * (qp - kp).abs().to(F64)
    p, _ = ref_normalize(s, vis.expand(B, H, Lq, Lk))
    check_stats(st, ref_stats(p, vis, 34, 12, 3, q0=q_off, k0=kv_off), p, vis, what="mods+offsets")


def test_float32_streaming_matches_float64():
    q, k, _ = rand_qkv(1, 4, 2, 300, 300, 16, 1)
    a = attention_stats(q.float(), k.float(), mask="causal", topk=4, block_q=64, block_k=128)
    b = attention_stats(q, k, mask="causal", topk=4)
    for name in STATS:
        torch.testing.assert_close(getattr(a, name).double(), getattr(b, name), atol=2e-4, rtol=1e-4)
    assert a.entropy.dtype == torch.float32
    assert torch.equal(a.topk_index, b.topk_index)


def test_head_summary_averages_valid_rows():
    q, k, _ = rand_qkv(2, 3, 3, 9, 9, 4, 1)
    st = attention_stats(q, k, mask=~M.causal | M.sinks(0), topk=0)  # the last row of ~causal sees nothing
    hs = head_summary(st)
    assert bool((~st.valid[..., -1]).all()) and bool(st.valid[..., :-1].all())
    torch.testing.assert_close(hs["entropy"], st.entropy[..., :-1].mean(-1))
    assert torch.equal(hs["rows"], torch.full((2, 3), 8.0, dtype=F64))


# ------------------------------------------------------------------------------------------------
# Maps
# ------------------------------------------------------------------------------------------------

def ref_block_means(p, n):
    """Block means by explicit loops over blocks of ceil(L / n) positions."""
    B, H, Lq, Lk = p.shape
    rs, cs = -(-Lq // min(n, Lq)), -(-Lk // min(n, Lk))
    nr, nc = -(-Lq // rs), -(-Lk // cs)
    out = torch.zeros(B, H, nr, nc, dtype=F64)
    for i in range(nr):
        for j in range(nc):
            out[:, :, i, j] = p[:, :, i * rs:(i + 1) * rs, j * cs:(j + 1) * cs].mean((-1, -2))
    return out


@pytest.mark.parametrize("norm", ["softmax", "sink", "relaxed", "sigmoid", "none"])
def test_block_map_exact_block_means(norm):
    B, H, Lk = 1, 2, random.randint(5, 60)
    Lq = random.randint(5, Lk)  # the document mask aligns queries to the end of the keys
    q, k, _ = rand_qkv(B, H, 1, Lq, Lk, 8, 1)
    rm = mask_case(random.choice(["causal", "window", "doc-batch-unsorted", "anti-causal"]), B, H, Lq, Lk)
    ak_norm, nkw = NORMS[norm](H)
    vis = rm.dense(B, H, Lq, Lk)
    p, _ = ref_normalize(ref_scores(q, k), vis, **nkw)
    n = random.randint(1, 9)
    got = block_map(q, k, size=n, mask=rm.ak, normalizer=ak_norm, block_q=random.randint(1, 8),
                    block_k=random.randint(1, 20))
    torch.testing.assert_close(got, ref_block_means(p, n), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(block_average(p, n), ref_block_means(p, n), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(attention_map(q, k, mask=rm.ak, normalizer=ak_norm), p, atol=1e-12, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# Implicit maps of linear rules
# ------------------------------------------------------------------------------------------------

def _linear_inputs(rule, base=None, B=1, H=2, T=37, D=6):
    q, k = torch.randn(B, H, T, D, dtype=F64), torch.randn(B, H, T, D, dtype=F64)
    kw = {"rule": rule}
    g = base or rule
    if g in ("scalar_gate", "gated_delta"):
        kw["gate"] = F.logsigmoid(2 + torch.randn(B, H, T, dtype=F64))
    if g in ("gla", "hgrn2", "kda"):
        kw["gate"] = F.logsigmoid(3 + torch.randn(B, H, T, D, dtype=F64))
    if g in ("delta", "gated_delta", "kda"):
        kw.update(beta=torch.rand(B, H, T, dtype=F64) * 2, qk_l2norm=True)
    if rule == "retention":
        kw["gate"] = torch.log1p(-torch.rand(H, dtype=F64) * 0.3)
    if rule == "lightning":
        kw.update(layer_idx=1, num_layers=3)
    if rule == "log_linear":
        kw.update(base=base, level_weights=0.5 + torch.rand(B, H, T, 7, dtype=F64))
    if rule == "hgrn2":
        k = None
    return q, k, kw


LINEAR_CASES = [("linear", None, {}), ("linear", None, {"feature_map": "elu", "normalize": True}),
                ("linear", None, {"causal": False}), ("linear", None, {"causal": False, "feature_map": "relu",
                                                                       "normalize": True}),
                ("linear", None, {"feature_map": "favor", "normalize": True}),
                ("retention", None, {}), ("lightning", None, {}), ("scalar_gate", None, {}), ("gla", None, {}),
                ("gla", None, {"feature_map": "elu", "normalize": True}), ("hgrn2", None, {}), ("delta", None, {}),
                ("gated_delta", None, {}), ("kda", None, {}), ("log_linear", "linear", {}),
                ("log_linear", "scalar_gate", {}), ("log_linear", "gated_delta", {})]


@pytest.mark.parametrize("rule,base,extra", LINEAR_CASES, ids=[f"{r}-{b}-{'-'.join(map(str, e.values()))}"
                                                              for r, b, e in LINEAR_CASES])
def test_linear_implicit_map_statistics_chunkwise(rule, base, extra):
    """Chunkwise statistics and block means equal those of the parallel form's T×T matrix (decay-aware, every rule,
    T not a multiple of the chunk, key tiles spanning several chunks)."""
    T = random.randint(20, 45)
    q, k, kw = _linear_inputs(rule, base, T=T)
    kw.update(extra)
    full = attnkit.linear_attention(q, k, torch.randn(q.shape[0], q.shape[1], T, 3, dtype=F64), form="parallel",
                                    return_weights=True, **kw)[2]
    torch.testing.assert_close(linear_map(q, k, **kw), full)
    causal = kw.get("causal", True)
    vis = torch.tril(torch.ones(T, T, dtype=torch.bool)) if causal else torch.ones(T, T, dtype=torch.bool)
    n_sink, window, K = random.randint(0, 4), random.randint(1, 8), random.randint(0, 5)
    ref = ref_stats(full, vis[None, None], n_sink, window, K, q0=0)
    C = random.choice([4, 8, 16])
    st = linear_stats(q, k, sink_tokens=n_sink, window=window, topk=K, chunk=C, block_k=C * random.randint(1, 3),
                      **kw)
    check_stats(st, ref, full, vis[None, None], atol=1e-10, what=f"{rule} {base} {extra}")
    n = random.randint(1, 8)
    torch.testing.assert_close(linear_block_map(q, k, size=n, chunk=C, **kw), ref_block_means(full, n), atol=1e-12,
                               rtol=1e-9)


@pytest.mark.parametrize("per_token", [False, True])
def test_aaren_map_statistics(per_token):
    B, H, T, D = 1, 2, 23, 5
    k = torch.randn(B, H, T, D, dtype=F64)
    kw = {"rule": "aaren"}
    q = torch.randn(B, H, T, D, dtype=F64) if per_token else None
    if not per_token:
        kw["query"] = torch.randn(H, D, dtype=F64)
    full = attnkit.linear_attention(q, k, torch.randn(B, H, T, 2, dtype=F64), form="parallel", return_weights=True,
                                    **kw)[2]
    vis = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    st = linear_stats(q, k, sink_tokens=2, window=3, topk=3, chunk=4, block_k=8, **kw)
    check_stats(st, ref_stats(full, vis, 2, 3, 3, q0=0), full, vis, what="aaren")


def test_linear_float32_long_chunks_match_float64():
    q, k, kw = _linear_inputs("gated_delta", T=200, D=8)
    qf, kf = q.float(), k.float()
    st32 = linear_stats(qf, kf, **{**kw, "gate": kw["gate"].float(), "beta": kw["beta"].float()}, topk=2)
    st64 = linear_stats(q, k, **kw, topk=2)
    for name in STATS:
        torch.testing.assert_close(getattr(st32, name).double(), getattr(st64, name), atol=1e-4, rtol=1e-3)


def test_bad_inputs_are_named():
    q, k, _ = rand_qkv(1, 2, 2, 5, 5, 4, 1)
    with pytest.raises(ValueError, match="topk"):
        attention_stats(q, k, topk=-1)
    with pytest.raises(ValueError, match="window"):
        attention_stats(q, k, window=0)
    with pytest.raises(ValueError, match="block_q"):
        attention_stats(q, k, block_q=0)
    with pytest.raises(ValueError, match="4-D"):
        attention_stats(q[0], k)
    with pytest.raises(ValueError, match="weights"):
        map_stats(torch.ones(3, 3))
    with pytest.raises(ValueError, match="rule"):
        linear_stats(q, k, rule="nope")
    with pytest.raises(TypeError, match="initial_state"):
        linear_stats(q, k, rule="linear", initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="chunk"):
        linear_stats(q, k, rule="linear", chunk=3)
    with pytest.raises(ValueError, match="level_weights"):
        linear_stats(q, k, rule="log_linear", level_weights=torch.ones(1, 2, 5, 2, dtype=F64))
    with pytest.raises(ValueError, match="size"):
        block_map(q, k, size=0)
    with pytest.raises(ValueError, match="T, T"):
        rollout([torch.ones(1, 3, 4)])


# ------------------------------------------------------------------------------------------------
# Rollout and flow on hand-computed graphs
# ------------------------------------------------------------------------------------------------

def test_rollout_hand_computed():
    A1 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]], dtype=F64)
    A2 = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=F64)
    # Ã = (A + I) / 2 (rows already sum to 1)
    t1 = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=F64)
    t2 = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=F64)
    torch.testing.assert_close(rollout([A1, A2])[0], t2 @ t1)
    torch.testing.assert_close(rollout([A1, A2])[0], torch.tensor([[0.625, 0.375], [0.625, 0.375]], dtype=F64))
    torch.testing.assert_close(rollout([A1], residual=0.0)[0], A1[0])
    # rows that do not sum to 1 (a sigmoid map) are renormalized after adding the residual
    torch.testing.assert_close(residual_maps([2 * A1], residual=0.5)[0][0],
                               torch.tensor([[1.0, 0.0], [1 / 3, 2 / 3]], dtype=F64))


def test_flow_hand_computed():
    # one layer: the flow from input j to output i is the edge capacity Ã[i, j]
    A = torch.tensor([[[0.2, 0.8, 0.0], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]]], dtype=F64)
    torch.testing.assert_close(flow([A], residual=0.0)[0], A[0])
    # two layers, tokens {0, 1}: Ã1 = [[1, 0], [.4, .6]], Ã2 = [[.7, .3], [0, 1]]; into output 0:
    #   from input 0: paths 0→0→0 (min(1, .7)) and 0→1→0 (min(.4, .3)): .7 + .3 = 1.0
    #   from input 1: 1→1→0 only: min(.6, .3) = .3
    A1 = torch.tensor([[[1.0, 0.0], [0.4, 0.6]]], dtype=F64)
    A2 = torch.tensor([[[0.7, 0.3], [0.0, 1.0]]], dtype=F64)
    got = flow([A1, A2], residual=0.0)
    torch.testing.assert_close(got[0, 0], torch.tensor([1.0, 0.3], dtype=F64))
    # into output 1: from 0: 0→1→1 min(.4, 1) = .4; from 1: 1→1→1 min(.6, 1) = .6
    torch.testing.assert_close(got[0, 1], torch.tensor([0.4, 0.6], dtype=F64))
    torch.testing.assert_close(flow([A1, A2], residual=0.0, outputs=[1]), got[:, 1:])
    # flow never exceeds rollout's capacity bound 1 and is at least the rollout path product on a chain
    big = [torch.softmax(torch.randn(2, 5, 5, dtype=F64), -1) for _ in range(3)]
    f = flow(big)
    assert bool((f <= 1 + 1e-12).all()) and bool((f > 0).all())


# ------------------------------------------------------------------------------------------------
# Plots: files that decode and are not blank
# ------------------------------------------------------------------------------------------------

def _png_ok(path):
    mpimg = pytest.importorskip("matplotlib.image")
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(img[..., :3].std()) > 0.02  # not one flat colour


def test_plots_produce_non_blank_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from attnkit.analysis import plots
    maps = torch.softmax(torch.randn(2, 3, 7, 7), -1)
    tokens = [f"t{i}" for i in range(7)]
    files = [plots.head_grid(maps, tmp_path / "grid.png", tokens, "grid"),
             plots.layer_head_heatmap(torch.rand(2, 3), tmp_path / "ent.png", "entropy", "nats"),
             plots.layer_curves({"sink": [0.1, 0.5], "entropy": [2.0, 1.0]}, tmp_path / "curves.png"),
             plots.rollout_plot({"rollout": torch.rand(7)}, tmp_path / "roll.png", tokens),
             plots.compare_maps({"linear": torch.randn(7, 7).tril(), "softmax": maps[0, 0]}, tmp_path / "cmp.png",
                                tokens=tokens)]
    for f in files:
        _png_ok(f)
    md = plots.analysis_section(tmp_path, {"target": "x", "layers": [{"name": "l0", "sink": 0.5, "entropy": 1.0}]})
    assert "## Analysis" in md and "| l0 | 0.500 | 1.000 |" in md and "![grid](" in md
