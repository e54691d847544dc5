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
from .flow import flow, rollout
from .hooks import LinearRecord, SoftmaxRecord, capture, head_mean, intercept
from .importance import ablation_importance, gradient_importance, head_gates
from .linear_maps import linear_block_map, linear_map, linear_stats
from .maps import attention_map, block_average, block_map
from .stats import RowStats, StatSpec, attention_stats, head_summary, map_stats

__all__ = ["RowStats", "StatSpec", "attention_stats", "map_stats", "head_summary", "attention_map", "block_map",
           "block_average", "linear_stats", "linear_map", "linear_block_map", "capture", "intercept", "head_mean",
           "SoftmaxRecord", "LinearRecord", "rollout", "flow", "head_gates", "gradient_importance",
           "ablation_importance"]
