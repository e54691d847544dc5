"""Float64 references of the linear family written from the definitions, and tests of those references.

Nothing here calls attnkit.ops.linear to compute an expected value: every rule is an explicit
Dk×Dk transition matrix A_t per token (``S_t = A_t S_{t−1} + W_t``, ``o_t = q_tᵀ S_t``), the
log-linear levels come from the paper's recursive definition, feature maps and normalizations from
their formulas. Other test_linear*.py modules import these helpers.
"""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from conftest import alibi_slopes_ref

F64 = torch.float64
RULE_CASES = ["linear", "linear_elu_norm", "retention", "lightning", "scalar_gate", "gla", "hgrn2", "delta",
              "gated_delta", "kda"]
DELTA = {"delta", "gated_delta", "kda"}
SCALAR_GATE = {"scalar_gate", "gated_delta"}
CHANNEL_GATE = {"gla", "hgrn2", "kda"}
LIGHTNING_LAYER = (1, 3)


def api_rule(name: str) -> str:
    return "linear" if name == "linear_elu_norm" else name


def api_kwargs(name: str) -> Dict:
    kw: Dict = {"rule": api_rule(name)}
    if name == "linear_elu_norm":
        kw.update(feature_map="elu", normalize=True)
    if name in DELTA:
        kw["qk_l2norm"] = True
    if name == "lightning":
        kw.update(layer_idx=LIGHTNING_LAYER[0], num_layers=LIGHTNING_LAYER[1])
    return kw


def make_case(name: str, B=2, Hk=2, Hv=2, T=37, D=6, Dv=5, dtype=F64, initial_state=True) -> Dict:
    """Fresh float64 leaf inputs for a rule: q, k, v, gate, beta, initial_state (None where unused)."""
    H = max(Hk, Hv)
    r = lambda *s: torch.randn(*s, dtype=F64)
    inp = {"q": r(B, Hk, T, D), "k": None if name == "hgrn2" else r(B, Hk, T, D), "v": r(B, Hv, T, Dv),
           "gate": None, "beta": None, "initial_state": None}
    if name in SCALAR_GATE:
        inp["gate"] = F.logsigmoid(1.5 + r(B, H, T))
    elif name in CHANNEL_GATE:
        inp["gate"] = F.logsigmoid(2.0 + r(B, H, T, D))
    elif name == "retention":
        inp["gate"] = torch.log1p(-torch.rand(H, dtype=F64) * 0.3)
    if name in DELTA:
        inp["beta"] = torch.rand(B, H, T, dtype=F64)
    if initial_state:
        S0 = 0.5 * r(B, H, D, Dv + (name == "linear_elu_norm"))
        if name == "linear_elu_norm":
            S0[..., -1] = 1 + torch.rand(B, H, D, dtype=F64)
        inp["initial_state"] = S0
    return {k: (v.to(dtype) if v is not None else None) for k, v in inp.items()}


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------

def ref_gate_per_token(name: str, gate, B, H, T):
    """Per-token log decays ``[B,H,T]`` / ``[B,H,T,Dk]`` (fixed decays of retention / lightning expanded)."""
    if name == "retention" and gate is None:
        gate = torch.tensor([math.log(1 - 2 ** (-5 - h)) for h in range(H)], dtype=F64)
    if name == "lightning" and gate is None:
        l, L = LIGHTNING_LAYER
        gate = torch.tensor([-s * (1 - l / (L - 1) + 1e-5) for s in alibi_slopes_ref(H)], dtype=F64)
    if name in ("retention", "lightning"):
        return gate.to(F64)[None, :, None].expand(B, H, T)
    return gate


def ref_prepare(name: str, q, k, v, gate=None, beta=None, scale=None, feature_map=None):
    """Heads, keys, feature map, L2 norm and scale as the definitions state them. Returns q, k, v, g, beta."""
    B, Hk, T, D = q.shape
    Hv = v.shape[1]
    H = max(Hk, Hv)
    q = q.repeat_interleave(H // Hk, 1)
    v = v.repeat_interleave(H // Hv, 1)
    g = ref_gate_per_token(name, gate, B, H, T)
    if name == "hgrn2":
        k = 1 - torch.exp(g)
    else:
        k = k.repeat_interleave(H // Hk, 1)
    fm = feature_map or ("elu" if name == "linear_elu_norm" else None)
    if fm == "elu":
        q, k = F.elu(q) + 1, F.elu(k) + 1
    if name in DELTA:
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    if scale is None:
        scale = 1.0 if name == "hgrn2" else 1 / math.sqrt(D)
    return q * scale, k, v, g, beta


def ref_transition(name: str, k, g, beta):
    """The Dk×Dk matrix A_t of one token (k ``[Dk]``, g scalar or ``[Dk]``, beta scalar)."""
    Dk = k.shape[0]
    eye = torch.eye(Dk, dtype=k.dtype)
    if g is None:
        decay = eye
    elif g.dim() == 0:
        decay = torch.exp(g) * eye
    else:
        decay = torch.diag(torch.exp(g))
    if name in DELTA:
        return (eye - beta * torch.outer(k, k)) @ decay  # decay first, then the delta correction
    return decay


def ref_linear(name: str, q, k, v, gate=None, beta=None, initial_state=None, scale=None, eps=1e-6):
    """Token-by-token definition with explicit matrices. Returns ``(o [B,H,T,Dv], S_T)``; with
    ``linear_elu_norm`` the state is ``[S | z]`` and ``o = qᵀS / (qᵀz + eps)``."""
    q, k, v, g, beta = ref_prepare(name, q, k, v, gate, beta, scale)
    B, H, T, Dk = q.shape
    norm = name == "linear_elu_norm"
    if norm:
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    outs, finals = [], []
    for b in range(B):
        ob, fb = [], []
        for h in range(H):
            S = initial_state[b, h] if initial_state is not None else torch.zeros(Dk, v.shape[-1], dtype=q.dtype)
            oh = []
            for t in range(T):
                gt = None if g is None else g[b, h, t]
                bt = None if beta is None else beta[b, h, t]
                A = ref_transition(name, k[b, h, t], gt, bt)
                w = (bt if bt is not None else 1.0) * torch.outer(k[b, h, t], v[b, h, t])
                S = A @ S + w
                o = q[b, h, t] @ S
                oh.append(o[:-1] / (o[-1] + eps) if norm else o)
            ob.append(torch.stack(oh))
            fb.append(S)
        outs.append(torch.stack(ob))
        finals.append(torch.stack(fb))
    return torch.stack(outs), torch.stack(finals)


def ref_level(t: int, s: int) -> int:
    """Fenwick level of key s for query t (Guo et al. 2025, base 2, 'weak' hierarchy), by recursion:
    if s lies before the largest power of two ≤ t, level floor(log2 t) + 1, else recurse on (t − v, s − v)."""
    if s == t:
        return 0
    l = int(math.floor(math.log2(t)))
    v = 2 ** l
    if s < v:
        return l + 1
    return ref_level(t - v, s - v)


def ref_pairwise(name: str, q, k, v, gate=None, beta=None, lam=None, scale=None, pos0: int = 0):
    """``o_t = Σ_{s≤t} λ_t^{(ℓ(t,s))} q_tᵀ P_{t←s} β_s k_s v_sᵀ`` with ``P_{t←s} = A_t ⋯ A_{s+1}``.

    Returns ``(o, M [B,H,T,T], levels [B,H,L,Dk,Dv])`` where M is the implicit attention matrix and
    ``levels`` the Fenwick bucket states relative to the last token (λ None: all weights 1, L = 1).
    """
    q, k, v, g, beta = ref_prepare(name, q, k, v, gate, beta, scale)
    B, H, T, Dk = q.shape
    L = 1 if lam is None else lam.shape[-1]
    outs, mats, levs = [], [], []
    for b in range(B):
        ob, mb, lb = [], [], []
        for h in range(H):
            A = [ref_transition(name, k[b, h, t], None if g is None else g[b, h, t],
                                None if beta is None else beta[b, h, t]) for t in range(T)]
            w = [k[b, h, s] * (1.0 if beta is None else beta[b, h, s]) for s in range(T)]
            rows, orow = [], []
            for t in range(T):
                P = torch.eye(Dk, dtype=q.dtype)
                row = [torch.zeros((), dtype=q.dtype)] * T
                for s in range(t, -1, -1):
                    c = q[b, h, t] @ P @ w[s]
                    if lam is not None:
                        c = c * lam[b, h, t, ref_level(pos0 + t, pos0 + s)]
                    row[s] = c
                    P = P @ A[s]
                rows.append(torch.stack(row))
            M = torch.stack(rows)
            ob.append(M @ v[b, h])
            mb.append(M)
            last, buckets = T - 1, [torch.zeros(Dk, v.shape[-1], dtype=q.dtype) for _ in range(L)]
            P = torch.eye(Dk, dtype=q.dtype)
            for s in range(last, -1, -1):
                lv = ref_level(pos0 + last, pos0 + s) if lam is not None else 0
                buckets[lv] = buckets[lv] + P @ torch.outer(w[s], v[b, h, s])
                P = P @ A[s]
            lb.append(torch.stack(buckets))
        outs.append(torch.stack(ob))
        mats.append(torch.stack(mb))
        levs.append(torch.stack(lb))
    return torch.stack(outs), torch.stack(mats), torch.stack(levs)


# ------------------------------------------------------------------------------------------------
# Helpers shared by the test modules
# ------------------------------------------------------------------------------------------------

def rel_err(a, b) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_rel(a, b, tol, what=""):
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.0e}"


def leaves(inp: Dict, dtype=None) -> Dict:
    """Fresh leaf copies requiring grad (optionally cast) of every tensor in a case."""
    out = {}
    for key, t in inp.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().to(dtype or t.dtype).clone().requires_grad_(t.is_floating_point())
        out[key] = t
    return out


def grads_of(out, state, inp: Dict, seed: int = 0):
    """Gradients of a fixed random projection of (out, state) w.r.t. every grad-requiring input."""
    gen = torch.Generator().manual_seed(seed)
    loss = (out.to(F64) * torch.randn(out.shape, generator=gen, dtype=F64)).sum()
    if state is not None:
        loss = loss + (state.to(F64) * torch.randn(state.shape, generator=gen, dtype=F64)).sum()
    names = [k for k, t in inp.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    gs = torch.autograd.grad(loss, [inp[k] for k in names], allow_unused=True)
    return dict(zip(names, gs))


# ------------------------------------------------------------------------------------------------
# Tests of the references themselves
# ------------------------------------------------------------------------------------------------

def test_ref_level_buckets_are_fenwick():
    """For every query t the keys 0..t−1 fall into one bucket per set bit of t, of size 2^(ℓ−1), the nearest
    keys in the smallest bucket."""
    for t in range(1, 70):
        sizes = {}
        for s in range(t):
            sizes[ref_level(t, s)] = sizes.get(ref_level(t, s), 0) + 1
        assert sorted(sizes) == [i + 1 for i in range(t.bit_length()) if t >> i & 1]
        assert all(n == 2 ** (lv - 1) for lv, n in sizes.items())
        nearest = [ref_level(t, s) for s in range(t - 1, -1, -1)]
        assert nearest == sorted(nearest)


def test_ref_delta_rule_overwrites_a_key():
    """β = 1, unit key: writing v1 then v2 under the same key leaves v2 (the delta rule's replacement)."""
    D = 4
    k = torch.zeros(1, 1, 2, D, dtype=F64)
    k[..., 0] = 1.0
    q = k.clone()
    v = torch.randn(1, 1, 2, 3, dtype=F64)
    o, S = ref_linear("delta", q, k, v, beta=torch.ones(1, 1, 2, dtype=F64), scale=1.0)
    assert torch.allclose(o[0, 0, 1], v[0, 0, 1]) and torch.allclose(S[0, 0, 0], v[0, 0, 1])
    o_lin, _ = ref_linear("linear", q, k, v, scale=1.0)
    assert torch.allclose(o_lin[0, 0, 1], v[0, 0, 0] + v[0, 0, 1])


@pytest.mark.parametrize("name", ["scalar_gate", "gla", "gated_delta", "kda"])
def test_ref_pairwise_equals_recursion(name):
    """The two references (state recursion, pairwise products) agree, so either can anchor a test."""
    c = make_case(name, B=1, Hk=1, Hv=1, T=9, D=3, Dv=2, initial_state=False)
    o1, _ = ref_linear(name, c["q"], c["k"], c["v"], c["gate"], c["beta"])
    o2, _, lv = ref_pairwise(name, c["q"], c["k"], c["v"], c["gate"], c["beta"])
    _, S = ref_linear(name, c["q"], c["k"], c["v"], c["gate"], c["beta"])
    assert_rel(o2, o1, 1e-12, "pairwise vs recursion")
    assert_rel(lv[:, :, 0], S, 1e-12, "final state")
