"""Plots of benchmark, MQAR and decode results (matplotlib's object API, Agg canvas: no pyplot state, no display).

Every function returns a :class:`Plot` (title, caption, PNG bytes) or None when the data has nothing to show.

* :func:`time_memory` — per (pattern, mode): time and peak memory against sequence length, one line per variant ×
  implementation (attnkit forms solid, peers dashed), the min–max band of the samples shaded;
* :func:`speedup_heatmaps` — per mode: (a) the fastest attnkit form against the fastest peer on the same cell,
  (b) each variant's fastest form against the fastest plain-softmax implementation (CAB's comparison);
* :func:`mqar_accuracy` — MQAR accuracy (best learning rate) against state size, one line per model;
  :func:`mqar_by_test` — accuracy per test (T, pairs) cell of each model's largest width;
* :func:`decode_bandwidth` — GB/s (and ms) against the number of keys, one line per implementation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["Plot", "time_memory", "speedup_heatmaps", "mqar_accuracy", "mqar_by_test", "decode_bandwidth"]


@dataclass
class Plot:
    title: str
    caption: str
    png: bytes


def _figure(w: float = 10, h: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _colors(n: int):
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def time_memory(rows: Sequence[Any], pattern: str, mode: str, env: str = "") -> Optional[Plot]:
    """Time (ms, min–max band) and peak extra memory (MiB) against T for one pattern and mode."""
    sel = [r for r in rows if r.pattern == pattern and r.mode == mode and r.status == "ok" and r.ms]
    if not sel:
        return None
    series: Dict[tuple, List[Any]] = {}
    for r in sel:
        series.setdefault((r.variant, r.label, r.impl == "attnkit"), []).append(r)
    variants = list(dict.fromkeys(k[0] for k in series))
    color = dict(zip(variants, _colors(len(variants))))
    fig = _figure(11, 4.4)
    ax_t, ax_m = fig.subplots(1, 2)
    for (name, label, ours), rs in series.items():
        rs = sorted(rs, key=lambda r: r.T)
        Ts = [r.T for r in rs]
        style = dict(color=color[name], linestyle="-" if ours else "--", marker="o" if ours else "s", markersize=3.5,
                     label=f"{name} · {label}")
        ax_t.plot(Ts, [r.ms for r in rs], **style)
        lo = [r.ms_min if r.ms_min is not None else r.ms for r in rs]
        hi = [r.ms_max if r.ms_max is not None else r.ms for r in rs]
        ax_t.fill_between(Ts, lo, hi, color=color[name], alpha=0.12, linewidth=0)
        mem = [(r.T, r.mem_mib) for r in rs if r.mem_mib is not None]
        if mem:
            ax_m.plot([t for t, _ in mem], [max(m, 1e-3) for _, m in mem], **style)
    for ax, what in ((ax_t, "ms per call (median; band: min–max)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.25)
    ax_t.set_title(f"{pattern} · {mode}: time")
    ax_m.set_title(f"{pattern} · {mode}: memory")
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    return Plot(f"{pattern} · {mode}", f"Time and memory vs length, {pattern}, {mode}; solid: attnkit forms, "
                f"dashed: peers on the same inputs. {env}".strip(), _png(fig))


def _heatmap(ax, data: List[List[Optional[float]]], rows: List[str], cols: List[str], title: str):
    import numpy as np
    from matplotlib.colors import LogNorm
    arr = np.array([[np.nan if x is None else x for x in r] for r in data], dtype=float)
    finite = arr[np.isfinite(arr)]
    span = max(2.0, float(np.nanmax(np.abs(np.log10(finite)))) if finite.size else 1.0)
    span = min(span, 3.0)
    im = ax.imshow(arr, cmap="RdYlGn", norm=LogNorm(10 ** -span, 10 ** span), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if np.isfinite(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.2g}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    return im


def speedup_heatmaps(rows: Sequence[Any], mode: str, baseline: str = "softmax") -> Optional[Plot]:
    """Two heatmaps over (pattern, T): fastest peer / fastest attnkit form per variant (> 1: attnkit faster), and
    fastest plain-softmax implementation / the variant's fastest attnkit form (> 1: the variant is faster)."""
    ok = [r for r in rows if r.mode == mode and r.status == "ok" and r.ms]
    if not ok:
        return None
    best_ak: Dict[tuple, float] = {}
    best_peer: Dict[tuple, float] = {}
    best_base: Dict[tuple, float] = {}
    for r in ok:
        key = (r.variant, r.pattern, r.T)
        d = best_ak if r.impl == "attnkit" else best_peer
        d[key] = min(d.get(key, math.inf), r.ms)
        if r.variant == baseline:
            best_base[(r.pattern, r.T)] = min(best_base.get((r.pattern, r.T), math.inf), r.ms)
    cols = sorted({(r.pattern, r.T) for r in ok}, key=lambda c: (list(dict.fromkeys(r.pattern for r in ok))
                                                                  .index(c[0]), c[1]))
    names = list(dict.fromkeys(r.variant for r in ok))
    col_labels = [f"{p} {T}" for p, T in cols]
    peer_rows = [n for n in names if any((n, p, T) in best_peer and (n, p, T) in best_ak for p, T in cols)]
    base_rows = [n for n in names if n != baseline and any((n, p, T) in best_ak and (p, T) in best_base
                                                           for p, T in cols)]
    if not peer_rows and not base_rows:
        return None
    panels = [x for x in ((peer_rows, "peer"), (base_rows, "base")) if x[0]]
    fig = _figure(11, 1.2 + 0.32 * max(len(x[0]) for x in panels) + 1.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (names_, kind) in zip(axes, panels):
        if kind == "peer":
            data = [[(best_peer[(n, p, T)] / best_ak[(n, p, T)]) if (n, p, T) in best_peer and (n, p, T) in best_ak
                     else None for p, T in cols] for n in names_]
            im = _heatmap(ax, data, names_, col_labels, f"{mode}: fastest peer ms / fastest attnkit ms")
        else:
            data = [[(best_base[(p, T)] / best_ak[(n, p, T)]) if (n, p, T) in best_ak and (p, T) in best_base
                     else None for p, T in cols] for n in names_]
            im = _heatmap(ax, data, names_, col_labels, f"{mode}: fastest {baseline} ms / variant's fastest ms")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return Plot(f"speedups · {mode}", "Speedup heatmaps (green > 1: the row is faster). Left: attnkit against the "
                "fastest peer computing the same function; right: each variant against the fastest plain-softmax "
                "implementation on the same pattern and length (CAB's efficiency comparison).", _png(fig))


def mqar_accuracy(summary: Sequence[Dict[str, Any]]) -> Optional[Plot]:
    """Accuracy (mean over the test grid, best learning rate) against state size, one line per model."""
    pts = [s for s in summary if s.get("state_bytes")]
    if not pts:
        return None
    names = list(dict.fromkeys(_mqar_name(s) for s in pts))
    color = dict(zip(names, _colors(len(names))))
    fig = _figure(9, 5)
    ax = fig.subplots()
    for n in names:
        ss = sorted((s for s in pts if _mqar_name(s) == n), key=lambda s: s["state_bytes"])
        ax.plot([s["state_bytes"] for s in ss], [s["accuracy"] for s in ss], marker="o", color=color[n], label=n)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("state size (bytes to decode after the longest test sequence)")
    ax.set_ylabel("MQAR accuracy (test grid mean, best lr)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    grid = sorted({k for s in pts for k in s.get("by_test", {})}, key=lambda k: [int(x) for x in k.split("x")])
    return Plot("MQAR: accuracy vs state size", f"Multi-query associative recall (Zoology), vocab 8192, test cells "
                f"{', '.join(grid)}; one point per model width (and feature dim), the best learning rate each.",
                _png(fig))


def _mqar_name(s: Dict[str, Any]) -> str:
    fd = s.get("feature_dim")
    return s["variant"] + (f" (f={fd})" if fd else "")


def mqar_by_test(summary: Sequence[Dict[str, Any]]) -> Optional[Plot]:
    """Accuracy per test (T, pairs) cell for every model at its largest width: where recall breaks down."""
    widest: Dict[str, Dict[str, Any]] = {}
    for s in summary:
        n = _mqar_name(s)
        if s.get("by_test") and (n not in widest or s["d_model"] > widest[n]["d_model"]):
            widest[n] = s
    if not widest:
        return None
    cols = sorted({k for s in widest.values() for k in s["by_test"]}, key=lambda k: [int(x) for x in k.split("x")])
    names = list(widest)
    import numpy as np
    arr = np.array([[widest[n]["by_test"].get(c, np.nan) for c in cols] for n in names], dtype=float)
    fig = _figure(8, 1.5 + 0.32 * len(names))
    ax = fig.subplots()
    im = ax.imshow(arr, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [c.replace("x", " / ") for c in cols], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), [f"{n} d={widest[n]['d_model']}" for n in names], fontsize=7)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if np.isfinite(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if arr[i, j] < 0.6 else "black")
    ax.set_xlabel("test sequence length / key-value pairs")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return Plot("MQAR: accuracy per test cell", "Accuracy per (sequence length, pairs) test cell, each model at "
                "its largest width and best learning rate.", _png(fig))


def decode_bandwidth(rows: Sequence[Dict[str, Any]]) -> Optional[Plot]:
    """Decode results: GB/s (left) and ms (right) against the number of keys, one line per implementation
    (rows need ``ms`` and a bandwidth field; see :func:`attnkit.tools.report.decode_rows`)."""
    if not rows:
        return None
    series: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(r["label"], []).append(r)
    color = dict(zip(series, _colors(len(series))))
    fig = _figure(11, 4.4)
    ax_b, ax_t = fig.subplots(1, 2)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["keys"])
        if any(r.get("gbps") for r in rs):
            ax_b.plot([r["keys"] for r in rs if r.get("gbps")], [r["gbps"] for r in rs if r.get("gbps")],
                      marker="o", color=color[label], label=label)
        ax_t.plot([r["keys"] for r in rs if r.get("ms")], [r["ms"] for r in rs if r.get("ms")], marker="o",
                  color=color[label], label=label)
    for ax, what in ((ax_b, "GB/s of K/V read"), (ax_t, "ms per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys in the cache")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.25)
    ax_t.set_yscale("log")
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    return Plot("decode bandwidth", "Decoding one query token: bandwidth on the K/V bytes read and time per step.",
                _png(fig))
