"""The issue-4 grid on one GPU: attnkit's Triton kernels against SDPA (cuDNN / flash / efficient) and
FlexAttention (compiled once per shape) on the same inputs.

    python benchmarks/softmax_gpu.py --out benchmarks/results            # whole grid
    python benchmarks/softmax_gpu.py --D 128 --T 16384 --patterns causal  # a slice
    python benchmarks/softmax_gpu.py --table benchmarks/results/<file>.json  # markdown from a JSON

bf16, H = 16, B·T = 16384, forward and forward+backward. TFLOP/s count only visible (query, key)
pairs: ``2·pairs·(D + Dv)`` forward, 3.5× that forward+backward. Every cell is timed with
:func:`attnkit.tools.bench.time_ms` (synchronized, median) and, forward+backward, its peak extra memory
with :func:`attnkit.tools.bench.peak_memory`; the output of each impl is compared with attnkit's Triton
output (relative error) so a fast wrong peer or kernel shows. Results are written after every
cell (JSON), so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List

import torch

from attnkit import masks as M
from attnkit import scores as S
from attnkit.tools.bench import environment
from attnkit.tools.timing import peak_memory, time_ms

PATTERNS = ["full", "causal", "sliding_window_1024", "causal_softcap30", "causal_alibi", "document8_causal",
            "prefix_lm_quarter", "cross_full", "cross_causal"]


def pattern(name: str, T: int):
    """(Lq, Lk, mask, score_mod) of a grid pattern at length T."""
    if name == "full":
        return T, T, M.full, None
    if name == "causal":
        return T, T, M.causal, None
    if name == "sliding_window_1024":
        return T, T, M.sliding_window(1024), None
    if name == "causal_softcap30":
        return T, T, M.causal, S.softcap(30.0)
    if name == "causal_alibi":
        return T, T, M.causal, S.alibi()
    if name == "document8_causal":
        return T, T, M.document(cu_seqlens=torch.arange(0, T + 1, T // 8)) & M.causal, None
    if name == "prefix_lm_quarter":
        return T, T, M.prefix_lm(T // 4), None
    if name == "cross_full":
        return T // 4, T, M.full, None
    if name == "cross_causal":
        return T // 4, T, M.causal, None
    raise KeyError(name)


_mask_cache: Dict = {}


def cached_pattern(name: str, T: int):
    """One mask object per (pattern, T): attnkit caches block maps on it, as a model reusing its mask would."""
    if (name, T) not in _mask_cache:
        _mask_cache[(name, T)] = pattern(name, T)
    return _mask_cache[(name, T)]


def visible_pairs(mask, B, H, Lq, Lk, device) -> int:
    c = mask.row_counts(B, H, Lq, Lk, device=device)
    return int(c.sum()) * (B // c.shape[0]) * (H // c.shape[1])


def make_steps(fn: Callable[[], torch.Tensor], inputs: List[torch.Tensor]):
    """(forward step, forward+backward step) of a zero-argument attention callable."""
    holder = {}

    def fwd():
        with torch.no_grad():
            return fn()

    def fwd_bwd():
        out = fn()
        g = holder.get("g")
        if g is None or g.shape != out.shape:
            g = holder["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, g)
    return fwd, fwd_bwd


def warm(step, seconds: float) -> None:
    """Run ``step`` for about ``seconds`` before timing: after a compile pause the GPU clocks are low and
    a few warm-up calls of a sub-millisecond cell are not enough to bring them back."""
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        step()
        torch.cuda.synchronize()


def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def profile(fn, inputs, what: str) -> None:
    """Kernel times of one warm forward+backward (host gaps show as wall time above the kernel sum)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    _, fwd_bwd = make_steps(fn, inputs)
    fwd_bwd()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            fwd_bwd()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    print(f"--- profile {what}: {wall:.3f} ms wall per fwd+bwd (profiled)", flush=True)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run(args) -> None:
    import faulthandler
    faulthandler.enable()
    if args.stack_every_s > 0:  # where a stuck cell is stuck (once seen to crash inside a compile)
        faulthandler.dump_traceback_later(args.stack_every_s, repeat=True)
    import attnkit
    from attnkit.ops.utils import tuning
    from attnkit.tools.peers import peers
    dev = torch.device("cuda")
    env = environment(dev)
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version()
    if args.autotune:
        tuning.enable(True)
    if args.fwd_config:
        force_fwd_config(args.fwd_config)
    gpu = env["gpu"].replace(" ", "-")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{gpu}-{env['date']}{args.suffix}")
    rows: List[dict] = []
    t_start = time.time()
    config = {"dtype": "bfloat16", "H": args.H, "tokens": args.tokens, "D": args.D, "T": args.T,
              "patterns": args.patterns, "flex_T": args.flex_T, "flex_patterns": args.flex_patterns,
              "fwd_config": args.fwd_config, "warmup": args.warmup, "rep": args.rep,
              "autotune": args.autotune, "flops": "2*pairs*(D+Dv) fwd, x3.5 fwd+bwd; pairs = visible pairs"}

    def save():
        with open(stem + ".json", "w") as f:
            json.dump({"environment": env, "config": config, "rows": rows}, f, indent=1)

    dtype = torch.bfloat16
    for D in args.D:
        for T in args.T:
            B = max(1, args.tokens // T)
            for pat in args.patterns:
                if time.time() - t_start > args.budget_s:
                    print(f"budget of {args.budget_s}s reached; stopping", flush=True)
                    save()
                    return
                Lq, Lk, mask, score_mod = cached_pattern(pat, T)
                H = args.H
                torch.manual_seed(0)
                q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, requires_grad=True)
                k = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
                v = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
                pairs = visible_pairs(mask, B, H, Lq, Lk, dev)
                flops = 2.0 * pairs * (D + D)
                impls: Dict[str, Callable[[], torch.Tensor]] = {
                    "triton": lambda: attnkit.attention(q, k, v, mask=mask, score_mod=score_mod, backend="triton")}
                with torch.no_grad():
                    ref_out = impls["triton"]()
                if args.profile:
                    profile(impls["triton"], [q, k, v], f"D={D} T={T} {pat}")

                def with_peers():  # built after attnkit's cells are timed, so a failing peer costs nothing
                    yield "triton", impls["triton"]
                    try:
                        pe = peers(q, k, v, mask=mask, score_mod=score_mod, normalizer="softmax", scale=None)
                    except Exception as e:  # noqa: BLE001 - report, never hide
                        pe = {}
                        print(f"peers failed for {pat} T={T} D={D}: {type(e).__name__}: {e}", flush=True)
                    if (args.flex_T and T not in args.flex_T) or (args.flex_patterns and pat not in args.flex_patterns):
                        pe.pop("flex", None)
                    for name in args.peers:
                        if name in pe:
                            yield name, pe[name]

                for name, fn in with_peers():
                    fwd, fwd_bwd = make_steps(fn, [q, k, v])
                    t0 = time.time()
                    for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                        if mode not in args.modes:
                            continue
                        row = dict(D=D, pattern=pat, T=T, B=B, H=H, Lq=Lq, Lk=Lk, mode=mode, impl=name,
                                   pairs=pairs, ms=None, tflops=None, mem_mib=None, status="ok", note="")
                        try:
                            warm(step, args.warm_s)
                            ms = time_ms(step, dev, warmup=args.warmup, rep=args.rep)
                            row["ms"] = ms
                            row["tflops"] = flops * (3.5 if mode == "fwd+bwd" else 1.0) / (ms * 1e-3) / 1e12
                            if mode == "fwd":
                                with torch.no_grad():
                                    row["rel_vs_triton"] = rel_err(fn(), ref_out)
                            if mode == "fwd+bwd" and args.memory:
                                row["mem_mib"] = peak_memory(step, dev) / 2 ** 20
                        except Exception as e:  # noqa: BLE001 - report, never hide
                            row["status"] = "error"
                            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                            torch.cuda.empty_cache()
                        rows.append(row)
                        print(f"[{time.time() - t_start:6.0f}s] D={D} T={T} {pat:20s} {mode:7s} {name:15s} "
                              f"{_f(row['ms'], '8.3f')} ms {_f(row['tflops'], '5.0f')} TF/s "
                              f"{_f(row['mem_mib'], '6.0f')} MiB {row['status']} {row['note'][:80]} "
                              f"(+{time.time() - t0:.0f}s)", flush=True)
                    save()
                del q, k, v, impls, ref_out, fn
                torch.cuda.empty_cache()
    save()
    with open(stem + ".md", "w") as f:
        f.write(markdown({"environment": env, "config": config, "rows": rows}))
    print(markdown({"environment": env, "config": config, "rows": rows}))


def table(path: str, markdown: Callable[[dict], str]) -> str:
    """The markdown of a results JSON, also written next to it (``.md``)."""
    with open(path) as f:
        md = markdown(json.load(f))
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md)
    return md


def force_fwd_config(spec: str) -> None:
    """Run every forward with the configuration ``BM,BN,warps,stages`` (an A/B of tile shapes)."""
    from attnkit.ops.utils import tuning
    cfg = tuning.Config(*(int(x) for x in spec.split(",")))
    base = tuning.defaults

    def forced(phase, *args):
        return cfg if phase == "fwd" else base(phase, *args)
    tuning.defaults = forced


def host_overhead(args) -> None:
    """Host time per call where the GPU work is small (B = H = 1, T = 128, D = 64): the time to enqueue 100
    back-to-back calls (no synchronize in between; an idle GPU runs its tiny kernels at low clocks, so the time
    until the synchronize returns is reported too), median over 5 rounds; and whether one call synchronizes
    the device (torch's sync debug mode set to raise). ``triton-python``: attnkit with its kernel launches left
    out (the host time of its Python alone)."""
    import attnkit
    from attnkit.ops.softmax import fused as A
    from attnkit.tools.peers import peers
    dev = torch.device("cuda")
    rows = []
    for pat in ("causal", "causal_alibi", "causal_softcap30", "document8_causal", "sliding_window_1024"):
        Lq, Lk, mask, score_mod = pattern(pat, 128 if pat != "sliding_window_1024" else 256)
        q, k, v = (torch.randn(1, 1, L, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for L in (Lq, Lk, Lk))
        ours = lambda: attnkit.attention(q, k, v, mask=mask, score_mod=score_mod, backend="triton")  # noqa: E731
        impls = {"triton": ours, "triton-python": ours}  # the latter with the kernel launches left out
        pe = peers(q, k, v, mask=mask, score_mod=score_mod, normalizer="softmax", scale=None)
        impls.update({n: pe[n] for n in ("sdpa-cudnn", "sdpa-flash", "flex") if n in pe})
        for name, fn in impls.items():
            launch = A.Phase.launch
            if name == "triton-python":
                A.Phase.launch = lambda self, sig, args: None
            try:
                for mode, step in zip(("fwd", "fwd+bwd"), make_steps(fn, [q, k, v])):
                    for _ in range(20):
                        step()
                    torch.cuda.synchronize()
                    syncs = "no"
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        step()
                    except RuntimeError as e:
                        syncs = f"yes: {str(e).splitlines()[0][:120]}"
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize()
                    host, total = [], []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        for _ in range(100):
                            step()
                        t1 = time.perf_counter()
                        torch.cuda.synchronize()
                        host.append((t1 - t0) / 100 * 1e6)
                        total.append((time.perf_counter() - t0) / 100 * 1e6)
                    us, tot = sorted(host)[2], sorted(total)[2]
                    rows.append(dict(pattern=pat, impl=name, mode=mode, host_us_per_call=us, total_us_per_call=tot,
                                     syncs=syncs))
                    print(f"host {pat:20s} {name:12s} {mode:8s} {us:8.1f} us/call on the host (enqueue), "
                          f"{tot:8.1f} with the GPU; device sync in call: {syncs}", flush=True)
            finally:
                A.Phase.launch = launch
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"host-overhead{args.suffix}.json"), "w") as f:
        json.dump({"environment": environment(dev), "rows": rows}, f, indent=1)


def merge_rows(paths: List[str], fields: tuple):
    """``(last file's data, rows)`` of result JSONs of one session, one row per value of ``fields``: a later file's
    row replaces an earlier one, except that a failed row never replaces an ok one."""
    merged: Dict[tuple, dict] = {}
    data = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data["rows"]:
            key = tuple(r[k] for k in fields)
            if r["status"] == "ok" or key not in merged or merged[key]["status"] != "ok":
                merged[key] = r
    return data, list(merged.values())


def markdown(data: dict) -> str:
    """Summary tables: per (D, mode, pattern) and T, attnkit-triton TF/s and its ratio to the best peer
    and to FlexAttention (ratio = peer ms / triton ms, > 1 means attnkit is faster)."""
    env, rows = data["environment"], [r for r in data["rows"] if r["status"] == "ok"]
    lines = [f"# softmax-family kernels: {env.get('gpu')} ({env.get('date')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
             f"bf16, H = {data['config']['H']}, B·T = {data['config']['tokens']}; TFLOP/s over visible pairs only "
             "(fwd 2·pairs·(D+Dv), fwd+bwd 3.5×). Cells: attnkit-triton TF/s, then ×best peer (its name) and "
             "×flex; ratio = peer ms / attnkit ms.", ""]
    cell = {(r["D"], r["mode"], r["pattern"], r["T"], r["impl"]): r for r in rows}
    Ts = sorted({r["T"] for r in rows})
    for D in sorted({r["D"] for r in rows}, reverse=True):
        for mode in ("fwd", "fwd+bwd"):
            pats = [p for p in PATTERNS if any((D, mode, p, T, "triton") in cell for T in Ts)]
            if not pats:
                continue
            lines += [f"## D = {D}, {mode}", "", "| pattern | " + " | ".join(f"T={T}" for T in Ts) + " |",
                      "|---|" + "---|" * len(Ts)]
            for p in pats:
                out = []
                for T in Ts:
                    tr = cell.get((D, mode, p, T, "triton"))
                    if tr is None:
                        out.append("")
                        continue
                    peers_ = [r for (d, m, pp, t, name), r in cell.items()
                              if (d, m, pp, t) == (D, mode, p, T) and name != "triton"]
                    s = f"{tr['tflops']:.0f}"
                    if peers_:
                        best = min(peers_, key=lambda r: r["ms"])
                        s += f" (×{best['ms'] / tr['ms']:.2f} {best['impl']})"
                    fl = cell.get((D, mode, p, T, "flex"))
                    if fl is not None and (not peers_ or fl is not min(peers_, key=lambda r: r["ms"])):
                        s += f" ×{fl['ms'] / tr['ms']:.2f} flex"
                    out.append(s)
                lines.append(f"| {p} | " + " | ".join(out) + " |")
            lines.append("")
    lines += ["## every cell", "", "| D | pattern | T | mode | impl | ms | TF/s | peak MiB | rel. diff vs triton |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        bad = "" if r["status"] == "ok" else f" {r['status']}: {r['note']}"
        lines.append(f"| {r['D']} | {r['pattern']} | {r['T']} | {r['mode']} | {r['impl']} | {_f(r['ms'], '.3f')} | "
                     f"{_f(r['tflops'], '.0f')} | {_f(r.get('mem_mib'), '.0f')} | "
                     f"{_f(r.get('rel_vs_triton'), '.1e')}{bad} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--suffix", default="")
    p.add_argument("--D", type=int, nargs="+", default=[128, 64])
    p.add_argument("--T", type=int, nargs="+", default=[16384, 8192, 4096, 2048, 1024])
    p.add_argument("--flex-T", type=int, nargs="*", default=None, help="lengths at which to time Flex (default all)")
    p.add_argument("--flex-patterns", nargs="*", default=None, help="patterns at which to time Flex (default all)")
    p.add_argument("--fwd-config", default=None, help="force the forward configuration BM,BN,warps,stages")
    p.add_argument("--host", action="store_true", help="measure the host time per call (tiny shapes) and exit")
    p.add_argument("--patterns", nargs="+", default=PATTERNS)
    p.add_argument("--peers", nargs="+", default=["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--warm-s", type=float, default=0.3, help="run each step this long before timing it")
    p.add_argument("--memory", action="store_true", default=True)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop (results saved) after this many seconds")
    p.add_argument("--stack-every-s", type=float, default=0.0, help="dump all stacks this often (0: never)")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels of one attnkit fwd+bwd per cell")
    p.add_argument("--table", help="print the markdown of an existing JSON and exit")
    p.add_argument("--merge", nargs="+", help="merge JSONs of one session (later files replace equal cells) into "
                   "OUT/<gpu>-<date>SUFFIX.json and .md, then exit")
    args = p.parse_args(argv)
    if args.host:
        host_overhead(args)
        return
    if args.merge:
        data, rows = merge_rows(args.merge, ("D", "pattern", "T", "mode", "impl"))
        data["rows"] = sorted(rows, key=lambda r: (-r["D"], -r["T"], PATTERNS.index(r["pattern"]), r["mode"],
                                                   r["impl"] != "triton", r["impl"]))
        data["config"]["merged_from"] = [os.path.basename(p) for p in args.merge]
        data["config"]["T"] = sorted({r["T"] for r in data["rows"]})
        data["config"]["D"] = sorted({r["D"] for r in data["rows"]})
        env = data["environment"]
        stem = os.path.join(args.out, f"{env['gpu'].replace(' ', '-')}-{env['date']}{args.suffix}")
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(data))
        print(markdown(data))
        return
    if args.table:
        print(table(args.table, markdown))
        return
    run(args)


if __name__ == "__main__":
    sys.exit(main())
