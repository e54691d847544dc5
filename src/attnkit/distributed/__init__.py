"""Context parallelism: one sequence sharded over the ranks of a torch.distributed group.

    import attnkit.distributed as cp
    lay = cp.ShardLayout.for_sequence(T, world_size, load_balance="zigzag")
    q_l, k_l, v_l = (cp.shard(x, rank, world_size, load_balance="zigzag") for x in (q, k, v))
    o_l = cp.context_parallel_attention(q_l, k_l, v_l, mask=attnkit.masks.causal, seq_len=T)
    o_l, S = cp.context_parallel_linear_attention(q_l, k_l, v_l, rule="gated_delta", gate=g_l, beta=b_l,
                                                   load_balance="zigzag", seq_len=T, output_final_state=True)

* softmax family (:mod:`.ring`): ring attention (K/V passed around, skipping blocks the mask cannot see) or
  all-gather attention;
* linear family (:mod:`.linear`): state passing (each shard's affine state map, an exclusive scan);
* sharding (:mod:`.shard`): contiguous / zigzag layouts, padding, cu_seqlens per rank;
* layers (:mod:`.wrap`): :class:`CPConfig` and :class:`ContextParallel` for modules;
* :mod:`.sim`: the ring's schedule timed on one GPU, and the scaling prediction.
"""
from .comm import RingError, gather_sequence
from .linear import context_parallel_linear_attention
from .ring import RingPlan, context_parallel_attention
from .shard import (LOAD_BALANCE, ShardLayout, inverse_permutation, local_cu_seqlens, pad_cu_seqlens, padded_length,
                    shard, unshard, zigzag_permutation)
from .wrap import ContextParallel, CPConfig

__all__ = ["context_parallel_attention", "context_parallel_linear_attention", "ShardLayout", "RingPlan",
           "RingError", "LOAD_BALANCE", "padded_length", "shard", "unshard", "gather_sequence", "zigzag_permutation",
           "inverse_permutation", "pad_cu_seqlens", "local_cu_seqlens", "CPConfig", "ContextParallel"]
