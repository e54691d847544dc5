"""``attnkit`` command line: ``list``, ``check``, ``bench`` (the main job), ``mqar``, ``report`` and ``inspect``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from .. import catalog as registry
from ..catalog import PATTERNS
from .inspect import add_parser as add_inspect_parser

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: what ``attnkit bench`` runs with no options: about a minute on a 2-core CPU
DEFAULT_BENCH_VARIANTS = ["softmax", "sliding_window", "sigmoid", "gated_delta"]
DEFAULT_BENCH_LENGTHS = [256, 1024]


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> List[int]:
    """'256,1k,4k' -> [256, 1024, 4096]."""
    try:
        out = [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 256,1k,4k), got {s!r}")
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 1, got {s!r}")
    return out


def _dtype(s: str) -> torch.dtype:
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES)}, got {s!r}")
    return DTYPES[s]


def _device(s: str) -> str:
    if s.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"attnkit: --device {s} asked for but CUDA is not available on this machine")
    return s


def _select(names: Optional[List[str]]) -> list:
    if not names:
        return registry.variants()
    try:
        return [registry.get_variant(n) for n in names]
    except ValueError as e:
        raise SystemExit(f"attnkit: {e}")


def _table(head: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(esc(x) for x in r) + " |" for r in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


# -- rendering ----------------------------------------------------------------------------------

#: the width tables must fit (a terminal narrower than this gets its own width)
WIDTH = 120


def _has_rich() -> bool:
    """rich draws tables and progress bars; without it the CLI prints the same content as plain text."""
    import importlib.util
    return importlib.util.find_spec("rich") is not None


def _console(width: Optional[int] = None, stderr: bool = False):
    """A rich Console on stdout (stderr): plain text without colours when not a terminal, ``width`` columns."""
    from rich.console import Console
    probe = Console(file=sys.stderr if stderr else sys.stdout)
    w = width or (min(WIDTH, probe.width) if probe.is_terminal else WIDTH)
    return Console(file=sys.stderr if stderr else sys.stdout, width=w, highlight=False, soft_wrap=False)


def _render(tables, markdown: bool = False, width: Optional[int] = None, wrap: Sequence[str] = ()) -> None:
    """Print :class:`attnkit.tools.bench.Table` objects: rich tables within ``width`` columns, or markdown.
    Columns named in ``wrap`` wrap their text; the others stay on one line (ellipsized if they must)."""
    if markdown:
        for t in tables:
            print(f"\n**{t.title}**\n" if t.title else "")
            print(_table(t.head, t.body, True))
            for n in t.notes:
                print(f"- {n}")
        return
    if not _has_rich():
        for t in tables:
            print("\n".join(([t.title] if t.title else []) + [_table(t.head, t.body, False)] + list(t.notes)))
        return
    from rich import box
    from rich.table import Table as RichTable
    console = _console(width)
    for t in tables:
        rt = RichTable(title=t.title or None, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                       pad_edge=False, collapse_padding=True)
        for h in t.head:
            rt.add_column(h, no_wrap=h not in wrap, overflow="fold" if h in wrap else "ellipsis")
        for r in t.body:
            rt.add_row(*(str(x) for x in r))
        console.print(rt)
        for n in t.notes:
            console.print(n, overflow="fold", markup=False)


def _print_lines(lines: Sequence[str], width: Optional[int] = None) -> None:
    if not _has_rich():
        print("\n".join(lines))
        return
    console = _console(width)
    for line in lines:
        console.print(line, overflow="fold", markup=False)


# -- list ---------------------------------------------------------------------------------------

def cmd_list(args) -> int:
    from .bench import Table
    vs = registry.variants(args.family)
    if args.json:
        print(json.dumps([v.row() for v in vs], indent=1))
        return 0
    if args.markdown or args.wide:
        head = ["variant", "family", "what", "forms", "masks", "time", "memory", "cache / state",
                "decode memory (Hkv=8, D=128, bf16)", "paper"]
        body = [[v.name, v.family, v.summary, ", ".join(v.forms), v.masks, v.time, v.memory, v.cache,
                 _cache_cell(v), v.paper] for v in vs]
        if args.markdown:
            print(_table(head, body, True))
        else:
            _render([Table("", head, body)], width=10 ** 4)
        return 0
    families = list(dict.fromkeys(v.family for v in vs))
    _render([Table(f"{fam} family", ["variant", "forms", "decode memory", "what"],
                   [[v.name, "/".join(v.forms), _cache_cell(v), v.summary] for v in vs if v.family == fam])
             for fam in families], wrap=("what",))
    print(f"{len(vs)} variants; decode memory: KV cache per token or state per head at Hkv=8, D=128, bf16; "
          "--wide: all")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _cache_cell(v) -> str:
    c = v.cache_at_reference()
    parts = []
    if c["kv_bytes_per_token"]:
        parts.append(f"{_bytes(c['kv_bytes_per_token'])}/token")
    if c["state_bytes_per_head"]:
        parts.append(f"{_bytes(c['state_bytes_per_head'])}/head")
    return " + ".join(parts) or "-"


# -- check --------------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from .check import check_variant
    device = _device(args.device)
    vs = _select(args.variants)
    backends = ["reference"] + (["triton"] if args.triton else [])
    if args.seed is not None:
        torch.manual_seed(args.seed)
    rows, t0 = [], time.time()
    progress = Progress("check")
    for i, v in enumerate(vs):
        progress(i, len(vs), v.name)
        rows += check_variant(v, device=device, dtype=args.dtype, patterns=args.patterns, backends=backends)
    progress(len(vs), len(vs), "done")
    shown = rows if args.all else [r for r in rows if r.status != "pass" or r.dtype != "float64"]
    fmt = lambda e: "-" if e is None else f"{e:.1e}"  # noqa: E731
    body = [[r.variant, r.pattern, r.form, r.backend, r.dtype, fmt(r.out_err), fmt(r.grad_err), f"{r.tol:.0e}",
             r.status, r.note] for r in shown]
    print(_table(["variant", "pattern", "form", "backend", "dtype", "out err", "grad err", "tol", "status", "note"],
                 body, False))
    n_fail = sum(r.status == "FAIL" for r in rows)
    n_pass = sum(r.status == "pass" for r in rows)
    print(f"\n{n_pass} passed, {n_fail} failed, {sum(r.status == 'n/a' for r in rows)} not applicable "
          f"({len(vs)} variants, device {device}, {time.time() - t0:.1f}s; errors are ‖x−ref‖/‖ref‖ vs float64)")
    return 1 if n_fail else 0


# -- bench --------------------------------------------------------------------------------------

class Progress:
    """``progress(n, total, what)`` for :func:`attnkit.tools.bench.sweep`: a live rich bar on a terminal (stderr),
    plain lines otherwise (a log stays line by line): one per item ``n``, at most one per :attr:`EVERY_S` within
    an item."""

    EVERY_S = 10.0

    def __init__(self, label: str = "bench", quiet: bool = False):
        self.quiet, self.label, self.t0 = quiet, label, time.time()
        self.bar, self.last = None, (None, 0.0)
        if not quiet and _has_rich() and sys.stderr.isatty():
            from rich.console import Console
            self.console = Console(file=sys.stderr)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=self.console, transient=True)
            self.task = None

    def __call__(self, n: int, total: int, what: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            now = time.time()
            if n != self.last[0] or now - self.last[1] >= self.EVERY_S:
                self.last = (n, now)
                print(f"[{self.label} {min(n + 1, total)}/{total} {now - self.t0:.0f}s] {what}", file=sys.stderr,
                      flush=True)
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, completed=n, description=f"{what[:60]:<60}")
        if n >= total:
            self.bar.stop()


def _parse_peers(args, device: str):
    """``(peer names, flex_everywhere)`` from --peers / --no-peers."""
    from .bench import PEERS, peer_names
    if args.no_peers:
        return [], True
    if args.peers is None:
        return True, None
    if args.peers == "all":
        return peer_names(device), True
    names = _csv(args.peers)
    known = [p.name for p in PEERS]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"attnkit: unknown peers {bad}; known: {', '.join(known)}")
    return names, True


def cmd_bench(args) -> int:
    from . import bench
    device = _device(args.device)
    names = args.variants or DEFAULT_BENCH_VARIANTS
    vs = _select(names)
    lengths = args.lengths or DEFAULT_BENCH_LENGTHS
    peers, flex_everywhere = _parse_peers(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    env = bench.environment(device)  # load average before the run
    rows = bench.sweep(vs, args.patterns or list(PATTERNS), lengths, forms=args.forms, backend=args.backend,
                       device=device, dtype=args.dtype, B=args.batch, H=args.heads, Hkv=args.kv_heads, D=args.dim,
                       fwd_only=args.fwd_only, warmup=args.warmup, rep=args.rep, min_time_s=args.min_time,
                       measure_memory=not args.no_memory, max_recurrent_T=args.max_recurrent_T,
                       peers=peers, flex_everywhere=flex_everywhere, budget_s=args.budget,
                       progress=Progress("bench", args.quiet))
    env["wall_s"] = round(time.time() - t0, 1)
    config = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items() if k != "func"}
    peers = bench.peer_names(device) if peers is True else peers
    config.update(variants=[v.name for v in vs], lengths=list(lengths), peers=peers)
    out = args.out or f"bench-{env['gpu'] or 'cpu'}-{env['date']}.json".replace(" ", "_")
    eff = bench.efficiency_lengths(rows)
    bench.write_json(out, rows, env, config, eff)
    dt = str(args.dtype).replace("torch.", "")
    load = f", load {env['load_avg'][0]:.1f}" if env.get("load_avg") else ""
    if env.get("load_avg") and env["load_avg"][0] > (env.get("cpu_count") or 1) and env["cpu_threads"] > 1:
        _print_lines([f"warning: load {env['load_avg'][0]:.1f} on {env['cpu_count']} cores: other jobs share this "
                      f"CPU and multi-threaded timings can be many times too slow; try --threads 1"])
    _print_lines([f"attnkit bench: {env['gpu'] or env.get('cpu')} ({env['cpu_threads']} threads{load}), "
                  f"torch {env['torch']}, {dt}, B={args.batch} H={args.heads} D={args.dim}, backend {args.backend}; "
                  f"peers: {', '.join(peers) or 'none'}"])
    if args.wide:
        _render([bench.wide_table(rows)], args.markdown, width=10 ** 4)
    else:
        _render(bench.pivot_tables(rows, WIDTH), args.markdown)
    eff_table = bench.efficiency_table(eff)
    if eff_table is not None:
        _render([eff_table], args.markdown)
    _print_lines(bench.notes(rows))
    bad = [r for r in rows if r.status == "error" and r.impl == "attnkit"]
    print()
    _print_lines([f"wrote {out} ({len(rows)} rows, {time.time() - t0:.0f}s)",
                  f"plots: attnkit report {out} -o report.html"])
    return 1 if bad else 0


# -- mqar ---------------------------------------------------------------------------------------

def _grid(s: str):
    """'64x4,128x8' -> ((64, 4), (128, 8))."""
    try:
        out = tuple(tuple(int(x) for x in c.lower().split("x")) for c in _csv(s))
    except ValueError:
        out = ()
    if not out or any(len(c) != 2 for c in out):
        raise argparse.ArgumentTypeError(f"expected sequence-length x pairs cells such as 64x4,128x8, got {s!r}")
    return out


def _floats(s: str):
    try:
        return tuple(float(x) for x in _csv(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")


def cmd_mqar(args) -> int:
    from dataclasses import replace
    from . import mqar
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    c = mqar.CONFIGS["smoke" if args.smoke else args.config]
    over = {k: getattr(args, k) for k in ("variants", "d_models", "lrs", "feature_dims", "steps", "batch",
                                           "train_grid", "test_grid", "n_test", "seed", "backend")
            if getattr(args, k) is not None}
    if "variants" in over:
        over["variants"] = tuple(over["variants"])
    if "d_models" in over:
        over["d_models"] = tuple(over["d_models"])
    try:
        c = replace(c, **over)  # the variant names resolved to the catalog's (mqar.model_name)
    except ValueError as e:
        raise SystemExit(f"attnkit: {e}")
    out = args.out or ("mqar-smoke.jsonl" if args.smoke else f"mqar-{args.config}.jsonl")
    t0 = time.time()
    cells = mqar.run(c, out, device=device, budget_s=args.budget, log=lambda m: print(m, file=sys.stderr),
                     progress=Progress("mqar", args.quiet))
    summary = mqar.summarize(cells)
    tests = [f"{T}x{n}" for T, n in c.test_grid]
    body = [[s["variant"], s["d_model"], s.get("feature_dim") or "", mqar._fmt_bytes(s["state_bytes"]), f"{s['lr']:g}",
             f"{s['accuracy']:.3f}", *(f"{s['by_test'].get(t, float('nan')):.2f}" for t in tests)] for s in summary]
    from .bench import Table
    _render([Table("MQAR accuracy", ["model", "d", "f", "state", "lr", "acc", *tests], body,
                   ["MQAR: best learning rate per model; acc: mean over the test cells (T x pairs columns); "
                    "state: bytes kept to decode after the longest test sequence; f: feature dim of Based's map"])],
            args.markdown)
    bad = [r for r in cells if r.get("status") != "ok"]
    _print_lines([f"{'reproduced' if held else 'not reproduced' if held is False else 'not testable'}: {claim}"
                  + (f" ({detail})" if detail else "") for claim, held, detail in mqar.check_orderings(summary)]
                 + [f"{r.get('status')}: {r.get('variant')} d={r.get('d_model')} lr={r.get('lr')}: {r.get('note')}"
                    for r in bad])
    if args.plot:
        from .plots import mqar_accuracy
        plot = mqar_accuracy(summary)
        if plot is not None:
            with open(args.plot, "wb") as f:
                f.write(plot.png)
    print()
    _print_lines([f"wrote {out} ({len(cells)} cells, {time.time() - t0:.0f}s)",
                  f"report: attnkit report {out} -o report.html"])
    return 1 if bad else 0


# -- report -------------------------------------------------------------------------------------

def cmd_report(args) -> int:
    from . import report
    try:
        rep = report.write(args.results, args.out, args.decode or ())
    except (ValueError, OSError) as e:
        raise SystemExit(f"attnkit report: {e}")
    if args.png_dir:
        import re
        os.makedirs(args.png_dir, exist_ok=True)
        for p in rep.plots:
            name = re.sub(r"[^a-z0-9]+", "-", p.title.lower()).strip("-")
            with open(os.path.join(args.png_dir, f"{args.png_prefix}{name}.png"), "wb") as f:
                f.write(p.png)
    print(f"wrote {args.out} ({len(rep.plots)} plots, {len(rep.html) / 2 ** 20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="attention variants: catalog, checks, benchmarks")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="the variant catalog")
    pl.add_argument("--markdown", action="store_true", help="markdown table (as in the README)")
    pl.add_argument("--json", action="store_true", help="JSON records")
    pl.add_argument("--wide", action="store_true", help="every column (masks, costs, papers)")
    pl.add_argument("--family", default=None, help="only this family (softmax, linear)")
    pl.set_defaults(func=cmd_list)

    pc = sub.add_parser("check", help="cross-form checks against the float64 reference, with gradients")
    pc.add_argument("variants", nargs="*", help="variant names (default: all)")
    pc.add_argument("--device", default="cpu", type=str)
    pc.add_argument("--dtype", default=torch.float32, type=_dtype, help="low-precision dtype checked besides float64")
    pc.add_argument("--patterns", type=_csv, default=None, help=f"subset of {','.join(PATTERNS)}")
    pc.add_argument("--triton", action="store_true", help="also check the fused Triton backend")
    pc.add_argument("--seed", type=int, default=None, help="seed (default: fresh random inputs)")
    pc.add_argument("--all", action="store_true", help="also list the float64 rows")
    pc.set_defaults(func=cmd_check)

    pb = sub.add_parser("bench", help="CAB-style sweep: time, TFLOP/s and memory per pattern and length")
    pb.add_argument("--variants", type=_csv, default=None,
                    help=f"comma-separated (default: {','.join(DEFAULT_BENCH_VARIANTS)})")
    pb.add_argument("--patterns", type=_csv, default=None, help=f"subset of {','.join(PATTERNS)}")
    pb.add_argument("--lengths", type=_ints, default=None,
                    help=f"sequence lengths, e.g. 1k,4k (default {','.join(map(str, DEFAULT_BENCH_LENGTHS))})")
    pb.add_argument("--forms", type=_csv, default=None, help="forms to time (default: every form of the variant)")
    pb.add_argument("--backend", default="reference", help="reference, triton or auto")
    pb.add_argument("--device", default="cpu", type=str)
    pb.add_argument("--dtype", default=None, type=_dtype, help="default float32 on CPU, bfloat16 on CUDA")
    pb.add_argument("--batch", type=int, default=1)
    pb.add_argument("--heads", type=int, default=4)
    pb.add_argument("--kv-heads", type=int, default=None)
    pb.add_argument("--dim", type=int, default=64)
    pb.add_argument("--fwd-only", action="store_true", help="forward only (default: forward and forward+backward)")
    pb.add_argument("--warmup", type=int, default=2,
                    help="at least this many warm-up calls; warm-up continues until call times settle")
    pb.add_argument("--rep", type=int, default=5, help="at least this many timed samples per cell")
    pb.add_argument("--min-time", type=float, default=0.05, help="sample each cell for at least this many seconds")
    pb.add_argument("--max-recurrent-T", type=int, default=128,
                    help="time token-by-token forms only up to this length (they are O(T) Python steps)")
    pb.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    pb.add_argument("--budget", type=float, default=None,
                    help="seconds: start no measurement after this; the cells left are listed as not run")
    pb.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's choice; 1 on a machine shared with other jobs)")
    pb.add_argument("--peers", nargs="?", const="all", default=None,
                    help="peers timed on the same inputs: a list, or 'all' (default: the device's peers: CPU sdpa-flash, "
                         "sdpa-math, flex where SDPA cannot, fla; CUDA sdpa-cudnn/flash/efficient, flex, flash-attn, "
                         "flashinfer, fla)")
    pb.add_argument("--no-peers", action="store_true", help="time attnkit only")
    pb.add_argument("--wide", action="store_true", help="every row with every column (min/q1/q3/max, TF/s, MiB, ...)")
    pb.add_argument("--markdown", action="store_true")
    pb.add_argument("--quiet", action="store_true", help="no progress bar")
    pb.add_argument("--out", default=None, help="JSON path (default bench-<device>-<date>.json)")
    pb.set_defaults(func=cmd_bench)

    pm = sub.add_parser("mqar", help="multi-query associative recall (Zoology) on 2-layer attnkit models")
    pm.add_argument("--smoke", action="store_true", help="the CI configuration (CPU, under a minute)")
    pm.add_argument("--config", default="default", choices=["smoke", "default", "gpu"],
                    help="preset grid (gpu: what benchmarks/mqar_gpu.py runs)")
    pm.add_argument("--variants", type=_csv, default=None,
                    help="models: catalog variants, a+b for a hybrid (layer 0 a, layer 1 b)")
    pm.add_argument("--d-models", type=_ints, default=None)
    pm.add_argument("--lrs", type=_floats, default=None, help="learning rates swept per model")
    pm.add_argument("--feature-dims", type=lambda s: tuple(_ints(s)), default=None,
                    help="key features per head of expanding feature maps (Based's taylor2)")
    pm.add_argument("--steps", type=int, default=None)
    pm.add_argument("--batch", type=int, default=None)
    pm.add_argument("--train-grid", type=_grid, default=None, help="e.g. 64x4,128x8,256x16,512x64")
    pm.add_argument("--test-grid", type=_grid, default=None, help="e.g. 64x4,...,1024x256")
    pm.add_argument("--n-test", type=int, default=None, help="test sequences per test cell")
    pm.add_argument("--seed", type=int, default=None, help="run seed (default: the file's, else fresh, printed)")
    pm.add_argument("--backend", default=None, help="attnkit backend of the softmax layers (auto, reference)")
    pm.add_argument("--device", default="cpu")
    pm.add_argument("--threads", type=int, default=None)
    pm.add_argument("--budget", type=float, default=None, help="seconds: start no cell that would pass this")
    pm.add_argument("--out", default=None, help="results file (JSON lines; a rerun extends it)")
    pm.add_argument("--plot", default=None, help="also write the accuracy-vs-state PNG here")
    pm.add_argument("--markdown", action="store_true")
    pm.add_argument("--quiet", action="store_true")
    pm.set_defaults(func=cmd_mqar)

    pr = sub.add_parser("report", help="one HTML file with plots from bench / mqar / decode results")
    pr.add_argument("results", nargs="+", help="results files (bench JSON, mqar JSONL, decode JSON)")
    pr.add_argument("-o", "--out", default="report.html")
    pr.add_argument("--decode", action="append", default=None, help="a decode results file (ms and GB/s per cell)")
    pr.add_argument("--png-dir", default=None, help="also write every plot as a PNG into this folder")
    pr.add_argument("--png-prefix", default="", help="file name prefix of those PNGs")
    pr.set_defaults(func=cmd_report)

    add_inspect_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.dtype is None:
        args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
