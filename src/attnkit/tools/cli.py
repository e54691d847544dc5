"""``attnkit`` command line: ``list``, ``check`` and ``bench`` (the main job)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

import torch

from .. import catalog as registry
from ..catalog import PATTERNS

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: what ``attnkit bench`` runs with no options: about a minute on a 2-core CPU
DEFAULT_BENCH_VARIANTS = ["softmax", "sigmoid", "alibi", "sliding-window", "gated-deltanet"]
DEFAULT_BENCH_LENGTHS = [256, 512, 1024]


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


# -- list ---------------------------------------------------------------------------------------

def cmd_list(args) -> int:
    vs = registry.variants(args.family)
    if args.json:
        print(json.dumps([v.row() for v in vs], indent=1))
        return 0
    head = ["variant", "family", "what", "forms", "masks", "time", "memory", "cache / state",
            "decode memory (Hkv=8, D=128, bf16)", "paper"]
    body = [[v.name, v.family, v.summary, ", ".join(v.forms), v.masks, v.time, v.memory, v.cache,
             _cache_cell(v), v.paper] for v in vs]
    print(_table(head, body, args.markdown))
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
    for i, v in enumerate(vs):
        print(f"\r[{i + 1}/{len(vs)}] {v.name:<24}", end="", file=sys.stderr, flush=True)
        rows += check_variant(v, device=device, dtype=args.dtype, patterns=args.patterns, backends=backends)
    print(file=sys.stderr)
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

def _progress(n: int, total: int, what: str) -> None:
    width = 24
    done = int(width * n / max(total, 1))
    print(f"\r[{'#' * done}{'.' * (width - done)}] {n}/{total} {what[:60]:<60}", end="" if n < total else "\n",
          file=sys.stderr, flush=True)


def cmd_bench(args) -> int:
    from . import bench
    device = _device(args.device)
    names = args.variants or DEFAULT_BENCH_VARIANTS
    vs = _select(names)
    lengths = args.lengths or DEFAULT_BENCH_LENGTHS
    t0 = time.time()
    rows = bench.sweep(vs, args.patterns or list(PATTERNS), lengths, forms=args.forms, backend=args.backend,
                       device=device, dtype=args.dtype, B=args.batch, H=args.heads, Hkv=args.kv_heads, D=args.dim,
                       fwd_only=args.fwd_only, warmup=args.warmup, rep=args.rep,
                       measure_memory=not args.no_memory, max_recurrent_T=args.max_recurrent_T,
                       peers=args.peers, progress=None if args.quiet else _progress)
    env = bench.environment(device)
    config = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items() if k != "func"}
    out = args.out or f"bench-{env['gpu'] or 'cpu'}-{env['date']}.json".replace(" ", "_")
    bench.write_json(out, rows, env, config)
    print(f"attnkit bench: {env['gpu'] or env.get('cpu')} ({env['cpu_threads']} threads), torch {env['torch']}, "
          f"{str(args.dtype).replace('torch.', '')}, B={args.batch} H={args.heads} D={args.dim}; "
          f"cells: median ms after warm-up, TFLOP/s over computed pairs, peak extra memory")
    print(bench.format_table(rows, markdown=args.markdown))
    bad = [r for r in rows if r.status == "error"]
    for r in bad:
        print(f"error: {r.variant} {r.pattern} T={r.T} {r.form} {r.mode}: {r.note}")
    print(f"\nwrote {out} ({len(rows)} cells, {time.time() - t0:.0f}s)")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="attention variants: catalog, checks, benchmarks")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="the variant catalog")
    pl.add_argument("--markdown", action="store_true", help="markdown table (as in the README)")
    pl.add_argument("--json", action="store_true", help="JSON records")
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
    pb.add_argument("--warmup", type=int, default=1)
    pb.add_argument("--rep", type=int, default=3)
    pb.add_argument("--max-recurrent-T", type=int, default=512,
                    help="time token-by-token forms only up to this length (they are O(T) Python steps)")
    pb.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    pb.add_argument("--peers", action="store_true", help="also time SDPA / FlexAttention on the same inputs (CUDA)")
    pb.add_argument("--markdown", action="store_true")
    pb.add_argument("--quiet", action="store_true", help="no progress bar")
    pb.add_argument("--out", default=None, help="JSON path (default bench-<device>-<date>.json)")
    pb.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", "unset") is None:
        args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
