"""MQAR (Zoology's multi-query associative recall) on one GPU in one 10-minute device call: the ``gpu`` preset of
:mod:`attnkit.tools.mqar` (13 models × d_model 64/128/256 × 2 learning rates, Based also at feature dims 8 and 24),
sharded over worker processes that share the GPU (these small models leave one process bound by kernel
launches, so several run side by side).

    OUT=/some/dir python benchmarks/mqar_gpu.py                  # the device call (one H200)
    python benchmarks/mqar_gpu.py --estimate                     # CPU: launches + FLOPs per step -> predicted time
    python benchmarks/mqar_gpu.py --cpu-smoke /tmp/mq            # CPU: this script's code path on a tiny grid

Writes ``$OUT/mqar-gpu.jsonl`` (every cell; a rerun with the same OUT skips the finished ones and keeps the seed),
``$OUT/mqar-gpu.md`` (best learning rate per model, the published orderings reproduced or not, wall time) and
prints the same. No worker starts a cell that would end after ``--budget`` seconds from the start; what is left
is listed and a rerun finishes it. Plots: ``attnkit report $OUT/mqar-gpu.jsonl -o report.html`` (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from attnkit.tools import mqar as Q  # noqa: E402

#: kernel launch + dispatch cost per aten op in eager PyTorch on a fast host (H100/H200 class), seconds
SEC_PER_OP = 8e-6
#: GPU time of one small kernel when several processes keep the GPU busy
GPU_SEC_PER_OP = 4e-6
#: sustained dense fp32/TF32 throughput assumed for these small matmuls
FLOPS = 100e12


def worker(i: int, n: int, cfg: Q.MQARConfig, out_dir: str, deadline: float, device: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    shard = os.path.join(out_dir, f".mqar-gpu.shard{i}.jsonl")
    log = open(os.path.join(out_dir, f".mqar-gpu.worker{i}.log"), "a")
    try:
        Q.run(cfg, shard, device=device, budget_s=max(0.0, deadline - time.time()), shard=(i, n),
              prior=[os.path.join(out_dir, "mqar-gpu.jsonl")], log=lambda m: print(f"[w{i}] {m}", file=log, flush=True))
    except Exception:  # reported in the log and by the parent (missing cells)
        traceback.print_exc(file=log)
    finally:
        log.close()


def merge(out_dir: str, n: int) -> str:
    """Append every complete shard line to mqar-gpu.jsonl, then remove the shards."""
    main = os.path.join(out_dir, "mqar-gpu.jsonl")
    with open(main, "a") as f:
        for i in range(n):
            shard = os.path.join(out_dir, f".mqar-gpu.shard{i}.jsonl")
            if not os.path.exists(shard):
                continue
            for line in open(shard):
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a killed worker
                f.write(line if line.endswith("\n") else line + "\n")
            os.remove(shard)
    return main


def markdown(cells, cfg: Q.MQARConfig, wall: float, left: int, env: dict) -> str:
    summary = Q.summarize(cells)
    tests = [f"{T}x{n}" for T, n in cfg.test_grid]
    lines = [f"# MQAR on {env.get('gpu') or env.get('cpu')} ({env.get('date')}), torch {env.get('torch')}", "",
             f"{len(cells)} cells, wall {wall:.0f} s, {left} cells left; steps {cfg.steps}, batch {cfg.batch}, "
             f"train {cfg.train_grid}, lrs {cfg.lrs}, float32 (TF32 matmuls)", "",
             "| model | d | f | state | lr | acc | " + " | ".join(tests) + " |",
             "|---" * (6 + len(tests)) + "|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['d_model']} | {s.get('feature_dim') or ''} | "
                     f"{Q._fmt_bytes(s['state_bytes'])} | {s['lr']:g} | {s['accuracy']:.3f} | "
                     + " | ".join(f"{s['by_test'].get(t, float('nan')):.2f}" for t in tests) + " |")
    lines.append("")
    for claim, held, detail in Q.check_orderings(summary):
        lines.append(f"- {'reproduced' if held else 'NOT reproduced' if held is False else 'not testable'}: "
                     f"{claim}" + (f" ({detail})" if detail else ""))
    bad = [c for c in cells if c.get("status") != "ok"]
    lines += [f"- {c.get('status')}: {c.get('variant')} d={c.get('d_model')} lr={c.get('lr')}: {c.get('note')}"
              for c in bad]
    return "\n".join(lines) + "\n"


def count_ops(cfg: Q.MQARConfig, d_model: int = 128):
    """Aten ops (≈ kernel launches; views excluded) of one training step per variant and training length."""
    from torch.utils._python_dispatch import TorchDispatchMode
    views = {"view", "_unsafe_view", "reshape", "expand", "transpose", "t", "permute", "select", "slice",
             "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "unbind", "chunk", "narrow",
             "diagonal", "lift_fresh"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in views:
                self.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    for name in cfg.variants:
        m = Q.build_model(Q.ModelSpec(name, d_model, cfg.n_heads), cfg.vocab, "reference")
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        per_T = {}
        for T, pairs in cfg.train_grid:
            ids, lab = Q.mqar_batch(2, T, pairs, cfg.vocab, generator=g)
            for counting in (False, True):
                c = Count()
                if counting:
                    with c:
                        loss, _ = m.loss_and_correct(ids, lab)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    per_T[T] = c.n
                else:
                    loss, _ = m.loss_and_correct(ids, lab)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        out[name] = per_T
        print(f"  {name:28s} ops per training step: {per_T}", flush=True)
    return out


_LAYER_PARAMS = {}


def step_flops(cfg: Q.MQARConfig, spec: Q.ModelSpec, T: int, pairs: int) -> float:
    """Matmul FLOPs of one training step (3x forward): 2·(layer parameters)·tokens, the score and value products of
    each softmax-family layer, the tied head at the asked positions."""
    if spec not in _LAYER_PARAMS:
        m = Q.build_model(spec, cfg.vocab, "reference")
        _LAYER_PARAMS[spec] = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks."))
    layer_params = _LAYER_PARAMS[spec]
    fwd = 2.0 * layer_params * cfg.batch * T + 2.0 * cfg.batch * pairs * spec.d_model * cfg.vocab
    for part in spec.layer_names():
        if part in ("softmax", "sigmoid", "sliding_window"):
            keys = min(T, cfg.window + 1) if part == "sliding_window" else T
            fwd += 4.0 * cfg.batch * T * keys * spec.d_model
    return 3.0 * fwd


def estimate(cfg: Q.MQARConfig, workers: int) -> None:
    """Predicted wall time of the grid: host-bound (every op dispatched and launched by one worker's Python) and
    GPU-bound (every worker's kernels on one GPU: a per-kernel time plus FLOPs at a sustained rate)."""
    cells = cfg.cells()
    print(f"estimate: {len(cells)} cells × {cfg.steps} steps, batch {cfg.batch}, {workers} workers; assumed "
          f"{SEC_PER_OP * 1e6:.0f} µs host per op, {GPU_SEC_PER_OP * 1e6:.0f} µs GPU per kernel, "
          f"{FLOPS / 1e12:.0f} TFLOP/s")
    ops = count_ops(cfg)
    host = gpu = 0.0
    n_eval = sum(-(-cfg.n_test // cfg.eval_batch) for _ in cfg.test_grid) + \
        (cfg.steps // cfg.eval_every) * len(cfg.train_grid)
    for spec, lr in cells:
        per_T = ops[spec.name]
        cycles = cfg.steps / len(cfg.train_grid)
        cycle_ops = sum(per_T.values())
        cycle_flops = sum(step_flops(cfg, spec, T, pairs) for T, pairs in cfg.train_grid)
        eval_ops = n_eval * 0.35 * cycle_ops / len(cfg.train_grid)  # a forward is about a third of a step
        host += (cycles * cycle_ops + eval_ops) * SEC_PER_OP
        gpu += (cycles * cycle_ops + eval_ops) * GPU_SEC_PER_OP + cycles * cycle_flops / FLOPS
    print(f"host-bound: {host / workers:.0f} s per worker ({host:.0f} s in one process); GPU-bound: {gpu:.0f} s; "
          f"predicted wall ≈ {max(host / workers, gpu):.0f} s + start-up")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=os.environ.get("OUT", "mqar-gpu"))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds from start after which no cell starts (a 600 s device call: 480 leaves room)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--estimate", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    cfg = Q.GPU if a.steps is None else replace(Q.GPU, steps=a.steps)
    device = "cuda"
    if a.cpu_smoke:
        cfg = replace(cfg, variants=("softmax", "gated_delta", "gated_delta+softmax"), d_models=(32,),
                      feature_dims=(16,), steps=4, batch=4, train_grid=((64, 4),), test_grid=((64, 4), (128, 8)),
                      n_test=8, eval_every=2)
        device, a.workers = "cpu", 2
    if a.estimate:
        estimate(cfg, a.workers)
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mqar_gpu.py: no CUDA device (use --cpu-smoke or --estimate on a CPU)")
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    main_file = os.path.join(a.out, "mqar-gpu.jsonl")
    seed = a.seed
    if seed is None and os.path.exists(main_file):
        runs = Q.read_results(main_file)["runs"]
        seed = runs[-1]["seed"] if runs else None
    if seed is None:
        import secrets
        seed = secrets.randbelow(2 ** 31)
    cfg = replace(cfg, seed=seed)
    print(f"mqar_gpu: seed {seed}, {len(cfg.cells())} cells, {a.workers} workers, budget {a.budget:.0f} s",
          flush=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(i, a.workers, cfg, a.out, t0 + a.budget, device))
             for i in range(a.workers)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(timeout=max(1.0, t0 + a.budget + 50 - time.time()))
    for pr in procs:
        if pr.is_alive():
            pr.terminate()
    merge(a.out, a.workers)
    wall = time.time() - t0
    data = Q.read_results(main_file)
    from attnkit.tools.bench import environment
    env = environment(device)
    keys = {Q.cell_key(s, lr, cfg, seed) for s, lr in cfg.cells()}
    cells = [c for c in data["cells"] if c["key"] in keys]
    left = len(keys) - sum(c.get("status") == "ok" for c in cells)
    md = markdown(cells, cfg, wall, left, env)
    with open(os.path.join(a.out, "mqar-gpu.md"), "w") as f:
        f.write(md)
    print(md)
    for i in range(a.workers):
        log = os.path.join(a.out, f".mqar-gpu.worker{i}.log")
        if os.path.exists(log):
            tail = open(log).read().splitlines()[-3:]
            print(f"worker {i}: " + " | ".join(tail))
    print(f"mqar_gpu: wall {wall:.0f} s, {len(cells)} cells done, {left} left"
          + (" (rerun the same command to finish)" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
