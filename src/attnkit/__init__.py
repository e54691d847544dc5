"""attnkit: the attention mechanisms of the research literature behind one PyTorch API.

    import attnkit
    from attnkit import masks, scores, normalizers
    out = attnkit.attention(q, k, v, mask=masks.causal & masks.sliding_window(256),
                            score_mod=scores.softcap(30.0))

Layers, one way (see the README's layout section): core → ops → dispatch → catalog → cache → nn → integrations →
distributed → analysis; tools on top.
"""
import sys as _sys

from .core import masks, normalizers, scores
from .core.record import last_backend, record
from .dispatch import attention, differential_attention, linear_attention, linear_step, varlen_attention
from .dispatch.decode import decode_attention
from .ops.linear import AarenState, LogLinearState
from .ops.multitoken import multi_token_attention
from .ops.simplicial import simplicial_attention
from .catalog import Spec, Variant, get_variant, variants

# ``import attnkit.masks`` (and scores, normalizers) keeps working: the public modules live in attnkit.core
for _name in ("masks", "scores", "normalizers"):
    _sys.modules[f"{__name__}.{_name}"] = globals()[_name]

__version__ = "0.1.0"
__all__ = ["attention", "varlen_attention", "decode_attention", "differential_attention", "multi_token_attention", "simplicial_attention",
           "linear_attention", "linear_step", "LogLinearState", "AarenState", "last_backend", "record", "masks",
           "scores", "normalizers", "variants", "get_variant", "Variant", "Spec", "__version__"]
