"""The issue-19 patterns of benchmarks/softmax_gpu.py: seeded unequal / long-tailed document packing (causal inside each
document), block-causal chunks and causal sliding windows.

Each pattern is checked against a float64 dense mask written from its definition (cu_seqlens intervals, chunk index,
window width; explicit loops over rows), three ways: attnkit's mask object element by element, the FlexAttention peer's
``mask_mod`` (the same object through :func:`attnkit.tools.peers.flex_mods`, evaluated as Flex does: nested vmap,
0-d int32 indices; and Flex's own ``create_block_mask``), and the attention it defines (attnkit's reference and the
Triton kernels in the interpreter, eager Flex on the CPU, all against softmax over the dense mask, outputs and
gradients; Flex forward only, it has no CPU backward). Layouts: reproducible (pinned values), summing to T, the
promised shapes. The preset, its order, resume, the measuring loop (--cpu-smoke) and the merged markdown on the CPU.
"""
from __future__ import annotations

import json
import os
import random
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels on the CPU: its interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

import attnkit  # noqa: E402
import attnkit.masks as M  # noqa: E402
from attnkit.tools.peers import flex_mods  # noqa: E402
from conftest import F64, assert_close, one_thread  # noqa: E402
from test_peers_flex import block_level, on_grid  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import softmax_gpu as G  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


# ------------------------------------------------------------------------------------------------
# float64 dense references, from the definitions
# ------------------------------------------------------------------------------------------------

def ref_documents_causal(cu: list, T: int) -> torch.Tensor:
    """[T, T] float64: 1 where key j is in query i's document [cu[d], cu[d+1]) and j <= i."""
    m = torch.zeros(T, T, dtype=F64)
    for start, end in zip(cu, cu[1:]):
        for i in range(start, end):
            m[i, start:i + 1] = 1.0
    return m


def ref_block_causal(c: int, T: int) -> torch.Tensor:
    """[T, T] float64: 1 where key j's chunk (j // c) is not after query i's chunk."""
    m = torch.zeros(T, T, dtype=F64)
    for i in range(T):
        m[i, :min(T, (i // c + 1) * c)] = 1.0
    return m


def ref_window(w: int, T: int) -> torch.Tensor:
    """[T, T] float64: 1 where i - w <= j <= i."""
    m = torch.zeros(T, T, dtype=F64)
    for i in range(T):
        m[i, max(0, i - w):i + 1] = 1.0
    return m


def reference(name: str, T: int) -> torch.Tensor:
    """The dense reference of a softmax_gpu pattern name at length T (documents from the layout the script uses)."""
    kind, _, n = name.rpartition("_")
    if kind == "block_causal":
        return ref_block_causal(int(n), T)
    if kind == "sliding_window":
        return ref_window(int(n), T)
    return ref_documents_causal(G.layout(name, T), T)


def hand_layouts(T: int) -> list:
    """cu_seqlens with empty documents (also first and last), length-1 documents, one document longer than T/2."""
    long_ = T // 2 + 1 + random.randint(0, T // 8)
    rest = T - long_
    a = random.randint(2, max(2, rest - 3))
    return [[0, 0, 1, 1, 2, 2 + long_, 2 + long_ + a, T - 1, T, T],  # empties, 1-token documents, a long one
            [0, T],  # one document
            [0, 1, long_, T],
            [0] + sorted(random.sample(range(1, T), 11)) + [T]]  # 12 random documents


NEW_PATTERNS = G.ISSUE19_PATTERNS + ["docs_unequal_s7", "docs_longtail_s3", "block_causal_1", "block_causal_5",
                                     "sliding_window_0", "sliding_window_9"]
SMALL_T = [64, 131, 300]


def cases():
    """(what, mask as the script builds it, float64 reference, T)."""
    out = []
    for T in SMALL_T:
        for name in NEW_PATTERNS:
            out.append((f"{name} T={T}", G.pattern(name, T)[2], reference(name, T), T))
        for cu in hand_layouts(T):
            out.append((f"documents {cu}", G.document_causal(cu), ref_documents_causal(cu, T), T))
    return out


def test_new_patterns_are_issue19():
    """The preset lists the issue's patterns: 3 unequal layouts and a long-tailed one, chunks 64/128/256, windows
    256–4096, and the causal baseline last."""
    assert G.ISSUE19_PATTERNS == ["docs_unequal_s0", "docs_unequal_s1", "docs_unequal_s2", "docs_longtail_s0",
                                  "block_causal_64", "block_causal_128", "block_causal_256", "sliding_window_256",
                                  "sliding_window_512", "sliding_window_1024", "sliding_window_2048",
                                  "sliding_window_4096"]
    grid = G.GRIDS["issue19"]
    assert grid["patterns"] == G.ISSUE19_PATTERNS + ["causal"]
    assert grid["T"] == [1024, 2048, 4096, 8192, 16384, 32768] and grid["D"] == [128, 64]
    assert "flex" in grid["peers"] and "sdpa-cudnn" in grid["peers"]


def test_masks_equal_reference():
    """attnkit's mask and the Flex peer's mask_mod (vmapped over 0-d int32 indices) equal the dense reference at every
    (i, j); Flex's create_block_mask lists exactly the non-empty blocks; the visible-pair count (TF/s) is exact."""
    for what, mask, ref, T in cases():
        want = ref.bool()
        got = mask.dense(M.Geometry(1, 1, T, T), "cpu")
        assert got.shape[-2:] == (T, T) and got.shape[:2] == (1, 1), what
        bad = (got[0, 0] != want).nonzero()[:5].tolist()
        assert not bad, f"{what}: attnkit mask differs from the definition at (i, j) {bad}"

        B, H = 2, 3
        mask_mod, score_mod = flex_mods(mask, None, B, H, T, T, torch.device("cpu"))
        assert score_mod is None and mask_mod is not None, what
        grid = on_grid(mask_mod, B, H, T, T)
        assert grid.dtype == torch.bool and grid.shape == (B, H, T, T), what
        bad = (grid != want).nonzero()[:5].tolist()
        assert not bad, f"{what}: Flex mask_mod differs from the definition at [b, h, i, j] {bad}"

        blk = random.choice([8, 16, 32])
        bm = create_block_mask(mask_mod, None, None, T, T, device="cpu", BLOCK_SIZE=blk, _compile=False)
        blocks = bm.to_dense().bool()[0, 0, :-(-T // blk), :-(-T // blk)]
        bad = (blocks != block_level(want[None, None], blk, blk)[0, 0]).nonzero()[:5].tolist()
        assert not bad, f"{what}: Flex block mask differs at blocks {bad} (block {blk})"

        assert G.visible_pairs(mask, B, H, T, T, "cpu") == int(ref.sum()) * B * H, what


def dense_attention(q, k, v, ref):
    """softmax(q kᵀ / sqrt(D) over the keys where ref is 1) v, float64; every row sees at least its own key."""
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return s.masked_fill(ref == 0, float("-inf")).softmax(-1) @ v


def grads(fn, q, k, v, g):
    return torch.autograd.grad(fn(q, k, v), (q, k, v), g)


@pytest.mark.parametrize("T", SMALL_T)
def test_attention_equals_dense_reference(T):
    """attnkit's reference (forward and gradients) and eager Flex with the peer's mask_mod and block mask (forward:
    Flex has no CPU backward), float64, against softmax over the dense mask; a random pick of the cases at this T."""
    picked = random.sample([c for c in cases() if c[3] == T], 6)
    B, H, D = 1, 2, 8
    for what, mask, ref, _ in picked:
        q, k, v = (torch.randn(B, H, T, D, dtype=F64, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, D, dtype=F64)
        want = dense_attention(q, k, v, ref)
        want_g = grads(lambda a, b, c: dense_attention(a, b, c, ref), q, k, v, g)
        ours = lambda a, b, c: attnkit.attention(a, b, c, mask=mask, backend="reference")  # noqa: E731
        assert_close(ours(q, k, v), want, atol=1e-12, rtol=1e-10, what=f"{what} attnkit out")
        for name, x, y in zip("qkv", grads(ours, q, k, v, g), want_g):
            assert_close(x, y, atol=1e-11, rtol=1e-9, what=f"{what} attnkit d{name}")
        mask_mod, _ = flex_mods(mask, None, B, H, T, T, torch.device("cpu"))
        bm = create_block_mask(mask_mod, None, None, T, T, device="cpu", BLOCK_SIZE=random.choice([16, 128]),
                               _compile=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            got = flex_attention(q.detach(), k.detach(), v.detach(), block_mask=bm)  # no Flex backward on CPU
        assert_close(got, want, atol=1e-12, rtol=1e-10, what=f"{what} flex out")


@pytest.mark.parametrize("name", ["docs_longtail_s0", "hand", "block_causal_5", "sliding_window_9"])
def test_triton_kernels_equal_dense_reference(name):
    """The impl the benchmark times (``backend="triton"``, here in Triton's interpreter, float32) on a long-tail layout,
    empty / 1-token documents, a chunk and a window at T = 131 (not a multiple of a tile): output and gradients
    against the float64 dense reference."""
    T, D = 131, 16
    if name == "hand":
        cu = hand_layouts(T)[0]
        mask, ref = G.document_causal(cu), ref_documents_causal(cu, T)
    else:
        mask, ref = G.pattern(name, T)[2], reference(name, T)
    q, k, v = (torch.randn(1, 2, T, D, dtype=torch.float32, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2, T, D)
    out = attnkit.attention(q, k, v, mask=mask, backend="triton")
    assert "triton" in str(attnkit.last_backend()), attnkit.last_backend()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = dense_attention(q64, k64, v64, ref)
    assert_close(out, want, atol=2e-5, rtol=1e-4, what=f"{name} triton out")
    got_g = torch.autograd.grad(out, (q, k, v), g)
    want_g = torch.autograd.grad(want, (q64, k64, v64), g.double())
    for n, x, y in zip("qkv", got_g, want_g):
        assert_close(x, y, atol=5e-5, rtol=1e-3, what=f"{name} triton d{n}")


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------

def lengths(cu):
    return [b - a for a, b in zip(cu, cu[1:])]


def test_layouts_pinned():
    """The seeded layouts are pinned: random.Random(str).random() is the stream Python keeps across versions, so these
    values hold on every machine; a change here means recorded layouts (--layouts-from) must be used to repeat a run."""
    assert G.doc_layout("unequal", 0, 1024) == [0, 10, 20, 291, 322, 378, 605, 749, 889, 913, 1024]
    assert lengths(G.doc_layout("longtail", 0, 1024)) == [14, 1, 71, 150, 25, 20, 7, 4, 12, 9, 2, 709]


@pytest.mark.parametrize("kind", ["unequal", "longtail"])
def test_layouts_reproducible_and_sum_to_T(kind):
    """Same (kind, seed, T): same layout, also in a fresh interpreter state; starts at 0, ends at T, every document
    >= 1 token; unequal: 10–14 documents of unequal lengths; long tail: 12 documents, one longer than T/2, five of
    1–16 tokens. Different seeds differ (from T = 64: at T = 32 a long tail is nearly forced)."""
    Ts = [32, 64, 131, 300, 1000, 1024, 2048, 4096, 8192, 16384, 32768] + [random.randint(40, 40000) for _ in range(4)]
    for T in Ts:
        seen = set()
        for seed in range(6):
            cu = G.doc_layout(kind, seed, T)
            random.random()  # the global stream is not the layout's
            assert G.doc_layout(kind, seed, T) == cu, (kind, seed, T)
            n = lengths(cu)
            assert cu[0] == 0 and cu[-1] == T and min(n) >= 1, (kind, seed, T, cu)
            if kind == "unequal":
                assert 10 <= len(n) <= 14 and max(n) >= 2 * min(n), (seed, T, n)
            else:
                assert len(n) == 12 and max(n) > T / 2, (seed, T, n)
                assert sum(1 <= x <= 16 for x in n) >= 5, (seed, T, n)
            seen.add(tuple(cu))
        assert len(seen) == 6 or T < 64, f"{kind} T={T}: seeds 0-5 gave only {len(seen)} layouts"  # 32: near forced


def test_layout_errors():
    with pytest.raises(ValueError, match="long-tail layout needs T >= 24"):
        G.doc_layout("longtail", 0, 23)
    with pytest.raises(ValueError, match="'unequal' or 'longtail', got 'zipf'"):
        G.doc_layout("zipf", 0, 1024)
    with pytest.raises(ValueError, match="cannot split 5 tokens into 10"):
        G.doc_layout("unequal", 0, 5)
    with pytest.raises(KeyError):
        G.pattern("docs_equal_s0", 64)


def test_recorded_layouts_win(monkeypatch):
    """A layout read from results (--layouts-from / --resume) replaces the seeded one at that T only; two different
    layouts for one (pattern, T) are refused."""
    monkeypatch.setattr(G, "LAYOUTS", {"docs_unequal_s0": {64: [0, 3, 3, 64]}})
    _, _, mask, _ = G.pattern("docs_unequal_s0", 64)
    assert torch.equal(mask.dense(M.Geometry(1, 1, 64, 64), "cpu")[0, 0],
                       ref_documents_causal([0, 3, 3, 64], 64).bool())
    assert G.layout("docs_unequal_s0", 128) == G.doc_layout("unequal", 0, 128)
    have = {"docs_longtail_s0": {64: [0, 40, 64]}}
    G.add_layouts(have, {"docs_longtail_s0": {64: [0, 40, 64]}, "docs_unequal_s1": {64: [0, 64]}}, "b.json")
    assert have == {"docs_longtail_s0": {64: [0, 40, 64]}, "docs_unequal_s1": {64: [0, 64]}}
    with pytest.raises(ValueError, match="docs_longtail_s0 at T=64 has cu_seqlens \\[0, 41, 64\\]"):
        G.add_layouts(have, {"docs_longtail_s0": {64: [0, 41, 64]}}, "c.json")


# ------------------------------------------------------------------------------------------------
# The preset on the CPU: order, resume, dry run, help, merged markdown
# ------------------------------------------------------------------------------------------------

def test_issue19_order():
    """Every cell of the grid exactly once; unequal documents at D = 128, T = 2k / 8k first, the issue's other measured
    cells next, D = 128 before D = 64, windows equal to causal and the causal baseline last."""
    grid = G.GRIDS["issue19"]
    order = G.cells(grid["D"], grid["T"], grid["patterns"], "issue19")
    assert sorted(order) == sorted((D, T, p) for D in grid["D"] for T in grid["T"] for p in grid["patterns"])
    assert len(set(order)) == len(order) == 2 * 6 * 13
    assert set(order[:8]) == {(128, T, p) for T in (2048, 8192) for p in G.ISSUE19_PATTERNS[:4]}
    assert set(order[8:16]) == ({(128, T, p) for T in (2048, 8192) for p in ("block_causal_128", "sliding_window_512")}
                                | {(64, 32768, p) for p in G.ISSUE19_PATTERNS[:4]})
    tiers = [G.issue19_priority(c, grid["patterns"])[0] for c in order]
    assert tiers == sorted(tiers)
    assert all(D == 128 for D, T, p in order if G.issue19_priority((D, T, p), grid["patterns"])[0] == 2)
    tail = [c for c in order if G.issue19_priority(c, grid["patterns"])[0] >= 4]
    assert {c for c in tail if c[2] != "causal"} == {(D, T, f"sliding_window_{w}") for D in (128, 64)
                                                     for T in grid["T"] for w in (1024, 2048, 4096) if w >= T - 1}
    assert G.cells([64], [1024, 2048], ["causal", "full"], "grid") == [(64, 1024, "causal"), (64, 1024, "full"),
                                                                       (64, 2048, "causal"), (64, 2048, "full")]


def test_done_cells():
    """A cell is done when attnkit's rows are ok in every mode asked for; a failed peer does not reopen it."""
    row = dict(D=128, T=2048, pattern="docs_unequal_s0", status="ok")
    rows = [dict(row, mode="fwd", impl="triton"), dict(row, mode="fwd+bwd", impl="triton"),
            dict(row, mode="fwd", impl="flex", status="error"),
            dict(row, pattern="block_causal_64", mode="fwd", impl="triton"),
            dict(row, pattern="block_causal_64", mode="fwd+bwd", impl="triton", status="error")]
    assert G.done_cells(rows, ["fwd", "fwd+bwd"]) == {(128, 2048, "docs_unequal_s0")}
    assert G.done_cells(rows, ["fwd"]) == {(128, 2048, "docs_unequal_s0"), (128, 2048, "block_causal_64")}


def test_help_and_dry_run(capsys):
    """--help and --dry-run run without CUDA; the dry run lists every cell in order with the layouts."""
    with pytest.raises(SystemExit) as e:
        G.main(["--help"])
    assert e.value.code == 0 and "--grid" in capsys.readouterr().out
    G.main(["--grid", "issue19", "--dry-run", "--T", "256", "512", "--budget-s", "100"])
    out = capsys.readouterr().out
    assert "52 cells (0 done in --resume files), order issue19" in out
    assert "--budget-s 100: call 2 (--resume the earlier ones) starts here" in out
    assert "(= causal at this T)" in out
    assert "layout docs_longtail_s0 T=512: 12 documents" in out
    lines = [ln.split() for ln in out.splitlines() if ln[:4].strip().isdigit()]
    assert len(lines) == 52 and lines[0][2:5] == ["128", "256", "docs_unequal_s0"]


def fake_results(path, patterns, T, layouts, flex_ms=2.0, date="2026-12-05"):
    rows = []
    for p in patterns:
        for mode in ("fwd", "fwd+bwd"):
            for impl, ms in (("triton", 1.0), ("flex", flex_ms)):
                rows.append(dict(D=128, pattern=p, T=T, B=1, H=16, Lq=T, Lk=T, mode=mode, impl=impl, pairs=10, ms=ms,
                                 tflops=1.0, mem_mib=None, status="ok", note="", cell_s=9.0))
    data = {"environment": {"gpu": "NVIDIA H200", "date": date, "torch": "2.11", "triton": "3.6", "cuda": "13.0",
                            "cudnn": 91000, "attnkit": "0.1", "commit": "abc1234"},
            "config": {"H": 16, "tokens": 16384, "layouts": layouts}, "rows": rows}
    with open(path, "w") as f:
        json.dump(data, f)


def test_merge_markdown_and_resume(tmp_path, capsys):
    """Merged results: ratios (Flex ms / attnkit ms) per cell, device, versions and date in the header, layouts
    carried; a dry run resumed from them skips their cells and estimates from their measured cell time."""
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    cu = G.doc_layout("unequal", 0, 2048)
    fake_results(a, ["docs_unequal_s0"], 2048, {"docs_unequal_s0": {"2048": cu}}, flex_ms=1.25)
    fake_results(b, ["sliding_window_512"], 2048, {}, flex_ms=0.8)
    G.main(["--merge", a, b, "--out", str(tmp_path), "--suffix=-m"])
    md = open(tmp_path / "NVIDIA-H200-2026-12-05-m.md").read()
    assert "Device NVIDIA H200; torch 2.11, triton 3.6, CUDA 13.0, cuDNN 91000, attnkit 0.1 (commit abc1234); " \
           "measured 2026-12-05" in md
    assert "| docs_unequal_s0 | 1.000 ms: ×1.25 flex |" in md and "| sliding_window_512 | 1.000 ms: ×0.80 flex |" in md
    assert "| 128 | fwd | 2 | 0.80 | 1.02 | 1.25 | 1 | 1 |" in md
    assert f"| docs_unequal_s0 | 2048 | {len(cu) - 1} |" in md
    merged = json.load(open(tmp_path / "NVIDIA-H200-2026-12-05-m.json"))
    assert merged["config"]["layouts"] == {"docs_unequal_s0": {"2048": cu}}
    capsys.readouterr()
    G.main(["--grid", "issue19", "--dry-run", "--T", "2048", "--D", "128", "--resume", a])
    out = capsys.readouterr().out
    assert "13 cells (1 done in --resume files)" in out and "9 s per cell (median of 1 measured cells)" in out
    fake_results(b, ["docs_unequal_s0"], 2048, {"docs_unequal_s0": {"2048": cu[:1] + [5] + cu[1:]}})
    with pytest.raises(ValueError, match="docs_unequal_s0 at T=2048 has cu_seqlens"):
        G.main(["--merge", a, b, "--out", str(tmp_path)])


def test_cpu_smoke_run_records_layout_and_resumes(tmp_path, capsys):
    """The measuring loop end to end on the CPU (Triton interpreter, no peers): rows ok in both modes, the layout's
    cu_seqlens recorded; a second call resumed from the first runs no cell and still writes its files."""
    out = str(tmp_path)
    G.main(["--cpu-smoke", "--grid", "issue19", "--patterns", "docs_unequal_s1", "--out", out, "--suffix=-a"])
    first = [f for f in os.listdir(out) if f.endswith("-a.json")]
    data = json.load(open(os.path.join(out, first[0])))
    assert [(r["mode"], r["impl"], r["status"]) for r in data["rows"]] == [("fwd", "triton", "ok"),
                                                                          ("fwd+bwd", "triton", "ok")]
    assert data["config"]["layouts"] == {"docs_unequal_s1": {"64": G.doc_layout("unequal", 1, 64)}}
    assert all(r["cell_s"] > 0 and r["ms"] > 0 for r in data["rows"]) and data["rows"][0]["rel_vs_triton"] == 0
    capsys.readouterr()
    G.main(["--cpu-smoke", "--grid", "issue19", "--patterns", "docs_unequal_s1", "--out", out, "--suffix=-b",
            "--resume", os.path.join(out, first[0])])
    assert "0 cells to run, 1 done in --resume files" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, first[0].replace("-a.json", "-b.json"))))["rows"] == []


def test_failing_cell_is_a_row(tmp_path, monkeypatch):
    """A cell attnkit cannot run becomes error rows naming the exception; the run goes on to the next cell."""
    calls = []

    def boom(*a, **kw):
        calls.append(kw["mask"])
        raise RuntimeError("out of resources: shared memory, required: 300000")

    monkeypatch.setattr(attnkit, "attention", boom)
    out = str(tmp_path)
    G.main(["--cpu-smoke", "--patterns", "block_causal_64", "sliding_window_256", "--out", out])
    data = json.load(open(os.path.join(out, [f for f in os.listdir(out) if f.endswith(".json")][0])))
    assert len(calls) == 2
    assert [(r["pattern"], r["mode"], r["status"]) for r in data["rows"]] == [
        ("block_causal_64", "fwd", "error"), ("block_causal_64", "fwd+bwd", "error"),
        ("sliding_window_256", "fwd", "error"), ("sliding_window_256", "fwd+bwd", "error")]
    assert all(r["note"] == "RuntimeError: out of resources: shared memory, required: 300000" for r in data["rows"])
