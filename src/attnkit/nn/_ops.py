"""The attnkit operations the layers call, imported in this one place: when a module moves, one line changes.

Only public names are used (see notes/LAYOUT.md); the head-structure functions are taken from the top level
when the package exports them there, else from their current modules.
"""
from __future__ import annotations

import importlib

import attnkit as _ak
from attnkit import masks, normalizers, scores  # noqa: F401  (re-exported for the layers)
# the linear rules' names; rule_name: the rule a deprecated alias names (with a DeprecationWarning)
from attnkit.ops.linear import ALL_RULES as LINEAR_RULES, rule_name, value_checks  # noqa: F401
from attnkit.ops.softmax.call import at_visible, sum_visible  # noqa: F401  (products over visible pairs only)

attention = _ak.attention
linear_attention = _ak.linear_attention
linear_step = _ak.linear_step
get_variant = _ak.get_variant
AarenState = _ak.AarenState
LogLinearState = _ak.LogLinearState


def _public(name: str, *modules: str):
    """``attnkit.<name>``, else the first of ``modules`` (old and new homes during the package move) that has it."""
    fn = getattr(_ak, name, None)
    for module in modules:
        if fn is not None:
            break
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
    if fn is None:
        raise ImportError(f"attnkit exports no {name} (looked in attnkit and {', '.join(modules)})")
    return fn


differential_attention = _public("differential_attention", "attnkit.variants.differential",
                                 "attnkit.dispatch.differential")
multi_token_attention = _public("multi_token_attention", "attnkit.variants.multitoken",
                                "attnkit.ops.multitoken.reference", "attnkit.ops.multitoken")
simplicial_attention = _public("simplicial_attention", "attnkit.variants.simplicial",
                               "attnkit.ops.simplicial.reference", "attnkit.ops.simplicial")


def catalog(family: str):
    """Every registered variant of ``family`` (the catalog listing, wherever the package exports it)."""
    listing = getattr(_ak, "variants", None)
    if not callable(listing):
        listing = _public("variants", "attnkit.catalog", "attnkit.catalog.registry", "attnkit.registry")
    return listing(family)


def variant_pieces(variant, n_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """Fresh ``score_mod`` / ``normalizer`` modules of a softmax-family catalog variant, owned by the caller.

    Uses ``variant.pieces(H)`` where the catalog offers it (the variant's own initialization); otherwise the
    learnable pieces the catalog builds for its checks (``variant.make_inputs``, random initialization).
    """
    pieces = getattr(variant, "pieces", None)
    if callable(pieces):
        got = pieces(n_heads)
    else:
        got = variant.make_inputs(_ak.Spec(B=1, Hq=n_heads, Hkv=n_kv_heads, Lq=1, Lk=1, D=head_dim, Dv=head_dim))
    return {"score_mod": got.get("score_mod"), "normalizer": got.get("normalizer")}
