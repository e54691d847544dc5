"""Token-by-token kernels of every matrix-state rule: the decode step and short sequences, forward and backward.

One program owns a ``Dk × BV`` tile of one head's state (fp32, in registers) and walks its document's tokens:

    P = Diag(α_t) S_{t−1}                         (α_t = e^{g_t}: scalar or per key channel)
    additive:  S_t = P + k_t v_tᵀ
    delta:     S_t = P + k_t (β_t (v_t − Pᵀ k_t))ᵀ   (= (I − β k kᵀ) Diag(α) S + β k vᵀ)
    o_t = (scale · q_t)ᵀ S_t

A decode step (T = 1) reads the state once and writes it once (``out_state`` may alias ``initial_state``: every
program reads its tile before it writes it). The backward recomputes the forward once, storing every ``P``
(``T × Dk × Dv`` floats per head: meant for short sequences; the chunk kernels serve long ones), then walks the
tokens backwards:

    dS_t += q_t do_tᵀ,  dq_t = S_t do_t
    additive:  dk_t = dS_t v_t,  dv_t = dS_tᵀ k_t,  dP = dS_t
    delta:     dr = dS_tᵀ k_t,  dk_t = dS_t r + P dpred,  dv_t = β dr,  dβ = dr·(v − pred),  dpred = −β dr,
               dP = dS_t + k_t dpredᵀ
    dg_t = Σ dP ⊙ P (per row for per-channel gates),  dS_{t−1} = Diag(α_t) dP

Partial sums over Dv tiles (dq, dk, dg, dβ) are written per tile and added on the host (deterministic).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunkwise import NORMALIZE_EPS, Tiles, _or, _st, prepare
from .utils import GATE_CHANNEL, GATE_SCALAR, doc_coords, interpreting, pow2, precisions

__all__ = ["fused_recurrent"]


@triton.jit
def _token(Q, K, V, Gp, BETA, qoff, koff, voff, goff, beoff, t, cols, cv, Dk, Dv, scale,
           sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, sg_t, sg_d, sbe_t,
           GATE: tl.constexpr, DELTA: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr):
    """One token's ``(q̂, 1/‖q‖, k̂, 1/‖k‖, v, α, β)``: rows L2-normalized when ``L2`` (q not yet scaled)."""
    km = cols < Dk
    tt = qoff * 0 + t  # int64 (t may be a plain int in the interpreter)
    q = tl.load(Q + qoff + tt * sq_t + cols * sq_d, mask=km, other=0.0).to(ACC)
    k = tl.load(K + koff + tt * sk_t + cols * sk_d, mask=km, other=0.0).to(ACC)
    rq = tl.sum(q * 0.0, 0) + 1.0
    rk = rq
    if L2:
        rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(q * q, 0)), 1e-12)
        rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-12)
        q = q * rq
        k = k * rk
    v = tl.load(V + voff + tt * sv_t + cv * sv_d, mask=cv < Dv, other=0.0).to(ACC)
    if GATE == 1:
        a = tl.exp(tl.load(Gp + goff + tt * sg_t).to(ACC))
    elif GATE == 2:
        a = tl.exp(tl.load(Gp + goff + tt * sg_t + cols * sg_d, mask=km, other=0.0).to(ACC))
    else:
        a = rq * 0.0 + 1.0
    beta = rq * 0.0
    if DELTA:
        beta = tl.load(BETA + beoff + tt * sbe_t).to(ACC)
    return q, rq, k, rk, v, a, beta


@triton.jit
def _decay(st, a, GATE: tl.constexpr):
    if GATE == 1:
        return st * a
    elif GATE == 2:
        return st * a[:, None]
    else:
        return st


@triton.jit
def recurrent_fwd_kernel(Q, K, V, Gp, BETA, H0, O, HT, PS, DOCS,
                         sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                         sg_b, sg_h, sg_t, sg_d, sbe_b, sbe_h, sbe_t,
                         T, H, QK_DIV, V_DIV, Dk, Dv, scale,
                         BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                         L2: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, SAVE: tl.constexpr,
                         STORE_O: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr):
    """Forward over one document and Dv tile; ``SAVE`` also stores every token's decayed state ``P`` (backward)."""
    iv = tl.program_id(0)
    pid_nh = tl.program_id(1)
    b, h, bos, eos, _ = doc_coords(pid_nh, DOCS, DOCS, T, 1, H, VARLEN)
    cols = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    smask = (cols < Dk)[:, None] & (cv < Dv)[None, :]
    sptr = cols[:, None] * Dv + cv[None, :]
    st = tl.zeros([BK, BV], dtype=ACC)
    if HAS_H0:
        st += tl.load(H0 + pid_nh.to(tl.int64) * Dk * Dv + sptr, mask=smask, other=0.0).to(ACC)
    qoff = b.to(tl.int64) * sq_b + (h // QK_DIV).to(tl.int64) * sq_h
    koff = b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h
    voff = b.to(tl.int64) * sv_b + (h // V_DIV).to(tl.int64) * sv_h
    goff = b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h
    beoff = b.to(tl.int64) * sbe_b + h.to(tl.int64) * sbe_h
    row0 = (b * H + h).to(tl.int64) * T
    for t in range(bos, eos):
        q, rq, k, rk, v, a, beta = _token(Q, K, V, Gp, BETA, qoff, koff, voff, goff, beoff, t, cols, cv, Dk, Dv,
                                          scale, sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, sg_t, sg_d, sbe_t,
                                          GATE, DELTA, L2, ACC)
        st = _decay(st, a, GATE)
        if SAVE:
            tl.store(PS + (row0 + t) * Dk * Dv + sptr, st, mask=smask)
        if DELTA:
            v = beta * (v - tl.sum(k[:, None] * st, 0))
        st += k[:, None] * v[None, :]
        if STORE_O:
            o = tl.sum((q * scale)[:, None] * st, 0)
            tl.store(O + (row0 + t) * Dv + cv, o.to(O.dtype.element_ty), mask=cv < Dv)
    if STORE_HT:
        tl.store(HT + pid_nh.to(tl.int64) * Dk * Dv + sptr, st.to(HT.dtype.element_ty), mask=smask)


@triton.jit
def recurrent_bwd_kernel(Q, K, V, Gp, BETA, PS, DO, DHT, DQ, DK, DV, DG, DBETA, DH0, DOCS,
                         sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                         sg_b, sg_h, sg_t, sg_d, sbe_b, sbe_h, sbe_t, so_b, so_h, so_t, so_d,
                         T, BHT, H, QK_DIV, V_DIV, Dk, Dv, scale,
                         BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                         L2: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, VARLEN: tl.constexpr,
                         ACC: tl.constexpr):
    """Backward over one document and Dv tile, last token first (see the module docstring). DQ, DK, DG, DBETA get
    this tile's partial sums at ``[iv]``; DV its columns."""
    iv = tl.program_id(0)
    pid_nh = tl.program_id(1)
    b, h, bos, eos, _ = doc_coords(pid_nh, DOCS, DOCS, T, 1, H, VARLEN)
    cols = tl.arange(0, BK)
    km = cols < Dk
    cv = iv * BV + tl.arange(0, BV)
    vm = cv < Dv
    smask = km[:, None] & vm[None, :]
    sptr = cols[:, None] * Dv + cv[None, :]
    dh = tl.zeros([BK, BV], dtype=ACC)
    if HAS_DHT:
        dh += tl.load(DHT + pid_nh.to(tl.int64) * Dk * Dv + sptr, mask=smask, other=0.0).to(ACC)
    qoff = b.to(tl.int64) * sq_b + (h // QK_DIV).to(tl.int64) * sq_h
    koff = b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h
    voff = b.to(tl.int64) * sv_b + (h // V_DIV).to(tl.int64) * sv_h
    goff = b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h
    beoff = b.to(tl.int64) * sbe_b + h.to(tl.int64) * sbe_h
    ooff = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    row0 = (b * H + h).to(tl.int64) * T
    prow = iv.to(tl.int64) * BHT + row0  # this tile's rows in the partial-sum buffers [NV, B·H·T]
    for i in range(eos - bos):
        t = eos - 1 - i
        q, rq, k, rk, v, a, beta = _token(Q, K, V, Gp, BETA, qoff, koff, voff, goff, beoff, t, cols, cv, Dk, Dv,
                                          scale, sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, sg_t, sg_d, sbe_t,
                                          GATE, DELTA, L2, ACC)
        P = tl.load(PS + (row0 + t) * Dk * Dv + sptr, mask=smask, other=0.0)
        do = tl.load(DO + ooff + (ooff * 0 + t) * so_t + cv * so_d, mask=vm, other=0.0).to(ACC)
        if DELTA:
            pred = tl.sum(k[:, None] * P, 0)
            r = beta * (v - pred)
            S = P + k[:, None] * r[None, :]
        else:
            S = P + k[:, None] * v[None, :]
        dh += (q * scale)[:, None] * do[None, :]
        dqs = tl.sum(S * do[None, :], 1) * scale
        if DELTA:
            dr = tl.sum(dh * k[:, None], 0)
            dpred = -beta * dr
            dk = tl.sum(dh * r[None, :], 1) + tl.sum(P * dpred[None, :], 1)
            dv = beta * dr
            tl.store(DBETA + prow + t, tl.sum(dr * (v - pred), 0))
            dP = dh + k[:, None] * dpred[None, :]
        else:
            dk = tl.sum(dh * v[None, :], 1)
            dv = tl.sum(dh * k[:, None], 0)
            dP = dh
        tl.store(DV + (row0 + t) * Dv + cv, dv, mask=vm)
        if L2:
            dqs = (dqs - q * tl.sum(q * dqs, 0)) * rq
            dk = (dk - k * tl.sum(k * dk, 0)) * rk
        slot = prow + t
        tl.store(DQ + slot * Dk + cols, dqs, mask=km)
        tl.store(DK + slot * Dk + cols, dk, mask=km)
        if GATE == 1:
            tl.store(DG + slot, tl.sum(tl.sum(dP * P, 1), 0))
        elif GATE == 2:
            tl.store(DG + slot * Dk + cols, tl.sum(dP * P, 1), mask=km)
        dh = _decay(dP, a, GATE)
    if STORE_DH0:
        tl.store(DH0 + pid_nh.to(tl.int64) * Dk * Dv + sptr, dh.to(DH0.dtype.element_ty), mask=smask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def decode_tiles(Dk: int, Dv: int, dtype: torch.dtype, chunk_size=None, n_seq_heads: int = 0) -> Tiles:
    """Dv tile of the recurrent kernels: 32 columns of a 128-row fp32 state per program (16 KiB of state: 2048
    programs at B = 32, H = 16, Dv = 128); 16 in the interpreter (tile loops run in the tests)."""
    bv = 16 if interpreting() else min(pow2(Dv), 32)
    return Tiles(1, bv, bv, bv, warps_state=4 if pow2(Dk) * bv >= 4096 else 2)


def _launch_fwd(p, q, k, v, g, beta, h0, *, o, ht, ps):
    acc = precisions(p.dtype)[0]
    docs = p.docs if p.varlen else torch.zeros(2, dtype=torch.int32, device=q.device)
    recurrent_fwd_kernel[p.grid_s](q, k, v, _or(g, q), _or(beta, q), _or(h0, q), _or(o, q), _or(ht, q), _or(ps, q),
                                   docs, *_st(q, 4), *_st(k, 4), *_st(v, 4), *_st(g, 4), *_st(beta, 3),
                                   p.T, p.H, p.qk_div, p.v_div, p.Dk, p.Dv, p.scale,
                                   BK=pow2(p.Dk), BV=p.tiles.bv_state, GATE=p.gate, DELTA=p.delta, L2=p.l2,
                                   HAS_H0=h0 is not None, STORE_HT=ht is not None, SAVE=ps is not None,
                                   STORE_O=o is not None, VARLEN=p.varlen, ACC=acc, num_warps=p.tiles.warps_state)


class _RecurrentFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, p, want_ht: bool, out_dtype):
        acc_t = torch.float64 if p.dtype == torch.float64 else torch.float32
        o = torch.empty(p.B, p.H, p.T, p.Dv, device=q.device, dtype=out_dtype)
        if _POISON:
            o.fill_(float("nan"))
        ht = torch.empty(p.n_seq, p.H, p.Dk, p.Dv, device=q.device, dtype=acc_t) if want_ht else None
        if _POISON and want_ht:
            ht.fill_(float("nan"))
        _launch_fwd(p, q, k, v, g, beta, h0, o=o, ht=ht, ps=None)
        ctx.p = p
        ctx.save_for_backward(q, k, v, g, beta, h0)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        p = ctx.p
        dht = None if dht is None else dht.contiguous()  # the kernels read dht densely (a sum's gradient is expanded)
        dev = q.device
        B, H, T, Dk, Dv = p.B, p.H, p.T, p.Dk, p.Dv
        acc_t = torch.float64 if p.dtype == torch.float64 else torch.float32
        ps = torch.empty(B, H, T, Dk, Dv, device=dev, dtype=acc_t)
        _launch_fwd(p, q, k, v, g, beta, h0, o=None, ht=None, ps=ps)
        nv = p.grid_s[0]
        dq = torch.empty(nv, B, H, T, Dk, device=dev, dtype=acc_t)
        dk = torch.empty_like(dq)
        dv = torch.empty(B, H, T, Dv, device=dev, dtype=acc_t)
        dg = None
        if p.gate == GATE_SCALAR:
            dg = torch.empty(nv, B, H, T, device=dev, dtype=acc_t)
        elif p.gate == GATE_CHANNEL:
            dg = torch.empty(nv, B, H, T, Dk, device=dev, dtype=acc_t)
        dbeta = torch.empty(nv, B, H, T, device=dev, dtype=acc_t) if p.delta else None
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dh0 = torch.empty(p.n_seq, H, Dk, Dv, device=dev, dtype=acc_t) if need_dh0 else None
        if _POISON:
            for t in (dq, dk, dv, dg, dbeta, dh0):
                if t is not None:
                    t.fill_(float("nan"))
        docs = p.docs if p.varlen else torch.zeros(2, dtype=torch.int32, device=dev)
        recurrent_bwd_kernel[p.grid_s](q, k, v, _or(g, q), _or(beta, q), ps, do, _or(dht, q), dq, dk, dv,
                                       _or(dg, dq), _or(dbeta, dq), _or(dh0, dq), docs,
                                       *_st(q, 4), *_st(k, 4), *_st(v, 4), *_st(g, 4), *_st(beta, 3), *_st(do, 4),
                                       T, B * H * T, H, p.qk_div, p.v_div, Dk, Dv, p.scale,
                                       BK=pow2(Dk), BV=p.tiles.bv_state, GATE=p.gate, DELTA=p.delta, L2=p.l2,
                                       HAS_DHT=dht is not None, STORE_DH0=need_dh0, VARLEN=p.varlen,
                                       ACC=precisions(p.dtype)[0], num_warps=p.tiles.warps_state)
        dq, dk = dq.sum(0), dk.sum(0)
        dg = None if dg is None else dg.sum(0)
        dbeta = None if dbeta is None else dbeta.sum(0)
        if p.qk_div > 1:
            dq = dq.view(B, H // p.qk_div, p.qk_div, T, Dk).sum(2)
            dk = dk.view(B, H // p.qk_div, p.qk_div, T, Dk).sum(2)
        if p.v_div > 1:
            dv = dv.view(B, H // p.v_div, p.v_div, T, Dv).sum(2)
        cast = lambda d, x: None if d is None or x is None else d.to(x.dtype)  # noqa: E731
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dg, g), cast(dbeta, beta), cast(dh0, h0),
                None, None, None)


#: fill outputs with NaN before the kernels write them (tests)
_POISON = False


def fused_recurrent(q: Tensor, k: Tensor, v: Tensor, *, gate: Optional[Tensor] = None,
                    beta: Optional[Tensor] = None, delta: bool = False, scale: Optional[float] = None,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    cu_seqlens: Optional[Tensor] = None, qk_l2norm: bool = False, normalize: bool = False,
                    out_state: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Token-by-token linear attention of any rule (arguments as :func:`chunk`); differentiable.

    ``out_state`` (no autograd; needs ``output_final_state``): write the final state into this fp32 tensor, which may
    be ``initial_state`` itself (an in-place decode step: the state is read once and written once).
    Returns ``(o [B, H, T, Dv] in q's dtype, final state or None)``.
    """
    if normalize:
        if delta:
            raise ValueError("normalize=True belongs to the additive rules (delta=False)")
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    p, g = prepare(q, k, v, gate, beta, delta, scale, initial_state, cu_seqlens, qk_l2norm, None,
                   tiles_fn=decode_tiles)
    out_dtype = torch.float32 if normalize and q.dtype != torch.float64 else q.dtype
    h0 = None if initial_state is None else initial_state.contiguous()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, beta, h0))
    if out_state is not None:
        if grad:
            raise ValueError("out_state= writes the state in place: call without autograd (torch.no_grad())")
        if not output_final_state:
            raise ValueError("out_state= needs output_final_state=True")
        acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
        if tuple(out_state.shape) != (p.n_seq, p.H, p.Dk, p.Dv) or out_state.dtype != acc_t \
                or not out_state.is_contiguous() or out_state.device != q.device:
            raise ValueError(f"out_state must be a contiguous {acc_t} tensor of shape {(p.n_seq, p.H, p.Dk, p.Dv)} "
                             f"on {q.device}, got {out_state.dtype} {tuple(out_state.shape)}")
        if h0 is not None and h0.data_ptr() != initial_state.data_ptr():
            raise ValueError("out_state aliasing needs a contiguous initial_state")
        o = torch.empty(p.B, p.H, p.T, p.Dv, device=q.device, dtype=out_dtype)
        _launch_fwd(p, q, k, v, g, beta, h0, o=o, ht=out_state, ps=None)
        ht = out_state
    else:
        o, ht = _RecurrentFn.apply(q, k, v, g, beta, h0, p, bool(output_final_state), out_dtype)
    if normalize:
        o = (o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)).to(q.dtype)
    return o, (ht if output_final_state else None)
