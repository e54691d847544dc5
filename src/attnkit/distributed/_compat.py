"""attnkit names this package needs beyond the public API, resolved in one place (the package is being moved
into core/ ops/ dispatch/: each name is looked up in its new home, then its old one)."""
from __future__ import annotations

import importlib

_LINEAR_HOMES = ("attnkit.ops.linear", "attnkit.ops.linear.functional", "attnkit.ops.linear.feature_maps",
                 "attnkit.variants.linear")
_AAREN_HOMES = ("attnkit.ops.linear.aaren", "attnkit.variants.linear.aaren")


def linear_name(name: str, homes=_LINEAR_HOMES):
    """``RULES`` (rule -> gate kind / delta flag), ``NORMALIZE_EPS``, ``as_feature_map`` of the linear family."""
    for module in homes:
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    raise ImportError(f"attnkit's linear family exports no {name} (looked in {', '.join(homes)})")


def aaren_combine():
    """``combine(a, b)``: the AarenState of a prefix a followed by b (a may be empty, b not)."""
    return linear_name("combine", _AAREN_HOMES)
