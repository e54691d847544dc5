"""Registered variants of the linear family: one per rule × feature map (``attnkit list``, ``check``, ``bench``).

    get_variant("gated_delta")(q, k, v, gate=g, beta=b, form="chunk")   # binds rule and qk_l2norm

A variant is named by ``linear_attention``'s own words: the rule, then the feature map or the log-linear base rule
it binds (``linear_elu``, ``log_linear_scalar_gate``); ``aaren_causal`` is Aaren with per-token queries.

``make_inputs(spec)`` gives fresh q ``[B,Hq,T,D]``, k ``[B,Hq,T,D]``, v ``[B,Hkv,T,Dv]`` (the state
has max(Hq, Hkv) heads), log gates, β ∈ (0,1), level weights and a random initial state. Only the
causal self pattern (Lq = Lk) has a state-passing form; plain linear attention also runs
bidirectionally (non-causal self) in its parallel and chunk forms.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..ops.linear.common import levels_needed
from ..ops.linear.feature_maps import as_feature_map
from ..dispatch.linear import KERNEL_RULES, linear_attention
from ..ops.linear.functional import RULE_ALIASES, RULES, retention_log_decay
from ..ops.utils.tiles import reference_tiles
from .registry import Spec, Variant, register

LINEAR_FORMS = ("parallel", "chunk", "recurrent")
#: the parallel forms materialize B·H·T² entries (several such tensors, some float64, in forward and
#: backward: ~3.5 GB for gated_delta at 2^26); above this many they are refused (use chunk)
PARALLEL_LIMIT = 1 << 25
#: log-linear over a delta base builds an explicit T×T transfer matrix in its parallel form: O(T³)
CUBIC_LIMIT = 2048


def default_chunk() -> int:
    """Chunk size of registered variants: 64, or the largest power of two ≤ the reference tile when a check
    shrinks it (:func:`attnkit.ops.utils.tiles.streaming_blocks`), so that checks cross chunk boundaries."""
    tile = min(64, reference_tiles()[1])
    return 1 << (max(tile, 1).bit_length() - 1)


def _rand(spec: Spec, *shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32, device=spec.device)


def _leaf(t: torch.Tensor, spec: Spec) -> torch.Tensor:
    return t.to(spec.dtype).detach()


def _heads(spec: Spec) -> int:
    return max(spec.Hq, spec.Hkv)


def _make_inputs(rule: str, base: Optional[str], fm, normalize: bool, extra: Dict) -> Callable[[Spec], dict]:
    """Input builder for one variant (gates in log space, β ∈ (0,1), λ > 0, a random initial state)."""
    gate_kind = RULES[base or rule].gate if rule != "aaren" else "none"
    delta = rule != "aaren" and RULES[base or rule].delta

    def make(spec: Spec) -> dict:
        B, T, D, Dv, H = spec.B, spec.Lk, spec.D, spec.Dv, _heads(spec)
        if rule == "aaren":
            out = {"k": _leaf(_rand(spec, B, spec.Hkv, T, D), spec), "v": _leaf(_rand(spec, B, spec.Hkv, T, Dv), spec)}
            if extra.get("per_token"):
                out["q"] = _leaf(_rand(spec, B, spec.Hq, spec.Lq, D), spec)
            else:
                out["q"] = None
                out["query"] = _leaf(2 * _rand(spec, spec.Hq, D), spec)
            return out
        out = {"q": _leaf(_rand(spec, B, spec.Hq, spec.Lq, D), spec),
               "k": None if rule == "hgrn2" else _leaf(_rand(spec, B, spec.Hq, T, D), spec),
               "v": _leaf(_rand(spec, B, spec.Hkv, T, Dv), spec)}
        Dk = as_feature_map(fm).dim(D)
        if gate_kind == "scalar":
            out["gate"] = _leaf(F.logsigmoid(2 + _rand(spec, B, H, T)), spec)
        elif gate_kind == "channel":
            out["gate"] = _leaf(F.logsigmoid(3 + _rand(spec, B, H, T, Dk)), spec)
        elif rule == "retention":
            out["gate"] = _leaf((retention_log_decay(H).float() * (0.5 + torch.rand(H))).to(spec.device), spec)
        if delta:
            out["beta"] = _leaf(torch.sigmoid(_rand(spec, B, H, T)), spec)
        if rule == "log_linear":
            out["level_weights"] = _leaf(0.5 + torch.rand(B, H, T, levels_needed(T - 1), device=spec.device), spec)
        else:
            S0 = 0.5 * _rand(spec, B, H, Dk, Dv + int(normalize))
            if normalize:  # keep the normalizer column positive (denominators away from 0)
                S0[..., -1] = 1 + torch.rand(B, H, Dk, device=spec.device)
            out["initial_state"] = _leaf(S0, spec)
        if rule == "linear":
            out["causal"] = spec.causal
        return out

    return make


def linear_variant(rule: str, summary: str, paper: str, *, name: Optional[str] = None, base: Optional[str] = None,
                   feature_map: Optional[str] = None, normalize: bool = False, forms=LINEAR_FORMS,
                   reference_form: str = "recurrent", aliases=(), **extra) -> Variant:
    """Build and register one variant of the linear family, named ``rule[_feature_map][_base]`` unless ``name`` is
    given (log_linear's default base 'linear' adds nothing). ``aliases``: deprecated earlier names; a rule's own
    deprecated names (``RULE_ALIASES``) are added to the variant named after it."""
    if name is None:
        name = "_".join([rule] + [x for x in (feature_map, base) if x not in (None, "linear")])
    aliases = tuple(aliases) + tuple(old for old, new in RULE_ALIASES.items() if new == name)
    bound = {k: v for k, v in dict(rule=rule, base=base, feature_map=feature_map,
                                    normalize=normalize or None).items() if v is not None}
    delta = rule != "aaren" and RULES[base or rule].delta
    if delta:
        bound["qk_l2norm"] = True
    if rule == "lightning":
        bound.update(layer_idx=1, num_layers=4)
    per_token = extra.pop("per_token", False)
    if rule == "linear":  # its parallel form is the definition and also exists bidirectionally: checks cover both
        reference_form = "parallel"
    fm = as_feature_map(feature_map) if rule != "aaren" else None

    def fn(q=None, k=None, v=None, *, form: str = "chunk", backend: str = "reference", **kw):
        kw.setdefault("chunk_size", default_chunk())
        return linear_attention(q, k, v, form=form, backend=backend, **{**bound, **kw})

    def dims(spec: Spec):
        Dk = fm.dim(spec.D) if fm is not None else spec.D
        return Dk, spec.Dv + int(normalize)

    def state_bytes(spec: Spec) -> float:
        if rule == "aaren":  # learned query: (max, numerator, denominator); per-token queries use a KV cache
            return 4.0 * (spec.Dv + 2)
        Dk, Dv = dims(spec)
        levels = levels_needed(spec.Lk - 1) if rule == "log_linear" else 1
        return 4.0 * levels * Dk * Dv

    def flops(spec: Spec, C: int = 64) -> float:
        """Matmul FLOPs of the chunk form (per-token queries of Aaren: the causal pairs)."""
        BH, T = spec.B * _heads(spec), spec.Lk
        if rule == "aaren":
            if per_token:
                return spec.B * spec.Hq * (spec.D + spec.Dv) * T * (T + 1.0)
            return BH * T * (2.0 * spec.D + 2.0 * C * spec.Dv)
        Dk, Dv = dims(spec)
        per_tok = 2 * C * (Dk + Dv) + 4 * Dk * Dv
        if delta:
            per_tok += 2 * C * Dk + 2 * C * (Dk + Dv) + 4 * Dk * Dv + C * C
        if rule == "log_linear":
            per_tok += (levels_needed(T - 1) - 1) * (2 if not delta else 4) * Dk * Dv
        return float(BH * T * per_tok)

    def unsupported(spec: Spec, form: str) -> Optional[str]:
        if spec.Lq != spec.Lk:
            return ("linear / recurrent rules run over one sequence with a state; cross attention (Lq != Lk) has "
                    "no state-passing form")
        if not spec.causal:
            if rule == "aaren":
                return f"{name} is causal only: a prefix scan over the past has no bidirectional form"
            if rule != "linear":
                return f"{name} is causal only: its state recurrence has no bidirectional form"
            if form == "recurrent":
                return "bidirectional linear attention has no recurrent (decoding) form"
        if form == "parallel" and spec.B * _heads(spec) * spec.Lk ** 2 > PARALLEL_LIMIT:
            return (f"the parallel form materializes B·H·T² = {spec.B * _heads(spec) * spec.Lk ** 2:.3g} entries "
                    f"(> 2^25); use form='chunk'")
        if form == "parallel" and rule == "log_linear" and delta and spec.Lk > CUBIC_LIMIT:
            return f"the parallel form over a delta base is O(T³) (explicit T×T transfer matrix); T > {CUBIC_LIMIT}"
        if fm is not None and fm.dim(spec.D) > 4161:
            return f"{fm.name} expands D={spec.D} to {fm.dim(spec.D)} features (Based uses D = 16); D ≤ 64 only"
        return None

    if rule == "aaren":
        time_c = "O(T²·D) (per-token queries)" if per_token else "O(T·D) scan / O(T·C·D) chunk"
        memory = "chunk O(T·D); parallel O(T²)"
        cache = "K,V cache (D+Dv)·4 B per token" if per_token else "(max, num[Dv], den): (Dv+2)·4 B per head"
    else:
        time_c = "chunk O(T·C·D + T·D²); parallel O(T²·D); recurrent O(T·D²)"
        memory = "chunk O(T·D + T/C·D²); parallel O(T²); recurrent O(D²)"
        if rule == "log_linear":
            time_c = "chunk O(T·C·D + T·log(T)·D²); parallel O(T²·D)" + (" (O(T³) delta base)" if delta else "")
            memory = "chunk O(T·D + (T/C)·log(T/C)·D²); parallel O(T²)"
            cache = "log2(T)+1 Fenwick states Dk×Dv fp32 per head"
        else:
            cache = "state Dk×Dv fp32 per head" + (" + normalizer z [Dk]" if normalize else "") + ", constant in T"
    v = Variant(name=name, family="linear", summary=summary, paper=paper, forms=tuple(forms), fn=fn,
                make_inputs=_make_inputs(rule, base, feature_map, normalize, {"per_token": per_token}),
                masks="causal self" + (" / full self (bidirectional)" if rule == "linear" else ""),
                time=time_c, memory=memory, cache=cache, state_bytes=None if per_token else state_bytes, flops=flops,
                unsupported=unsupported, reference_form=reference_form,
                cache_bytes_per_token=(lambda s: s.Hkv * (s.D + s.Dv) * torch.finfo(s.dtype).bits / 8)
                if per_token else None, tags=("linear", rule),
                backends=("reference", "triton") if rule in KERNEL_RULES else ("reference",),
                api="linear_attention", aliases=aliases)
    v.rule, v.bound = rule, dict(bound)
    return register(v)


# -- the catalog --------------------------------------------------------------------------------

linear_variant("linear", "linear attention S_t = S_{t−1} + k_t v_tᵀ, o_t = q_tᵀ S_t (identity map, unnormalized)",
               "Katharopoulos et al. 2020, Transformers are RNNs")
linear_variant("linear", "normalized linear attention with φ = elu + 1",
               "Katharopoulos et al. 2020, Transformers are RNNs", feature_map="elu", normalize=True,
               aliases=("linear-elu",))
linear_variant("linear", "normalized linear attention with φ = relu",
               "ReLU kernel linear attention (e.g. Qin et al. 2022, cosFormer baseline)", feature_map="relu",
               normalize=True, aliases=("linear-relu",))
linear_variant("linear", "normalized linear attention with Performer FAVOR+ positive random features",
               "Choromanski et al. 2021, Rethinking Attention with Performers", feature_map="favor", normalize=True,
               aliases=("linear-favor",))
linear_variant("linear", "normalized linear attention with the 2nd-order Taylor map of exp (Based)",
               "Arora et al. 2024, Simple linear attention language models balance the recall-throughput tradeoff "
               "(Based)", feature_map="taylor2", normalize=True, aliases=("linear-taylor2",))
linear_variant("retention", "retention: S_t = γ_h S_{t−1} + k_t v_tᵀ with fixed per-head decays",
               "Sun et al. 2023, Retentive Network (RetNet)")
linear_variant("lightning", "Lightning Attention: fixed decays from ALiBi slopes and layer depth",
               "Qin et al. 2024, Lightning Attention-2 / MiniMax-01 (2025)")
linear_variant("scalar_gate", "data-dependent scalar decay per head: S_t = α_t S_{t−1} + k_t v_tᵀ (Mamba-2 / SSD)",
               "Dao & Gu 2024, Transformers are SSMs (Mamba-2)")
linear_variant("gla", "gated linear attention: S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ (per-channel decay)",
               "Yang et al. 2024, Gated Linear Attention Transformers with Hardware-Efficient Training")
linear_variant("hgrn2", "HGRN2: GLA with keys 1 − α_t (state expansion of a gated linear RNN)",
               "Qin et al. 2024, HGRN2: Gated Linear RNNs with State Expansion")
linear_variant("delta", "delta rule: S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ (L2-normalized q, k)",
               "Schlag et al. 2021; Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule")
linear_variant("gated_delta", "gated delta rule: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ",
               "Yang, Kautz, Hatamizadeh 2025, Gated Delta Networks: Improving Mamba2 with Delta Rule")
linear_variant("kda", "Kimi Delta Attention: S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ",
               "Kimi Team 2025, Kimi Linear: An Expressive, Efficient Attention Architecture")
linear_variant("log_linear", "log-linear attention over Fenwick levels (linear attention base)",
               "Guo et al. 2025, Log-Linear Attention", base="linear")
linear_variant("log_linear", "log-linear Mamba-2: Fenwick levels over a scalar-gated state",
               "Guo et al. 2025, Log-Linear Attention", base="scalar_gate", aliases=("log-linear-mamba2",))
linear_variant("log_linear", "log-linear Gated DeltaNet: Fenwick levels over a gated delta state",
               "Guo et al. 2025, Log-Linear Attention", base="gated_delta", aliases=("log-linear-gated-deltanet",))
linear_variant("aaren", "Aaren: softmax attention of a learned query over every prefix, as a prefix-scan RNN",
               "Feng et al. 2024, Attention as an RNN", forms=("parallel", "scan", "chunk", "recurrent"))
linear_variant("aaren", "Aaren with per-token queries = causal softmax attention (prefix view)",
               "Feng et al. 2024, Attention as an RNN", name="aaren_causal", forms=("parallel", "chunk", "recurrent"),
               reference_form="parallel", per_token=True, aliases=("aaren-causal",))
