"""Benchmark machinery: synchronized timing, peak memory, and the CAB-style sweep behind ``attnkit bench``.

Timing synchronizes the device before and after the timed region (CUDA events, or
``triton.testing.do_bench`` when Triton is present), warms up first and reports the median.
Memory is the peak *extra* memory of one call over what was allocated before it: on CUDA
``max_memory_allocated`` minus the allocation at entry; on CPU the peak resident set (VmHWM, reset
through /proc/self/clear_refs) minus the resident set at entry.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..catalog.registry import Spec, Variant

__all__ = ["sync", "time_ms", "peak_memory", "make_step", "BenchRow", "sweep", "format_table", "environment"]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


#: CUDA timing: warm-up time and the time the timed repeats should fill (milliseconds)
CUDA_WARMUP_MS, CUDA_REPEAT_MS = 100.0, 200.0


def time_ms(fn: Callable[[], Any], device="cpu", warmup: int = 2, rep: int = 5, min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls, the device synchronized
    around every timed call (CUDA events on GPUs, perf_counter after a synchronize on CPUs)."""
    dev = torch.device(device)
    for _ in range(max(0, warmup)):
        fn()
    sync(dev)
    if dev.type == "cuda":
        # warm up for at least CUDA_WARMUP_MS (a call count alone is too short after a compile pause),
        # then repeat enough times to fill CUDA_REPEAT_MS, at least `rep` times
        t0, n = time.perf_counter(), 0
        while n < 3 or (time.perf_counter() - t0) * 1e3 < CUDA_WARMUP_MS:
            fn()
            sync(dev)
            n += 1
        per_call = (time.perf_counter() - t0) * 1e3 / n
        rep = int(min(1000, max(rep, CUDA_REPEAT_MS / max(per_call, 1e-3))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(dev)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    times = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < rep or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device="cpu") -> Optional[int]:
    """Peak extra bytes allocated while running ``fn()`` once (None where it cannot be measured)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    if not cpu_peak_supported():
        return None
    import gc
    gc.collect()
    _malloc_trim()  # hand freed heap back to the OS so the baseline is what is really live
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _status_kib("VmHWM") - base) * 1024


def _leaves(inputs: Dict[str, Any]) -> List[torch.Tensor]:
    """Floating tensors of an inputs dict and learnable parameters of its modules."""
    out = []
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out.append(v)
        elif isinstance(v, torch.nn.Module):
            out += [p for p in v.parameters() if p.requires_grad]
    return out


def _require_grad(inputs: Dict[str, Any]) -> None:
    for t in _leaves(inputs):
        if not isinstance(t, torch.nn.Parameter):
            t.requires_grad_(True)


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def step_of(run: Callable[[], torch.Tensor], inputs: Dict[str, Any], backward: bool) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running ``run()`` once: under no_grad, or followed by a backward pass with
    a fixed random cotangent (gradients of the inputs cleared after each call)."""
    if not backward:
        def step():
            with torch.no_grad():
                return run()
        return step
    _require_grad(inputs)
    grad_holder = {}

    def step():
        out = run()
        g = grad_holder.get("g")
        if g is None or g.shape != out.shape:
            g = grad_holder["g"] = torch.randn_like(out)
        out.backward(g)
        for t in _leaves(inputs):
            t.grad = None
        return out
    return step


def make_step(variant: Variant, inputs: Dict[str, Any], form: str, backend: str, backward: bool):
    """A zero-argument callable running the variant once (and its backward when asked)."""
    return step_of(lambda: first(variant.fn(**inputs, form=form, backend=backend)), inputs, backward)


@dataclass
class BenchRow:
    variant: str
    family: str
    pattern: str
    T: int
    Lq: int
    Lk: int
    form: str
    mode: str  # "fwd" or "fwd+bwd"
    backend: str = ""
    ms: Optional[float] = None
    tflops: Optional[float] = None
    mem_mib: Optional[float] = None
    status: str = "ok"
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


def environment(device) -> Dict[str, Any]:
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device), "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    from .. import __version__
    env["attnkit"] = __version__
    return env


def sweep(variants: Sequence[Variant], patterns: Sequence[str], lengths: Sequence[int], *,
          forms: Optional[Sequence[str]] = None, backend: str = "reference", device="cpu",
          dtype=torch.float32, B: int = 1, H: int = 4, Hkv: Optional[int] = None, D: int = 64,
          fwd_only: bool = False, warmup: int = 1, rep: int = 3, min_time_s: float = 0.0,
          measure_memory: bool = True, max_recurrent_T: Optional[int] = None, peers: bool = False,
          progress: Optional[Callable[[int, int, str], None]] = None) -> List[BenchRow]:
    """Time every (variant, pattern, length, form, mode); unsupported cells get a row saying why.

    ``max_recurrent_T`` skips token-by-token forms above that length (noted in the row);
    ``peers`` adds rows for SDPA / FlexAttention computing the same function (CUDA, softmax family).
    """
    modes = ["fwd"] if fwd_only else ["fwd", "fwd+bwd"]
    cells = []
    for v in variants:
        for pat in patterns:
            for T in lengths:
                for form in (forms or v.forms):
                    if form not in v.forms:
                        continue
                    for mode in modes:
                        cells.append((v, pat, T, form, mode))
                if peers and v.full_mask is not None:
                    cells += [(v, pat, T, PEERS, mode) for mode in modes]
    rows: List[BenchRow] = []
    for n, (v, pat, T, form, mode) in enumerate(cells):
        if form == PEERS:
            spec = Spec.for_pattern(pat, T, B=B, Hq=H, Hkv=Hkv or H, D=D, Dv=D, dtype=dtype, device=str(device))
            if progress:
                progress(n, len(cells), f"{v.name} {pat} T={T} peers {mode}")
            rows += _peer_rows(v, spec, pat, T, mode, device, warmup, rep, measure_memory)
            continue
        spec = Spec.for_pattern(pat, T, B=B, Hq=H, Hkv=Hkv or H, D=D, Dv=D, dtype=dtype, device=str(device))
        row = BenchRow(v.name, v.family, pat, T, spec.Lq, spec.Lk, form, mode)
        if progress:
            progress(n, len(cells), f"{v.name} {pat} T={T} {form} {mode}")
        reason = v.unsupported(spec, form)
        if reason is None and form == "recurrent" and max_recurrent_T is not None and T > max_recurrent_T:
            reason = f"skipped: token-by-token form above --max-recurrent-T {max_recurrent_T}"
        if reason:
            row.status, row.note = "n/a", reason
            rows.append(row)
            continue
        try:
            inputs = v.make_inputs(spec)
            step = make_step(v, inputs, form, backend, backward=(mode == "fwd+bwd"))
            row.backend = _ran(step, backend)  # also the first warm-up call
            row.ms = time_ms(step, device, warmup=warmup - 1, rep=rep, min_time_s=min_time_s)
            if measure_memory:
                mem = peak_memory(step, device)
                row.mem_mib = None if mem is None else mem / 2 ** 20
            row.tflops = _tflops(v, spec, mode, row.ms)
            del inputs, step
        except (RuntimeError, ValueError, MemoryError) as e:  # report, never hide
            row.status, row.note = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
    if progress:
        progress(len(cells), len(cells), "done")
    _ratios(rows)
    return rows


PEERS = "<peers>"


def _tflops(v: Variant, spec: Spec, mode: str, ms: float) -> Optional[float]:
    """TFLOP/s over the variant's counted FLOPs (forward+backward counted as 3.5x forward)."""
    if v.flops is None:
        return None
    return v.flops(spec) * (3.5 if mode == "fwd+bwd" else 1.0) / (ms * 1e-3) / 1e12


def _peer_rows(v: Variant, spec: Spec, pat: str, T: int, mode: str, device, warmup: int, rep: int,
               measure_memory: bool) -> List[BenchRow]:
    """Rows for the peers (SDPA backends, compiled FlexAttention) computing exactly this variant's call."""
    if torch.device(device).type != "cuda":
        return []
    from .peers import peers as find_peers
    if v.unsupported(spec, "streaming"):
        return []
    inputs = v.make_inputs(spec)
    backward = mode == "fwd+bwd"
    if backward:
        _require_grad(inputs)  # before the peers close over q, k, v
    found = find_peers(inputs["q"], inputs["k"], inputs["v"], mask=v.full_mask(spec),
                       score_mod=inputs.get("score_mod"), normalizer=inputs.get("normalizer", "softmax"),
                       scale=None)
    rows = []
    for name, fn in found.items():
        row = BenchRow(v.name, v.family, pat, T, spec.Lq, spec.Lk, name, mode, backend=name)
        step = step_of(fn, inputs, backward)
        try:
            row.ms = time_ms(step, device, warmup=warmup, rep=rep)
            if measure_memory:
                row.mem_mib = peak_memory(step, device) / 2 ** 20
            row.tflops = _tflops(v, spec, mode, row.ms)
        except (RuntimeError, ValueError) as e:
            row.status, row.note = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
    return rows


def _ratios(rows: List[BenchRow]) -> None:
    """For attnkit rows: the fastest peer on the same cell and ``peer ms / attnkit ms`` (> 1: attnkit faster)."""
    best: Dict[tuple, BenchRow] = {}
    for r in rows:
        if r.form.startswith(("sdpa-", "flex")) and r.status == "ok":
            key = (r.variant, r.pattern, r.T, r.mode)
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    for r in rows:
        peer = best.get((r.variant, r.pattern, r.T, r.mode))
        if peer is not None and r.status == "ok" and not r.form.startswith(("sdpa-", "flex")):
            r.extra["best_peer"], r.extra["x_best_peer"] = peer.form, peer.ms / r.ms


def _ran(step, backend: str) -> str:
    """What actually ran for one call of ``step`` (the last call the step made, as recorded)."""
    from ..core.record import record
    with record() as r:
        step()
    return r.calls[-1] if r.calls else backend


def format_table(rows: Sequence[BenchRow], markdown: bool = False) -> str:
    """One line per (variant, pattern, form, mode), one column per length: ms (TFLOP/s, MiB)."""
    lengths = sorted({r.T for r in rows})
    keys = []
    for r in rows:
        k = (r.variant, r.pattern, r.form, r.mode)
        if k not in keys:
            keys.append(k)
    cell = {(r.variant, r.pattern, r.form, r.mode, r.T): r for r in rows}

    def fmt(r: Optional[BenchRow]) -> str:
        if r is None:
            return ""
        if r.status != "ok":
            return r.status
        s = f"{r.ms:.3g} ms"
        if r.tflops is not None:
            s += f" {r.tflops:.2g} TF/s" if r.tflops < 10 else f" {r.tflops:.0f} TF/s"
        if r.mem_mib is not None:
            s += f" {r.mem_mib:.0f} MiB"
        if "x_best_peer" in r.extra:
            s += f" ×{r.extra['x_best_peer']:.2f} {r.extra['best_peer']}"
        return s

    head = ["variant", "pattern", "form", "mode"] + [f"T={T}" for T in lengths]
    skipped = {}  # (variant, reason) -> patterns/forms whose every cell is n/a
    shown = []
    for k in keys:
        cells = [cell.get((*k, T)) for T in lengths]
        if all(c is None or c.status == "n/a" for c in cells):
            note = next((c.note for c in cells if c is not None), "")
            where = f"{k[1]}/{k[2]}"
            lst = skipped.setdefault((k[0], note), [])
            if where not in lst:
                lst.append(where)
        else:
            shown.append(k)
    body = [[*k, *(fmt(cell.get((*k, T))) for T in lengths)] for k in shown]
    foot = [f"n/a: {name} on {', '.join(where)}: {note}" for (name, note), where in skipped.items()]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ([""] + [f"- {f}" for f in foot] if foot else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body] + foot)


def write_json(path: str, rows: Sequence[BenchRow], env: Dict[str, Any], config: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "config": config, "rows": [asdict(r) for r in rows]}, f, indent=1,
                  default=str)
