"""Where the backward's time goes, next to FlexAttention's: per-kernel times and a sweep of tile choices.

    python benchmarks/bwd_probe.py [--cases full:16384 causal:16384 causal:1024] [--configs ...]

For each case (pattern:T, bf16, H = 16, D = 128, B·T = 16384): the CUDA kernels of one attnkit
forward+backward and one Flex forward+backward (torch profiler), then attnkit's forward+backward time with each
``dkdv/dq`` configuration ``BM,BN,warps,stages/BM,BN,warps,stages[/split]`` (median of CUDA-event timings after
warm-up; ``/split``: dK/dV and dQ as two launches).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from softmax_gpu import cached_pattern, make_steps, warm  # noqa: E402

import attnkit  # noqa: E402
from attnkit.tools.timing import time_ms  # noqa: E402
from attnkit.ops.softmax import fused as A  # noqa: E402
from attnkit.ops.utils import tuning  # noqa: E402
from attnkit.tools.peers import peers  # noqa: E402

SPLIT0 = A.SPLIT_BWD  # as set by ATTNKIT_SPLIT_BWD
DEFAULT_CONFIGS = ["64,128,8,3/128,64,8,3", "64,128,8,2/128,64,8,2", "64,128,8,3/128,128,8,2",
                   "64,128,8,2/128,128,8,2", "32,128,8,3/128,64,8,3", "64,64,4,3/64,64,4,3"]


def kernel_table(step, n: int = 5) -> list:
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:60], t / n))
    return sorted(rows, key=lambda r: -r[1])[:8]


def force(spec: str) -> None:
    """Force ``dkdv/dq`` configurations; a trailing ``/split`` runs them as two launches (else one, where the
    warps and stages agree)."""
    parts = spec.split("/")
    A.SPLIT_BWD = parts[-1] == "split" or SPLIT0
    dkdv, dq = (tuning.Config(*(int(x) for x in s.split(","))) for s in parts[:2])
    base = tuning.defaults

    def forced(phase, *args):
        return {"dkdv": dkdv, "dq": dq}.get(phase) or base(phase, *args)
    tuning.defaults = forced
    tuning.clear()
    A._problems.clear()
    return base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["full:16384", "causal:16384", "causal:1024"])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--D", type=int, default=128)
    a = ap.parse_args(argv)
    dev, H, D = torch.device("cuda"), 16, a.D
    result = []
    for case in a.cases:
        pat, T = case.split(":")
        T = int(T)
        B = max(1, 16384 // T)
        Lq, Lk, mask, mod = cached_pattern(pat, T)
        q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for L in (Lq, Lk, Lk))
        ours = lambda: attnkit.attention(q, k, v, mask=mask, score_mod=mod, backend="triton")  # noqa: E731
        flex = peers(q, k, v, mask=mask, score_mod=mod, normalizer="softmax", scale=None)["flex"]
        rec = {"case": case, "kernels": {}, "configs": {}}
        for name, fn in (("flex", flex), ("attnkit", ours)):
            fw, fb = make_steps(fn, [q, k, v])
            warm(fw, 0.2)
            rec["fwd_ms_" + name] = time_ms(fw, dev, warmup=3, rep=20)
            print(f"{case} {name}: {rec['fwd_ms_' + name]:.3f} ms fwd", flush=True)
            warm(fb, 0.3)
            rec["kernels"][name] = kernel_table(fb)
            rec["configs"][name + " (as shipped)" if name == "attnkit" else name] = time_ms(fb, dev, warmup=3, rep=20)
            print(f"{case} {name}: {rec['configs'][list(rec['configs'])[-1]]:.3f} ms fwd+bwd", flush=True)
            for kname, us in rec["kernels"][name]:
                print(f"    {us:9.1f} us  {kname}", flush=True)
        for spec in a.configs:
            base = force(spec)
            try:
                _, fb = make_steps(ours, [q, k, v])
                warm(fb, 0.3)
                ms = time_ms(fb, dev, warmup=3, rep=20)
            except Exception as e:  # noqa: BLE001 - report, keep going
                ms = None
                print(f"{case} {spec}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            finally:
                tuning.defaults = base
                A.SPLIT_BWD = SPLIT0
                A._problems.clear()
            rec["configs"][spec] = ms
            if ms is not None:
                print(f"{case} {spec}: {ms:.3f} ms fwd+bwd ({rec['configs']['flex'] / ms:.2f}x flex)", flush=True)
        result.append(rec)
        del q, k, v
        torch.cuda.empty_cache()
        with open(os.path.join(a.out, "bwd_probe.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
