"""The linear / recurrent family: fixed-size-state rules in parallel, chunk and recurrent forms.

    from attnkit.variants.linear import linear_attention, step
    o, S = linear_attention(q, k, v, rule="gated_delta", gate=log_alpha, beta=beta, qk_l2norm=True,
                            output_final_state=True)
    o_t, S = step(S, q_t, k_t, v_t, rule="gated_delta", gate=log_alpha_t, beta=beta_t, qk_l2norm=True)

Rules and their recurrences: :mod:`attnkit.variants.linear.functional`. Importing this package
registers one variant per rule × feature map in :mod:`attnkit.registry` (family ``"linear"``).
"""
from . import feature_maps
from . import catalog  # noqa: F401  (registers the variants)
from .aaren import AarenState
from .feature_maps import FeatureMap, Favor, as_feature_map
from .functional import (ALL_RULES, FORMS, LOG_LINEAR_BASES, NORMALIZE_EPS, RULES, lightning_log_decay,
                         linear_attention, retention_log_decay, step)
from .loglinear import LogLinearState

#: the name under which attnkit re-exports :func:`step` (``attnkit.linear_step``)
linear_step = step

__all__ = ["linear_attention", "step", "linear_step", "LogLinearState", "AarenState", "FeatureMap", "Favor",
           "as_feature_map", "feature_maps", "ALL_RULES", "RULES", "FORMS", "LOG_LINEAR_BASES", "NORMALIZE_EPS",
           "retention_log_decay", "lightning_log_decay"]
