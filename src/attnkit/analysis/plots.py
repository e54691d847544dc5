"""Matplotlib figures of the analysis, written as PNG files with the Agg canvas (no pyplot, no global backend change).

* :func:`head_grid` — heatmaps of ``[L, H, Lq, Lk]`` maps, one panel per (layer, head);
* :func:`layer_head_heatmap` — a ``[L, H]`` value (entropy, sink share, importance) as a heatmap;
* :func:`layer_curves` — per-layer curves (e.g. sink share and entropy);
* :func:`rollout_plot` — rollout / flow rows over input tokens;
* :func:`compare_maps` — maps side by side (a linear rule's implicit map next to a softmax map);
* :func:`analysis_section` — the Markdown section a report embeds, from the files an inspection wrote.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["head_grid", "layer_head_heatmap", "layer_curves", "rollout_plot", "compare_maps", "analysis_section"]

PathLike = Union[str, "os.PathLike[str]"]


def _figure(w: float, h: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"attnkit.analysis.plots needs matplotlib (pip install matplotlib): {e}") from None
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _np(t: Tensor):
    return t.detach().to(torch.float64).cpu().numpy()


def _ticks(ax, tokens: Optional[Sequence[str]], n_rows: int, n_cols: int, small: bool = False) -> None:
    if tokens is None or len(tokens) != n_cols or n_cols > 40:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    fs = 5 if small else 7
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(tokens, rotation=90, fontsize=fs)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(tokens[-n_rows:], fontsize=fs)


def head_grid(maps: Tensor, path: PathLike, tokens: Optional[Sequence[str]] = None, title: Optional[str] = None,
              layer_names: Optional[Sequence[str]] = None) -> Path:
    """Heatmaps of ``maps [L, H, Lq, Lk]`` (or ``[H, Lq, Lk]``): rows = layers, columns = heads, each panel scaled
    to its own maximum |weight| (one mosaic image: fast for many heads)."""
    import numpy as np
    if maps.dim() == 3:
        maps = maps[None]
    if maps.dim() != 4:
        raise ValueError(f"maps must be [L, H, Lq, Lk] or [H, Lq, Lk], got {tuple(maps.shape)}")
    L, H, Lq, Lk = maps.shape
    a = np.abs(_np(maps))
    peak = a.max(axis=(2, 3), keepdims=True)
    a = a / np.where(peak > 0, peak, 1.0)
    gap = max(1, max(Lq, Lk) // 12)
    mosaic = np.full((L * (Lq + gap) - gap, H * (Lk + gap) - gap), np.nan)
    for l in range(L):
        for h in range(H):
            mosaic[l * (Lq + gap):l * (Lq + gap) + Lq, h * (Lk + gap):h * (Lk + gap) + Lk] = a[l, h]
    fig = _figure(min(1.2 * H + 1.0, 24.0), min(1.2 * L * Lq / max(Lk, 1) + 1.0, 24.0))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mosaic, cmap="viridis", interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.03, label="weight / panel max")
    ax.set_xticks([h * (Lk + gap) + Lk / 2 for h in range(H)])
    ax.set_xticklabels([f"h{h}" for h in range(H)], fontsize=7)
    ax.set_yticks([l * (Lq + gap) + Lq / 2 for l in range(L)])
    ax.set_yticklabels(list(layer_names) if layer_names else [f"layer {l}" for l in range(L)], fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def layer_head_heatmap(values: Tensor, path: PathLike, title: str = "", label: str = "",
                       layer_names: Optional[Sequence[str]] = None) -> Path:
    """A ``[L, H]`` value per layer and head (entropy, sink share, importance), annotated."""
    if values.dim() != 2:
        raise ValueError(f"values must be [L, H], got {tuple(values.shape)}")
    L, H = values.shape
    fig = _figure(0.5 * H + 2.2, 0.4 * L + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    a = _np(values)
    im = ax.imshow(a, cmap="magma", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xticks(range(H))
    ax.set_xlabel("head")
    ax.set_yticks(range(L))
    ax.set_yticklabels(layer_names if layer_names else [f"layer {l}" for l in range(L)], fontsize=7)
    if L * H <= 200:
        for l in range(L):
            for h in range(H):
                ax.text(h, l, f"{a[l, h]:.2f}", ha="center", va="center", fontsize=5, color="white")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def layer_curves(curves: Mapping[str, Sequence[float]], path: PathLike, title: str = "",
                 ylabels: Optional[Mapping[str, str]] = None) -> Path:
    """One panel per named curve over layers (e.g. ``{"sink share": [...], "entropy (nats)": [...]}``)."""
    n = len(curves)
    if n == 0:
        raise ValueError("give at least one curve")
    fig = _figure(3.4 * n, 2.6)
    fig.subplots_adjust(wspace=0.45)
    for i, (name, ys) in enumerate(curves.items()):
        ax = fig.add_subplot(1, n, i + 1)
        ys = [float(y) for y in ys]
        ax.plot(range(len(ys)), ys, marker="o")
        ax.set_xlabel("layer")
        ax.set_ylabel((ylabels or {}).get(name, name))
        ax.set_xticks(range(len(ys)))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def rollout_plot(rows: Mapping[str, Tensor], path: PathLike, tokens: Optional[Sequence[str]] = None,
                 title: str = "") -> Path:
    """Bars of rollout / flow rows over input tokens: ``{"rollout [CLS]": R[0, :] [T], "flow [CLS]": ...}``."""
    n = len(rows)
    if n == 0:
        raise ValueError("give at least one row")
    T = next(iter(rows.values())).shape[-1]
    fig = _figure(max(4.0, 0.3 * T + 1.5), 2.2 * n + 0.4)
    for i, (name, r) in enumerate(rows.items()):
        ax = fig.add_subplot(n, 1, i + 1)
        ax.bar(range(T), _np(r))
        ax.set_ylabel(name, fontsize=8)
        if tokens is not None and len(tokens) == T:
            ax.set_xticks(range(T))
            ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("input token")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def compare_maps(maps: Mapping[str, Tensor], path: PathLike, title: str = "", log: bool = True,
                 tokens: Optional[Sequence[str]] = None) -> Path:
    """Maps ``[Lq, Lk]`` side by side (e.g. ``{"gated delta (implicit)": M, "softmax": P}``); ``log`` shows
    ``log10 |w|`` (implicit maps are signed and span many decades)."""
    n = len(maps)
    if n == 0:
        raise ValueError("give at least one map")
    fig = _figure(3.4 * n, 3.2)
    fig.subplots_adjust(wspace=0.5)
    for i, (name, m) in enumerate(maps.items()):
        if m.dim() != 2:
            raise ValueError(f"map {name!r} must be [Lq, Lk], got {tuple(m.shape)}")
        a = _np(m)
        if log:
            import numpy as np
            a = np.log10(np.maximum(np.abs(a), 1e-12))
        ax = fig.add_subplot(1, n, i + 1)
        im = ax.imshow(a, cmap="viridis", aspect="auto", interpolation="nearest",
                       vmin=max(a.min(), a.max() - 8) if log else None)
        fig.colorbar(im, ax=ax, fraction=0.046, label="log10 |weight|" if log else "weight")
        ax.set_title(name, fontsize=8)
        _ticks(ax, tokens, m.shape[0], m.shape[1], small=True)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def analysis_section(out_dir: PathLike, summary: Optional[Mapping] = None, level: int = 2) -> str:
    """The Markdown "Analysis" section of a report from an inspection's output folder (``attnkit inspect`` or
    :func:`attnkit.tools.inspect.inspect`): its ``summary.json`` (or ``summary``) as a table and its PNGs as
    images, paths relative to ``out_dir``'s parent."""
    import json
    out_dir = Path(out_dir)
    if summary is None:
        f = out_dir / "summary.json"
        summary = json.loads(f.read_text()) if f.exists() else {}
    h = "#" * level
    lines = [f"{h} Analysis", ""]
    target = summary.get("target")
    if target:
        lines += [f"Target: `{target}`" + (f" — {summary.get('what', '')}" if summary.get("what") else ""), ""]
    layers = summary.get("layers") or []
    if layers:
        keys = [k for k in ("sink", "entropy", "window", "distance", "mass") if k in layers[0]]
        lines += ["| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in layers:
            lines.append(f"| {row.get('name', '')} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
        lines.append("")
    for png in sorted(out_dir.glob("*.png")):
        rel = os.path.relpath(png, out_dir.parent)
        lines += [f"![{png.stem}]({rel})", ""]
    return "\n".join(lines)
