"""One name per thing (issue 11): a registry variant is called by the API's own name for what it adds, the API
accepts every registry name where it names that thing, and the earlier names still work with a DeprecationWarning
that names the new one. Everything below is derived from the registry (``variants()``, ``Variant.api``,
``Variant.aliases``) except ``RENAMED``, the frozen table of names users had before the rename."""
from __future__ import annotations

import contextlib
import importlib
import re
import warnings

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit import normalizers as N
from attnkit.catalog import Spec, aliases, get_variant, variants
from attnkit.nn import Attention, LinearAttention
from attnkit.ops.linear import ALL_RULES, RULE_ALIASES, rule_name
from attnkit.ops.linear import linear_attention as reference_linear_attention
from attnkit.ops.linear.feature_maps import FEATURE_MAP_ALIASES, FEATURE_MAPS, as_feature_map

F64 = torch.float64

#: every registry name before the rename -> its name now (the names users typed; frozen, never extended)
RENAMED = {
    "softmax-sink": "softmax_sink", "softmax-off-by-one": "softmax_off_by_one", "relaxed-softmax": "relaxed",
    "linear-none": "none", "t5-bias": "relative_bias", "sliding-window": "sliding_window",
    "streaming-llm": "streaming_llm", "block-causal": "chunked", "prefix-lm": "prefix_lm",
    "multi-token": "multi_token", "simplicial-2": "simplicial", "linear-elu": "linear_elu",
    "linear-relu": "linear_relu", "linear-favor": "linear_favor", "linear-taylor2": "linear_taylor2",
    "scalar-gate": "scalar_gate", "deltanet": "delta", "gated-deltanet": "gated_delta", "log-linear": "log_linear",
    "log-linear-mamba2": "log_linear_scalar_gate", "log-linear-gated-deltanet": "log_linear_gated_delta",
    "aaren-causal": "aaren_causal",
}
SPEC = Spec(B=1, Hq=2, Hkv=2, Lq=12, Lk=12, D=4, Dv=3, dtype=F64)


def deprecated(new: str):
    """pytest.warns for a DeprecationWarning that names ``new``."""
    return pytest.warns(DeprecationWarning, match=re.escape(repr(new)))


@contextlib.contextmanager
def no_warning():
    """Any warning inside is an error (a current name must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def resolve(path: str):
    """``attnkit.<path>``: a module attribute path under attnkit (``cache.StreamingLLM``, ``normalizers.relaxed``)."""
    *mods, attr = path.split(".")
    module = importlib.import_module(".".join(["attnkit"] + mods))
    return getattr(module, attr)


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def linear_name(v) -> str:
    """The name ``linear_attention``'s own arguments give a linear variant: the rule, then the feature map or the
    log-linear base bound (base 'linear' is the default), then 'causal' for Aaren with per-token queries."""
    parts = [v.rule] + [v.bound[k] for k in ("feature_map", "base") if v.bound.get(k) not in (None, "linear")]
    if v.rule == "aaren" and v.make_inputs(SPEC)["q"] is not None:
        parts.append("causal")
    return "_".join(parts)


# ------------------------------------------------------------------------------------------------
# Registry names are the API's names, and the API accepts each of them
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [v.name for v in variants()])
def test_every_registry_name_is_accepted_by_the_api_it_names(name):
    v = get_variant(name)
    assert v.name == name and name.isidentifier() and name == name.lower(), name
    assert v.api, f"{name} says where its name comes from (Variant.api)"
    api = resolve(v.api)  # the thing exists in the public API
    where, _, tail = v.api.rpartition(".")
    with no_warning():
        assert get_variant(name) is v
        if where == "normalizers":
            piece = v.pieces(SPEC.Hq)["normalizer"]
            assert tail == name and isinstance(piece, N.Normalizer) and piece.name == name
            assert isinstance(api(*([SPEC.Hq] if name == "softmax_sink" else [0.1] if name == "relaxed" else [])),
                              N.Normalizer)
            try:  # parameter-free normalizers are also accepted as a plain name
                assert N.as_normalizer(name).name == name
            except ValueError as e:
                assert "needs parameters" in str(e) and name in str(e)
        elif where == "scores":
            assert tail == name and v.pieces(SPEC.Hq)["score_mod"].kind == name
        elif where == "masks":
            assert tail == name and name in [leaf.kind for leaf in v.full_mask(SPEC).leaves()]
        elif where == "cache":  # a cache policy's mask: the variant attends over exactly what the policy keeps
            assert snake(tail) == name
            window = min(1024, max(2, SPEC.Lk // 4))
            assert v.full_mask(SPEC).key() == (M.causal & api(4, window).mask()).key()
        elif v.api == "linear_attention":
            assert api is attnkit.linear_attention and v.rule in ALL_RULES and name == linear_name(v)
            inputs = v.make_inputs(SPEC)
            o = api(**inputs, **{**v.bound, "chunk_size": 4}, backend="reference")[0]
            assert o.shape == (1, 2, 12, 3) and bool(torch.isfinite(o).all())
            layer = LinearAttention(16, 2, rule=v.rule, **({"base": v.bound["base"]} if "base" in v.bound else {}))
            assert layer.rule == v.rule
        else:  # a head-structure function exported at the top level
            assert v.api.endswith("_attention") and "." not in v.api and name == v.api[:-len("_attention")]
            assert getattr(v.fn, "__wrapped__", v.fn) is api
        if v.family == "softmax" and v.full_mask is not None:  # one attention call: the layer takes the name
            assert Attention(16, 2, variant=name).variant is v


def test_names_are_unique_across_names_and_aliases():
    names = [v.name for v in variants()]
    olds = [old for v in variants() for old in v.aliases]
    assert len(set(names)) == len(names) and len(set(olds)) == len(olds) and not set(names) & set(olds)
    assert aliases() == {old: v.name for v in variants() for old in v.aliases}


# ------------------------------------------------------------------------------------------------
# Deprecated names keep working, with a warning naming the new name
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("old", sorted(aliases()))
def test_each_alias_maps_to_its_new_name_and_warns(old):
    new = aliases()[old]
    with deprecated(new):
        assert get_variant(old) is get_variant(new)


def test_the_names_before_the_rename_all_still_work():
    assert set(RENAMED) <= set(aliases()) and {old: aliases()[old] for old in RENAMED} == RENAMED


@pytest.mark.parametrize("v", [v for v in variants("linear") if v.name in ALL_RULES], ids=lambda v: v.name)
def test_rule_aliases_are_accepted_by_linear_attention(v):
    """A variant named after a rule carries that rule's deprecated names, and linear_attention (reference and
    dispatch), linear_step and LinearAttention accept each one with a warning, computing the same function."""
    assert set(v.aliases) == {old for old, new in RULE_ALIASES.items() if new == v.name}
    inputs = {**v.make_inputs(SPEC), **{k: x for k, x in v.bound.items() if k != "rule"}, "chunk_size": 4}
    want = attnkit.linear_attention(**inputs, rule=v.name, backend="reference")[0]
    for old in v.aliases:
        with deprecated(v.name):
            assert rule_name(old) == v.name
        for fn in (attnkit.linear_attention, reference_linear_attention):
            with deprecated(v.name):
                got = fn(**inputs, rule=old, backend="reference")[0]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        with deprecated(v.name):
            assert LinearAttention(16, 2, rule=old).rule == v.name


def test_rule_alias_in_linear_step_and_as_log_linear_base():
    B, H, D = 1, 2, 4
    q, k, v = (torch.randn(B, H, D, dtype=F64) for _ in range(3))
    gate, beta = -torch.rand(B, H, dtype=F64), torch.rand(B, H, dtype=F64)
    want = attnkit.linear_step(None, q, k, v, rule="gated_delta", gate=gate, beta=beta, backend="reference")[0]
    with deprecated("gated_delta"):
        got = attnkit.linear_step(None, q, k, v, rule="gated-deltanet", gate=gate, beta=beta, backend="reference")[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with deprecated("scalar_gate"):
        layer = LinearAttention(16, 2, rule="log_linear", base="scalar-gate")
    assert layer.base == "scalar_gate"
    with pytest.raises(ValueError, match="unknown rule 'gated-delta'"):
        attnkit.linear_attention(q[:, :, None], k[:, :, None], v[:, :, None], rule="gated-delta")


def test_normalizer_and_feature_map_aliases():
    """The API's own second names: normalizer 'softmax1' is softmax_off_by_one, feature maps 'taylor' and 'based'
    are taylor2; each still works and warns."""
    assert N.ALIASES == {"softmax1": "softmax_off_by_one"} and set(FEATURE_MAP_ALIASES.values()) <= set(FEATURE_MAPS)
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=F64) for _ in range(3))
    want = attnkit.attention(q, k, v, mask=M.causal, normalizer="softmax_off_by_one")
    with deprecated("softmax_off_by_one"):
        got = attnkit.attention(q, k, v, mask=M.causal, normalizer="softmax1")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for old, new in FEATURE_MAP_ALIASES.items():
        with deprecated(new):
            assert as_feature_map(old) is as_feature_map(new)


def test_hf_registers_the_old_names_too():
    from attnkit.integrations.hf import _one_call_variants
    names = _one_call_variants()
    one_call = [v for v in variants("softmax") if v.full_mask is not None]
    assert names == [v.name for v in one_call] + [old for v in one_call for old in v.aliases]


# ------------------------------------------------------------------------------------------------
# return_weights (as in attnkit.attention) and its deprecated name return_attention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [attnkit.linear_attention, reference_linear_attention], ids=["dispatch", "reference"])
def test_linear_attention_return_weights(fn):
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=F64) for _ in range(3))
    gate = -torch.rand(1, 2, 9, dtype=F64)
    kw = dict(rule="scalar_gate", gate=gate, form="parallel", backend="reference")
    o, S, W = fn(q, k, v, **kw, return_weights=True)
    torch.testing.assert_close(o, W @ v, rtol=1e-12, atol=1e-12)  # o = M V from a zero state
    assert len(fn(q, k, v, **kw)) == 2 and len(fn(q, k, v, **kw, return_weights=False)) == 2
    with pytest.warns(DeprecationWarning, match="return_weights"):
        o2, S2, W2 = fn(q, k, v, **kw, return_attention=True)
    torch.testing.assert_close(W2, W, rtol=0, atol=0)
    for a, b in ((True, True), (False, True), (True, False)):
        with pytest.raises(TypeError, match="return_weights"):
            fn(q, k, v, **kw, return_weights=a, return_attention=b)
    with pytest.raises(ValueError, match="return_weights needs form='parallel'"):
        fn(q, k, v, **{**kw, "form": "chunk"}, return_weights=True)
