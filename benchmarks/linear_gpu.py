"""attnkit's fused linear-family kernels against flash-linear-attention (fla 0.6.0) on the same inputs, one run.

    python benchmarks/linear_gpu.py --out benchmarks/results                 # the issue-12 grid (CUDA)
    python benchmarks/linear_gpu.py --out /tmp/x --T 4096 --rules kda        # a slice
    python benchmarks/linear_gpu.py --out /tmp/x --cpu-smoke                 # tiny shapes, Triton's interpreter,
                                                                             # attnkit only (exercises every path)

Chunk rows: bf16, H = 16, Dk = Dv = 128, B·T = 16384, T ∈ {1k, 4k, 16k}; q, k, v stored ``[B, T, H, D]`` (fla's
layout; attnkit reads the same memory through transposed views), gates and β the same tensors for both. Rules and
their fla peers: scalar_gate (``chunk_simple_gla``), retention (``chunk_simple_gla`` with ``g_gamma``), gla
(``chunk_gla``), delta (``chunk_delta_rule``), gated_delta (``chunk_gated_delta_rule``), kda (``chunk_kda``); delta
rules L2-normalize q and k inside the kernels on both sides. Each cell: forward and forward+backward time (median,
synchronized, :func:`attnkit.tools.bench.time_ms`), tokens/s, peak extra memory of forward+backward
(:func:`attnkit.tools.bench.peak_memory`), and the relative difference ``‖o_attnkit − o_fla‖ / ‖o_fla‖``. A peer
that raises (fla refuses its gated chunk backward on Hopper with triton < 3.7.1) is reported with its message.

Decode rows: one token per call, B = 32, H = 16, 128×128 fp32 states updated in place (attnkit ``out_state``;
fla's ``fused_recurrent_*`` writes a new state), GB/s on the state bytes read + written
(``2·B·H·Dk·Dv·4``), timed per eager call and as a CUDA-graph replay (kernel time without the host).

Results are written after every cell (JSON) and as a markdown table naming device, versions and date; a failing
cell records its error and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

if "--cpu-smoke" in sys.argv:  # the kernels must be decorated for the interpreter before they are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnkit.ops.linear import triton as LT  # noqa: E402
from attnkit.tools.bench import environment, peak_memory, time_ms  # noqa: E402

RULES = ["scalar_gate", "retention", "gla", "delta", "gated_delta", "kda"]
DELTA = {"delta", "gated_delta", "kda"}
GATE = {"scalar_gate": "scalar", "gated_delta": "scalar", "gla": "channel", "kda": "channel",
        "retention": "head", "delta": None}


# ------------------------------------------------------------------------------------------------
# Inputs and the two implementations
# ------------------------------------------------------------------------------------------------

def make_inputs(rule: str, B: int, T: int, H: int, D: int, dtype, device, grad: bool):
    """q, k, v ``[B, T, H, D]``; gate fp32 ``[B, T, H]`` / ``[B, T, H, D]`` / ``[H]``; β ``[B, T, H]``."""
    torch.manual_seed(0)
    x = dict(q=torch.randn(B, T, H, D, device=device, dtype=dtype), k=torch.randn(B, T, H, D, device=device, dtype=dtype),
             v=torch.randn(B, T, H, D, device=device, dtype=dtype))
    kind = GATE[rule]
    if kind == "scalar":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 3.0)
    elif kind == "channel":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, D, device=device) + 4.0)
    elif kind == "head":
        x["g"] = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, device=device, dtype=torch.float32)))
    if rule in DELTA:
        x["beta"] = torch.sigmoid(torch.randn(B, T, H, device=device)).to(dtype)
    if grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


def attnkit_fn(rule: str, x: dict, kernel: str = "chunk"):
    """attnkit on the same storage: [B, T, H, D] read as [B, H, T, D] views (strides, no copy). Returns o [B,T,H,D]."""
    tr = lambda t: None if t is None else (t if t.dim() == 1 else t.transpose(1, 2))  # noqa: E731
    fn = LT.chunk if kernel == "chunk" else LT.fused_recurrent
    D = x["q"].shape[-1]

    def run():
        o, _ = fn(tr(x["q"]), tr(x["k"]), tr(x["v"]), gate=tr(x.get("g")), beta=tr(x.get("beta")),
                  delta=rule in DELTA, qk_l2norm=rule in DELTA, scale=D ** -0.5)
        return o.transpose(1, 2)
    return run


def fla_fn(rule: str, x: dict):
    """fla 0.6.0's chunk kernel of the rule on the same tensors (signatures read from its source)."""
    D = x["q"].shape[-1]
    q, k, v, g, beta = x["q"], x["k"], x["v"], x.get("g"), x.get("beta")
    s = D ** -0.5
    if rule == "scalar_gate":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda: chunk_simple_gla(q, k, v, g=g, scale=s)[0]
    if rule == "retention":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda: chunk_simple_gla(q, k, v, g_gamma=g, scale=s)[0]
    if rule == "gla":
        from fla.ops.gla import chunk_gla
        return lambda: chunk_gla(q, k, v, g=g, scale=s)[0]
    if rule == "delta":
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda: chunk_delta_rule(q, k, v, beta=beta, scale=s, use_qk_l2norm_in_kernel=True)[0]
    if rule == "gated_delta":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda: chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=s, use_qk_l2norm_in_kernel=True)[0]
    if rule == "kda":
        from fla.ops.kda import chunk_kda
        return lambda: chunk_kda(q, k, v, g=g, beta=beta, scale=s, use_qk_l2norm_in_kernel=True)[0]
    raise KeyError(rule)


def fla_decode_fn(rule: str, x: dict, state):
    D = x["q"].shape[-1]
    q, k, v, g, beta = x["q"], x["k"], x["v"], x.get("g"), x.get("beta")
    s = D ** -0.5
    if rule == "scalar_gate":
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        return lambda: fused_recurrent_simple_gla(q, k, v, g=g, scale=s, initial_state=state, output_final_state=True)
    if rule == "retention":
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        return lambda: fused_recurrent_simple_gla(q, k, v, g_gamma=g, scale=s, initial_state=state,
                                                  output_final_state=True)
    if rule == "gla":
        from fla.ops.gla import fused_recurrent_gla
        return lambda: fused_recurrent_gla(q, k, v, gk=g, scale=s, initial_state=state, output_final_state=True)
    if rule == "delta":
        from fla.ops.delta_rule import fused_recurrent_delta_rule
        return lambda: fused_recurrent_delta_rule(q, k, v, beta=beta, scale=s, initial_state=state,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    if rule == "gated_delta":
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
        return lambda: fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, scale=s, initial_state=state,
                                                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    if rule == "kda":
        from fla.ops.kda import fused_recurrent_kda
        return lambda: fused_recurrent_kda(q, k, v, g=g, beta=beta, scale=s, initial_state=state,
                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
    raise KeyError(rule)


def attnkit_decode_fn(rule: str, x: dict, state):
    tr = lambda t: None if t is None else (t if t.dim() == 1 else t.transpose(1, 2))  # noqa: E731
    D = x["q"].shape[-1]

    def run():
        return LT.fused_recurrent(tr(x["q"]), tr(x["k"]), tr(x["v"]), gate=tr(x.get("g")), beta=tr(x.get("beta")),
                                  delta=rule in DELTA, qk_l2norm=rule in DELTA, scale=D ** -0.5,
                                  initial_state=state, output_final_state=True, out_state=state)
    return run


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------

def _grad_step(fn, x):
    leaves = [t for t in x.values() if t.requires_grad]
    do = {}

    def step():
        o = fn()
        if "do" not in do:
            do["do"] = torch.randn_like(o)
        torch.autograd.grad(o, leaves, do["do"], allow_unused=True)
    return step


def _nograd(fn):
    def step():
        with torch.no_grad():
            return fn()
    return step


def rel_diff(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(fn, x, device, warmup, rep, min_s) -> dict:
    """fwd ms, fwd+bwd ms, fwd+bwd peak bytes; an exception in a mode is recorded as that mode's error."""
    out = {}
    for mode, step in (("fwd", _nograd(fn)), ("fwd+bwd", _grad_step(fn, x))):
        try:
            out[mode] = time_ms(step, device=device, warmup=warmup, rep=rep, min_time_s=min_s)
            if mode == "fwd+bwd":
                out["peak_bytes"] = peak_memory(step, device=device)
        except Exception as e:  # noqa: BLE001 - a refusal or failure is a result
            out[mode] = None
            out[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()
    return out


def graph_ms(fn, device, rep: int = 50):
    """Kernel time of ``fn`` replayed from a CUDA graph (host launch cost removed); None off CUDA."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_ms(g.replay, device=device, warmup=3, rep=rep)


def chunk_cell(rule, T, a) -> dict:
    dev = torch.device(a.device)
    B = max(1, a.tokens // T)
    row = dict(kind="chunk", rule=rule, B=B, T=T, H=a.H, D=a.D, dtype=str(a.dtype).replace("torch.", ""))
    x = make_inputs(rule, B, T, a.H, a.D, a.dtype, dev, grad=True)
    impls = {"attnkit": attnkit_fn(rule, x)}
    if not a.no_fla:
        try:
            impls["fla"] = fla_fn(rule, x)
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = f"{type(e).__name__}: {e}"
    outs = {}
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                outs[name] = fn()
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            continue
        m = measure(fn, x, dev, a.warmup, a.rep, a.min_s)
        for key, val in m.items():
            row[f"{name}_{key}"] = val
    if "attnkit" in outs and "fla" in outs:
        row["rel_diff"] = rel_diff(outs["attnkit"], outs["fla"])
        row["max_abs_diff"] = float((outs["attnkit"].double() - outs["fla"].double()).abs().max())
    tok = B * T
    for name in impls:
        for mode in ("fwd", "fwd+bwd"):
            ms = row.get(f"{name}_{mode}")
            if ms:
                row[f"{name}_{mode}_Mtok_s"] = tok / ms / 1e3
    for mode in ("fwd", "fwd+bwd"):
        if row.get(f"attnkit_{mode}") and row.get(f"fla_{mode}"):
            row[f"speedup_{mode}"] = row[f"fla_{mode}"] / row[f"attnkit_{mode}"]
    return row


def decode_cell(rule, a) -> dict:
    dev = torch.device(a.device)
    B, H, D = a.decode_B, a.H, a.D
    row = dict(kind="decode", rule=rule, B=B, H=H, D=D, dtype=str(a.dtype).replace("torch.", ""))
    x = make_inputs(rule, B, 1, H, D, a.dtype, dev, grad=False)
    state_bytes = 2 * B * H * D * D * 4
    row["state_MiB_read_written"] = state_bytes / 2 ** 20
    impls = {"attnkit": lambda st: attnkit_decode_fn(rule, x, st)}
    if not a.no_fla:
        impls["fla"] = lambda st: fla_decode_fn(rule, x, st)
    outs = {}
    torch.manual_seed(1)
    state0 = torch.randn(B, H, D, D, device=dev, dtype=torch.float32) * 0.1
    for name, make in impls.items():
        try:
            state = state0.clone()
            fn = make(state)
            with torch.no_grad():
                o = make(state0.clone())()[0].float()
            outs[name] = o.transpose(1, 2) if name == "attnkit" else o  # both [B, 1, H, D]
            with torch.no_grad():
                ms = time_ms(fn, device=dev, warmup=a.warmup, rep=a.rep, min_time_s=a.min_s)
            row[f"{name}_ms"] = ms
            row[f"{name}_GB_s"] = state_bytes / ms / 1e6
            try:
                with torch.no_grad():
                    gms = graph_ms(fn, dev)
                if gms is not None:
                    row[f"{name}_graph_ms"] = gms
                    row[f"{name}_graph_GB_s"] = state_bytes / gms / 1e6
            except Exception as e:  # noqa: BLE001
                row[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if "attnkit" in outs and "fla" in outs:
        row["rel_diff"] = rel_diff(outs["attnkit"], outs["fla"])
    return row


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def _f(v, fmt="{:.3f}"):
    return "–" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))


def table(rows, env) -> str:
    head = (f"# Linear kernels vs fla — {env.get('gpu') or env.get('cpu')} — torch {env['torch']}, triton "
            f"{env['triton']}, fla {env.get('fla')} — {env['date']}\n\n")
    lines = ["| rule | B×T | attnkit fwd ms | fla fwd ms | fwd × | attnkit fwd+bwd ms | fla fwd+bwd ms | fwd+bwd × | "
             "attnkit M tok/s fwd / fwd+bwd | peak MiB attnkit / fla | rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "chunk":
            continue
        mib = lambda b: None if b is None else b / 2 ** 20  # noqa: E731
        fla_fb = r.get("fla_fwd+bwd")
        fla_fb_s = _f(fla_fb) if fla_fb is not None else ("refused" if "fla_fwd+bwd_error" in r else "–")
        lines.append(
            f"| {r['rule']} | {r['B']}×{r['T']} | {_f(r.get('attnkit_fwd'))} | {_f(r.get('fla_fwd'))} | "
            f"{_f(r.get('speedup_fwd'), '{:.2f}')} | {_f(r.get('attnkit_fwd+bwd'))} | {fla_fb_s} | "
            f"{_f(r.get('speedup_fwd+bwd'), '{:.2f}')} | {_f(r.get('attnkit_fwd_Mtok_s'), '{:.1f}')} / "
            f"{_f(r.get('attnkit_fwd+bwd_Mtok_s'), '{:.1f}')} | {_f(mib(r.get('attnkit_peak_bytes')), '{:.0f}')} / "
            f"{_f(mib(r.get('fla_peak_bytes')), '{:.0f}')} | {_f(r.get('rel_diff'), '{:.1e}')} |")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        lines += ["", "| decode rule | B×H, D | attnkit µs (graph) | attnkit GB/s (graph) | fla µs (graph) | "
                      "fla GB/s (graph) | rel. diff |", "|---|---|---|---|---|---|---|"]
        us = lambda v: None if v is None else 1e3 * v  # noqa: E731
        for r in dec:
            lines.append(
                f"| {r['rule']} | {r['B']}×{r['H']}, {r['D']} | {_f(us(r.get('attnkit_ms')), '{:.1f}')} "
                f"({_f(us(r.get('attnkit_graph_ms')), '{:.1f}')}) | {_f(r.get('attnkit_GB_s'), '{:.0f}')} "
                f"({_f(r.get('attnkit_graph_GB_s'), '{:.0f}')}) | {_f(us(r.get('fla_ms')), '{:.1f}')} "
                f"({_f(us(r.get('fla_graph_ms')), '{:.1f}')}) | {_f(r.get('fla_GB_s'), '{:.0f}')} "
                f"({_f(r.get('fla_graph_GB_s'), '{:.0f}')}) | {_f(r.get('rel_diff'), '{:.1e}')} |")
    errs = [(r["rule"], r.get("T", "decode"), k, v) for r in rows for k, v in r.items() if k.endswith("error")]
    if errs:
        lines += ["", "Errors and refusals:", ""] + [f"- {rule} T={T} {k}: {v}" for rule, T, k, v in errs]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the JSON and markdown results")
    ap.add_argument("--rules", nargs="*", default=RULES)
    ap.add_argument("--T", nargs="*", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--tokens", type=int, default=16384, help="B·T of the chunk rows")
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--decode-B", type=int, default=32)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-chunk", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="attnkit rows only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in Triton's interpreter, attnkit only")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.device, a.dtype, a.no_fla = "cpu", torch.float32, True
        a.T, a.tokens, a.H, a.D, a.decode_B = [24], 24, 2, 16, 2
        a.warmup, a.rep, a.min_s = 0, 1, 0.0
    else:
        if not torch.cuda.is_available():
            print("needs CUDA (or --cpu-smoke)", file=sys.stderr)
            return 2
        a.device, a.dtype = "cuda", torch.bfloat16
        a.warmup, a.rep, a.min_s = 2, 10, 0.0
    env = environment(a.device)
    try:
        import fla
        env["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        env["fla"] = None
        if not a.no_fla:
            print(f"fla not importable ({type(e).__name__}: {e}); attnkit rows only", file=sys.stderr)
            a.no_fla = True
    os.makedirs(a.out, exist_ok=True)
    tag = (env.get("gpu") or "cpu").replace(" ", "-") + "-" + datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    jpath, mpath = os.path.join(a.out, f"linear-{tag}.json"), os.path.join(a.out, f"linear-{tag}.md")
    rows = []

    def save():
        with open(jpath, "w") as f:
            json.dump(dict(env=env, args={k: str(v) for k, v in vars(a).items()}, rows=rows), f, indent=1)
        with open(mpath, "w") as f:
            f.write(table(rows, env))

    cells = []
    if not a.no_chunk:
        cells += [("chunk", r, T) for T in a.T for r in a.rules]
    if not a.no_decode:
        cells += [("decode", r, None) for r in a.rules]
    for i, (kind, rule, T) in enumerate(cells):
        try:
            row = chunk_cell(rule, T, a) if kind == "chunk" else decode_cell(rule, a)
        except Exception as e:  # noqa: BLE001
            row = dict(kind=kind, rule=rule, T=T, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        rows.append(row)
        save()
        if a.device == "cuda":
            torch.cuda.empty_cache()
        summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                   if k.endswith(("fwd", "fwd+bwd", "GB_s", "error", "rel_diff"))}
        print(f"[{i + 1}/{len(cells)}] {kind} {rule} T={T}: {summary}", flush=True)
    print("\n" + table(rows, env))
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
