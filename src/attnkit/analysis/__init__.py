"""attnkit.analysis: look inside attention (issue 16).

* :mod:`.stats` — exact row statistics (entropy, sink share, window share, mean distance, top-k keys, mass) in one
  streaming pass for any softmax-family variant, and from any given map;
* :mod:`.linear_maps` — the same statistics and block maps for the implicit maps of linear rules, chunkwise;
* :mod:`.maps` — full maps (small T) and exact block-averaged maps (long T);
* :mod:`.hooks` — per-layer maps from attnkit layers and Hugging Face models using the attnkit plug-in;
* :mod:`.flow` — attention rollout and attention flow (Abnar & Zuidema 2020);
* :mod:`.importance` — head importance by gradient (Michel et al. 2019) and by ablation;
* :mod:`.plots` — matplotlib PNGs (Agg).
"""
from .stats import RowStats, StatSpec, attention_stats, head_summary, map_stats

__all__ = ["RowStats", "StatSpec", "attention_stats", "map_stats", "head_summary"]
