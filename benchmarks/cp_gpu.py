"""Context parallelism on GPUs: the single-GPU simulation of the ring (issue 17) and the multi-GPU run (issue 18).

    python benchmarks/cp_gpu.py --simulate --out benchmarks/results          # one H200: predicted scaling
    python benchmarks/cp_gpu.py --simulate --lengths 131072 --worlds 2 8      # a slice
    torchrun --nproc-per-node 8 benchmarks/cp_gpu.py --distributed --out benchmarks/results   # measured (issue 18)
    python benchmarks/cp_gpu.py --cpu-smoke --out /tmp/cp                     # tiny end-to-end run on the CPU

``--simulate`` (one GPU; the model is in notes/context_parallel.md): for each total length T (128k, 512k), each
pattern (causal softmax with zigzag shards, sliding window 4k with contiguous shards, linear rules gla and
gated_delta with contiguous shards) and each direction (forward, forward+backward), the one-GPU call on the whole
sequence is timed (``t1``: the code path of one rank, i.e. ``return_lse=True`` for softmax; ``t1 best``: plain
``attnkit.attention``, where ``auto`` may pick cuDNN), then for n = 2, 4, 8 every distinct ring step of every rank
is timed on a copy of a peer's K/V block (alone and next to a device copy of the block's bytes on a second stream),
the transfer is taken at the H200's NVLink bandwidth (900 GB/s bidirectional per GPU: 450 GB/s each way, times
``--link-efficiency``), and the predicted call time is Σ over steps of max over ranks of max(compute, transfer).
Efficiency = t1 / (n · t_n). bf16, B=1, H=16 (``--kv-heads`` for GQA), D=128.

``--distributed`` (under torchrun, NCCL, one process per GPU; NVLink multicast left off): correctness of every
pattern against the one-GPU result at a small length, then the time per call on n GPUs of
``context_parallel_attention`` / ``context_parallel_linear_attention`` (max over ranks), the one-GPU time on rank 0,
and PyTorch's own ``context_parallel`` with SDPA on the causal pattern where it runs.

Every cell runs in try/except (an OOM or a refusal is a row with its error); JSON and markdown go to ``--out``
after every row, and the table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Dict, List, Optional

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attnkit  # noqa: E402
import attnkit.distributed as cp  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit.distributed.sim import NVLINK_H200_PER_DIRECTION, Timer, simulate_linear, simulate_softmax  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def patterns(window: int) -> Dict[str, dict]:
    """name -> how to run it: softmax (mask, load balance) or linear (rule)."""
    return {
        "causal-zigzag": dict(family="softmax", mask=M.causal, load_balance="zigzag"),
        (f"window{window // 1024}k" if window >= 1024 else f"window{window}"):
            dict(family="softmax", mask=M.sliding_window(window - 1), load_balance=None),
        "gla": dict(family="linear", rule="gla"),
        "gated_delta": dict(family="linear", rule="gated_delta"),
    }


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def environment() -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpus"] = torch.cuda.device_count()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:.3f}" if x < 0.1 else f"{x * 1e3:.1f}"


def table(rows: List[dict]) -> str:
    head = ("| pattern | T | dir | n | t1 ms | tn ms | efficiency | t1 best ms | eff. vs best | eff. kept graphs | "
            "ring steps | comm-bound steps | note |")
    out = [head, "|" + "---|" * 13]
    pct = lambda x: "" if x is None else f"{x:.1%}"  # noqa: E731
    for r in rows:
        out.append(f"| {r['pattern']} | {r['T']} | {r['dir']} | {r['n']} | {_ms(r.get('t1'))} | {_ms(r.get('t_n'))} | "
                   f"{pct(r.get('efficiency'))} | {_ms(r.get('t1_best'))} | {pct(r.get('efficiency_vs_best'))} | "
                   f"{pct(r.get('efficiency_kept'))} | "
                   f"{r.get('ring_steps', '')} | {r.get('comm_bound_steps', '')} | {r.get('note', '')} |")
    return "\n".join(out)


def write(rows: List[dict], out_dir: str, tag: str, meta: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    dev = (meta.get("gpu") or "cpu").replace(" ", "-")
    base = os.path.join(out_dir, f"{dev}-{time.strftime('%Y-%m-%d')}-cp-{tag}")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(f"# Context parallelism, {tag} ({meta.get('gpu', 'cpu')})\n\n```\n{json.dumps(meta, default=str)}\n```"
                f"\n\n{table(rows)}\n")
    return base


# ------------------------------------------------------------------------------------------------
# --simulate (one device)
# ------------------------------------------------------------------------------------------------

def run_simulation(args, device: str) -> List[dict]:
    dtype = DTYPES[args.dtype]
    timer = Timer(device, warmup=args.warmup, reps=args.reps)
    rows: List[dict] = []
    meta = dict(environment(), mode="simulate", link_bw_per_direction=args.link_bw,
                link_efficiency=args.link_efficiency,
                latency_s=args.latency, B=1, H=args.heads, Hkv=args.kv_heads, D=args.dim, dtype=args.dtype)
    pats = patterns(args.window)
    for T in args.lengths:
        for name in args.patterns or list(pats):
            p = pats[name]
            for backward in (False, True):
                d = "fwd+bwd" if backward else "fwd"
                t1 = None
                for n in args.worlds:
                    row = dict(pattern=name, T=T, dir=d, n=n)
                    try:
                        common = dict(dtype=dtype, device=device, backward=backward, timer=timer, t1=t1,
                                      link_bw=args.link_bw, link_efficiency=args.link_efficiency,
                                      latency=args.latency)
                        if p["family"] == "softmax":
                            r = simulate_softmax(T, n, B=1, Hq=args.heads, Hkv=args.kv_heads, D=args.dim,
                                                 mask=p["mask"], load_balance=p["load_balance"], **common)
                        else:
                            r = simulate_linear(T, n, rule=p["rule"], B=1, H=args.heads, D=args.dim, **common)
                        t1 = r.get("t1_all", r["t1"])  # measured once per (T, pattern, direction)
                        row.update({k: v for k, v in r.items() if k not in ("T", "backward", "world_size")})
                    except Exception as e:  # one failing cell (OOM, refusal) must not stop the grid
                        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        if args.verbose:
                            traceback.print_exc()
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    write(rows, args.out, "simulate", meta)
    return rows


# ------------------------------------------------------------------------------------------------
# --distributed (under torchrun, or spawned gloo processes for the CPU smoke run)
# ------------------------------------------------------------------------------------------------

def _inputs(T: int, H: int, Hkv: int, D: int, dtype, device, seed: int):
    """The whole sequence's q, k, v, equal on every rank (a seeded generator on the device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(1, h, T, D, generator=g, device=device).to(dtype)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


def _linear_kw(rule: str, T: int, H: int, D: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed + 1)
    rand = lambda *s: torch.rand(*s, generator=g, device=device)  # noqa: E731
    kw = {}
    if rule == "gla":
        kw["gate"] = -rand(1, H, T, D) * 0.1
    if rule == "gated_delta":
        kw["gate"] = -rand(1, H, T) * 0.1
        kw["beta"] = rand(1, H, T)
        kw["qk_l2norm"] = True
    return kw


def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _dist_cell(name: str, p: dict, T: int, backward: bool, args, rank: int, n: int, device, dtype) -> dict:
    """Time one pattern on the group (and its one-GPU baseline on rank 0)."""
    lb = p.get("load_balance")
    q, k, v = _inputs(T, args.heads, args.kv_heads if p["family"] == "softmax" else args.heads, args.dim, dtype,
                      device, args.seed)
    kw = _linear_kw(p.get("rule", ""), T, args.heads, args.dim, device, args.seed) if p["family"] == "linear" else {}
    sh = lambda x, dim=2: cp.shard(x, rank, n, dim=dim, load_balance=lb).contiguous()  # noqa: E731
    ql, kl, vl = (sh(x).requires_grad_(backward) for x in (q, k, v))
    kwl = {a: (sh(t).requires_grad_(backward) if torch.is_tensor(t) else t) for a, t in kw.items()}
    timer = Timer(device, warmup=args.warmup, reps=args.reps)

    def call_n():
        if p["family"] == "softmax":
            o = cp.context_parallel_attention(ql, kl, vl, mask=p["mask"], load_balance=lb, check=False)
        else:
            o, _ = cp.context_parallel_linear_attention(ql, kl, vl, rule=p["rule"], load_balance=lb, check=False,
                                                        **kwl)
        if backward:
            leaves = [x for x in (ql, kl, vl, *kwl.values()) if torch.is_tensor(x) and x.requires_grad]
            torch.autograd.grad(o, leaves, torch.ones_like(o))

    dist.barrier()
    t_n = _max_over_ranks(timer(call_n), device)
    t1 = None
    if rank == 0 and not args.no_baseline:
        qg, kg, vg = (x.detach().requires_grad_(backward) for x in (q, k, v))
        kwg = {a: (t.detach().requires_grad_(backward) if torch.is_tensor(t) else t) for a, t in kw.items()}

        def call_1():
            if p["family"] == "softmax":
                o = attnkit.attention(qg, kg, vg, mask=p["mask"])
            else:
                o, _ = attnkit.linear_attention(qg, kg, vg, rule=p["rule"], **kwg)
            if backward:
                leaves = [x for x in (qg, kg, vg, *kwg.values()) if torch.is_tensor(x) and x.requires_grad]
                torch.autograd.grad(o, leaves, torch.ones_like(o))
        try:
            t1 = timer(call_1)
        except Exception as e:  # the whole sequence may not fit one GPU
            t1 = None
            print(f"one-GPU baseline failed: {type(e).__name__}: {e}", flush=True)
    dist.barrier()
    return dict(t_n=t_n, t1=t1, efficiency=None if t1 is None else t1 / (n * t_n))


def _dist_check(name: str, p: dict, T: int, args, rank: int, n: int, device, dtype) -> float:
    """Relative error of the gathered output and input gradients against the one-rank call (same inputs)."""
    lb = p.get("load_balance")
    q, k, v = _inputs(T, args.heads, args.kv_heads if p["family"] == "softmax" else args.heads, args.dim, dtype,
                      device, args.seed + 7)
    kw = (_linear_kw(p.get("rule", ""), T, args.heads, args.dim, device, args.seed + 7) if p["family"] == "linear"
          else {})
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if p["family"] == "softmax":
        ref = attnkit.attention(q, k, v, mask=p["mask"])
    else:
        ref, _ = attnkit.linear_attention(q, k, v, rule=p["rule"], **kw)
    g = torch.randn(ref.shape, generator=torch.Generator(device=device).manual_seed(args.seed), device=device,
                    dtype=dtype)
    want = torch.autograd.grad(ref, (q, k, v), g)
    sh = lambda x: cp.shard(x.detach(), rank, n, load_balance=lb).requires_grad_()  # noqa: E731
    ql, kl, vl = sh(q), sh(k), sh(v)
    kwl = {a: (cp.shard(t, rank, n, load_balance=lb) if torch.is_tensor(t) else t) for a, t in kw.items()}
    if p["family"] == "softmax":
        o = cp.context_parallel_attention(ql, kl, vl, mask=p["mask"], load_balance=lb)
    else:
        o, _ = cp.context_parallel_linear_attention(ql, kl, vl, rule=p["rule"], load_balance=lb, **kwl)
    got = torch.autograd.grad(o, (ql, kl, vl), cp.shard(g, rank, n, load_balance=lb))
    lay = cp.ShardLayout.for_sequence(T, n, lb)
    err = 0.0
    for a, b in [(o, ref)] + list(zip(got, want)):
        full = cp.gather_sequence(a.detach(), lay)
        err = max(err, float((full.float() - b.detach().float()).norm() / b.detach().float().norm().clamp(min=1e-30)))
    return err


def _torch_cp_cell(T: int, backward: bool, args, rank: int, n: int, device, dtype) -> Optional[float]:
    """PyTorch's context_parallel with SDPA, causal (round-robin load balancing as PyTorch defaults)."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh(device.type, (n,))
    q, k, v = (x.requires_grad_(backward) for x in _inputs(T, args.heads, args.heads, args.dim, dtype, device,
                                                           args.seed))
    timer = Timer(device, warmup=args.warmup, reps=args.reps)

    def call():
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                o.backward(torch.ones_like(o))
    return _max_over_ranks(timer(call), device)


def run_distributed(args, device_type: str) -> List[dict]:
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_type, rank % max(torch.cuda.device_count(), 1)) if device_type == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    pats = patterns(args.window)
    rows: List[dict] = []
    meta = dict(environment(), mode="distributed", world_size=n, backend=dist.get_backend(), B=1, H=args.heads,
                Hkv=args.kv_heads, D=args.dim, dtype=args.dtype)
    for name in args.patterns or list(pats):  # correctness first, at a small length
        try:
            err = _dist_check(name, pats[name], args.check_T, args, rank, n, device, dtype)
            rows.append(dict(pattern=name, T=args.check_T, dir="check", n=n, note=f"max rel. error {err:.2e}"))
        except Exception as e:
            rows.append(dict(pattern=name, T=args.check_T, dir="check", n=n, note=f"{type(e).__name__}: {e}"[:200]))
    for T in args.lengths:
        for name in args.patterns or list(pats):
            for backward in (False, True):
                row = dict(pattern=name, T=T, dir="fwd+bwd" if backward else "fwd", n=n)
                try:
                    row.update(_dist_cell(name, pats[name], T, backward, args, rank, n, device, dtype))
                except Exception as e:
                    row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                if rank == 0:
                    print(table([row]).splitlines()[-1], flush=True)
                    write(rows, args.out, f"distributed{n}", meta)
        if not args.no_torch_cp:
            for backward in (False, True):
                row = dict(pattern="torch-context_parallel-sdpa-causal", T=T, dir="fwd+bwd" if backward else "fwd", n=n)
                try:
                    row["t_n"] = _torch_cp_cell(T, backward, args, rank, n, device, dtype)
                except Exception as e:
                    row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
    if rank == 0:
        write(rows, args.out, f"distributed{n}", meta)
    return rows


def _spawned(rank: int, n: int, store: str, argv: List[str]):
    args = parse(argv)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
    try:
        rows = run_distributed(args, "cpu")
        if rank == 0:
            print(table(rows))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulate", action="store_true", help="one GPU: time the ring's steps, predict the scaling")
    mode.add_argument("--distributed", action="store_true", help="under torchrun: measure on the group's GPUs")
    mode.add_argument("--cpu-smoke", action="store_true", help="tiny simulation + a 2-process gloo run on the CPU")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--patterns", nargs="+", default=None, help="subset of the pattern names")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--link-bw", type=float, default=NVLINK_H200_PER_DIRECTION, help="bytes/s per direction")
    ap.add_argument("--link-efficiency", type=float, default=1.0)
    ap.add_argument("--latency", type=float, default=20e-6, help="seconds per transfer")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--check-T", type=int, default=8192, help="--distributed: length of the correctness check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="--distributed: skip the one-GPU time")
    ap.add_argument("--no-torch-cp", action="store_true", help="--distributed: skip PyTorch's context_parallel")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.simulate:
        if not torch.cuda.is_available():
            sys.exit("--simulate needs a GPU (use --cpu-smoke on a CPU)")
        rows = run_simulation(args, "cuda")
        print("\n" + table(rows))
    elif args.distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        try:
            rows = run_distributed(args, "cuda" if backend == "nccl" else "cpu")
            if dist.get_rank() == 0:
                print("\n" + table(rows))
        finally:
            dist.destroy_process_group()
    else:  # --cpu-smoke: every code path at toy sizes
        import tempfile

        import torch.multiprocessing as mp
        small = ["--worlds", "2", "4", "--heads", "2", "--kv-heads", "2", "--dim", "16", "--window", "32",
                 "--dtype", "fp32", "--warmup", "0", "--reps", "1", "--out", args.out]
        rows = run_simulation(parse(["--simulate", "--lengths", "256"] + small), "cpu")
        print("\n" + table(rows))
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_spawned, args=(2, os.path.join(tmp, "store"),
                                               ["--distributed", "--lengths", "128", "--check-T", "64",
                                                "--no-torch-cp"] + small),
                               nprocs=2, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
