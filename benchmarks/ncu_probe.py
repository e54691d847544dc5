"""One warm forward+backward of attnkit and of FlexAttention inside a CUDA profiler range, for Nsight Compute.

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats ... \
        python benchmarks/ncu_probe.py --case full:4096

Only the calls between cudaProfilerStart/Stop are profiled (compiles and warm-up stay outside).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from softmax_gpu import cached_pattern, make_steps  # noqa: E402

import attnkit  # noqa: E402
from attnkit.tools.peers import peers  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="full:4096")
    ap.add_argument("--impls", nargs="+", default=["attnkit", "flex"])
    a = ap.parse_args(argv)
    pat, T = a.case.split(":")
    T = int(T)
    B, H, D, dev = max(1, 16384 // T), 16, 128, torch.device("cuda")
    Lq, Lk, mask, mod = cached_pattern(pat, T)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for L in (Lq, Lk, Lk))
    fns = {"attnkit": lambda: attnkit.attention(q, k, v, mask=mask, score_mod=mod, backend="triton"),
           "flex": peers(q, k, v, mask=mask, score_mod=mod, normalizer="softmax", scale=None)["flex"]}
    steps = [make_steps(fns[name], [q, k, v])[1] for name in a.impls]
    for step in steps:
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    sys.exit(main())
