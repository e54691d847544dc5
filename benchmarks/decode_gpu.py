"""Decode benchmark (issue 14): attnkit's split-KV kernel against SDPA (cuDNN, flash), compiled FlexAttention
(FlexDecoding) and FlashInfer where it is installed, on the same inputs in one run.

    python benchmarks/decode_gpu.py OUT_DIR                    # the H200 grid (stops starting cells after --minutes)
    python benchmarks/decode_gpu.py OUT_DIR --cpu-smoke        # every code path on CPU (Triton interpreter, tiny)
    python benchmarks/decode_gpu.py OUT_DIR --streaming-memory 100000   # CPU: a StreamingLLM cache over N appends

One query token, bf16, D = 128; B ∈ {1, 8, 64}; keys 4k–128k; GQA 32:8 and MHA 32:32. Variants: plain softmax,
sliding window (4096), sinks + window (4 + 4092), softcap 30, ALiBi, sigmoid (bias −log L); paged caches (pages of
16 and 64 keys, scattered through the pool) against the contiguous cache. Each cell reports milliseconds (triton's
``do_bench``, median, eager; and replayed from a CUDA graph of 20 calls, which removes host overhead) and GB/s of the
K/V bytes the variant must read (``B · Hkv · keys seen · (D + Dv) · 2``), with % of the H200's 4.8 TB/s. Every
contender's output is checked against the float32 reference on the first sequence (relative error).

Contenders: ``attnkit`` (``decode_attention(backend="triton")``: the kernel), ``attnkit-auto`` (what ``auto`` picks:
SDPA for exactly-plain softmax, else the kernel), ``attention()`` (``attnkit.attention(q, k, v, mask=causal)``, the
general entry point, plain only), ``sdpa-cudnn`` / ``sdpa-flash`` (plain only), ``flex`` (compiled once per shape;
sigmoid has no Flex form: its row times Flex's softmax with the same mask, marked ``flex≈``), ``flashinfer``.

Order (most important first; a cell that fails is recorded with its error): a small sweep of the kernel's
configurations (contiguous and paged) whose winners the rest of the run uses, the plain grid at B = 8, the variants,
paged vs contiguous, then the other batch sizes. Results are written after every cell: ``decode-<gpu>-<date>.json``
and ``.md`` (device, versions, date) in OUT_DIR; a short table is printed last.

``attnkit bench --decode`` calls :func:`run` (``run(out_dir, minutes=..., cpu_smoke=...)``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.dispatch import sdpa  # noqa: E402
from attnkit.dispatch.decode import decode_attention  # noqa: E402
from attnkit.ops.softmax import decode as DK  # noqa: E402

HBM = 4.8e12  # H200 HBM3e, bytes/s
KV_LIMIT = 40e9  # skip cells whose contiguous K/V would exceed this (bytes)
WINDOW, SINKS = 4096, 4


def variant(name: str, L: int, Hq: int) -> dict:
    """``(kwargs, keys seen per sequence)`` of a decode variant at ``L`` keys."""
    if name == "plain":
        return dict(mask=M.causal), L
    if name == "window":
        return dict(mask=M.causal & M.sliding_window(WINDOW)), min(L, WINDOW + 1)
    if name == "sinks_window":
        return dict(mask=M.causal & (M.sliding_window(WINDOW - SINKS) | M.sinks(SINKS))), min(L, WINDOW + 1)
    if name == "softcap":
        return dict(mask=M.causal, score_mod=S.softcap(30.0)), L
    if name == "alibi":
        return dict(mask=M.causal, score_mod=S.alibi()), L
    if name == "sigmoid":
        return dict(mask=M.causal, normalizer=N.sigmoid()), L
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def eager_ms(fn: Callable, cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def graph_ms(fn: Callable, calls: int = 20, replays: int = 5) -> Optional[float]:
    """Milliseconds per call replayed from a CUDA graph of ``calls`` calls (None when capture fails)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        ms = a.elapsed_time(b) / (replays * calls)
        del g
        return ms
    except Exception:  # noqa: BLE001 - a contender that cannot be captured
        torch.cuda.synchronize()
        return None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------
# inputs and contenders
# ------------------------------------------------------------------------------------------------

class Inputs:
    """q ``[B, Hq, 1, D]``, contiguous k / v ``[B, Hkv, L, D]``; :meth:`paged` builds a scattered page pool."""

    def __init__(self, B, Hq, Hkv, L, D, dtype, device):
        g = torch.Generator(device=device).manual_seed(B * 1000003 + L)
        self.B, self.Hq, self.Hkv, self.L, self.D, self.dtype, self.device = B, Hq, Hkv, L, D, dtype, device
        self.q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g)
        self.k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=g)
        self.v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=g)
        self.lens = [L] * B
        self.seqlens = torch.full((B,), L, dtype=torch.int32, device=device)

    def paged(self, page: int):
        n = -(-self.L // page)
        perm = torch.randperm(self.B * n, device=self.device)
        table = perm.view(self.B, n).to(torch.int32)
        kp = torch.empty(self.B * n, self.Hkv, page, self.D, device=self.device, dtype=self.dtype)
        vp = torch.empty_like(kp)
        pad = n * page - self.L
        kk = torch.nn.functional.pad(self.k, (0, 0, 0, pad)).view(self.B, self.Hkv, n, page, self.D)
        vv = torch.nn.functional.pad(self.v, (0, 0, 0, pad)).view(self.B, self.Hkv, n, page, self.D)
        kp[table.long().flatten()] = kk.permute(0, 2, 1, 3, 4).reshape(-1, self.Hkv, page, self.D)
        vp[table.long().flatten()] = vv.permute(0, 2, 1, 3, 4).reshape(-1, self.Hkv, page, self.D)
        return kp, vp, table

    def reference(self, kw) -> torch.Tensor:
        """Float32 (float64 on CPU) reference output of the first sequence."""
        cd = torch.float64 if self.device.type == "cpu" else torch.float32
        return attnkit.attention(self.q[:1].to(cd), self.k[:1].to(cd), self.v[:1].to(cd), backend="reference",
                                 form="materialized", **kw)


def contenders(x: Inputs, name: str, kw: dict, want: set, flex_ok: bool, page: Optional[int] = None
               ) -> Dict[str, Callable[[], torch.Tensor]]:
    """``{contender: fn() -> out [B, Hq, 1, D]}`` of one cell (only the ones in ``want``)."""
    out: Dict[str, Callable] = {}
    q, k, v = x.q, x.k, x.v
    cuda = x.device.type == "cuda"
    scale = 1.0 / math.sqrt(x.D)
    if page is not None:
        kp, vp, table = x.paged(page)
        if "attnkit" in want:
            out["attnkit"] = lambda: decode_attention(q, kp, vp, seqlens=x.seqlens, block_table=table,
                                                      max_seqlen=x.L, backend="triton", check=False, **kw)
        if "flashinfer" in want and cuda:
            fi = flashinfer_call(x, kp, vp, table, page, name)
            if fi is not None:
                out["flashinfer"] = fi
        return out
    if "attnkit" in want:
        out["attnkit"] = lambda: decode_attention(q, k, v, seqlens=x.lens, backend="triton", check=False, **kw)
    if "attnkit-auto" in want:
        out["attnkit-auto"] = lambda: decode_attention(q, k, v, seqlens=x.lens, check=False, **kw)
    if "attention()" in want and name == "plain":
        out["attention()"] = lambda: attnkit.attention(q, k, v, **kw)
    if name == "plain" and cuda:
        for b in ("cudnn", "flash"):
            if f"sdpa-{b}" in want and sdpa.available(b, q, k, v, {"is_causal": False}, scale):
                out[f"sdpa-{b}"] = (lambda b=b: sdpa.call(b, q, k, v, {"is_causal": False}, scale))
    if "flex" in want and flex_ok:
        f = flex_call(x, name, kw)
        if f is not None:
            out["flex" if name != "sigmoid" else "flex≈"] = f
    if "flashinfer" in want and cuda and name in ("plain", "softcap", "window"):
        kp, vp, table = x.paged(16)
        fi = flashinfer_call(x, kp, vp, table, 16, name)
        if fi is not None:
            out["flashinfer"] = fi
    return out


def flex_call(x: Inputs, name: str, kw: dict) -> Optional[Callable]:
    """Compiled FlexAttention (FlexDecoding at one query token) of the same mask and score mod; sigmoid attention
    has no Flex form: Flex's softmax with the same mask stands in (``flex≈``)."""
    from attnkit.tools.peers import flex_call as peer
    q, k, v = x.q, x.k, x.v
    mask, mod = kw.get("mask", M.causal), S.as_score_mod(kw.get("score_mod"))
    if x.device.type == "cuda":
        fn = peer(mask, mod, x.B, x.Hq, x.Hkv, 1, x.L, x.device, 1.0 / math.sqrt(x.D))
        return None if fn is None else (lambda: fn(q, k, v))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # CPU smoke: eager
    from attnkit.tools.peers import flex_mods
    mods = flex_mods(mask, mod, x.B, x.Hq, 1, x.L, x.device)
    if mods is None:
        return None
    mm, sc = mods
    bm = create_block_mask(mm, None, None, 1, x.L, device=x.device, _compile=False) if mm is not None else None
    return lambda: flex_attention(q, k, v, score_mod=sc, block_mask=bm, enable_gqa=x.Hq != x.Hkv)


def flashinfer_call(x: Inputs, kp, vp, table, page: int, name: str) -> Optional[Callable]:
    """FlashInfer's paged batch decode (HND pool), where it is installed; plain, softcap and window only."""
    try:
        import flashinfer
    except ImportError:
        return None
    if name not in ("plain", "softcap", "window"):
        return None
    ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=x.device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND")
    n = table.shape[1]
    indptr = torch.arange(0, x.B * n + 1, n, dtype=torch.int32, device=x.device)
    last = torch.full((x.B,), x.L - (n - 1) * page, dtype=torch.int32, device=x.device)
    extra = {"logits_soft_cap": 30.0} if name == "softcap" else {}
    if name == "window":
        extra["window_left"] = WINDOW
    w.plan(indptr, table.flatten(), last, x.Hq, x.Hkv, x.D, page, q_data_type=x.dtype, **extra)
    q = x.q[:, :, 0]
    return lambda: w.run(q, (kp, vp)).unsqueeze(2)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, out_dir: str, minutes: float, cpu: bool):
        self.cuda = not cpu
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.D = 128 if self.cuda else 16
        self.deadline = time.time() + 60 * minutes
        from attnkit.tools.bench import environment
        self.env = environment(self.device)
        self.env["decode_configs"] = {}
        gpu = (self.env.get("gpu") or "cpu").replace(" ", "-")
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"decode-{gpu}-{self.env['date']}")
        self.rows: List[dict] = []

    def time_left(self) -> bool:
        return time.time() < self.deadline

    def save(self) -> None:
        with open(self.path + ".json", "w") as f:
            json.dump({"env": self.env, "rows": self.rows}, f, indent=1)
        with open(self.path + ".md", "w") as f:
            f.write(markdown(self.env, self.rows))

    def cell(self, section: str, name: str, B: int, Hq: int, Hkv: int, L: int, want: set, flex_ok: bool,
             page: Optional[int] = None) -> None:
        row = dict(section=section, variant=name, B=B, Hq=Hq, Hkv=Hkv, L=L, page=page, results={})
        self.rows.append(row)
        if not self.time_left():
            row["skipped"] = "time budget"
            return
        kv_bytes = 2 * B * Hkv * L * self.D * 2
        if kv_bytes > KV_LIMIT:
            row["skipped"] = f"K/V would take {kv_bytes / 1e9:.0f} GB"
            self.save()
            return
        x = None
        try:
            x = Inputs(B, Hq, Hkv, L, self.D, self.dtype, self.device)
            kw, seen = variant(name, L, Hq)
            row["bytes"] = B * Hkv * seen * 2 * self.D * x.k.element_size()
            ref = x.reference(kw)
            for who, fn in contenders(x, name, kw, want, flex_ok, page).items():
                res = row["results"][who] = {}
                try:
                    out = fn()
                    res["rel_err"] = rel(out[:1], ref)
                    if who.startswith("attnkit"):
                        res["ran"] = attnkit.last_backend()
                    res["ms"] = eager_ms(fn, self.cuda)
                    if self.cuda and who in ("attnkit", "attnkit-auto", "sdpa-cudnn", "flex", "flashinfer"):
                        res["graph_ms"] = graph_ms(fn)
                    best = min(t for t in (res["ms"], res.get("graph_ms")) if t)
                    res["GB/s"] = row["bytes"] / (best * 1e-3) / 1e9
                    res["hbm_%"] = 100 * row["bytes"] / (best * 1e-3) / HBM
                except Exception as e:  # noqa: BLE001 - every cell is recorded, failures included
                    res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["trace"] = traceback.format_exc()[-1500:]
        finally:
            del x
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.save()
        print(line(row), flush=True)

    def sweep_configs(self, B: int, L: int) -> None:
        """Time the kernel's configurations on plain GQA decode (contiguous, and paged with 16-key pages); the
        fastest of each becomes the configuration of the rest of the run."""
        cands = [DK.DecodeConfig(*c) for c in ((64, 4, 3, 2), (64, 8, 3, 2), (64, 4, 2, 3), (64, 4, 4, 1),
                                               (32, 4, 4, 3), (64, 8, 4, 2), (128, 8, 2, 1), (128, 8, 3, 1),
                                               (64, 8, 2, 4), (32, 4, 3, 4))]
        if not self.cuda:
            cands = cands[:2]
        x = Inputs(B, 32, 8, L, self.D, self.dtype, self.device)
        kw = dict(mask=M.causal)
        ref = x.reference(kw)
        kp, vp, table = x.paged(16)
        for paged in (False, True):
            best = (float("inf"), None)
            for cfg in cands:
                row = dict(section="config", variant="plain", B=B, Hq=32, Hkv=8, L=L, page=16 if paged else None,
                           config=list(cfg.__dict__.values()), results={})
                self.rows.append(row)
                env = "ATTNKIT_DECODE_CONFIG" + ("_PAGED" if paged else "")
                os.environ[env] = ",".join(str(c) for c in cfg.__dict__.values())
                try:
                    if paged:
                        fn = lambda: decode_attention(x.q, kp, vp, seqlens=x.seqlens, block_table=table,  # noqa
                                                      max_seqlen=L, backend="triton", check=False, **kw)
                    else:
                        fn = lambda: decode_attention(x.q, x.k, x.v, seqlens=x.lens, backend="triton",  # noqa
                                                      check=False, **kw)
                    out = fn()
                    ms = eager_ms(fn, self.cuda)
                    gms = graph_ms(fn) if self.cuda else None
                    t = min(v for v in (ms, gms) if v)
                    row["results"]["attnkit"] = {"ms": ms, "graph_ms": gms, "rel_err": rel(out[:1], ref),
                                                 "GB/s": 2 * B * 8 * L * self.D * 2 / (t * 1e-3) / 1e9}
                    if t < best[0] and row["results"]["attnkit"]["rel_err"] < 2e-2:
                        best = (t, cfg)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile
                    row["results"]["attnkit"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                finally:
                    del os.environ[env]
                    DK._problems.clear()
                print(line(row), flush=True)
                self.save()
            if best[1] is not None:
                os.environ[env] = ",".join(str(c) for c in best[1].__dict__.values())
                self.env["decode_configs"]["paged" if paged else "contiguous"] = list(best[1].__dict__.values())
        del x, kp, vp
        gc.collect()


def line(row: dict) -> str:
    head = f"{row['section']:8s} {row['variant']:12s} B={row['B']:<3d} {row['Hq']}:{row['Hkv']:<2d} L={row['L']:<7d}"
    if row.get("page"):
        head += f" page={row['page']}"
    if row.get("config"):
        head += f" cfg={row['config']}"
    if row.get("skipped") or row.get("error"):
        return head + "  " + (row.get("skipped") or row.get("error"))
    parts = []
    for who, r in row["results"].items():
        if "error" in r:
            parts.append(f"{who}=ERR")
            continue
        g = f"/{r['graph_ms']:.3f}g" if r.get("graph_ms") else ""
        parts.append(f"{who}={r['ms']:.3f}{g}ms({r.get('GB/s', 0):.0f}GB/s,e{r.get('rel_err', 0):.0e})")
    return head + "  " + " ".join(parts)


def best_ms(r: Optional[dict]) -> Optional[float]:
    if not r or "ms" not in r:
        return None
    return min(t for t in (r["ms"], r.get("graph_ms")) if t)


def markdown(env: dict, rows: List[dict]) -> str:
    out = [f"# Decode benchmark ({env.get('gpu') or 'cpu'}, {env['date']})", "",
           f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
           f"flashinfer {env.get('flashinfer')}, attnkit {env.get('attnkit')}; kernel configs {env.get('decode_configs')}",
           "", "ms = best of eager (do_bench median) and CUDA-graph replay; GB/s on the K/V bytes the variant must "
           "read; % of 4.8 TB/s.", ""]
    out += ["| section | variant | B | heads | keys | page | attnkit ms | GB/s | % HBM | auto (ran) | cuDNN | flash | "
            "flex | attention() | flashinfer | auto/cuDNN | flex/attnkit | max rel err |", "|" + "---|" * 18]
    contig = {(r["variant"], r["B"], r["Hq"], r["Hkv"], r["L"]): r for r in rows if r["section"] != "config"
              and not r.get("page")}
    for r in rows:
        if r.get("skipped"):
            out.append(f"| {r['section']} | {r['variant']} | {r['B']} | {r['Hq']}:{r['Hkv']} | {r['L']} | "
                       f"{r.get('page') or ''} | {r['skipped']} |" + " |" * 12)
            continue
        res = r["results"]
        a = res.get("attnkit", {})
        ms = best_ms(a)
        f = lambda who: f"{best_ms(res.get(who)):.3f}" if best_ms(res.get(who)) else ("err" if who in res else "")  # noqa
        auto = res.get("attnkit-auto", {})
        cud = best_ms(res.get("sdpa-cudnn"))
        flex = best_ms(res.get("flex")) or best_ms(res.get("flex≈"))
        ratio_auto = f"{best_ms(auto) / cud:.2f}" if best_ms(auto) and cud else ""
        ratio_flex = f"{flex / ms:.1f}×" if flex and ms else ""
        if r.get("page") and ms:
            c = contig.get((r["variant"], r["B"], r["Hq"], r["Hkv"], r["L"]), {}).get("results", {}).get("attnkit")
            ratio_auto = f"paged/contig {ms / best_ms(c):.2f}" if best_ms(c) else ratio_auto
        errs = [x.get("rel_err") for who, x in res.items() if x.get("rel_err") is not None and who != "flex≈"]
        err = f"{max(errs):.1e}" if errs else ""
        label = r["section"] + (f" {r['config']}" if r.get("config") else "")
        out.append(f"| {label} | {r['variant']} | {r['B']} | {r['Hq']}:{r['Hkv']} | {r['L']} | {r.get('page') or ''} "
                   f"| {f'{ms:.3f}' if ms else ('err' if 'attnkit' in res else '')} | "
                   f"{a.get('GB/s', 0):.0f} | {a.get('hbm_%', 0):.0f} | "
                   f"{f(('attnkit-auto'))} ({(auto.get('ran') or '').split('/')[0]}) | {f('sdpa-cudnn')} | "
                   f"{f('sdpa-flash')} | {f('flex') or f('flex≈')} | {f('attention()')} | {f('flashinfer')} | "
                   f"{ratio_auto} | {ratio_flex} | {err} |")
    return "\n".join(out) + "\n"


def summary(rows: List[dict]) -> str:
    """The short table printed last: the issue's targets, cell by cell."""
    lines = ["", "variant      B  heads  keys   page | attnkit ms  TB/s  %HBM | vs cuDNN(auto) | Flex/attnkit"]
    for r in rows:
        if r["section"] == "config" or r.get("skipped") or r.get("error"):
            continue
        res = r["results"]
        ms = best_ms(res.get("attnkit"))
        if not ms:
            continue
        tbs = r["bytes"] / (ms * 1e-3) / 1e12
        cud, auto = best_ms(res.get("sdpa-cudnn")), best_ms(res.get("attnkit-auto"))
        flex = best_ms(res.get("flex")) or best_ms(res.get("flex≈"))
        vs = f"{cud / auto:.2f}x" if cud and auto else "-"
        fx = f"{flex / ms:.1f}x" if flex else "-"
        lines.append(f"{r['variant']:12s} {r['B']:<3d}{r['Hq']}:{r['Hkv']:<3d} {r['L']:<7d}{r.get('page') or '-':>4} | "
                     f"{ms:9.3f}  {tbs:4.2f}  {100 * tbs * 1e12 / HBM:4.0f} | {vs:>14s} | {fx}")
    return "\n".join(lines)


def run(out_dir: str, minutes: float = 9.0, cpu_smoke: bool = False, full: bool = False) -> str:
    """The benchmark; returns the path of the JSON written (see the module doc)."""
    R = Run(out_dir, minutes, cpu_smoke)
    K = 1024
    everyone = {"attnkit", "attnkit-auto", "attention()", "sdpa-cudnn", "sdpa-flash", "flex", "flashinfer"}
    mine = {"attnkit", "attnkit-auto", "flex", "flashinfer"}
    if cpu_smoke:
        lengths, batches, variants = [40, 70], [1, 2], ["plain", "window", "sinks_window", "softcap", "alibi", "sigmoid"]
        global WINDOW, SINKS
        WINDOW, SINKS = 24, 2
        R.sweep_configs(2, 70)
        for name in variants:
            for L in lengths:
                R.cell("variants", name, 2, 4, 2, L, everyone, True)
        R.cell("plain", "plain", 1, 2, 2, 40, everyone, True)
        for page in (16, 32):
            R.cell("paged", "plain", 2, 4, 2, 70, {"attnkit", "flashinfer"}, False, page)
    else:
        lengths = [4 * K, 16 * K, 32 * K, 64 * K, 128 * K]
        R.sweep_configs(8, 32 * K)
        for L in lengths:  # the table: B = 8, GQA 32:8
            R.cell("plain", "plain", 8, 32, 8, L, everyone, True)
        for name in ("window", "sinks_window", "softcap", "alibi", "sigmoid"):
            for L in (4 * K, 32 * K, 128 * K):
                R.cell("variants", name, 8, 32, 8, L, mine, True)
        for page in (16, 64):
            for L in (4 * K, 32 * K, 128 * K):
                R.cell("paged", "plain", 8, 32, 8, L, {"attnkit", "flashinfer"}, False, page)
        for B in (1, 64):
            for L in lengths:
                R.cell("plain", "plain", B, 32, 8, L, everyone, L == 32 * K or full)
        for B in (1, 8, 64):
            for L in lengths:
                R.cell("plain", "plain", B, 32, 32, L, everyone, (B == 8 and L == 32 * K) or full)
        for B in (1, 64):
            for name in ("sinks_window", "softcap", "alibi", "sigmoid"):
                R.cell("variants", name, B, 32, 8, 32 * K, mine, full)
        for name in ("sinks_window", "softcap", "alibi", "sigmoid"):
            R.cell("variants", name, 8, 32, 32, 32 * K, mine, full)
        for page in (16, 64):
            R.cell("paged", "plain", 64, 32, 8, 32 * K, {"attnkit"}, False, page)
    R.save()
    print(summary(R.rows))
    print(f"\nwrote {R.path}.json and .md")
    return R.path + ".json"


def streaming_memory(out_dir: str, steps: int) -> str:
    """CPU: bytes, kept tokens and live tensors of a StreamingLLM(4, 1020) cache (2 layers, B = 1, 2 KV heads,
    D = 64, bf16) over ``steps`` single-token appends; written to ``streaming_memory.json``."""
    from attnkit.cache import PolicyCache, StreamingLLM
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small copies: threads only add overhead
    cache = PolicyCache(StreamingLLM(4, 1020))
    B, H, D = 1, 2, 64
    samples = []

    def live():
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    k1 = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    t0 = time.time()
    for step in range(steps + 1):
        for layer in (0, 1):
            cache.update(layer, k1, k1)
            cache.observe(layer, None)
        if step % max(1, steps // 10) == 0:
            gc.collect()
            mem = cache.memory()
            samples.append(dict(step=step, bytes=mem["allocated"], kept=[mem["layer0"], mem["layer1"]],
                                live_tensors=live(), seconds=round(time.time() - t0, 1)))
            print(samples[-1], flush=True)
    res = dict(policy="StreamingLLM(sinks=4, window=1020)", layers=2, B=B, kv_heads=H, head_dim=D, dtype="bfloat16",
               steps=steps, samples=samples,
               constant=len({(s["bytes"], tuple(s["kept"]), s["live_tensors"]) for s in samples if s["step"] >= 1024}) == 1,
               date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "streaming_memory.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"memory constant over {steps} tokens: {res['constant']} ({samples[-1]['bytes']} bytes); wrote {path}")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--cpu-smoke", action="store_true", help="every code path on CPU under Triton's interpreter")
    ap.add_argument("--minutes", type=float, default=9.0, help="start no cell after this many minutes")
    ap.add_argument("--full", action="store_true", help="Flex at every cell (one compile each)")
    ap.add_argument("--streaming-memory", type=int, default=0, metavar="STEPS")
    a = ap.parse_args(argv)
    if a.streaming_memory:
        streaming_memory(a.out_dir, a.streaming_memory)
        return
    run(a.out_dir, a.minutes, a.cpu_smoke, a.full)


if __name__ == "__main__":
    main()
