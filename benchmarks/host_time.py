"""Host time per attnkit call (tiny GPU work: B = H = 1, T = 128, D = 64, bf16): median over 5 rounds of the time to
enqueue 100 back-to-back calls, forward and forward+backward, for a few masks. Runs against whatever ``attnkit``
is importable (PYTHONPATH), so the same script times an old and a new tree in one device call.

    python benchmarks/host_time.py [--label new]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnkit
from attnkit import masks as M
from attnkit import scores as S


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    cases = {"causal": (M.causal, None), "causal_alibi": (M.causal, S.alibi()),
             "document8_causal": (M.document(cu_seqlens=torch.arange(0, 129, 16)) & M.causal, None)}
    for name, (mask, mod) in cases.items():
        q, k, v = (torch.randn(1, 1, 128, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

        def fwd():
            return attnkit.attention(q, k, v, mask=mask, score_mod=mod, backend="triton")

        def fwd_bwd():
            fwd().sum().backward()

        for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            for _ in range(30):
                step()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(100):
                    step()
                times.append((time.perf_counter() - t0) / 100 * 1e6)
                torch.cuda.synchronize()
            print(f"host {args.label:>4} {name:<18} {mode:<8} {statistics.median(times):8.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
