"""attnkit.ops.linear: the linear / recurrent family — fixed-size-state rules in parallel, chunk and recurrent forms
(plain PyTorch, any dtype; the float64 ground truth of the fused kernels in :mod:`.triton`).

    from attnkit import linear_attention, linear_step
    o, S = linear_attention(q, k, v, rule="gated_delta", gate=log_alpha, beta=beta, qk_l2norm=True,
                            output_final_state=True)
    o_t, S = linear_step(S, q_t, k_t, v_t, rule="gated_delta", gate=log_alpha_t, beta=beta_t, qk_l2norm=True)

Rules and their recurrences: :mod:`.functional`; the chunkwise engine: :mod:`.engine`; log-linear's Fenwick
levels: :mod:`.loglinear`; Aaren's prefix scan: :mod:`.aaren`; feature maps: :mod:`.feature_maps`.
"""
from . import feature_maps
from .common import value_checks
from .aaren import AarenState
from .feature_maps import Favor, FeatureMap, as_feature_map
from .functional import (ALL_RULES, FORMS, LOG_LINEAR_BASES, NORMALIZE_EPS, RULE_ALIASES, RULES, lightning_log_decay,
                         linear_attention, retention_log_decay, rule_name, step)
from .loglinear import LogLinearState

#: the name under which attnkit re-exports :func:`step` (``attnkit.linear_step``)
linear_step = step

__all__ = ["value_checks", "linear_attention", "step", "linear_step", "LogLinearState", "AarenState", "FeatureMap", "Favor",
           "as_feature_map", "feature_maps", "ALL_RULES", "RULES", "RULE_ALIASES", "rule_name", "FORMS",
           "LOG_LINEAR_BASES", "NORMALIZE_EPS", "retention_log_decay", "lightning_log_decay"]
