"""Softmax-family kernel grids on one GPU (issues 4 and 19): attnkit's Triton kernels against SDPA and Flex.

SDPA pinned to one backend (cuDNN / flash / efficient) and FlexAttention (compiled once per shape), same inputs.

    python benchmarks/softmax_gpu.py --out benchmarks/results            # the issue-4 grid
    python benchmarks/softmax_gpu.py --D 128 --T 16384 --patterns causal  # a slice
    python benchmarks/softmax_gpu.py --grid issue19 --budget-s 440 --suffix=-i19a --out $OUT   # issue 19, first call
    python benchmarks/softmax_gpu.py --grid issue19 --budget-s 440 --suffix=-i19b --out $OUT \
        --resume benchmarks/results/<first call>.json                    # the next call skips the cells done
    python benchmarks/softmax_gpu.py --grid issue19 --dry-run            # CPU: the cells in order, layouts, estimate
    python benchmarks/softmax_gpu.py --merge A.json B.json --suffix=-issue19   # one JSON + markdown
    python benchmarks/softmax_gpu.py --table benchmarks/results/<file>.json    # markdown from a JSON

bf16, H = 16, B = max(1, 16384 // T), forward and forward+backward. TFLOP/s count only visible (query,
key) pairs: ``2·pairs·(D + Dv)`` forward, 3.5× that forward+backward. Every cell is timed with
:func:`attnkit.tools.timing.time_ms` (synchronized, median) and, forward+backward, its peak extra memory
with :func:`attnkit.tools.timing.peak_memory`; the output of each impl is compared with attnkit's Triton
output (relative error) so a fast wrong peer or kernel shows. Results are written after every
cell (JSON), so a run cut short keeps what it measured.

Patterns (:func:`pattern`; one definition each, the Flex peer's ``mask_mod`` is the same mask object, see
:func:`attnkit.tools.peers.flex_mods`):

* ``docs_unequal_s<seed>``, ``docs_longtail_s<seed>``: packed documents of unequal seeded lengths, causal inside each
  document (:func:`doc_layout`); the ``cu_seqlens`` of every (pattern, T) run are in the JSON's
  ``config["layouts"]``, and ``--layouts-from`` / ``--resume`` reuse them, so a run repeats exactly;
* ``block_causal_<c>``: chunks of ``c`` tokens, bidirectional inside a chunk, causal across chunks;
* ``sliding_window_<w>``: causal window, query ``q`` sees keys ``q − w … q`` (``w + 1`` keys);
* ``document8_causal``: 8 equal documents, causal inside each; full, causal, softcap 30, ALiBi, prefix-LM, cross
  (issue 4).

``--grid issue19`` runs the issue-19 patterns at T = 1k–32k, D = 128 / 64 with Flex and SDPA cuDNN, most important
cells first (:func:`issue19_priority`), so a ``--budget-s`` cut keeps the cells that matter; split over calls with
``--resume`` and join with ``--merge``.
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton reads this when its kernels are defined, i.e. at attnkit's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

from attnkit import masks as M  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.tools.bench import environment  # noqa: E402
from attnkit.tools.timing import peak_memory, sync, time_ms  # noqa: E402

PATTERNS = ["full", "causal", "sliding_window_1024", "causal_softcap30", "causal_alibi", "document8_causal",
            "prefix_lm_quarter", "cross_full", "cross_causal"]

#: issue 19, item 4: unequal-length document packing (3 seeded layouts and a long-tailed one), block-causal, windows
ISSUE19_PATTERNS = ([f"docs_unequal_s{s}" for s in (0, 1, 2)] + ["docs_longtail_s0"]
                    + [f"block_causal_{c}" for c in (64, 128, 256)]
                    + [f"sliding_window_{w}" for w in (256, 512, 1024, 2048, 4096)])

#: presets of ``--grid``: every field is a default that an explicit ``--patterns`` / ``--T`` / ``--D`` / ``--peers``
#: replaces. issue19 adds ``causal`` last: the one pattern cuDNN computes, attnkit's own kernel against it (item 3)
GRIDS = {
    "issue4": dict(patterns=PATTERNS, T=[16384, 8192, 4096, 2048, 1024], D=[128, 64],
                   peers=["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex"], order="grid"),
    "issue19": dict(patterns=ISSUE19_PATTERNS + ["causal"], T=[1024, 2048, 4096, 8192, 16384, 32768], D=[128, 64],
                    peers=["sdpa-cudnn", "flex"], order="issue19"),
}

_DOCS = re.compile(r"docs_(unequal|longtail)_s(\d+)$")
_NUMBERED = re.compile(r"(block_causal|sliding_window)_(\d+)$")

#: ``{pattern: {T: cu_seqlens}}`` read from earlier results (``--layouts-from``, ``--resume``); wins over doc_layout
LAYOUTS: Dict[str, Dict[int, List[int]]] = {}


def _split(total: int, weights: Sequence[float]) -> List[int]:
    """``len(weights)`` integers >= 1 summing to ``total``: 1 each, the rest by largest remainder over ``weights``."""
    n = len(weights)
    if total < n:
        raise ValueError(f"cannot split {total} tokens into {n} documents of length >= 1")
    extra, wsum = total - n, sum(weights)
    share = [extra * w / wsum if wsum > 0 else extra / n for w in weights]
    out = [1 + int(x) for x in share]
    order = sorted(range(n), key=lambda i: (-(share[i] - int(share[i])), i))
    for i in order[:total - sum(out)]:
        out[i] += 1
    return out


def doc_layout(kind: str, seed: int, T: int) -> List[int]:
    """``cu_seqlens`` (``[0, …, T]``) of a seeded packing of ``T`` tokens.

    ``unequal``: 10–14 documents, lengths ∝ exponential draws (each >= 1). ``longtail``: 12 documents, one of
    55–75 % of T, five of 1–16 tokens (fewer tokens when T is too small for that), six sharing the rest ∝ exponential
    draws. Document order shuffled. Only ``random.Random(str).random()`` is used: the one stream Python promises to
    keep across versions; one seed gives the same relative layout at every T (only the long tail's short documents
    keep their absolute 1–16 tokens)."""
    rng = random.Random(f"attnkit-docs-{kind}-{seed}")
    u = rng.random
    if kind == "unequal":
        n = 10 + int(5 * u())
        lengths = _split(T, [-math.log(1.0 - u()) for _ in range(n)])
    elif kind == "longtail":
        n_short, n_rest = 5, 6
        if T < 2 * (1 + n_short + n_rest):
            raise ValueError(f"a long-tail layout needs T >= {2 * (1 + n_short + n_rest)}, got {T}")
        long_ = min(max(T // 2 + 1, int((0.55 + 0.2 * u()) * T)), T - n_short - n_rest)
        cap = max(1, min(16, (T - long_ - n_rest) // n_short))
        short = [1 + min(cap - 1, int(cap * u())) for _ in range(n_short)]
        lengths = [long_] + short + _split(T - long_ - sum(short), [-math.log(1.0 - u()) for _ in range(n_rest)])
    else:
        raise ValueError(f"document layout kind must be 'unequal' or 'longtail', got {kind!r}")
    for i in range(len(lengths) - 1, 0, -1):  # Fisher-Yates on random() alone
        j = int(u() * (i + 1))
        lengths[i], lengths[j] = lengths[j], lengths[i]
    cu = [0]
    for n_tok in lengths:
        cu.append(cu[-1] + n_tok)
    return cu


def document_causal(cu_seqlens: Sequence[int]) -> M.Mask:
    """Packed documents from ``cu_seqlens``, causal inside each: ``doc[q] == doc[kv] and kv <= q``."""
    return M.document(cu_seqlens=torch.tensor(list(cu_seqlens), dtype=torch.long)) & M.causal


def layout(name: str, T: int) -> Optional[List[int]]:
    """The ``cu_seqlens`` a document pattern uses at length T (recorded, else seeded), None for other patterns."""
    m = _DOCS.match(name)
    if name == "document8_causal":
        return list(range(0, T + 1, T // 8))
    if m is None:
        return None
    return LAYOUTS.get(name, {}).get(T) or doc_layout(m[1], int(m[2]), T)


def pattern(name: str, T: int):
    """(Lq, Lk, mask, score_mod) of a grid pattern at length T."""
    cu = layout(name, T)
    if cu is not None:
        return T, T, document_causal(cu), None
    m = _NUMBERED.match(name)
    if m is not None:
        n = int(m[2])
        return T, T, (M.chunked(n) if m[1] == "block_causal" else M.sliding_window(n)), None
    if name == "full":
        return T, T, M.full, None
    if name == "causal":
        return T, T, M.causal, None
    if name == "causal_softcap30":
        return T, T, M.causal, S.softcap(30.0)
    if name == "causal_alibi":
        return T, T, M.causal, S.alibi()
    if name == "prefix_lm_quarter":
        return T, T, M.prefix_lm(T // 4), None
    if name == "cross_full":
        return T // 4, T, M.full, None
    if name == "cross_causal":
        return T // 4, T, M.causal, None
    raise KeyError(name)


def pattern_rank(name: str) -> tuple:
    """Sort key of pattern names in tables: the grids' order, then unknown names by name."""
    known = PATTERNS + [p for p in ISSUE19_PATTERNS if p not in PATTERNS]
    return (known.index(name), "") if name in known else (len(known), name)


def same_as_causal(name: str, T: int) -> bool:
    """A window covering every earlier key (w >= T − 1): the cell computes plain causal attention."""
    m = _NUMBERED.match(name)
    return m is not None and m[1] == "sliding_window" and int(m[2]) >= T - 1


#: issue 19's order of lengths: the issue's own cells (2k, 8k) first
_I19_T = [2048, 8192, 4096, 16384, 32768, 1024]


def issue19_priority(cell: Tuple[int, int, str], patterns: Sequence[str]) -> tuple:
    """Sort key, most important first: (0) unequal documents at D = 128, T = 2k / 8k; (1) the issue's other measured
    cells (block-causal 128, window 512 at D = 128, T = 2k / 8k; documents at D = 64, T = 32k); (2) the rest at
    D = 128; (3) at D = 64; (4) windows that equal causal at that T; (5) the causal baseline."""
    D, T, p = cell
    doc, headline = p.startswith("docs_"), T in (2048, 8192)
    if p == "causal":
        tier = 5
    elif same_as_causal(p, T):
        tier = 4
    elif D == 128 and headline and doc:
        tier = 0
    elif (D == 128 and headline and p in ("block_causal_128", "sliding_window_512")) or (D == 64 and T == 32768
                                                                                         and doc):
        tier = 1
    else:
        tier = 2 if D == 128 else 3
    t_rank = _I19_T.index(T) if T in _I19_T else len(_I19_T) + T
    return tier, t_rank, -D, list(patterns).index(p)


def cells(Ds: Sequence[int], Ts: Sequence[int], patterns: Sequence[str], order: str = "grid"
          ) -> List[Tuple[int, int, str]]:
    """``(D, T, pattern)`` in run order: ``grid`` loops D, T, pattern as given; ``issue19`` sorts by
    :func:`issue19_priority`."""
    grid = [(D, T, p) for D in Ds for T in Ts for p in patterns]
    if order == "issue19":
        grid.sort(key=lambda c: issue19_priority(c, patterns))
    elif order != "grid":
        raise ValueError(f"cell order must be 'grid' or 'issue19', got {order!r}")
    return grid


def done_cells(rows: Sequence[dict], modes: Sequence[str]) -> set:
    """``(D, T, pattern)`` whose attnkit rows are ok in every one of ``modes`` (peers that failed are not retried)."""
    ok: Dict[tuple, set] = {}
    for r in rows:
        if r["impl"] == "triton" and r["status"] == "ok":
            ok.setdefault((r["D"], r["T"], r["pattern"]), set()).add(r["mode"])
    return {c for c, m in ok.items() if set(modes) <= m}


def read_layouts(data: dict) -> Dict[str, Dict[int, List[int]]]:
    """``{pattern: {T: cu_seqlens}}`` recorded in a results JSON's config."""
    return {p: {int(T): cu for T, cu in by_T.items()} for p, by_T in data["config"].get("layouts", {}).items()}


def add_layouts(into: Dict[str, Dict[int, List[int]]], new: Dict[str, Dict[int, List[int]]], where: str) -> None:
    """Union of recorded layouts; two different ``cu_seqlens`` for one (pattern, T) are an error (results of different
    layouts must never share a cell)."""
    for p, by_T in new.items():
        for T, cu in by_T.items():
            have = into.setdefault(p, {}).get(T)
            if have is not None and list(have) != list(cu):
                raise ValueError(f"{where}: {p} at T={T} has cu_seqlens {list(cu)}, an earlier file {list(have)}")
            into[p][T] = list(cu)


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


def warm(step, seconds: float, device="cuda") -> None:
    """Run ``step`` for about ``seconds`` before timing: after a compile pause the GPU clocks are low and
    a few warm-up calls of a sub-millisecond cell are not enough to bring them back."""
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        step()
        sync(device)


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


def git_commit() -> Optional[str]:
    """Short commit of the tree the script runs from (None where it is not a git checkout), '+' when edited."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def load_results(paths: Sequence[str]) -> Tuple[List[dict], Dict[str, Dict[int, List[int]]]]:
    """Rows and recorded layouts of earlier results JSONs."""
    rows: List[dict] = []
    layouts: Dict[str, Dict[int, List[int]]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        add_layouts(layouts, read_layouts(data), path)
    return rows, layouts


def ratio_line(rows: Sequence[dict]) -> str:
    """``fwd ×1.23 flex ×0.95 sdpa-cudnn | fwd+bwd …`` for the rows of one cell: peer ms / attnkit ms."""
    out = []
    for mode in ("fwd", "fwd+bwd"):
        tr = next((r for r in rows if r["mode"] == mode and r["impl"] == "triton" and r["status"] == "ok"), None)
        if tr is None:
            continue
        peers_ = [f"×{r['ms'] / tr['ms']:.2f} {r['impl']}" for r in rows
                  if r["mode"] == mode and r["impl"] != "triton" and r["status"] == "ok"]
        out.append(f"{mode} " + (" ".join(peers_) or "no peer"))
    return " | ".join(out)


def run(args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("softmax_gpu.py: no CUDA device (on a CPU: --help, --dry-run, --cpu-smoke, --table, --merge)")
    import faulthandler  # enabled for the whole process in __main__
    if args.stack_every_s > 0:  # where a stuck cell is stuck (once seen to crash inside a compile)
        faulthandler.dump_traceback_later(args.stack_every_s, repeat=True)
    import attnkit
    from attnkit.ops.utils import tuning
    from attnkit.tools.peers import peers
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    env = environment(dev)
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if cuda else None
    env["commit"] = git_commit()
    if args.autotune:
        tuning.enable(True)
    if args.fwd_config:
        force_fwd_config(args.fwd_config)
    gpu = env["gpu"].replace(" ", "-") if cuda else "cpu-smoke"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{gpu}-{env['date']}{args.suffix}")
    rows: List[dict] = []
    t_start = time.time()
    todo = cells(args.D, args.T, args.patterns, args.order)
    done = done_cells(args.resume_rows, args.modes)
    skipped = [c for c in todo if c in done]
    todo = [c for c in todo if c not in done]
    layouts: Dict[str, Dict[int, List[int]]] = {}
    config = {"dtype": args.dtype, "H": args.H, "tokens": args.tokens, "D": args.D, "T": args.T,
              "patterns": args.patterns, "grid": args.grid, "order": args.order, "peers": args.peers,
              "modes": args.modes, "flex_T": args.flex_T, "flex_patterns": args.flex_patterns,
              "fwd_config": args.fwd_config, "warmup": args.warmup, "rep": args.rep, "warm_s": args.warm_s,
              "autotune": args.autotune, "budget_s": args.budget_s, "resumed_from": args.resume,
              "cells_skipped_as_done": len(skipped), "layouts": layouts,
              "flops": "2*pairs*(D+Dv) fwd, x3.5 fwd+bwd; pairs = visible pairs"}
    print(f"softmax_gpu: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"cuDNN {env['cudnn']}, attnkit {env['attnkit']} ({env['commit']}), {env['date']}; {len(todo)} cells to run"
          f", {len(skipped)} done in --resume files; budget {args.budget_s:.0f} s", flush=True)

    def save():
        with open(stem + ".json", "w") as f:
            json.dump({"environment": env, "config": config, "rows": rows}, f, indent=1)

    dtype = getattr(torch, args.dtype)
    for i, (D, T, pat) in enumerate(todo):
        if time.time() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached; stopping with {len(todo) - i} cells left (rerun with "
                  f"--resume {stem}.json)", flush=True)
            break
        t_cell = time.time()
        B = max(1, args.tokens // T)
        Lq, Lk, mask, score_mod = cached_pattern(pat, T)
        cu = layout(pat, T)
        if cu is not None:
            add_layouts(layouts, {pat: {T: cu}}, "this run")
        H = args.H
        torch.manual_seed(0)
        q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
        pairs = visible_pairs(mask, B, H, Lq, Lk, dev)
        flops = 2.0 * pairs * (D + D)
        impls: Dict[str, Callable[[], torch.Tensor]] = {
            "triton": lambda: attnkit.attention(q, k, v, mask=mask, score_mod=score_mod, backend="triton")}
        try:
            with torch.no_grad():
                ref_out = impls["triton"]()
        except Exception as e:  # noqa: BLE001 - a cell attnkit cannot run is a row that says so, not a lost call
            note = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.extend(dict(D=D, pattern=pat, T=T, B=B, H=H, Lq=Lq, Lk=Lk, mode=mode, impl="triton", pairs=pairs,
                             ms=None, tflops=None, mem_mib=None, status="error", note=note) for mode in args.modes)
            print(f"[{time.time() - t_start:6.0f}s] D={D} T={T} {pat}: attnkit failed, cell skipped: {note}",
                  flush=True)
            save()
            continue
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

        cell_rows: List[dict] = []
        for name, fn in with_peers():
            fwd, fwd_bwd = make_steps(fn, [q, k, v])
            t0 = time.time()
            for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                if mode not in args.modes:
                    continue
                row = dict(D=D, pattern=pat, T=T, B=B, H=H, Lq=Lq, Lk=Lk, mode=mode, impl=name,
                           pairs=pairs, ms=None, tflops=None, mem_mib=None, status="ok", note="")
                try:
                    warm(step, args.warm_s, dev)
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
                    if cuda:
                        torch.cuda.empty_cache()
                rows.append(row)
                cell_rows.append(row)
                print(f"[{time.time() - t_start:6.0f}s] D={D} T={T} {pat:20s} {mode:7s} {name:15s} "
                      f"{_f(row['ms'], '8.3f')} ms {_f(row['tflops'], '5.0f')} TF/s "
                      f"{_f(row['mem_mib'], '6.0f')} MiB {row['status']} {row['note'][:80]} "
                      f"(+{time.time() - t0:.0f}s)", flush=True)
            save()
        for r in cell_rows:  # the cell's wall time, compiles included: what the next --dry-run estimate reads
            r["cell_s"] = round(time.time() - t_cell, 1)
        print(f"         D={D} T={T} {pat}: {ratio_line(cell_rows)} (peer ms / attnkit ms; cell "
              f"{time.time() - t_cell:.0f} s)", flush=True)
        save()
        del q, k, v, impls, ref_out, fn
        if cuda:
            torch.cuda.empty_cache()
    save()
    data = {"environment": env, "config": config, "rows": rows}
    with open(stem + ".md", "w") as f:
        f.write(markdown(data))
    print(markdown(data))


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


def _peer_ratios(cell: dict, key: tuple) -> Tuple[Optional[dict], List[Tuple[str, float]]]:
    """attnkit's row of one (D, mode, pattern, T) and ``[(peer, peer ms / attnkit ms)]``: flex and sdpa-cudnn where
    they ran, then the fastest other peer when it beats both."""
    tr = cell.get(key + ("triton",))
    if tr is None:
        return None, []
    peers_ = {name: r for (*k, name), r in cell.items() if tuple(k) == key and name != "triton"}
    shown = [n for n in ("flex", "sdpa-cudnn") if n in peers_]
    rest = [n for n in peers_ if n not in shown]
    if rest:
        best = min(rest, key=lambda n: peers_[n]["ms"])
        if not shown or peers_[best]["ms"] < min(peers_[n]["ms"] for n in shown):
            shown.append(best)
    return tr, [(n, peers_[n]["ms"] / tr["ms"]) for n in shown]


def markdown(data: dict) -> str:
    """Summary tables: per (D, mode), a pattern × T table of attnkit-triton's ms and its ratio to FlexAttention and
    SDPA cuDNN (and the fastest other peer when it beats both); ratio = peer ms / attnkit ms, > 1 means attnkit is
    faster. Then the range of the Flex ratios, the document layouts, and every cell."""
    env, cfg, rows = data["environment"], data["config"], [r for r in data["rows"] if r["status"] == "ok"]
    commit = f" (commit {env['commit']})" if env.get("commit") else ""
    lines = [f"# softmax-family kernels: {env.get('gpu')} ({env.get('date')})", "",
             f"Device {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, attnkit {env.get('attnkit')}{commit}; measured {env.get('date')}. bf16, "
             f"H = {cfg['H']}, B = max(1, {cfg['tokens']} // T); TFLOP/s over visible pairs only "
             "(fwd 2·pairs·(D+Dv), fwd+bwd 3.5×). Cells: attnkit-triton ms, then ×peer = peer ms / attnkit ms "
             "(> 1: attnkit faster); cudnn = SDPA's cuDNN backend, which computes only full / causal.", ""]
    cell = {(r["D"], r["mode"], r["pattern"], r["T"], r["impl"]): r for r in rows}
    Ts = sorted({r["T"] for r in rows})
    flex: Dict[tuple, List[float]] = {}
    for D in sorted({r["D"] for r in rows}, reverse=True):
        for mode in ("fwd", "fwd+bwd"):
            pats = sorted({p for (d, m, p, T, i) in cell if (d, m, i) == (D, mode, "triton")}, key=pattern_rank)
            if not pats:
                continue
            lines += [f"## D = {D}, {mode}", "", "| pattern | " + " | ".join(f"T={T}" for T in Ts) + " |",
                      "|---|" + "---|" * len(Ts)]
            for p in pats:
                out = []
                for T in Ts:
                    tr, ratios = _peer_ratios(cell, (D, mode, p, T))
                    if tr is None:
                        out.append("")
                        continue
                    out.append(f"{tr['ms']:.3f} ms" + (": " if ratios else "")
                               + ", ".join(f"×{x:.2f} {n.replace('sdpa-', '')}" for n, x in ratios))
                    if "flex" in dict(ratios):
                        flex.setdefault((D, mode), []).append(dict(ratios)["flex"])
                lines.append(f"| {p} | " + " | ".join(out) + " |")
            lines.append("")
    if flex:
        lines += ["## Flex ratio over the cells above (issue 19 bar: >= 1.2 everywhere, interim 1.0)", "",
                  "| D | mode | cells | min | median | max | below 1.0 | below 1.2 |", "|---" * 8 + "|"]
        for (D, mode), xs in flex.items():
            lines.append(f"| {D} | {mode} | {len(xs)} | {min(xs):.2f} | {statistics.median(xs):.2f} | {max(xs):.2f} | "
                         f"{sum(x < 1.0 for x in xs)} | {sum(x < 1.2 for x in xs)} |")
        lines.append("")
    if cfg.get("layouts"):
        lines += ["## document layouts (cu_seqlens; causal inside each document)", "",
                  "| pattern | T | documents | shortest | longest | cu_seqlens |", "|---|---|---|---|---|---|"]
        for p in sorted(cfg["layouts"], key=pattern_rank):
            for T, cu in sorted(cfg["layouts"][p].items(), key=lambda kv: int(kv[0])):
                n = [b - a for a, b in zip(cu, cu[1:])]
                lines.append(f"| {p} | {T} | {len(n)} | {min(n)} | {max(n)} | {cu} |")
        lines.append("")
    lines += ["## every cell", "", "| D | pattern | T | mode | impl | ms | TF/s | peak MiB | rel. diff vs triton |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        bad = "" if r["status"] == "ok" else f" {r['status']}: {r['note']}"
        lines.append(f"| {r['D']} | {r['pattern']} | {r['T']} | {r['mode']} | {r['impl']} | {_f(r['ms'], '.3f')} | "
                     f"{_f(r['tflops'], '.0f')} | {_f(r.get('mem_mib'), '.0f')} | "
                     f"{_f(r.get('rel_vs_triton'), '.1e')}{bad} |")
    return "\n".join(lines) + "\n"


#: wall seconds assumed per cell when no measured ``cell_s`` is at hand (a guess, not a measurement): attnkit's two
#: modes and Flex's (warm-up 0.3 s, timing, memory: ~1 s per impl and mode) plus one fresh Flex compile of forward and
#: backward per shape and mask (~10 s); and once per call, start-up (imports, CUDA, first kernel builds)
ASSUMED_CELL_S, ASSUMED_START_S = 14.0, 60.0


def dry_run(args) -> None:
    """CPU: the cells in run order (tier, B, density of visible pairs, estimated seconds, cumulative) with the cut
    that ``--budget-s`` makes, and the document layouts; every mask is built and validated on the CPU. The estimate
    per cell is the median ``cell_s`` of the ``--resume`` rows when they have one, else :data:`ASSUMED_CELL_S`."""
    todo = cells(args.D, args.T, args.patterns, args.order)
    done = done_cells(args.resume_rows, args.modes)
    measured = sorted({(r["D"], r["T"], r["pattern"]): r["cell_s"] for r in args.resume_rows if "cell_s" in r}
                      .values())
    per_cell = statistics.median(measured) if measured else ASSUMED_CELL_S
    basis = f"median of {len(measured)} measured cells" if measured else "assumed, not measured"
    print(f"{len(todo)} cells ({len(done & set(todo))} done in --resume files), order {args.order}; "
          f"{per_cell:.0f} s per cell ({basis}) + {ASSUMED_START_S:.0f} s start-up per call", flush=True)
    print(f"{'#':>4} {'tier':>4} {'D':>4} {'T':>6} {'pattern':22s} {'B':>3} {'density':>8} {'est s':>6} {'cum s':>7}")
    call, in_call, cum, density = 1, 0.0, 0.0, {}
    for n, (D, T, pat) in enumerate(todo):
        B = max(1, args.tokens // T)
        if (pat, T) not in density:
            Lq, Lk, mask, _ = cached_pattern(pat, T)
            density[pat, T] = visible_pairs(mask, 1, 1, Lq, Lk, "cpu") / (Lq * Lk)
        if (D, T, pat) in done:
            print(f"{n:4d} {'':>4} {D:4d} {T:6d} {pat:22s} {B:3d} {density[pat, T]:8.4f}   done")
            continue
        tier = issue19_priority((D, T, pat), args.patterns)[0] if args.order == "issue19" else ""
        if in_call > args.budget_s:  # no cell starts after the budget: the next call (--resume) begins here
            call, in_call = call + 1, 0.0
            print(f"---- --budget-s {args.budget_s:.0f}: call {call} (--resume the earlier ones) starts here ----")
        in_call += per_cell
        cum += per_cell + (ASSUMED_START_S if in_call == per_cell else 0.0)
        note = " (= causal at this T)" if same_as_causal(pat, T) else ""
        print(f"{n:4d} {tier!s:>4} {D:4d} {T:6d} {pat:22s} {B:3d} {density[pat, T]:8.4f} {per_cell:6.0f} "
              f"{cum:7.0f}{note}")
    left = len([c for c in todo if c not in done])
    print(f"estimate: {left} cells, {left * per_cell / 60:.0f} min of cells, {cum / 60:.0f} min with start-ups; "
          f"with --budget-s {args.budget_s:.0f}: {call} call(s) of at most "
          f"~{args.budget_s + ASSUMED_START_S + per_cell:.0f} s each", flush=True)
    lay = {p: {T: layout(p, T) for T in args.T} for p in args.patterns if layout(p, args.T[0]) is not None}
    for p, by_T in lay.items():
        for T, cu in by_T.items():
            n = [b - a for a, b in zip(cu, cu[1:])]
            print(f"layout {p} T={T}: {len(n)} documents, lengths {n}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--suffix", default="")
    p.add_argument("--grid", choices=sorted(GRIDS), default="issue4",
                   help="preset of patterns, T, D, peers and cell order; explicit --patterns/--T/--D/--peers win")
    p.add_argument("--D", type=int, nargs="+", default=None)
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--flex-T", type=int, nargs="*", default=None, help="lengths at which to time Flex (default all)")
    p.add_argument("--flex-patterns", nargs="*", default=None, help="patterns at which to time Flex (default all)")
    p.add_argument("--fwd-config", default=None, help="force the forward configuration BM,BN,warps,stages")
    p.add_argument("--host", action="store_true", help="measure the host time per call (tiny shapes) and exit")
    p.add_argument("--patterns", nargs="+", default=None, help="names of pattern(); default: the --grid's")
    p.add_argument("--peers", nargs="+", default=None, help="default: the --grid's")
    p.add_argument("--order", choices=["grid", "issue19"], default=None,
                   help="cell order: D, T, pattern loops (grid) or most important first (issue19); "
                   "default: the --grid's")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--warm-s", type=float, default=0.3, help="run each step this long before timing it")
    p.add_argument("--memory", action="store_true", default=True)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="start no cell after this many seconds (results saved); cells go most important first")
    p.add_argument("--resume", nargs="+", default=[], help="results JSONs of earlier calls: skip their finished cells "
                   "(attnkit ok in every mode) and reuse their document layouts")
    p.add_argument("--layouts-from", nargs="+", default=[],
                   help="results JSONs whose recorded cu_seqlens the document patterns use (an exact repeat)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: print the cells in order, the layouts and a time estimate; measure nothing")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny end-to-end run on the CPU under TRITON_INTERPRET=1 (H=2, T=64, D=16, float32, no peers: "
                        "they need CUDA); for checking the script, not for numbers")
    p.add_argument("--stack-every-s", type=float, default=0.0, help="dump all stacks this often (0: never)")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels of one attnkit fwd+bwd per cell")
    p.add_argument("--table", help="print the markdown of an existing JSON and exit")
    p.add_argument("--merge", nargs="+", help="merge JSONs of one session (later files replace equal cells) into "
                   "OUT/<gpu>-<date>SUFFIX.json and .md, then exit")
    args = p.parse_args(argv)
    args.device, args.dtype = "cuda", "bfloat16"
    if args.cpu_smoke:
        args.device, args.dtype, args.H, args.tokens, args.warm_s, args.warmup, args.rep = \
            "cpu", "float32", 2, 64, 0.0, 1, 2
        args.T, args.D = args.T or [64], args.D or [16]
    for key, value in GRIDS[args.grid].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in args.patterns:
        pattern(name, max(args.T))  # an unknown name fails here, before any device work
    args.resume_rows, layouts = load_results(args.resume + args.layouts_from)
    LAYOUTS.clear()
    LAYOUTS.update(layouts)
    if args.dry_run:
        dry_run(args)
        return
    if args.host:
        host_overhead(args)
        return
    if args.merge:
        data, rows = merge_rows(args.merge, ("D", "pattern", "T", "mode", "impl"))
        data["rows"] = sorted(rows, key=lambda r: (-r["D"], -r["T"], pattern_rank(r["pattern"]), r["mode"],
                                                   r["impl"] != "triton", r["impl"]))
        layouts: Dict[str, Dict[int, List[int]]] = {}
        for path in args.merge:
            with open(path) as f:
                add_layouts(layouts, read_layouts(json.load(f)), path)
        data["config"]["layouts"] = layouts
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
    import faulthandler
    faulthandler.enable()  # a crash inside a compile or a kernel prints every thread's stack
    sys.exit(main())
