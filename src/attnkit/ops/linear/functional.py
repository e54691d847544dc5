"""``linear_attention`` and ``step``: every state rule of the linear / recurrent family behind one call.

Rules (per head; state ``S ∈ R^{Dk×Dv}``, read-out ``o_t = q_tᵀ S_t``, α = exp(gate), gates in log space):

=============  ==================================================================  ======================
rule           recurrence                                                          gate / beta
=============  ==================================================================  ======================
linear         S_t = S_{t−1} + φ(k_t) v_tᵀ,  o_t = φ(q_t)ᵀ S_t                       none
retention      S_t = γ_h S_{t−1} + k_t v_tᵀ,  γ_h = 1 − 2^{−5−h}  (RetNet)            optional ``[H]``
lightning      S_t = λ_h S_{t−1} + k_t v_tᵀ,  λ_h = exp(−m_h (1 − l/(L−1) + 1e-5)),    optional ``[H]``
               m_h the ALiBi slopes of H heads, l / L = layer_idx / num_layers
scalar_gate    S_t = α_t S_{t−1} + k_t v_tᵀ  (Mamba-2 / SSD)                          ``[B,H,T]``
gla            S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ                                     ``[B,H,T,Dk]``
hgrn2          gla with k_t = 1 − α_t (``k`` must be None)                            ``[B,H,T,Dk]``
delta          S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ  (DeltaNet)            beta ``[B,H,T]``
gated_delta    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ  (Gated DeltaNet)  ``[B,H,T]`` + beta
kda            S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ  (Kimi)     ``[B,H,T,Dk]`` + beta
log_linear     Fenwick levels over base ∈ {linear, scalar_gate, gated_delta}          base's + level_weights
aaren          prefix softmax of a learned ``query`` (or per-token q) as an RNN        none
=============  ==================================================================  ======================

Orientation of the delta rules. DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet
(Yang, Kautz, Hatamizadeh 2025) write the state as ``S ∈ R^{Dv×Dk}``, ``S_t = S_{t−1}(I − β k kᵀ) +
β v kᵀ``, ``o_t = S_t q_t``; we store its transpose (``Dk×Dv``, the orientation of Kimi Linear and
fla), so ``S_t = (I − β k kᵀ) S_{t−1} + β k vᵀ``, ``o_t = S_tᵀ q_t``: the same function. Kimi Delta
Attention (Kimi Linear, 2025) applies the per-channel decay *before* the delta correction:
``S_t = (I − β k kᵀ) Diag(α_t) S_{t−1} + β k vᵀ``, i.e. the key reads the decayed state.

Shapes (``layout="bhtd"``; ``"bthd"`` swaps the T and H dims of every per-token tensor):
q, k ``[B, Hk, T, Dk]``, v ``[B, Hv, T, Dv]``. The state has ``H = max(Hk, Hv)`` heads; Hk and Hv
must divide H (grouped value heads, e.g. Hv = 2·Hk, or shared values). Gates, β and level weights
are given per state head. Output ``[B, H, T, Dv]`` in q's dtype and layout; states are float32
(float64 for float64 inputs).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.scores import alibi_slopes
from ...core.validation import deprecated_name
from . import aaren as _aaren
from . import engine as _engine
from . import loglinear as _ll
from .aaren import AarenState
from .common import (LAYOUTS, check_beta, check_log_gate, check_shape, check_tensor, compute_dtype,
                     expand_heads, to_bhtd)
from .engine import Problem
from .feature_maps import FeatureMap, as_feature_map
from .loglinear import LogLinearState

__all__ = ["linear_attention", "step", "RULES", "ALL_RULES", "RULE_ALIASES", "rule_name", "FORMS", "LOG_LINEAR_BASES",
           "NORMALIZE_EPS", "retention_log_decay", "lightning_log_decay", "LogLinearState", "AarenState"]

FORMS = ("parallel", "chunk", "recurrent")
AAREN_FORMS = ("parallel", "scan", "chunk", "recurrent")
#: ``normalize=True`` divides by ``φ(q)ᵀ z + NORMALIZE_EPS``
NORMALIZE_EPS = 1e-6


@dataclass(frozen=True)
class Rule:
    """gate: 'none' | 'head' (fixed per-head decay ``[H]``) | 'scalar' (``[B,H,T]``) | 'channel' (``[B,H,T,Dk]``)."""

    name: str
    gate: str
    delta: bool = False


RULES = {r.name: r for r in (
    Rule("linear", "none"), Rule("retention", "head"), Rule("lightning", "head"),
    Rule("scalar_gate", "scalar"), Rule("gla", "channel"), Rule("hgrn2", "channel"),
    Rule("delta", "none", True), Rule("gated_delta", "scalar", True), Rule("kda", "channel", True))}
LOG_LINEAR_BASES = ("linear", "scalar_gate", "gated_delta")
ALL_RULES = tuple(RULES) + ("log_linear", "aaren")
#: deprecated rule names (the variant registry's names before it took the rules' own) -> rule; accepted with a
#: DeprecationWarning wherever a rule is named (``rule=``, log_linear's ``base=``, the layers)
RULE_ALIASES = {"scalar-gate": "scalar_gate", "deltanet": "delta", "gated-deltanet": "gated_delta",
                "log-linear": "log_linear"}


def rule_name(rule, what: str = "rule"):
    """``rule`` itself, or the rule a deprecated alias names (with a DeprecationWarning); unknown names pass
    through for the caller's own check."""
    return deprecated_name(what, rule, RULE_ALIASES, stacklevel=4)


def weights_flag(return_weights: Optional[bool], return_attention: Optional[bool]) -> bool:
    """``return_weights``, or its deprecated name ``return_attention`` (DeprecationWarning); TypeError for both."""
    if return_attention is None:
        return bool(return_weights)
    if return_weights is not None:
        raise TypeError("give return_weights= only: return_attention= is its deprecated name, not both")
    warnings.warn("return_attention= is deprecated: it is now called return_weights= (as in attnkit.attention)",
                  DeprecationWarning, stacklevel=3)
    return bool(return_attention)

State = Union[Tensor, LogLinearState, AarenState, None]


def retention_log_decay(H: int) -> Tensor:
    """RetNet's per-head decays ``log(1 − 2^{−5−h})``, float64 ``[H]``."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float64)))


def lightning_log_decay(H: int, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
    """Lightning Attention / MiniMax-01 decays ``−m_h (1 − l/(L−1) + 1e-5)`` (``1 + 1e-5`` when L = 1)."""
    if not (isinstance(layer_idx, int) and isinstance(num_layers, int) and 0 <= layer_idx < num_layers):
        raise ValueError(f"lightning needs integers 0 <= layer_idx < num_layers, got layer_idx={layer_idx!r}, "
                         f"num_layers={num_layers!r}")
    depth = 1.0 if num_layers <= 1 else 1.0 - layer_idx / (num_layers - 1)
    return -alibi_slopes(H) * (depth + 1e-5)


# ------------------------------------------------------------------------------------------------
# Validation and preprocessing
# ------------------------------------------------------------------------------------------------

def _check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_chunk_size(chunk_size) -> int:
    ok = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1
    if not ok or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two (16, 32, 64, 128, ...), got {chunk_size!r}")
    return chunk_size


def _per_token(name: str, t, layout: str, B: int, H: int, T: int, tail: Tuple[int, ...], desc: str, cd,
               device) -> Tensor:
    """Validate a per-token tensor given as ``[B,H,T,*tail]`` (bhtd) / ``[B,T,H,*tail]`` (bthd)."""
    want = f"[B, H, T{''.join(', ' + d for d in desc.split())}]" if desc else "[B, H, T]"
    if layout == "bthd":
        want = want.replace("H, T", "T, H")
    check_tensor(name, t, 3 + len(tail), want)
    shape = (B, H, T) + tail if layout == "bhtd" else (B, T, H) + tail
    check_shape(name, t, shape, want)
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    t = to_bhtd(t, layout)
    return t if cd is None else t.to(cd)


@dataclass
class Inputs:
    """One call's inputs after validation: ``[B, H, T, ·]`` views in the caller's dtype, nothing copied or
    expanded yet. ``gate``: None, the per-head decays ``[H]`` (defaults filled in), ``[B, H, T]`` or
    ``[B, H, T, Dg]``; ``scale``: resolved; ``H``: the state's heads (q/k and v heads divide it)."""

    rule: Rule
    q: Tensor
    k: Optional[Tensor]
    v: Tensor
    gate: Optional[Tensor]
    beta: Optional[Tensor]
    fm: FeatureMap
    scale: float
    qk_l2norm: bool
    normalize: bool
    level_weights: Optional[Tensor]
    B: int
    H: int
    T: int
    Dq: int
    Dv: int

    @property
    def cd(self) -> torch.dtype:
        return compute_dtype(self.q.dtype)

    @property
    def Dk(self) -> int:
        """The key dim after the feature map (hgrn2: the gate's)."""
        return self.Dq if self.rule.name == "hgrn2" else self.fm.dim(self.Dq)


def validate(rule: Rule, q, k, v, *, gate, beta, feature_map, normalize, scale, layout, qk_l2norm,
             layer_idx, num_layers, level_weights=None) -> Inputs:
    """Check every argument of one call (shapes, dtypes, devices, gates ≤ 0, β ∈ [0, 2]) without copying."""
    check_tensor("q", q, 4, "[B, H, T, Dk]")
    check_tensor("v", v, 4, "[B, H, T, Dv]")
    if rule.name == "hgrn2":
        if k is not None:
            raise ValueError("hgrn2 derives its keys from the gate (k_t = 1 − α_t): pass k=None")
        if feature_map is not None or qk_l2norm:
            raise ValueError("hgrn2 takes no feature_map or qk_l2norm (its keys come from the gate)")
    else:
        check_tensor("k", k, 4, "[B, H, T, Dk]")
        if k.dtype != q.dtype:
            raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if v.dtype != q.dtype:
        raise TypeError(f"q and v must share a dtype, got {q.dtype} and {v.dtype}")
    q, v = to_bhtd(q, layout), to_bhtd(v, layout)
    B, Hk, T, Dq = q.shape
    Hv, Dv = v.shape[1], v.shape[3]
    if k is not None:
        k = to_bhtd(k, layout)
        if k.shape != q.shape:
            raise ValueError(f"k must have the shape of q {tuple(q.shape)} (layout {layout!r}), got {tuple(k.shape)}")
        if k.device != q.device:
            raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if v.shape[0] != B or v.shape[2] != T:
        raise ValueError(f"v must have batch {B} and length {T} like q (layout {layout!r}), got shape {tuple(v.shape)}")
    if v.device != q.device:
        raise ValueError(f"q and v must be on one device, got {q.device} and {v.device}")
    if min(B, T, Dq, Dv, Hk, Hv) == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} or v {tuple(v.shape)}")
    H = max(Hk, Hv)
    if H % Hk or H % Hv:
        raise ValueError(f"query/key heads ({Hk}) and value heads ({Hv}) must divide one another (grouped heads)")
    fm = as_feature_map(feature_map)
    if normalize and (rule.delta or not fm.positive):
        raise ValueError("normalize=True needs an additive rule and a positive feature map (elu, relu, favor, "
                         "taylor2); "
                         f"got rule {rule.name!r} with feature map {fm.name!r}")
    # gates
    g = None
    if rule.gate == "none":
        if gate is not None:
            raise ValueError(f"rule {rule.name!r} takes no gate, got {type(gate).__name__} "
                             f"{tuple(gate.shape) if isinstance(gate, Tensor) else ''}")
    elif rule.gate == "head":
        if gate is None:
            g = retention_log_decay(H) if rule.name == "retention" else lightning_log_decay(H, layer_idx, num_layers)
            g = g.to(q.device)
        else:
            check_tensor("gate", gate, 1, "[H] (one log decay per head)")
            check_shape("gate", gate, (H,), "[H] (one log decay per head)")
            if gate.device != q.device:
                raise ValueError(f"gate must be on q's device {q.device}, got {gate.device}")
            check_log_gate("gate", gate)
            g = gate
    else:
        if gate is None:
            raise ValueError(f"rule {rule.name!r} needs gate= (log decays, "
                             f"{'[B, H, T]' if rule.gate == 'scalar' else '[B, H, T, Dk]'})")
        Dg = fm.dim(Dq) if rule.name != "hgrn2" else Dq
        g = _per_token("gate", gate, layout, B, H, T, (Dg,) if rule.gate == "channel" else (),
                       "Dk" if rule.gate == "channel" else "", None, q.device)
        check_log_gate("gate", g)
    sc = _check_scale(scale)
    if sc is None:
        sc = 1.0 if fm.own_scale or rule.name == "hgrn2" else 1.0 / math.sqrt(Dq)
    # beta
    if rule.delta:
        if beta is None:
            raise ValueError(f"rule {rule.name!r} needs beta= (write strengths in [0, 2], [B, H, T])")
        beta = _per_token("beta", beta, layout, B, H, T, (), "", None, q.device)
        check_beta(beta)
    elif beta is not None:
        raise ValueError(f"rule {rule.name!r} takes no beta (only delta, gated_delta, kda and their log-linear form)")
    lam = None
    if level_weights is not None:
        check_tensor("level_weights", level_weights, 4, "[B, H, T, L]")
        lam = _per_token("level_weights", level_weights, layout, B, H, T, (level_weights.shape[-1],), "L", None,
                         q.device)
        if not bool(torch.isfinite(lam).all()):
            raise ValueError("level_weights must be finite")
    return Inputs(rule, q, k, v, g, beta, fm, sc, bool(qk_l2norm), bool(normalize), lam, B, H, T, Dq, Dv)


def _prepare(rule: Rule, q, k, v, **kw) -> Tuple[Problem, dict]:
    """The reference forms' :class:`Problem`: feature map, L2 norm and scale applied, heads expanded, computed in
    float32 (half inputs) or float64, the ones column of ``normalize`` appended."""
    x = validate(rule, q, k, v, **kw)
    cd, H, B, T = x.cd, x.H, x.B, x.T
    q = expand_heads(x.q.to(cd), H)
    v = expand_heads(x.v.to(cd), H)
    g = x.gate
    if g is not None:
        g = g.to(device=q.device, dtype=cd)
        if rule.gate == "head":
            g = g[None, :, None].expand(B, H, T)
    if rule.name == "hgrn2":
        k = -torch.expm1(g)
    else:
        k = expand_heads(x.k.to(cd), H)
        q, k = x.fm(q), x.fm(k)
    if x.qk_l2norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    q = q * x.scale
    beta = None if x.beta is None else x.beta.to(cd)
    if x.normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    lam = None if x.level_weights is None else x.level_weights.to(cd)
    meta = dict(B=B, H=H, T=T, Dk=k.shape[-1], Dv=x.Dv, cd=cd)
    return Problem(q, k, v, g, beta, rule.delta, lam), meta


def _check_cu_seqlens(cu_seqlens, B: int, T: int) -> list:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool:
        got = (f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor)
               else type(cu_seqlens).__name__)
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor [N + 1], got {got}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if B != 1:
        raise ValueError(f"cu_seqlens needs the documents packed into batch 1, got batch {B}")
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, end at T={T} and strictly increase, got {cu}")
    return cu


def _slice(p: Problem, a: int, b: int) -> Problem:
    f = lambda t: None if t is None else t[:, :, a:b]
    return Problem(f(p.q), f(p.k), f(p.v), f(p.g), f(p.beta), p.delta, f(p.lam))


def _state_index(st, i: int):
    if st is None:
        return None
    if isinstance(st, tuple):
        return type(st)(*(x[i:i + 1] for x in st))
    return st[i:i + 1]


def _state_cat(states):
    if states[0] is None:
        return None
    if isinstance(states[0], tuple):
        return type(states[0])(*(torch.cat(xs, 0) for xs in zip(*states)))
    return torch.cat(states, 0)


def _per_document(run, piece, init, cu):
    """Run each document of a packed batch separately (the state restarts at every boundary)."""
    outs, finals, attns = [], [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        o, st, at = run(piece(a, b), _state_index(init, i))
        outs.append(o)
        finals.append(st)
        attns.append(at)
    return torch.cat(outs, 2), _state_cat(finals), attns


# ------------------------------------------------------------------------------------------------
# The public entry points
# ------------------------------------------------------------------------------------------------

def linear_attention(
    q: Optional[Tensor],
    k: Optional[Tensor],
    v: Tensor,
    *,
    rule: str,
    form: str = "chunk",
    gate: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    feature_map: Union[None, str, FeatureMap] = None,
    normalize: bool = False,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    layout: str = "bhtd",
    qk_l2norm: bool = False,
    causal: bool = True,
    level_weights: Optional[Tensor] = None,
    base: Optional[str] = None,
    query: Optional[Tensor] = None,
    layer_idx: int = 0,
    num_layers: int = 1,
    return_weights: Optional[bool] = None,
    backend: str = "reference",
    return_attention: Optional[bool] = None,
):
    """Linear / recurrent attention with a named state rule (see the module docstring for every rule).

    Args:
        q, k, v: ``[B, Hk, T, Dk]``, ``[B, Hk, T, Dk]``, ``[B, Hv, T, Dv]`` (``layout="bthd"``:
            ``[B, T, H, D]``). ``k=None`` for hgrn2; ``q=None`` for aaren with a learned ``query``.
        rule: one of ``ALL_RULES`` (a deprecated name of ``RULE_ALIASES`` is accepted with a warning).
        form: ``'chunk'`` (chunkwise parallel, O(T) memory), ``'parallel'`` (the T×T matrix),
            ``'recurrent'`` (token by token); aaren also ``'scan'`` (parallel prefix scan).
        gate: log decays (≤ 0): ``[B, H, T]`` (scalar_gate, gated_delta), ``[B, H, T, Dk]`` (gla,
            hgrn2, kda) or ``[H]`` (retention, lightning; optional, defaults from the papers).
        beta: delta-rule write strengths in [0, 2], ``[B, H, T]``.
        feature_map: φ on q and k (``'identity'``, ``'elu'``, ``'relu'``, ``'favor'``, ``'taylor2'``
            or a :class:`FeatureMap`); applied before ``qk_l2norm`` and ``scale``.
        normalize: divide by ``φ(q_t)ᵀ z_t + NORMALIZE_EPS`` with ``z_t`` the rule's recurrence on
            ``v ≡ 1`` (additive rules, positive feature maps). The state then has ``Dv + 1``
            columns, the last one ``z``.
        scale: multiplies q after the feature map; default ``1/√Dk`` (1 for favor / taylor2 and
            hgrn2).
        chunk_size: a power of two (the parallel form ignores it).
        initial_state: ``[B, H, Dk, Dv]`` (``[N, ...]`` with cu_seqlens); a
            :class:`LogLinearState` for log_linear, an :class:`AarenState` for aaren.
        output_final_state: also return the state after the last token (else None).
        cu_seqlens: ``[N + 1]`` offsets of N documents packed in batch 1; the state restarts at
            every document (from ``initial_state[i]`` if given) and final states are per document.
        qk_l2norm: L2-normalize q and k inside the op (DeltaNet / Gated DeltaNet / KDA use it).
        causal: False gives bidirectional linear attention (rule 'linear' only; no recurrent form).
        level_weights: log_linear's λ, ``[B, H, T, L]``; L levels serve positions < 2^{L−1}.
        base: log_linear's base rule, one of ``LOG_LINEAR_BASES`` (default 'linear').
        query: aaren's learned query ``[H, Dk]`` or ``[B, H, Dk]`` (else per-token ``q``).
        layer_idx, num_layers: lightning's layer depth (default decays).
        return_weights: also return the implicit ``[B, H, T, T]`` attention matrix (parallel
            form; excludes the initial-state term; O(T³) for delta rules). Default False.
        backend: 'reference' (plain PyTorch autograd; 'auto' is the same here: the fused kernels are chosen by
            :func:`attnkit.linear_attention`, which calls this for what they do not cover).
        return_attention: deprecated name of ``return_weights`` (giving both is a TypeError).

    Returns:
        ``(o, final_state)``, plus the attention matrix when ``return_weights``.
    """
    return_weights = weights_flag(return_weights, return_attention)
    rule = rule_name(rule)
    base = rule_name(base, "base")
    if backend not in ("reference", "auto"):
        raise ValueError(f"linear_attention has backend 'reference' (or 'auto'), got {backend!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rule not in ALL_RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {ALL_RULES}")
    forms = AAREN_FORMS if rule == "aaren" else FORMS
    if form not in forms:
        raise ValueError(f"form must be one of {forms} for rule {rule!r}, got {form!r}")
    if return_weights and form != "parallel":
        raise ValueError(f"return_weights needs form='parallel' (the form that builds the matrix), got {form!r}")
    _check_chunk_size(chunk_size)
    if rule == "aaren":
        if gate is not None or beta is not None or level_weights is not None or feature_map is not None or normalize:
            raise ValueError("aaren takes no gate, beta, level_weights, feature_map or normalize")
        return _run_aaren(q, k, v, query=query, form=form, scale=scale, chunk_size=chunk_size,
                          initial_state=initial_state, output_final_state=output_final_state,
                          cu_seqlens=cu_seqlens, layout=layout, causal=causal, return_weights=return_weights)
    if query is not None:
        raise ValueError(f"query= is aaren's learned query; rule {rule!r} takes per-token q")
    log_linear = rule == "log_linear"
    if log_linear:
        base = "linear" if base is None else base
        if base not in LOG_LINEAR_BASES:
            raise ValueError(f"log_linear base must be one of {LOG_LINEAR_BASES}, got {base!r}")
        if level_weights is None:
            raise ValueError("log_linear needs level_weights= [B, H, T, L] (λ per query and Fenwick level)")
        spec = RULES[base]
    else:
        if base is not None or level_weights is not None:
            raise ValueError(f"base= and level_weights= belong to rule 'log_linear', not {rule!r}")
        spec = RULES[rule]
    if not causal and (rule != "linear" or form == "recurrent"):
        raise ValueError("causal=False (bidirectional) exists for rule 'linear' in the parallel and chunk forms only; "
                         f"got rule {rule!r}, form {form!r}")
    if q is None:
        raise TypeError(f"rule {rule!r} needs per-token queries q")
    p, meta = _prepare(spec, q, k, v, gate=gate, beta=beta, feature_map=feature_map, normalize=normalize,
                       scale=scale, layout=layout, qk_l2norm=qk_l2norm, layer_idx=layer_idx,
                       num_layers=num_layers, level_weights=level_weights)
    B, H, T, Dk, cd = meta["B"], meta["H"], meta["T"], meta["Dk"], meta["cd"]
    Dv_state = p.v.shape[-1]
    cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T)
    n_states = B if cu is None else len(cu) - 1

    if log_linear:
        L = p.lam.shape[-1]
        init = _check_loglinear_state(initial_state, n_states, H, L, Dk, Dv_state, cd, p.q.device)

        def run(pp: Problem, st: LogLinearState):
            levels, position = st
            pos0 = int(position[0])
            if bool((position != pos0).any()):
                raise ValueError("a batched log_linear call needs one position for all rows; got "
                                 f"{position.tolist()} (run rows separately or use cu_seqlens)")
            Tn = pp.q.shape[2]
            if pos0 + Tn - 1 >= 1 << (L - 1):
                raise ValueError(f"level_weights has L={L} levels, enough for positions < 2^{L - 1} = {1 << (L - 1)}; "
                                 f"this call reaches position {pos0 + Tn - 1}")
            if form == "recurrent":
                o, lv = _ll.recurrent(pp, levels, pos0)
            else:
                o, lv = _ll.chunked(pp, levels, pos0, chunk_size if form == "chunk" else None)
            at = _ll.attention_matrix(pp, pos0) if return_weights else None
            return o, LogLinearState(lv, position + Tn), at
    else:
        init = _check_state(initial_state, n_states, H, Dk, Dv_state, cd, p.q.device, normalize)

        def run(pp: Problem, S: Tensor):
            if not causal:
                o, S = _engine.bidirectional(pp, S, form)
                at = pp.q @ pp.k.transpose(-1, -2) if return_weights else None
                return o, S, at
            if form == "recurrent":
                o, S = _engine.recurrent(pp, S)
            else:
                o, S = _engine.chunked(pp, S, chunk_size if form == "chunk" else None)
            return o, S, (_engine.attention_matrix(pp) if return_weights else None)

    if cu is None:
        o, final, attn = run(p, init)
    else:
        o, final, attns = _per_document(run, lambda a, b: _slice(p, a, b), init, cu)
        attn = None if not return_weights else _block_diag(attns, cu, T)
    if normalize:
        den = o[..., -1:] + NORMALIZE_EPS
        o = o[..., :-1] / den
        if attn is not None:
            attn = attn / den
    o = o.to(q.dtype)
    if layout == "bthd":
        o = o.transpose(1, 2)
    final = final if output_final_state else None
    return (o, final, attn) if return_weights else (o, final)


def _block_diag(attns, cu, T):
    B, H = attns[0].shape[:2]
    out = attns[0].new_zeros(B, H, T, T)
    for a, s, e in zip(attns, cu, cu[1:]):
        out[:, :, s:e, s:e] = a
    return out


def _check_state(st, n: int, H: int, Dk: int, Dv: int, cd, device, normalize: bool) -> Tensor:
    want = (n, H, Dk, Dv)
    if st is None:
        return torch.zeros(want, dtype=cd, device=device)
    desc = "[B (or N documents), H, Dk, Dv" + (" + 1 (normalizer column)]" if normalize else "]")
    check_tensor("initial_state", st, 4, desc)
    check_shape("initial_state", st, want, desc)
    return st.to(device=device, dtype=cd)


def _check_loglinear_state(st, n: int, H: int, L: int, Dk: int, Dv: int, cd, device) -> LogLinearState:
    want = (n, H, L, Dk, Dv)
    if st is None:
        return LogLinearState(torch.zeros(want, dtype=cd, device=device), torch.zeros(n, dtype=torch.long))
    if not isinstance(st, LogLinearState):
        raise TypeError(f"log_linear initial_state must be a LogLinearState(levels, position), got {type(st).__name__}")
    check_tensor("initial_state.levels", st.levels, 5, "[B, H, L, Dk, Dv]")
    check_shape("initial_state.levels", st.levels, want, "[B, H, L, Dk, Dv]")
    pos = st.position
    if not isinstance(pos, Tensor) or pos.dtype != torch.long or tuple(pos.shape) != (n,) or bool((pos < 0).any()):
        raise ValueError(f"initial_state.position must be a non-negative int64 tensor of shape ({n},), got {pos!r}")
    return LogLinearState(st.levels.to(device=device, dtype=cd), pos.cpu())


def _run_aaren(q, k, v, *, query, form, scale, chunk_size, initial_state, output_final_state, cu_seqlens, layout,
               causal, return_weights):
    if not causal:
        raise ValueError("aaren is causal only (a prefix scan); use attnkit.attention for bidirectional softmax")
    check_tensor("k", k, 4, "[B, Hkv, T, Dk]")
    check_tensor("v", v, 4, "[B, Hkv, T, Dv]")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    k, v = to_bhtd(k, layout), to_bhtd(v, layout)
    B, Hkv, T, D = k.shape
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and length")
    cd = compute_dtype(k.dtype)
    cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T)
    sc = _check_scale(scale)
    sc = 1.0 / math.sqrt(D) if sc is None else sc
    if (q is None) == (query is None):
        raise ValueError("aaren takes either per-token queries q [B, H, T, Dk] or a learned query= [H, Dk] / "
                         "[B, H, Dk], not both and not neither")
    if query is None:  # per-token queries: causal softmax attention
        if initial_state is not None or output_final_state:
            raise ValueError("aaren with per-token queries has no fixed-size state (it is causal softmax attention; "
                             "decode it with a KV cache: attnkit.attention form='recurrent')")
        check_tensor("q", q, 4, "[B, Hq, T, Dk]")
        if q.dtype != k.dtype:
            raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
        q = to_bhtd(q, layout)
        if q.shape[0] != B or q.shape[2] != T or q.shape[3] != D or q.shape[1] % Hkv:
            raise ValueError(f"q {tuple(q.shape)} must match k {tuple(k.shape)} in batch, length and Dk, with a "
                             f"multiple of its heads")
        args = lambda a, b: (q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        one = lambda a, b: _aaren.per_token(*args(a, b), sc, form, return_weights)
        if form == "scan":
            raise ValueError("form='scan' is for a learned query (per-token queries: parallel, chunk, recurrent)")
        if cu is None:
            res = one(0, T)
            o, attn = res if return_weights else (res, None)
        else:
            parts = [one(a, b) for a, b in zip(cu, cu[1:])]
            if return_weights:
                o = torch.cat([x[0] for x in parts], 2)
                attn = _block_diag([x[1] for x in parts], cu, T)
            else:
                o, attn = torch.cat(parts, 2), None
        o = o.to(k.dtype)
        o = o.transpose(1, 2) if layout == "bthd" else o
        return (o, None, attn) if return_weights else (o, None)

    if not isinstance(query, Tensor) or query.dim() not in (2, 3) or query.shape[-1] != D:
        raise ValueError(f"aaren query must be [H, Dk] or [B, H, Dk] with Dk={D}, got "
                         f"{tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__}")
    Hq = query.shape[-2]
    if Hq % Hkv or (query.dim() == 3 and query.shape[0] != B):
        raise ValueError(f"aaren query heads ({Hq}) must be a multiple of k/v heads ({Hkv}) and its batch {B}; "
                         f"got {tuple(query.shape)}")
    qv = query.to(cd).expand(B, Hq, D) if query.dim() == 3 else query.to(cd)[None].expand(B, Hq, D)
    kc, vc = expand_heads(k.to(cd), Hq), expand_heads(v.to(cd), Hq)
    s = torch.einsum("bhtd,bhd->bht", kc, qv) * sc
    n = B if cu is None else len(cu) - 1
    init = _check_aaren_state(initial_state, n, Hq, v.shape[-1], cd, k.device)

    def run(a_b, st):
        ss, vv = s[:, :, a_b[0]:a_b[1]], vc[:, :, a_b[0]:a_b[1]]
        if form == "recurrent":
            return (*_aaren.recurrent(ss, vv, st), None)
        if form == "scan":
            return (*_aaren.scan(ss, vv, st), None)
        if form == "chunk":
            return (*_aaren.chunked(ss, vv, st, chunk_size), None)
        return _aaren.parallel(ss, vv, st)

    if cu is None:
        o, final, attn = run((0, T), init)
    else:
        o, final, attns = _per_document(run, lambda a, b: (a, b), init, cu)
        attn = _block_diag(attns, cu, T) if return_weights else None
    o = o.to(k.dtype)
    o = o.transpose(1, 2) if layout == "bthd" else o
    final = final if output_final_state else None
    return (o, final, attn) if return_weights else (o, final)


def _check_aaren_state(st, n: int, H: int, Dv: int, cd, device) -> AarenState:
    if st is None:
        return _aaren.empty_state(n, H, Dv, cd, device)
    if not isinstance(st, AarenState):
        raise TypeError(f"aaren initial_state must be an AarenState(max, num, den), got {type(st).__name__}")
    for name, t, want in (("max", st.max, (n, H)), ("num", st.num, (n, H, Dv)), ("den", st.den, (n, H))):
        check_tensor(f"initial_state.{name}", t, len(want), str(list(want)))
        check_shape(f"initial_state.{name}", t, want, str(list(want)))
    return AarenState(*(t.to(device=device, dtype=cd) for t in st))


def step(
    state: State,
    q: Optional[Tensor],
    k: Optional[Tensor],
    v: Tensor,
    *,
    rule: str,
    gate: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    level_weights: Optional[Tensor] = None,
    base: Optional[str] = None,
    attention=None,
    **kwargs,
) -> Tuple[Tensor, State]:
    """Decode one token: ``(o_t, new_state)`` from ``state`` (None: empty).

    Shapes drop the time dim of :func:`linear_attention`: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``,
    gate ``[B, H]`` / ``[B, H, Dk]`` (``[H]`` for retention / lightning), beta ``[B, H]``,
    level_weights ``[B, H, L]``; aaren takes ``q=None`` and ``query=``. Other keyword arguments
    (feature_map, normalize, scale, qk_l2norm, query, layer_idx, num_layers) as in linear_attention.
    ``attention``: the linear_attention to run (the dispatcher passes its own; default the reference).
    """
    if "layout" in kwargs or "form" in kwargs or "cu_seqlens" in kwargs:
        raise TypeError("step() takes one token in [B, H, D]; layout, form and cu_seqlens do not apply")
    rule, base = rule_name(rule), rule_name(base, "base")
    gate_kind = RULES[base or "linear"].gate if rule == "log_linear" else RULES[rule].gate if rule in RULES else "none"

    def tok(name, t, ndim, desc):
        if t is None:
            return None
        check_tensor(name, t, ndim, desc + " (one token)")
        return t.unsqueeze(2)

    q1 = tok("q", q, 3, "[B, H, Dk]")
    k1 = tok("k", k, 3, "[B, H, Dk]")
    v1 = tok("v", v, 3, "[B, H, Dv]")
    if gate is not None and gate_kind in ("scalar", "channel"):
        gate = tok("gate", gate, 2 if gate_kind == "scalar" else 3, "[B, H]" if gate_kind == "scalar" else "[B, H, Dk]")
    beta = tok("beta", beta, 2, "[B, H]")
    level_weights = tok("level_weights", level_weights, 3, "[B, H, L]")
    o, new = (attention or linear_attention)(q1, k1, v1, rule=rule, form="recurrent", gate=gate, beta=beta,
                              level_weights=level_weights, base=base, initial_state=state,
                              output_final_state=True, **kwargs)
    return o[:, :, 0], new
