"""One training step of whole models on one GPU: attnkit's HybridLM against the same architecture built from
peers' layers (issue 13's speed targets).

    python benchmarks/model_gpu.py benchmarks/results/model-h200            # the default grid, bf16
    python benchmarks/model_gpu.py /tmp/smoke --cpu-smoke                   # tiny config on the CPU

Models (12 layers, d_model 1024, 16 heads of 64, SwiGLU 2752, vocab 32000 tied, 8192 tokens per sequence):

* ``attnkit-hybrid``: ``HybridLM(layers="LLLA", linear_rule="gated_delta")``, attnkit's Attention and
  LinearAttention layers with ``backend="auto"``;
* ``fla-hybrid``: the same blocks with fla's ``fla.layers.GatedDeltaNet`` (16 heads of 64, expand_v 1, short
  convolutions, chunk mode) for ``L`` and an SDPA attention layer (same projections and RoPE,
  ``scaled_dot_product_attention(is_causal=True)``) for ``A``; target: attnkit ≤ 1.2× its step time;
* ``attnkit-softmax``: ``HybridLM(layers="A")``, pure softmax;
* ``sdpa-cudnn-softmax``: the same blocks with the SDPA layer pinned to cuDNN; target: attnkit ≤ 1.1×.

A step is forward + next-token loss + backward + AdamW step + zero_grad, parameters in bf16. Per cell: median
ms per step over ``--iters`` steps after ``--warmup`` steps (CUDA events, synchronized), tokens/s, peak
allocated memory of a step, the ratio to its peer, and the error text for a cell that failed (every cell runs
in try/except; the table is written at the end and after every cell). JSON + markdown into OUT_DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import traceback
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit.nn import HybridConfig, HybridLM
from attnkit.nn.rope import RotaryEmbedding

CELLS = [("attnkit-hybrid", "LLLA", "attnkit"), ("fla-hybrid", "LLLA", "fla"),
         ("attnkit-softmax", "A", "attnkit"), ("sdpa-cudnn-softmax", "A", "sdpa-cudnn")]
PEER = {"attnkit-hybrid": ("fla-hybrid", 1.2), "attnkit-softmax": ("sdpa-cudnn-softmax", 1.1)}


class SDPAAttention(nn.Module):
    """The peer softmax layer: attnkit.nn.Attention's projections and RoPE around torch's SDPA (causal)."""

    def __init__(self, d_model: int, n_heads: int, backend: Optional[str]):
        super().__init__()
        self.h, self.d = n_heads, d_model // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False)
                                                              for _ in range(4))
        self.rope = RotaryEmbedding(self.d)
        self.backend = backend

    def forward(self, x, *, cache=None, cu_seqlens=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.h, self.d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        pos = torch.arange(T, device=x.device)
        q, k = self.rope(q, pos), self.rope(k, pos)
        if self.backend == "cudnn" and x.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class FLAGatedDeltaNet(nn.Module):
    """fla's GatedDeltaNet layer behind the attnkit.nn mixer call (fla returns ``(o, attn, cache)``)."""

    def __init__(self, d_model: int, n_heads: int, layer_idx: int):
        super().__init__()
        from fla.layers import GatedDeltaNet
        self.layer = GatedDeltaNet(hidden_size=d_model, num_heads=n_heads, head_dim=d_model // n_heads, expand_v=1,
                                   mode="chunk", use_short_conv=True, conv_size=4, layer_idx=layer_idx)

    def forward(self, x, *, cache=None, cu_seqlens=None):
        return self.layer(x)[0]


def build(kind: str, pattern: str, a) -> nn.Module:
    n_heads = a.heads
    mixers = {}
    if kind == "fla":
        mixers = {"L": lambda c, i: FLAGatedDeltaNet(c.d_model, n_heads, i),
                  "A": lambda c, i: SDPAAttention(c.d_model, n_heads, None)}
    elif kind == "sdpa-cudnn":
        mixers = {"A": lambda c, i: SDPAAttention(c.d_model, n_heads, "cudnn")}
    cfg = HybridConfig(vocab_size=a.vocab, d_model=a.d_model, n_heads=n_heads, layers=pattern, n_layers=a.layers,
                       linear_rule="gated_delta", linear={"backend": "auto"}, attention={"backend": "auto"},
                       mixers=mixers)
    return HybridLM(cfg)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_cell(name: str, pattern: str, kind: str, a, dev, dtype) -> Dict:
    row: Dict = {"cell": name, "pattern": pattern, "impl": kind}
    model = opt = None
    try:
        torch.manual_seed(0)
        model = build(kind, pattern, a).to(device=dev, dtype=dtype)
        row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        except (TypeError, RuntimeError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_fn = model if not a.compile else torch.compile(model)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)

        def step(optim=opt):
            _, loss = step_fn(ids, labels=ids)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            return loss

        t0 = time.perf_counter()
        loss = step()
        sync(dev)
        row["first_step_s"] = round(time.perf_counter() - t0, 3)
        row["loss0"] = float(loss)
        for _ in range(a.warmup):
            step()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.iters):
            if dev.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        row.update(ms=round(ms, 3), ms_min=round(min(times), 3), tokens_per_s=round(a.batch * a.seq / ms * 1e3),
                   status="ok")
        if dev.type == "cuda":
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        if kind == "attnkit":
            row["attnkit_last_backend"] = attnkit.last_backend()
    except Exception as e:  # noqa: BLE001  (a failed cell is a row with its reason, the others still run)
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:400]}",
                   trace=traceback.format_exc(limit=4)[-1500:])
    finally:
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def environment(dev) -> Dict:
    env = {"torch": torch.__version__, "attnkit": getattr(attnkit, "__version__", "?"), "python": platform.python_version(),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"}
    for mod in ("triton", "fla", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


def markdown(res: Dict) -> str:
    a = res["config"]
    lines = [f"# One training step: HybridLM vs peers ({res['env']['device']})", "",
             f"{a['layers']} layers, d_model {a['d_model']}, {a['heads']} heads, vocab {a['vocab']}, batch "
             f"{a['batch']} x {a['seq']} tokens, {a['dtype']}, fwd+bwd+AdamW; median of {a['iters']} steps after "
             f"{a['warmup']} warm-up. Versions: " + ", ".join(f"{k} {v}" for k, v in res["env"].items()), "",
             "| cell | pattern | ms / step | tokens/s | peak GiB | ratio to peer (target) | status |",
             "|---|---|---|---|---|---|---|"]
    by = {r["cell"]: r for r in res["rows"]}
    for r in res["rows"]:
        ratio = ""
        if r["cell"] in PEER and r.get("status") == "ok":
            peer, target = PEER[r["cell"]]
            p = by.get(peer, {})
            if p.get("status") == "ok":
                x = r["ms"] / p["ms"]
                ratio = f"{x:.3f}x {peer} (<= {target}: {'met' if x <= target else 'missed'})"
            else:
                ratio = f"{peer} did not run"
        st = r.get("status", "?") if r.get("status") == "ok" else f"error: {r.get('error', '')[:160]}"
        lines.append(f"| {r['cell']} | {r['pattern']} | {r.get('ms', '')} | {r.get('tokens_per_s', '')} | "
                     f"{r.get('peak_GiB', '')} | {ratio} | {st} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny float32 config on the CPU (peers that need CUDA fail)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cells", default=",".join(c[0] for c in CELLS))
    p.add_argument("--compile", action="store_true", help="torch.compile each model (both sides)")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.layers, a.d_model, a.heads, a.vocab, a.seq, a.batch, a.warmup, a.iters = 4, 64, 4, 128, 64, 1, 0, 1
    dev = torch.device("cpu" if a.cpu_smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    os.makedirs(a.out_dir, exist_ok=True)
    res = {"config": {**vars(a), "dtype": str(dtype).replace("torch.", "")}, "env": environment(dev), "rows": []}
    jpath, mpath = os.path.join(a.out_dir, "model_gpu.json"), os.path.join(a.out_dir, "model_gpu.md")
    wanted = a.cells.split(",")
    for name, pattern, kind in CELLS:
        if name not in wanted:
            continue
        row = run_cell(name, pattern, kind, a, dev, dtype)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        res["rows"].append(row)
        with open(jpath, "w") as f:
            json.dump(res, f, indent=1)
    md = markdown(res)
    with open(mpath, "w") as f:
        f.write(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
