"""``attnkit report RESULTS... -o report.html``: one self-contained HTML file (plots embedded as base64 PNG).

Inputs, recognized by content:

* ``attnkit bench`` JSON (``{"environment", "config", "rows", "peers"?}``, schema 1 or 2) → time and memory vs
  length per pattern and mode with every peer, speedup heatmaps, the efficiency-length table, the raw table;
* ``attnkit mqar`` results (JSON lines, schema ``attnkit.mqar``) → accuracy vs state size, accuracy per test cell,
  the best-learning-rate table and every cell;
* decode results (``--decode FILE`` or any JSON whose rows carry a bandwidth): ``{"rows": [...]}`` with, per row,
  ``ms`` and GB/s (``gbps`` / ``GB/s`` / ``gb_s``), the number of keys (``keys`` / ``Lk`` / ``T``) and a label
  (``impl`` / ``backend`` / ``variant``, plus ``pattern`` / ``B`` when present) → bandwidth and time vs keys.

Each section starts with the environment it was measured in (GPU or CPU, versions, load).
"""
from __future__ import annotations

import base64
import html
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import plots as P

__all__ = ["Report", "build", "write", "load", "decode_rows"]

GBPS_KEYS = ("gbps", "GB/s", "gb_s", "bandwidth_gbps")
KEYS_KEYS = ("keys", "Lk", "T", "kv_len")
LABEL_KEYS = ("impl", "backend", "variant", "form")


@dataclass
class Report:
    html: str
    plots: List[P.Plot] = field(default_factory=list)


def load(path: str) -> Tuple[str, Any]:
    """``("bench" | "mqar" | "decode", data)`` for a results file; ValueError naming what was expected."""
    with open(path) as f:
        text = f.read()
    first = text.lstrip()[:1]
    if first == "{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            rows = data["rows"]
            if rows and any(k in rows[0] for k in GBPS_KEYS):
                return "decode", data
            from .bench import read_json
            return "bench", read_json(path)
        if data is None or data.get("schema") == "attnkit.mqar":
            from .mqar import read_results
            return "mqar", read_results(path)
    raise ValueError(f"{path}: expected an attnkit bench JSON, an attnkit mqar JSON-lines file or decode results "
                     "({'rows': [{ms, gbps, keys, impl}, ...]})")


def decode_rows(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Normalized decode rows ``{label, keys, ms, gbps}`` from a decode results file (see the module docstring)."""
    out = []
    for r in data.get("rows", []):
        if r.get("status", "ok") != "ok":
            continue
        keys = next((r[k] for k in KEYS_KEYS if r.get(k) is not None), None)
        gbps = next((r[k] for k in GBPS_KEYS if r.get(k) is not None), None)
        if keys is None or (r.get("ms") is None and gbps is None):
            continue
        label = next((str(r[k]) for k in LABEL_KEYS if r.get(k)), "?")
        extra = " ".join(f"{k}={r[k]}" for k in ("pattern", "B") if r.get(k) is not None)
        out.append({"label": f"{label} {extra}".strip(), "keys": int(keys), "ms": r.get("ms"), "gbps": gbps})
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:left;white-space:nowrap}th{background:#f4f4f4}figure{margin:16px 0}img{max-width:100%;height:auto}
figcaption{font-size:12px;color:#555}details{margin:8px 0}.env td:first-child{font-weight:600}
"""


def _table(head: Sequence[str], body: Sequence[Sequence[Any]], cls: str = "") -> str:
    esc = lambda x: html.escape("" if x is None else str(x))  # noqa: E731
    rows = "".join("<tr>" + "".join(f"<td>{esc(x)}</td>" for x in r) + "</tr>" for r in body)
    return (f"<table class='{cls}'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{rows}</tbody></table>")


def _env_table(env: Dict[str, Any]) -> str:
    keys = ["gpu", "gpu_memory_gib", "cpu", "cpu_count", "cpu_threads", "load_avg", "torch", "triton", "cuda",
            "cudnn", "fla", "flash_attn", "flashinfer", "python", "platform", "attnkit", "date", "wall_s"]
    body = [[k, env[k]] for k in keys if env.get(k) not in (None, "")]
    body += [[k, v] for k, v in env.items() if k not in keys and not isinstance(v, (dict, list))]
    return _table(["environment", ""], body, "env")


def _figure(plot: Optional[P.Plot], out: List[P.Plot]) -> str:
    if plot is None:
        return ""
    out.append(plot)
    b64 = base64.b64encode(plot.png).decode()
    return (f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(plot.title)}'>"
            f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>")


def _env_line(env: Dict[str, Any]) -> str:
    dev = env.get("gpu") or env.get("cpu") or env.get("device", "")
    return f"{dev}, torch {env.get('torch', '?')}"


def _bench_section(path: str, data: Dict[str, Any], plots: List[P.Plot]) -> str:
    from . import bench
    rows = data["rows"]
    env, cfg = data["environment"], data["config"]
    parts = [f"<h2>Benchmark: {html.escape(os.path.basename(path))}</h2>", _env_table(env)]
    shape = ", ".join(f"{k}={cfg[k]}" for k in ("dtype", "batch", "heads", "kv_heads", "dim", "backend")
                      if cfg.get(k) is not None)
    if shape:
        parts.append(f"<p>Configuration: {html.escape(shape)}; schema {data.get('schema_version', 1)}.</p>")
    eff = bench.efficiency_table(bench.efficiency_lengths(rows))
    if eff is not None:
        parts.append(f"<h3>{html.escape(eff.title)}</h3>" + _table(eff.head, eff.body))
    for mode in dict.fromkeys(r.mode for r in rows):
        for pattern in dict.fromkeys(r.pattern for r in rows):
            parts.append(_figure(P.time_memory(rows, pattern, mode, _env_line(env)), plots))
        parts.append(_figure(P.speedup_heatmaps(rows, mode), plots))
    wide = bench.wide_table(rows)
    parts.append(f"<details><summary>Raw table ({len(rows)} rows)</summary>{_table(wide.head, wide.body)}</details>")
    nm = bench.notes(rows)
    parts.append("<details><summary>Notes: flags and what was not measured</summary><ul>"
                 + "".join(f"<li>{html.escape(n)}</li>" for n in nm) + "</ul></details>")
    return "\n".join(parts)


def _mqar_section(path: str, data: Dict[str, Any], plots: List[P.Plot]) -> str:
    from .mqar import summarize
    cells = data["cells"]
    summary = summarize(cells)
    parts = [f"<h2>MQAR: {html.escape(os.path.basename(path))}</h2>"]
    for run in data["runs"][-1:]:
        parts.append(_env_table(run.get("environment", {})))
        parts.append(f"<p>Seed {run.get('seed')}; configuration: "
                     f"{html.escape(json.dumps({k: v for k, v in run.get('config', {}).items() if k != 'seed'}))}</p>")
    parts.append(_figure(P.mqar_accuracy(summary), plots))
    parts.append(_figure(P.mqar_by_test(summary), plots))
    tests = sorted({k for s in summary for k in s.get("by_test", {})}, key=lambda k: [int(x) for x in k.split("x")])
    body = [[s["variant"], s["d_model"], s.get("feature_dim") or "", _bytes_text(s["state_bytes"]), f"{s['lr']:g}",
             f"{s['accuracy']:.3f}", *(f"{s['by_test'].get(t, float('nan')):.2f}" for t in tests)] for s in summary]
    parts.append("<h3>Best learning rate per model</h3>"
                 + _table(["model", "d_model", "f", "state", "lr", "acc", *tests], body))
    raw = [[c.get("variant"), c.get("d_model"), c.get("lr"), c.get("status"), c.get("accuracy"),
            c.get("steps_run"), c.get("early_stop_step"), c.get("train_s"), c.get("note", "")] for c in cells]
    parts.append(f"<details><summary>Every cell ({len(cells)})</summary>"
                 + _table(["model", "d_model", "lr", "status", "acc", "steps", "early stop", "train s", "note"], raw)
                 + "</details>")
    return "\n".join(parts)


def _bytes_text(n: Optional[float]) -> str:
    from .mqar import _fmt_bytes
    return "" if n is None else _fmt_bytes(n)


def _decode_section(path: str, data: Dict[str, Any], plots: List[P.Plot]) -> str:
    rows = decode_rows(data)
    parts = [f"<h2>Decode: {html.escape(os.path.basename(path))}</h2>"]
    if data.get("environment"):
        parts.append(_env_table(data["environment"]))
    parts.append(_figure(P.decode_bandwidth(rows), plots))
    parts.append(_table(["implementation", "keys", "ms", "GB/s"],
                        [[r["label"], r["keys"], r["ms"], r["gbps"]] for r in rows]))
    return "\n".join(parts)


def build(paths: Sequence[str], decode: Sequence[str] = ()) -> Report:
    """The report of ``paths`` (bench / mqar / decode files, recognized by content) and ``decode`` files."""
    if not paths and not decode:
        raise ValueError("attnkit report needs at least one results file")
    plots: List[P.Plot] = []
    sections = []
    for path in paths:
        kind, data = load(path)
        sections.append({"bench": _bench_section, "mqar": _mqar_section, "decode": _decode_section}[kind](
            path, data, plots))
    for path in decode:
        with open(path) as f:
            sections.append(_decode_section(path, json.load(f), plots))
    files = ", ".join(html.escape(os.path.basename(p)) for p in list(paths) + list(decode))
    doc = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>attnkit report</title>"
           f"<style>{_CSS}</style></head><body><h1>attnkit report</h1>"
           f"<p>Generated {time.strftime('%Y-%m-%d %H:%M')} from {files}; {len(plots)} plots.</p>"
           + "\n".join(sections) + "</body></html>")
    return Report(doc, plots)


def write(paths: Sequence[str], out: str, decode: Sequence[str] = ()) -> Report:
    rep = build(paths, decode)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(rep.html)
    return rep
