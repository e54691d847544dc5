"""``LinearAttention``: the layer around every state rule of :func:`attnkit.linear_attention`, shaped like the
published layers (fla's ``fla.layers``, Mamba-2, GLA, Gated DeltaNet, Kimi Linear):

    q, k, v = silu(conv₄(x W_q)), silu(conv₄(x W_k)), silu(conv₄(x W_v))   (short causal depthwise convolution)
    gate / β from x with the rule's parameterization (below)
    o, S = linear_attention(q, k, v; rule, gate, β, initial_state=S)      (chunk form; recurrent when decoding)
    y = (RMSNorm(o) ⊙ act(x W_g)) W_o            (per-head output norm and gate; act = silu, sigmoid for KDA)

Gate parameterizations (log decays ``g = log α ≤ 0``):

* ``scalar_gate``, ``gated_delta`` (Mamba-2, Dao & Gu 2024; Gated DeltaNet, Yang et al. 2025):
  ``g_t = −exp(A_log_h) · softplus(x_t W_a + dt_bias_h)``, ``A = exp(A_log) ~ U(1, 16)``,
  ``dt_bias = softplus⁻¹(dt)``, ``dt ~ logU(0.001, 0.1)`` (one decay per head and token).
* ``gla`` (Yang et al. 2024): a low-rank gate ``g_t = logsigmoid(x_t W₁ W₂ + b) / 16`` per key channel
  (rank 16, the paper's normalizer 16).
* ``hgrn2`` (Qin et al. 2024): per-channel forget gate ``g_t = logsigmoid(x_t W_f)``; keys are ``1 − α_t``.
* ``kda`` (Kimi Linear, 2025): per-channel ``g_t = −exp(A_log_h) · softplus(x_t W₁ W₂ + dt_bias)``
  (low-rank, rank = head dim; dt_bias per channel).
* ``retention``, ``lightning``: the papers' fixed per-head decays (no parameters).
* delta rules (``delta``, ``gated_delta``, ``kda``): ``β_t = sigmoid(x_t W_b)`` and L2-normalized q, k.
* ``log_linear`` (Guo et al. 2025) over ``base``: its base's gate plus level weights
  ``λ_t = softplus(x_t W_λ)`` over ``num_levels`` Fenwick levels (positions < 2^(num_levels−1)).
* ``aaren`` (Feng et al. 2024): a learned query per head (no q projection or convolution).

Decoding: with a :class:`attnkit.cache.StateCache` the layer reads and writes a :class:`LinearState`
(the convolutions' last inputs and the rule's recurrent state); one token at a time equals the chunk form.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops
from .attention import check_input
from .norm import GatedRMSNorm, RMSNorm

__all__ = ["LinearAttention", "ShortConv", "LinearState", "RULES"]

RULES = _ops.LINEAR_RULES
_DELTA = ("delta", "gated_delta", "kda")
_MAMBA_GATE = ("scalar_gate", "gated_delta")


class LinearState(NamedTuple):
    """A linear layer's decoding state: ``conv`` the last ``K − 1`` inputs of each short convolution (a tuple,
    None entries for absent convolutions), ``recurrent`` the rule's state (tensor, LogLinearState or AarenState)."""

    conv: Tuple[Optional[Tensor], ...]
    recurrent: object


class ShortConv(nn.Module):
    """Causal depthwise convolution ``y_t = act(Σ_{j<K} w_{c,j} x_{t−K+1+j, c} + b_c)`` over ``x [B, T, C]``.

    ``forward(x, state=None, cu_seqlens=None) -> (y, new_state)``: ``state [B, K−1, C]`` holds the inputs
    before ``x`` (zeros at the start); with ``cu_seqlens`` every document starts from zeros (no state returned).
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None

    def _run(self, x: Tensor, state: Optional[Tensor]):
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        xp = torch.cat([state.to(x.dtype), x], 1)
        T, w = x.shape[1], self.weight.to(x.dtype)
        y = sum(xp[:, j:j + T] * w[:, j] for j in range(K))  # K shifted products: exact, fast at any dtype
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return (F.silu(y) if self.activation else y), xp[:, xp.shape[1] - (K - 1):]

    def forward(self, x: Tensor, state: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None):
        if cu_seqlens is None:
            return self._run(x, state)
        cu = cu_seqlens.tolist()
        return torch.cat([self._run(x[:, a:b], None)[0] for a, b in zip(cu, cu[1:])], 1), None


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


class LinearAttention(nn.Module):
    """Linear / recurrent attention layer for any rule of :func:`attnkit.linear_attention` (see the module
    docstring for the parameterizations).

    Args:
        d_model: model width. n_heads: heads. rule: one of :data:`RULES`.
        head_dim: key dim per head (default d_model // n_heads). head_dim_v: value dim (default head_dim).
        conv_size: short convolution width (0 = none). output_gate: ``act(x W_g)`` gate on the normed output;
            gate_activation: ``act``, default ``"sigmoid"`` for kda (Kimi Linear), ``"silu"`` otherwise.
        feature_map, normalize: for the additive rules (``linear`` …), passed to the op.
        base, num_levels: log_linear's base rule (default ``gated_delta``) and number of Fenwick levels.
        gate_rank: GLA's low-rank gate width (16). chunk_size, form, backend: passed to the op (form for
            T > 1; a single decoded token runs the recurrent form).
        layer_idx, num_layers: this layer's depth (cache index; lightning's decays).

    ``forward(x [B, T, d_model], *, cache=None, cu_seqlens=None) -> [B, T, d_model]``.
    """

    def __init__(self, d_model: int, n_heads: int, rule: str = "gated_delta", *, head_dim: Optional[int] = None,
                 head_dim_v: Optional[int] = None, conv_size: int = 4, output_gate: bool = True,
                 feature_map=None, normalize: bool = False, base: Optional[str] = None, num_levels: int = 16,
                 gate_rank: int = 16, gate_activation: Optional[str] = None, chunk_size: int = 64, form: str = "chunk", backend: str = "reference",
                 layer_idx: int = 0, num_layers: int = 1, norm_eps: float = 1e-6):
        super().__init__()
        rule, base = _ops.rule_name(rule), _ops.rule_name(base, "base")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) is not divisible by n_heads ({n_heads}); give head_dim")
            head_dim = d_model // n_heads
        dk, dv, H = head_dim, head_dim_v or head_dim, n_heads
        self.d_model, self.n_heads, self.head_dim, self.head_dim_v, self.rule = d_model, H, dk, dv, rule
        self.layer_idx, self.num_layers, self.chunk_size, self.form, self.backend = (
            layer_idx, num_layers, chunk_size, form, backend)
        self.feature_map, self.normalize = feature_map, normalize
        if rule != "log_linear" and base is not None:
            raise ValueError(f"base= belongs to rule 'log_linear', not {rule!r}")
        self.base = (base or "gated_delta") if rule == "log_linear" else None
        eff = self.base or rule  # the rule whose gate / beta the layer builds
        self.num_levels = num_levels if rule == "log_linear" else None
        self.qk_l2norm = eff in _DELTA
        self.q_proj = None if rule == "aaren" else nn.Linear(d_model, H * dk, bias=False)
        self.k_proj = None if rule == "hgrn2" else nn.Linear(d_model, H * dk, bias=False)
        self.v_proj = nn.Linear(d_model, H * dv, bias=False)
        self.query = nn.Parameter(torch.randn(H, dk) / math.sqrt(dk)) if rule == "aaren" else None
        conv = lambda p: ShortConv(p.out_features, conv_size) if (p is not None and conv_size > 0) else None
        self.q_conv, self.k_conv, self.v_conv = conv(self.q_proj), conv(self.k_proj), conv(self.v_proj)
        # gates
        self.a_proj = self.A_log = self.dt_bias = self.gk_proj = self.f_proj = None
        if eff in _MAMBA_GATE or eff == "kda":
            A = torch.empty(H).uniform_(1.0, 16.0)
            self.A_log = nn.Parameter(torch.log(A))
            n_dt = H * dk if eff == "kda" else H
            dt = torch.exp(torch.rand(n_dt) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(_inverse_softplus(dt))
            if eff == "kda":
                self.f_proj = nn.Sequential(nn.Linear(d_model, dk, bias=False), nn.Linear(dk, H * dk, bias=False))
            else:
                self.a_proj = nn.Linear(d_model, H, bias=False)
        elif eff == "gla":
            self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False), nn.Linear(gate_rank, H * dk))
        elif eff == "hgrn2":
            self.f_proj = nn.Linear(d_model, H * dk, bias=False)
        self.b_proj = nn.Linear(d_model, H, bias=False) if eff in _DELTA else None
        self.l_proj = nn.Linear(d_model, H * num_levels, bias=False) if rule == "log_linear" else None
        self.g_proj = nn.Linear(d_model, H * dv, bias=False) if output_gate else None
        act = gate_activation or ("sigmoid" if eff == "kda" else "silu")
        self.o_norm = GatedRMSNorm(dv, norm_eps, activation=act) if output_gate else RMSNorm(dv, norm_eps)
        self.o_proj = nn.Linear(H * dv, d_model, bias=False)

    def gates(self, x: Tensor):
        """``(gate, beta)`` in the op's ``bthd`` layout (None where the rule takes none)."""
        B, T, _ = x.shape
        H, dk = self.n_heads, self.head_dim
        gate = beta = None
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.a_proj is not None:
            dt = F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))
            gate = -torch.exp(self.A_log.to(cd)) * dt  # [B, T, H]
        elif self.f_proj is not None and self.A_log is not None:  # kda
            dt = F.softplus(self.f_proj(x).to(cd) + self.dt_bias.to(cd)).view(B, T, H, dk)
            gate = -torch.exp(self.A_log.to(cd)).view(H, 1) * dt
        elif self.gk_proj is not None:
            gate = (F.logsigmoid(self.gk_proj(x).to(cd)) / 16.0).view(B, T, H, dk)
        elif self.f_proj is not None:  # hgrn2
            gate = F.logsigmoid(self.f_proj(x).to(cd)).view(B, T, H, dk)
        if self.b_proj is not None:
            beta = torch.sigmoid(self.b_proj(x).to(cd))
        return gate, beta

    def forward(self, x: Tensor, *, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        check_input(x, self.d_model, cu_seqlens, cache)
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.head_dim, self.head_dim_v
        prev = cache.get(self.layer_idx) if cache is not None else None
        if prev is not None and not isinstance(prev, LinearState):
            raise TypeError(f"layer {self.layer_idx}: the cache holds a {type(prev).__name__}, not a LinearState "
                            "(two layers share one layer_idx?)")
        conv_in = prev.conv if prev is not None else (None, None, None)
        new_conv = []

        def project(proj, conv, st, width):
            if proj is None:
                new_conv.append(None)
                return None
            t = proj(x)
            if conv is not None:
                t, st = conv(t, st, cu_seqlens)
            else:
                st = None
            new_conv.append(st)
            return t.view(B, T, H, width)

        q = project(self.q_proj, self.q_conv, conv_in[0], dk)
        k = project(self.k_proj, self.k_conv, conv_in[1], dk)
        v = project(self.v_proj, self.v_conv, conv_in[2], dv)
        gate, beta = self.gates(x)
        kw = dict(rule=self.rule, gate=gate, beta=beta, layout="bthd", cu_seqlens=cu_seqlens,
                  initial_state=None if prev is None else prev.recurrent, output_final_state=cache is not None,
                  form="recurrent" if (cache is not None and T == 1) else self.form, chunk_size=self.chunk_size,
                  backend=self.backend)
        if self.rule in ("linear",):
            kw.update(feature_map=self.feature_map, normalize=self.normalize)
        if self.qk_l2norm:
            kw["qk_l2norm"] = True
        if self.rule == "lightning":
            kw.update(layer_idx=self.layer_idx, num_layers=self.num_layers)
        if self.rule == "log_linear":
            kw.update(base=self.base, level_weights=F.softplus(self.l_proj(x)).view(B, T, H, self.num_levels))
        if self.rule == "aaren":
            kw["query"] = self.query
        with _ops.value_checks(False):  # gates ≤ 0 and β ∈ (0, 1) by construction: no host sync per call
            o, S = _ops.linear_attention(q, k, v, **kw)
        if cache is not None:
            cache.set(self.layer_idx, LinearState(tuple(new_conv), S))
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).view(B, T, H, dv))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, H * dv))
