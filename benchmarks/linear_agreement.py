"""Chunk vs recurrent form of a linear rule at long T (issue 3 done-when), against a float64 recurrent run.

    python benchmarks/linear_agreement.py --rule gated_delta --T 16384 --H 4 --D 128
"""
import argparse
import time

import torch

import attnkit
from attnkit.tools.check import rel_err


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rule", default="gated_delta")
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=128)
    a = p.parse_args()
    B, H, T, D = 1, a.H, a.T, a.D
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    gate = torch.nn.functional.logsigmoid(torch.randn(B, H, T) + 3)  # log decay per token
    beta = torch.rand(B, H, T)
    kw = dict(rule=a.rule, gate=gate, beta=beta, qk_l2norm=True, output_final_state=True)
    res = {}
    for form, dtype in [("chunk", torch.float32), ("recurrent", torch.float32), ("recurrent", torch.float64)]:
        t0 = time.perf_counter()
        o, S = attnkit.linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), form=form,
                                        **{**kw, "gate": gate.to(dtype), "beta": beta.to(dtype)})
        res[(form, dtype)] = (o, S, time.perf_counter() - t0)
    o64, S64, _ = res[("recurrent", torch.float64)]
    oc, Sc, tc = res[("chunk", torch.float32)]
    orc, Src, tr = res[("recurrent", torch.float32)]
    print(f"{a.rule} T={T} H={H} D={D} float32 (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"chunk vs recurrent (fp32):  out {rel_err(oc, orc):.1e}  state {rel_err(Sc, Src):.1e}")
    print(f"chunk vs float64 recurrent: out {rel_err(oc, o64):.1e}  state {rel_err(Sc, S64):.1e}")
    print(f"recurrent fp32 vs float64:  out {rel_err(orc, o64):.1e}  state {rel_err(Src, S64):.1e}")
    print(f"time: chunk {tc:.2f} s, recurrent {tr:.2f} s (one call each, no warm-up)")


if __name__ == "__main__":
    main()
