"""attnkit.ops.softmax: softmax-family attention ``o_i = Σ_j normalizer(score_mod(scale · q_i·k_j))_j v_j``.

* :mod:`.call` — one problem after validation (sizes, pieces, per-row counts) and the weights of a dense block;
* :mod:`.naive` — the materialized form (float64 ground truth, returns the weights);
* :mod:`.streaming` — online softmax over tiles, O(block²) memory, recomputing backward;
* :mod:`.recurrent` — token by token over a growing KV cache;
* :mod:`.reference` — the reference backend (one of the three forms);
* :mod:`.plan`, :mod:`.fused`, :mod:`.triton` — the fused Triton kernels (forward, backward, in-kernel masks,
  score mods and normalizers), imported only when Triton is there.
"""
from ..utils.tiles import reference_tiles, streaming_blocks
from .call import Call, dense_weights
from .naive import materialized
from .recurrent import check_no_lookahead, recurrent
from .reference import run_reference
from .streaming import streaming

__all__ = ["Call", "dense_weights", "materialized", "streaming", "recurrent", "check_no_lookahead", "run_reference",
           "streaming_blocks", "reference_tiles"]
