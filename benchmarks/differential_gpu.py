"""Differential attention on one GPU: attnkit's fused kernel against two-call compositions of attnkit,
FlexAttention (compiled once per shape) and SDPA (cuDNN / flash / efficient) on the same inputs.

    python benchmarks/differential_gpu.py --budget-s 280                 # default grid -> benchmarks/results
    python benchmarks/differential_gpu.py --T 16384 --patterns causal     # a slice
    python benchmarks/differential_gpu.py --table benchmarks/results/<file>.json   # markdown from a JSON
    python benchmarks/differential_gpu.py --cpu-smoke --out /tmp/x        # tiny end-to-end run on the CPU

``out_h = softmax(s·q1 k1ᵀ) V − λ_h · softmax(s·q2 k2ᵀ) V``, q/k head dim 2d split in halves (default
2d = 128, Dv = 128: the Diff Transformer layout), λ a per-head float32 tensor requiring grad; bf16,
H = 16, B·T = 16384. Implementations:

* ``attnkit-fused``: ``differential_attention(..., backend="triton")`` (the row records
  ``attnkit.last_backend()``: ``triton/fused-differential`` once the fused kernel is in);
* ``attnkit-2call``: two ``attnkit.attention(q_i, k_i, v, backend="triton")`` calls, ``o1 − λ·o2``;
* ``flex-2call``: the same with two compiled FlexAttention calls (attnkit's own mask and score mods,
  :func:`attnkit.tools.peers.flex_mods`, one BlockMask and one compile per shape for both maps);
* ``sdpa-<backend>-2call``: the same with SDPA pinned to one backend, where SDPA expresses the pattern
  (full, causal); a backend refusing the inputs (q/k head dim d ≠ Dv) is a ``refused`` row with its reason.

FLOPs: two maps of head dim d, each QKᵀ (d per pair) and PV (Dv per pair) over the visible pairs:
``2·pairs·(2d + 2·Dv)`` forward (``differential._flops``), 3.5× that forward+backward. Per cell: median
ms (:func:`attnkit.tools.bench.time_ms` after a warm-up of ``--warm-s`` seconds), TFLOP/s, the time of the
first call (compiles), peak extra memory of one forward+backward, ratio = impl ms / attnkit-fused ms
(> 1: the fused kernel is faster), and the relative difference to attnkit-fused of the output
(forward rows) and of the gradients of q, k, v, λ (forward+backward rows, the same cotangent for all;
the largest of the four), so a fast wrong path shows. Results are written after every row (JSON).
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton reads this when its kernels are defined, i.e. at attnkit's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from softmax_gpu import _f, cached_pattern, make_steps, merge_rows, rel_err, table, visible_pairs, warm  # noqa: E402

import attnkit  # noqa: E402
from attnkit.tools.bench import environment  # noqa: E402
from attnkit.tools.timing import peak_memory, time_ms  # noqa: E402
from attnkit.dispatch import sdpa  # noqa: E402
from attnkit.normalizers import Softmax  # noqa: E402
from attnkit import differential_attention  # noqa: E402

PATTERNS = ["full", "causal", "sliding_window_1024", "causal_softcap30", "document8_causal"]
SDPA_IMPLS = [f"sdpa-{b}-2call" for b in sdpa.BACKENDS]
IMPLS = ["attnkit-fused", "attnkit-2call", "flex-2call"] + SDPA_IMPLS
FUSED = "attnkit-fused"
_OOM = getattr(torch, "OutOfMemoryError", RuntimeError)


class Refused(Exception):
    """A peer that cannot compute this cell (the message says why)."""


def combine(o1: torch.Tensor, o2: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``o1 − λ_h·o2`` with λ ``[H]``, as ``differential_attention`` did before its fused kernel."""
    return o1 - lam.to(o1.dtype).view(1, -1, 1, 1) * o2


def two_call(attn: Callable, q, k, v, lam) -> Callable[[], torch.Tensor]:
    """``combine(attn(q1, k1, v), attn(q2, k2, v), λ)``, halves sliced inside the call (views)."""
    d = q.shape[-1] // 2
    return lambda: combine(attn(q[..., :d], k[..., :d], v), attn(q[..., d:], k[..., d:], v), lam)


def flex_attn(q, k, mask, score_mod, scale: float) -> Callable:
    """One compiled FlexAttention with attnkit's mask and score mod, shared by both maps (one BlockMask,
    one compile per shape: the two maps' views have the same shapes and strides)."""
    from attnkit.tools.peers import flex_call
    B, Hq, Lq, _ = q.shape
    fn = flex_call(mask, score_mod, B, Hq, k.shape[1], Lq, k.shape[2], q.device, scale)
    if fn is None:
        raise Refused(f"score mod {score_mod!r} has no FlexAttention form")
    return fn


def sdpa_reason(backend: str, q, k, v, form: dict, scale: float) -> str:
    """Why SDPA's ``backend`` refuses these inputs: the warnings it gives (``sdpa.call`` silences them) from
    one forward of the first map, or "forward runs" where the forward is accepted."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    d = q.shape[-1] // 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad(), sdpa_kernel([sdpa._backend_enum(backend)]):
                F.scaled_dot_product_attention(q[..., :d], k[..., :d], v, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1], **form)
            return "forward runs"
        except Exception as e:  # noqa: BLE001 - a diagnosis only
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    why = [str(w.message).split(" (Triggered internally")[0].strip() for w in caught]
    return "; ".join(dict.fromkeys(w for w in why if w)) or err


def build_impls(names: List[str], q, k, v, lam, mask, score_mod, scale: float) -> Dict[str, object]:
    """``{name: zero-argument callable, or a Refused}`` for the requested implementations."""
    out: Dict[str, object] = {}
    for name in names:
        try:
            if name == FUSED:
                out[name] = lambda: differential_attention(q, k, v, lam, mask=mask, score_mod=score_mod,
                                                           scale=scale, backend="triton")
            elif name == "attnkit-2call":
                out[name] = two_call(lambda qi, ki, vi: attnkit.attention(
                    qi, ki, vi, mask=mask, score_mod=score_mod, scale=scale, backend="triton"), q, k, v, lam)
            elif name == "flex-2call":
                out[name] = two_call(flex_attn(q, k, mask, score_mod, scale), q, k, v, lam)
            elif name in SDPA_IMPLS:
                backend = name.split("-")[1]
                form = sdpa.sdpa_form(q, k, mask, score_mod, Softmax())
                if form is None:
                    continue  # SDPA cannot express this pattern: no row
                out[name] = two_call(lambda qi, ki, vi, b=backend, f=form: sdpa.call(b, qi, ki, vi, f, scale),
                                     q, k, v, lam)
            else:
                raise KeyError(name)
        except Refused as e:
            out[name] = e
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, never hidden
            out[name] = Refused(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    return out


def cell(args, dev, dtype, T: int, pat: str, emit: Callable[[dict], None], deadline: float) -> bool:
    """Measure every impl on one (T, pattern) on the same inputs; False when the deadline stopped it."""
    D, Dv, H, Hkv = args.qk_dim, args.Dv, args.H, args.Hkv or args.H
    B = max(1, args.tokens // T)
    Lq, Lk, mask, score_mod = cached_pattern(pat, T)
    torch.manual_seed(0)
    q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, device=dev, dtype=dtype, requires_grad=True)
    lam = (0.2 + 0.6 * torch.rand(H, device=dev)).requires_grad_(True)
    pairs = visible_pairs(mask, B, H, Lq, Lk, dev)
    shared = dict(inputs=[q, k, v, lam], cotangent=torch.randn(B, H, Lq, Dv, device=dev, dtype=dtype),
                  flops=2.0 * pairs * (D + 2 * Dv), ref={}, fused_ms={})
    scale = 1.0 / math.sqrt(D // 2)
    impls = build_impls([FUSED] + [n for n in args.impls if n != FUSED], q, k, v, lam, mask, score_mod, scale)
    for name, fn in impls.items():
        if time.time() > deadline:
            return False
        steps = dict(zip(("fwd", "fwd+bwd"), make_steps(fn, shared["inputs"]))) if callable(fn) else {}
        for mode in ("fwd", "fwd+bwd"):
            if mode not in args.modes:
                continue
            row = dict(pattern=pat, T=T, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, qk_dim=D, Dv=Dv, mode=mode, impl=name,
                       backend=None, pairs=pairs, ms=None, tflops=None, ratio=None, mem_mib=None, first_s=None,
                       rel_out=None, rel_grad=None, rel_grads=None, status="ok", note="")
            try:
                if isinstance(fn, Exception):
                    raise fn
                measure(row, fn, steps[mode], shared, args, dev)
            except _OOM as e:
                row["status"], row["note"] = "oom", str(e).splitlines()[0][:200]
            except Exception as e:  # noqa: BLE001 - report, never hide
                row["status"] = "error" if name.startswith("attnkit") else "refused"  # a peer that cannot run it
                msg = str(e).splitlines()[0][:300] if str(e) else ""
                row["note"] = msg if isinstance(e, Refused) else f"{type(e).__name__}: {msg}"
                if name in SDPA_IMPLS:
                    form = sdpa.sdpa_form(q, k, mask, score_mod, Softmax())
                    row["note"] += " | why: " + sdpa_reason(name.split("-")[1], q, k, v, form, scale)
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            emit(row)
    return True


def measure(row: dict, fn: Callable[[], torch.Tensor], step: Callable, shared: dict, args, dev) -> None:
    """Fill one row: first-call time, difference to attnkit-fused (output, or gradients for the shared
    cotangent), median ms, TF/s, ratio to attnkit-fused, peak extra memory (forward+backward)."""
    mode, ref = row["mode"], shared["ref"]
    t0 = time.time()
    result = step()  # the first call: compiles, where anything compiles
    row["first_s"] = time.time() - t0
    if mode == "fwd+bwd":
        result = torch.autograd.grad(fn(), shared["inputs"], shared["cotangent"])
    if row["impl"].startswith("attnkit"):
        row["backend"] = attnkit.last_backend()
    if row["impl"] == FUSED:
        ref[mode] = result
    if mode == "fwd" and mode in ref:
        row["rel_out"] = rel_err(result, ref[mode])
    elif mode in ref:
        errs = {n: rel_err(a, b) for n, a, b in zip("qkvλ", result, ref[mode])}
        row["rel_grads"], row["rel_grad"] = errs, max(errs.values())
    del result
    warm(step, args.warm_s)
    ms = row["ms"] = time_ms(step, dev, warmup=args.warmup, rep=args.rep)
    row["tflops"] = shared["flops"] * (3.5 if mode == "fwd+bwd" else 1.0) / (ms * 1e-3) / 1e12
    if row["impl"] == FUSED:
        shared["fused_ms"][mode] = ms
    if mode in shared["fused_ms"]:
        row["ratio"] = ms / shared["fused_ms"][mode]
    if mode == "fwd+bwd" and args.memory:
        mem = peak_memory(step, dev)
        row["mem_mib"] = None if mem is None else mem / 2 ** 20


def run(args) -> None:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    env = environment(dev)
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if dev.type == "cuda" else None
    gpu = (env["gpu"] or "cpu").replace(" ", "-")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{gpu}-{env['date']}-differential{args.suffix}")
    config = {"dtype": args.dtype, "H": args.H, "Hkv": args.Hkv or args.H, "tokens": args.tokens,
              "qk_dim": args.qk_dim, "Dv": args.Dv, "T": args.T,
              "patterns": args.patterns, "modes": args.modes, "impls": args.impls, "warm_s": args.warm_s,
              "warmup": args.warmup, "rep": args.rep, "lam": "0.2 + 0.6·U(0,1) per head, float32, requires grad",
              "flops": "2*pairs*(qk_dim + 2*Dv) fwd (two maps of head dim qk_dim/2), x3.5 fwd+bwd; "
                       "pairs = visible (query, key) pairs summed over B and H"}
    data = {"environment": env, "config": config, "rows": []}
    rows: List[dict] = data["rows"]

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1)

    t_start = time.time()

    def emit(row: dict) -> None:
        rows.append(row)
        save()
        rel = row["rel_out"] if row["mode"] == "fwd" else row["rel_grad"]
        print(f"[{time.time() - t_start:6.0f}s] T={row['T']:6d} {row['pattern']:20s} {row['mode']:7s} "
              f"{row['impl']:22s} {_f(row['ms'], '8.3f')} ms {_f(row['tflops'], '5.0f')} TF/s "
              f"x{_f(row['ratio'], '.2f')} {_f(row['mem_mib'], '6.0f')} MiB rel {_f(rel, '.1e')} "
              f"first {_f(row['first_s'], '.1f')}s {row['backend'] or ''} {row['status']} {row['note'][:120]}",
              flush=True)

    stopped = False
    for T in args.T:
        for pat in args.patterns:
            if not stopped:
                stopped = not cell(args, dev, dtype, T, pat, emit, t_start + args.budget_s)
    config["wall_s"] = time.time() - t_start
    config["complete"] = not stopped
    if stopped:
        print(f"budget of {args.budget_s}s reached; stopped", flush=True)
    save()
    md = markdown(data)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {stem}.json and .md", flush=True)


def markdown(data: dict) -> str:
    """Per mode: one row per (pattern, T) with attnkit-fused's ms and TF/s and every other impl's ratio
    (impl ms / fused ms; > 1: fused is faster); then every row."""
    env, cfg, rows = data["environment"], data["config"], data["rows"]
    lines = [f"# differential attention: {env.get('gpu') or env.get('cpu')} ({env.get('date')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
             f"{cfg['dtype']}, H = {cfg['H']}, Hkv = {cfg['Hkv']}, B·T = {cfg['tokens']}, q/k head dim 2d = "
             f"{cfg['qk_dim']}, Dv = {cfg['Dv']}; λ per head. FLOPs: {cfg['flops']}. "
             "Cells: attnkit-fused ms and TF/s, the others ×(impl ms / fused ms), > 1 means the fused kernel is "
             "faster; `refused` where the peer cannot run the cell.", ""]
    if "wall_s" in cfg:
        lines += [f"Run: {cfg['wall_s']:.0f} s, {'complete' if cfg.get('complete') else 'stopped by --budget-s'}.",
                  ""]
    fused_backends = sorted({r["backend"] for r in rows if r["impl"] == FUSED and r["backend"]})
    if fused_backends:
        lines += [f"attnkit-fused ran as: {', '.join(fused_backends)}.", ""]
    cell = {(r["mode"], r["pattern"], r["T"], r["impl"]): r for r in rows}
    names = [n for n in IMPLS if any(r["impl"] == n for r in rows)]
    pats = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    pats += sorted({r["pattern"] for r in rows} - set(pats))
    for mode in ("fwd", "fwd+bwd"):
        keys = [(p, T) for p in pats for T in sorted({r["T"] for r in rows}) if any(
            (mode, p, T, n) in cell for n in names)]
        if not keys:
            continue
        lines += [f"## {mode}", "", "| pattern | T | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for p, T in keys:
            out = []
            for n in names:
                r = cell.get((mode, p, T, n))
                if r is None:
                    out.append("")
                elif r["status"] != "ok":
                    out.append(r["status"])
                elif n == FUSED:
                    out.append(f"{r['ms']:.3f} ms {r['tflops']:.0f} TF/s")
                else:
                    out.append(f"×{r['ratio']:.2f}" if r["ratio"] is not None else f"{r['ms']:.3f} ms")
            lines.append(f"| {p} | {T} | " + " | ".join(out) + " |")
        lines.append("")
    lines += ["## every row", "", "| pattern | T | mode | impl | ms | TF/s | ×fused | peak MiB | first call s | "
              "rel. diff vs fused (out / grads) | backend | status |", "|" + "---|" * 12]
    for r in rows:
        rel = _f(r["rel_out"], ".1e") if r["mode"] == "fwd" else _f(r["rel_grad"], ".1e")
        st = "ok" if r["status"] == "ok" else f"{r['status']}: {r['note']}".replace("|", "/")
        lines.append(f"| {r['pattern']} | {r['T']} | {r['mode']} | {r['impl']} | {_f(r['ms'], '.3f')} | "
                     f"{_f(r['tflops'], '.0f')} | {_f(r['ratio'], '.2f')} | {_f(r['mem_mib'], '.0f')} | "
                     f"{_f(r['first_s'], '.1f')} | {rel} | {r['backend'] or ''} | {st} |")
    return "\n".join(lines) + "\n"


def merge(paths: List[str], out: str, suffix: str) -> str:
    """Merge JSONs of one session (later files replace equal cells, an ok row is never replaced by a failed
    one) into OUT/<gpu>-<date>-differential SUFFIX.json and .md; returns the markdown."""
    data, rows = merge_rows(paths, ("pattern", "T", "mode", "impl"))
    order = {p: i for i, p in enumerate(PATTERNS)}
    data["rows"] = sorted(rows, key=lambda r: (-r["T"], order.get(r["pattern"], len(order)), r["mode"],
                                               IMPLS.index(r["impl"])))
    cfg = data["config"]
    cfg["merged_from"] = [os.path.basename(p) for p in paths]
    cfg["T"] = sorted({r["T"] for r in data["rows"]}, reverse=True)
    cfg.pop("wall_s", None)
    cfg.pop("complete", None)
    env = data["environment"]
    stem = os.path.join(out, f"{(env['gpu'] or 'cpu').replace(' ', '-')}-{env['date']}-differential{suffix}")
    md = markdown(data)
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    return md


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--suffix", default="", help="appended to the file stem <gpu>-<date>-differential")
    p.add_argument("--T", type=int, nargs="+", default=[16384, 4096, 1024])
    p.add_argument("--patterns", nargs="+", default=PATTERNS, help="names of softmax_gpu.pattern")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS,
                   help="attnkit-fused always runs (the reference of ratios and differences)")
    p.add_argument("--H", type=int, default=16, help="query heads")
    p.add_argument("--Hkv", type=int, default=None, help="key/value heads (GQA; default H)")
    p.add_argument("--qk-dim", type=int, default=128, help="q/k head dim 2d (each map uses d = half of it)")
    p.add_argument("--Dv", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16384, help="B·T")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--warm-s", type=float, default=0.2, help="run each step this long before timing it")
    p.add_argument("--memory", action="store_true", default=True)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop (results saved) after this many seconds")
    p.add_argument("--table", help="write and print the markdown of an existing JSON, then exit")
    p.add_argument("--merge", nargs="+", help="merge JSONs of one session into OUT/...SUFFIX.json and .md, then exit")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny end-to-end run on the CPU under TRITON_INTERPRET=1 (B=1, H=2, T=64, float32, "
                        "attnkit impls only unless --impls is given); for checking the script, not for numbers")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        given = set(argv if argv is not None else sys.argv[1:])
        args.device, args.dtype, args.H, args.tokens = "cpu", "float32", 2, 64
        args.qk_dim, args.Dv = (32, 32) if "--qk-dim" not in given else (args.qk_dim, args.Dv)
        args.warmup, args.rep, args.warm_s = 0, 1, 0.0
        if "--T" not in given:
            args.T = [64]
        if "--impls" not in given:
            args.impls = [FUSED, "attnkit-2call"]
    if args.qk_dim % 2:
        p.error(f"--qk-dim must be even (split into two halves), got {args.qk_dim}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.merge:
        print(merge(args.merge, args.out, args.suffix))
        return
    if args.table:
        print(table(args.table, markdown))
        return
    run(args)


if __name__ == "__main__":
    sys.exit(main())
