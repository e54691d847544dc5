"""The command line, the registry and the README catalog."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import masks, scores
from attnkit.catalog import registry
from attnkit.tools.timing import peak_memory
from attnkit.tools.cli import main
from attnkit.catalog import Variant
from conftest import one_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)  # one intra-op thread per xdist worker

ROOT = Path(__file__).resolve().parents[1]


def test_list_shows_at_least_12_softmax_variants(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows if r["family"] == "softmax"]
    assert len(names) >= 12 and len(set(names)) == len(names)
    for r in rows:
        assert r["forms"] and r["paper"] and r["summary"]


def test_list_json_shows_api_and_earlier_names(capsys):
    """`attnkit list --json`: each variant's place in the API and its earlier names; every deprecated name of the
    catalog appears once, under the variant it resolves to."""
    from attnkit.catalog import aliases
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        v = registry.get_variant(r["name"])
        assert r["api"] == v.api and r["api"] and r["aliases"] == list(v.aliases)
    listed = {old: r["name"] for r in rows for old in r["aliases"]}
    assert sum(len(r["aliases"]) for r in rows) == len(listed) and listed == aliases()
    assert listed["gated-deltanet"] == "gated_delta" and listed["sliding-window"] == "sliding_window"


def test_list_text_and_markdown(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "softmax" in text and "alibi" in text
    assert main(["list", "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| variant |") and md[1].startswith("|---|")


def test_readme_catalog_is_generated():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme_catalog.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_passes_for_every_registered_variant(capsys):
    rc = main(["check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert " 0 failed" in out


def _broken_variant(wrong_form: str) -> Variant:
    """softmax whose `wrong_form` silently uses a shifted causal mask: check must catch it."""
    base = registry.get_variant("softmax")

    def fn(q, k, v, *, mask=None, form="auto", backend="auto", **kw):
        if form == wrong_form:
            mask = masks.predicate(lambda b, h, qi, kv: kv < qi, "strictly-causal")
        return attnkit.attention(q, k, v, mask=mask, form=form, backend="reference", **kw)

    return Variant(name="broken", family="test", summary="", paper="", forms=base.forms, fn=fn,
                   make_inputs=base.make_inputs, unsupported=base.unsupported)


@pytest.mark.parametrize("wrong_form", ["streaming", "recurrent"])
def test_check_fails_on_a_wrong_form(wrong_form, monkeypatch, capsys):
    bad = _broken_variant(wrong_form)
    monkeypatch.setitem(registry._REGISTRY, "broken", bad)
    assert main(["check", "broken", "--patterns", "causal-self"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--variants", "softmax,sigmoid", "--lengths", "32,48", "--rep", "1", "--quiet",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["pattern"] for r in rows} == set(registry.PATTERNS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["ms"] > 0 and r["tflops"] > 0 for r in ok)
    assert {r["mode"] for r in ok} == {"fwd", "fwd+bwd"}
    assert all(r["backend"].startswith("reference/") for r in ok)
    na = [r for r in rows if r["status"] == "n/a"]
    assert na and all(r["form"] == "recurrent" and not registry.PATTERNS[r["pattern"]][0] for r in na)
    assert data["environment"]["torch"] == torch.__version__
    assert "causal-cross" in text


def test_bench_cpu_peers_spread_and_width(tmp_path, capsys):
    """On a CPU, every run times SDPA next to attnkit (same inputs, outputs checked against attnkit's), keeps every
    sample with min/median/max, and says where a peer cannot compute a cell; the text fits 120 columns."""
    out = tmp_path / "p.json"
    rc = main(["bench", "--variants", "softmax,sigmoid,gated_delta", "--patterns", "causal-self,cross",
               "--lengths", "32,48", "--rep", "3", "--min-time", "0", "--peers", "sdpa-math,sdpa-flash,fla",
               "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.out
    data = json.loads(out.read_text())
    assert data["schema"] == "attnkit.bench" and data["schema_version"] == 2
    for r in data["rows"]:
        if r["status"] == "ok":
            assert r["n"] == len(r["samples"]) >= 3 and r["ms_min"] <= r["ms"] <= r["ms_max"]
            assert r["ms_min"] == min(r["samples"]) and r["ms_max"] == max(r["samples"])
    peers = data["peers"]
    sm = [p for p in peers if p["variant"] == "softmax" and p["status"] == "ok"]
    assert {(p["form"], p["mode"]) for p in sm} == {(n, m) for n in ("sdpa-math", "sdpa-flash")
                                                   for m in ("fwd", "fwd+bwd")}
    assert all(p["extra"]["rel_err_vs_attnkit"] < 1e-4 for p in sm if p["mode"] == "fwd")
    sig = [p for p in peers if p["variant"] == "sigmoid"]
    assert sig and all(p["status"] == "n/a" and "softmax" in p["note"] for p in sig)
    fla = [p for p in peers if p["form"] == "fla"]
    assert fla and all(p["status"] == "n/a" and p["note"] for p in fla)
    assert {p["variant"] for p in fla} == {"gated_delta"}
    assert all(len(line) <= 120 for line in cap.out.splitlines()), max(cap.out.splitlines(), key=len)
    assert re.search(r"^n/a: (sdpa-\w+, )*sdpa-math(, sdpa-\w+)* on sigmoid \(all patterns\): SDPA computes plain "
                     r"softmax", cap.out, re.M), cap.out
    assert "efficiency length" in cap.out
    assert "\r" not in cap.err and "[bench 1/" in cap.err  # a log gets plain lines, no carriage returns
    assert main(["bench", "--variants", "softmax", "--patterns", "causal-self", "--lengths", "32", "--rep", "1",
                 "--min-time", "0", "--no-peers", "--wide", "--quiet", "--out", str(out)]) == 0
    wide = capsys.readouterr().out
    assert "median" in wide and "q1" in wide and "streaming" in wide
    assert json.loads(out.read_text())["peers"] == []


def test_bench_compiled_flex_peer_on_cpu(tmp_path):
    """Compiled FlexAttention runs on the CPU forward (checked against attnkit); its backward row says why not."""
    out = tmp_path / "f.json"
    assert main(["bench", "--variants", "softmax", "--patterns", "causal-cross", "--lengths", "64", "--rep", "2",
                 "--min-time", "0", "--peers", "flex", "--quiet", "--out", str(out)]) == 0
    flex = {p["mode"]: p for p in json.loads(out.read_text())["peers"]}
    assert flex["fwd"]["status"] == "ok" and flex["fwd"]["ms"] > 0, flex["fwd"]
    assert flex["fwd"]["extra"]["rel_err_vs_attnkit"] < 1e-4 and flex["fwd"]["extra"]["first_call_s"] > 0
    assert flex["fwd+bwd"]["status"] == "n/a" and "backward on CPU" in flex["fwd+bwd"]["note"]


def test_bench_peer_that_disagrees_is_not_timed(tmp_path, monkeypatch):
    """A peer whose output differs from attnkit's gets status 'mismatch' and no time."""
    from attnkit.tools import bench as B

    def wrong(v, spec, inputs, backward):
        return (lambda: inputs["v"][:, :, : spec.Lq] * 0 + 1), inputs
    monkeypatch.setattr(B, "PEERS", B.PEERS + (B.Peer("wrong", "softmax", ("cpu",), wrong),))
    rows = B.sweep([registry.get_variant("softmax")], ["causal-self"], [16], rep=1, min_time_s=0.0,
                   peers=["wrong"], fwd_only=True)
    bad = [r for r in rows if r.impl == "wrong"]
    assert len(bad) == 1 and bad[0].status == "mismatch" and bad[0].ms is None and "differs" in bad[0].note
    with pytest.raises(ValueError, match="unknown peers"):
        B.sweep([registry.get_variant("softmax")], ["causal-self"], [16], peers=["nope"])


def _row(variant, T, ms, impl="attnkit", form="streaming", pattern="causal-self", mode="fwd", **kw):
    from attnkit.tools.bench import BenchRow
    return BenchRow(variant, "softmax", pattern, T, T, T, form if impl == "attnkit" else impl, mode, ms=ms,
                    ms_min=ms, ms_max=ms, n=3, samples=[ms] * 3, impl=impl, **kw)


def test_off_trend_cells_are_flagged():
    """The issue's case: a shorter length measured 27x slower than a longer one is flagged, neighbours are not."""
    from attnkit.tools.bench import _off_trend, pivot_tables
    rows = [_row("sliding_window", 128, 2.0), _row("sliding_window", 256, 79.9), _row("sliding_window", 512, 2.9),
            _row("sliding_window", 1024, 6.1)]
    assert [r.T for r in _off_trend(rows)] == [256]
    rows[1].flags.append("off-trend")
    text = str(pivot_tables(rows)[0].body)
    assert "79.9 [79.9-79.9]~" in text and "]~" not in text.replace("79.9 [79.9-79.9]~", "")


def test_efficiency_length_from_the_definition():
    """CAB: the length from which the variant beats the fastest plain-softmax implementation; log-log
    interpolation between the measured lengths around the crossing."""
    from attnkit.tools.bench import efficiency_lengths
    Ts = [256, 512, 1024]
    soft = [1.0, 4.0, 16.0]
    peer = [0.8, 5.0, 20.0]  # the fastest softmax at 256 is the peer
    var = [2.0, 4.5, 8.0]
    never = [3.0, 9.0, 30.0]
    always = [0.1, 0.2, 0.4]
    rows = [_row("softmax", T, m) for T, m in zip(Ts, soft)] + \
        [_row("softmax", T, m, impl="sdpa-math") for T, m in zip(Ts, peer)] + \
        [_row("x", T, m) for T, m in zip(Ts, var)] + [_row("slow", T, m) for T, m in zip(Ts, never)] + \
        [_row("fast", T, m) for T, m in zip(Ts, always)]
    eff = {e["variant"]: e for e in efficiency_lengths(rows)}
    assert "softmax" not in eff
    base = [min(a, b) for a, b in zip(soft, peer)]
    ra, rb = var[1] / base[1], var[2] / base[2]
    want = 512 * 2 ** (math.log(ra) / (math.log(ra) - math.log(rb)))
    assert eff["x"]["length"] == round(want) and eff["x"]["text"] == f"≈{round(want)}"
    assert eff["x"]["baseline"][256] == "sdpa-math" and eff["x"]["ratios"][256] == pytest.approx(2.0 / 0.8)
    assert eff["slow"]["length"] is None and eff["slow"]["text"] == ">1024"
    assert eff["fast"]["text"] == "≤256"


def test_list_fits_120_columns(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 120 for line in lines), max(lines, key=len)
    assert main(["list", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "paper" in wide and "Vaswani" in wide and max(len(x) for x in wide.splitlines()) > 120


def test_timing_spread_warmup_and_noise_flag():
    """measure(): at least min_rep samples, min <= median <= max; a burst of calls 10x slower is flagged noisy;
    warm-up runs until the call times stop falling; a slow call is sampled exactly min_rep times; the peak memory
    comes from a warm-up call."""
    import time as _time
    from attnkit.tools.timing import cpu_peak_supported, measure, time_ms, warm_up
    t = measure(lambda: _time.sleep(0.001), min_rep=7, min_time_s=0.0)
    assert t.n >= 7 and t.min <= t.q1 <= t.median <= t.q3 <= t.max and 0.9 < t.median < 20
    calls = {"n": 0}

    def spiky():  # a burst of load: calls 80-109 run 10x slower (warm-up ends within a few calls)
        calls["n"] += 1
        _time.sleep(0.01 if 80 <= calls["n"] < 110 else 0.001)
    s = measure(spiky, min_rep=15, min_time_s=0.5)
    assert calls["n"] >= 110 and "noisy" in s.flags and s.max > 2 * s.median and s.median < 3
    delays = iter([0.04, 0.03, 0.02, 0.012, 0.006] + [0.002] * 100)  # a cache warming up: each call faster

    def settling():
        _time.sleep(next(delays))
    n, stable, last = warm_up(settling, max_s=5.0)
    assert n >= 7 and stable and last < 10
    made = {"n": 0}

    def counted():
        made["n"] += 1
        _time.sleep(0.002)
    n, stable, _ = warm_up(counted, primed=True, max_s=5.0)  # the caller made the first call
    assert stable and made["n"] == n - 1 >= 2
    made["n"] = 0
    counted()  # the caller's first call (bench: the one recording what ran)
    slow = measure(lambda: counted() or _time.sleep(0.028), min_rep=5, min_time_s=0.0, primed=True, memory=True)
    assert slow.n == 5 and slow.per_sample == 1 and slow.median >= 30
    assert made["n"] == slow.warmup_calls + slow.n >= 2 + 5  # untimed: the caller's, the memory call, any warm-up
    assert isinstance(time_ms(lambda: None, rep=2), float)
    nbytes = 64 * 2 ** 20
    mem = measure(lambda: torch.ones(nbytes // 4).sum(), min_rep=2, min_time_s=0.0, memory=True)
    if cpu_peak_supported():
        assert 0.9 * nbytes <= mem.peak_bytes < 2 * nbytes, mem.peak_bytes
    else:
        assert mem.peak_bytes is None


def test_default_bench_variants_exist():
    from attnkit.tools.cli import DEFAULT_BENCH_VARIANTS
    for name in DEFAULT_BENCH_VARIANTS:
        registry.get_variant(name)


def test_readme_quickstart_runs():
    """The README's quickstart block is real code: run it (at a smaller T)."""
    text = (ROOT / "README.md").read_text()
    code = text.split("## Quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(code.replace("B, H, T, D = 2, 8, 1024, 64", "B, H, T, D = 1, 8, 96, 16"), "README", "exec"), {})


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--lengths", "abc"])
    with pytest.raises(SystemExit, match="unknown variant"):
        main(["bench", "--variants", "softmx"])


def test_get_variant_unknown_suggests():
    with pytest.raises(ValueError, match="did you mean softmax"):
        registry.get_variant("softmx")


def test_variant_is_callable_and_equals_its_pieces():
    q, k, v = (torch.randn(2, 4, 19, 8, dtype=torch.float64) for _ in range(3))
    got = registry.get_variant("alibi")(q, k, v, mask=masks.causal)
    want = attnkit.attention(q, k, v, mask=masks.causal, score_mod=scores.alibi())
    torch.testing.assert_close(got, want)
    sw = registry.get_variant("sliding_window")
    got = sw(q, k, v, mask=masks.causal)
    want = attnkit.attention(q, k, v, mask=masks.causal & masks.sliding_window(max(2, 19 // 4)))
    torch.testing.assert_close(got, want)


def test_streaming_memory_is_linear_in_T():
    """Causal T=16384, H=1, D=64 float32: materialized would need ≥ 1 GiB of scores; streaming stays small."""
    T = 16384
    q, k, v = (torch.randn(1, 1, T, 64) for _ in range(3))
    mem = peak_memory(lambda: attnkit.attention(q, k, v, mask=masks.causal, form="streaming"))
    if mem is None:
        pytest.skip("peak RSS cannot be measured on this OS")
    assert mem < 96 * 2 ** 20, f"streaming used {mem / 2 ** 20:.0f} MiB"


def test_inspect_subcommand_on_a_variant(tmp_path, capsys):
    """`attnkit inspect VARIANT` writes the maps (PNG) and a summary whose statistics follow their definitions: with
    the sink and the window spanning all T keys, both shares are 1 on a causal map; entropy within [0, log T]."""
    T = 16
    out = tmp_path / "insp"
    assert main(["inspect", "sliding_window", "--length", str(T), "--sink-tokens", str(T), "--window", str(T),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sliding_window" in text and "summary.json" in text
    s = json.loads((out / "summary.json").read_text())
    (row,) = s["layers"]
    assert row["sink"] == pytest.approx(1.0, abs=1e-5) and row["window"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < row["entropy"] <= math.log(T)
    assert s["files"] and all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in s["files"])
    with pytest.raises(SystemExit, match="neither a model"):
        main(["inspect", "no-such-variant", "--out", str(tmp_path / "x")])


def test_bench_budget_lists_what_was_not_run(tmp_path, capsys):
    """--budget: no measurement starts after it; every cell left gets a row saying so (here: all of them)."""
    out = tmp_path / "b.json"
    assert main(["bench", "--variants", "softmax", "--patterns", "causal-self", "--lengths", "32", "--rep", "1",
                 "--min-time", "0", "--peers", "sdpa-math", "--budget", "0", "--quiet", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"] + data["peers"]
    assert rows and all(r["status"] == "n/a" and r["note"] == "not run: --budget 0 s reached" for r in rows)
    assert {r["form"] for r in data["peers"]} == {"sdpa-math"}
    assert "not run: --budget 0 s reached" in capsys.readouterr().out
