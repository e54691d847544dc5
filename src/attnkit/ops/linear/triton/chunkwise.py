"""Chunkwise-parallel forward and backward of every matrix-state rule: one kernel family, constexpr switches.

Per head and chunk of ``C`` tokens with start state ``S`` (``Dk×Dv``, fp32), log gates summed inside the chunk
(``b_t`` inclusive, ``r_t = b_C − b_t``; see :func:`utils.chunk_gates`), ``q`` already scaled:

    Q̄ = Q ⊙ e^{b},  K̄ = K ⊙ e^{b},  K̂ = K ⊙ e^{r},  A = gram(Q, K) (s ≤ t),  Ā = gram(K, K) (s < t)
    additive (GATE ∈ {none, scalar, channel}):   U = V
    delta (DELTA):  T = (I + Diag(β) Ā)⁻¹,  W = T(β ⊙ K̄),  U₀ = T(β ⊙ V),  U = U₀ − W S     (the UT transform)
    O = Q̄ S + A U,     S' = e^{b_C} ⊙ S + K̂ᵀ U

Kernels (grid; what each reads and writes):

* ``wy``     (chunks × B·H; delta rules): T, W, U₀ of every chunk (T stored only for the backward).
* ``state``  (Dv tiles × documents·H; sequential over a document's chunks): the start state of every chunk
  (``HS``, the inputs' dtype), the delta rules' ``U`` (``UN``), the final state (fp32).
* ``out``    (chunks × B·H): ``O = Q̄ S + A U``; in the backward (``MODE 1``) ``dU_local = Aᵀ dO``.
* ``dh``     (Dv tiles × documents·H; sequential, last chunk first): the gradient of every chunk's end state
  (``DHS``), ``dU = Aᵀ dO + K̂ dS'`` (delta), the initial state's gradient.
* ``grad``   (chunks × B·H): dq, dk, dv, dβ and the gate gradient of one chunk from ``S``, ``dS'``, ``U``, ``dU``.

The backward recomputes ``wy`` and ``state`` instead of keeping per-chunk states from the forward (memory:
the inputs only). Varlen documents (``cu_seqlens``) are walked inside the kernels from host-built chunk tables;
no atomics anywhere (deterministic). ``qk_l2norm`` is fused: every kernel normalizes the q / k rows it loads, and
``grad`` applies the normalization's backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (GATE_CHANNEL, GATE_NONE, GATE_SCALAR, chunk_coords, chunk_gates, doc_coords, gram, gram_bwd,
                    interpreting, l2norm_bwd, load_qk, load_tile, pow2, precisions, row_scale, state_scale,
                    store_tile, unit_lower_inverse, varlen_tables)

__all__ = ["chunk", "NORMALIZE_EPS"]

#: ``normalize=True`` divides by ``qᵀz + NORMALIZE_EPS`` (as attnkit.variants.linear)
NORMALIZE_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def chunk_wy_kernel(K, V, Gp, BETA, W, U0, TI, CHUNKS, DOCS,
                    sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sg_b, sg_h, sg_t, sg_d, sbe_b, sbe_h, sbe_t,
                    T, NT, H, QK_DIV, V_DIV, Dk, Dv,
                    C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                    L2: tl.constexpr, STORE_T: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr, IPREC: tl.constexpr):
    """The UT transform of one chunk: ``T = (I + Diag(β) Ā)⁻¹``, ``W = T(β ⊙ K̄)``, ``U₀ = T(β ⊙ V)``."""
    b, h, t0, eos, gi = chunk_coords(tl.program_id(0), tl.program_id(1), CHUNKS, DOCS, T, NT, H, C, VARLEN)
    rows = t0 + tl.arange(0, C)
    ok = rows < eos
    cols = tl.arange(0, BK)
    kk, _ = load_qk(K, b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h, rows, ok, cols, Dk, sk_t, sk_d,
                    L2, ACC)
    g, bb, rb, bC = chunk_gates(Gp, b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h, rows, ok, cols, Dk, sg_t, sg_d,
                                GATE, ACC)
    beta = tl.load(BETA + b.to(tl.int64) * sbe_b + h.to(tl.int64) * sbe_h + rows.to(tl.int64) * sbe_t, mask=ok,
                   other=0.0).to(ACC)
    Ti = unit_lower_inverse(beta[:, None] * gram(kk, kk, g, bb, True, GATE, C, LOG2C, BK, ACC, DT, PREC),
                            C, LOG2C, ACC, IPREC)
    srow = (b * H + h).to(tl.int64) * T
    if STORE_T:
        store_tile(TI, srow * C, rows, ok, tl.arange(0, C), C, C, 1, Ti)
    Td = Ti.to(DT)
    kb = row_scale(kk, tl.exp(bb), GATE) * beta[:, None]
    store_tile(W, srow * Dk, rows, ok, cols, Dk, Dk, 1, tl.dot(Td, kb.to(DT), input_precision=PREC, out_dtype=ACC))
    voff = b.to(tl.int64) * sv_b + (h // V_DIV).to(tl.int64) * sv_h
    for iv in range(tl.cdiv(Dv, BV)):
        cv = iv * BV + tl.arange(0, BV)
        vb = load_tile(V, voff, rows, ok, cv, Dv, sv_t, sv_d).to(ACC) * beta[:, None]
        store_tile(U0, srow * Dv, rows, ok, cv, Dv, Dv, 1, tl.dot(Td, vb.to(DT), input_precision=PREC, out_dtype=ACC))


@triton.jit
def chunk_state_kernel(K, V, Gp, W, U0, H0, HS, UN, HT, DOCS, CHOFF,
                       sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sg_b, sg_h, sg_t, sg_d,
                       T, NT, H, QK_DIV, V_DIV, Dk, Dv,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                       L2: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, VARLEN: tl.constexpr,
                       ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """State passing over one document for one Dv tile: stores every chunk's start state, the delta rules'
    ``U = U₀ − W S``, and the final state. The state stays in registers (fp32) the whole way."""
    iv = tl.program_id(0)
    pid_nh = tl.program_id(1)
    b, h, bos, eos, gi0 = doc_coords(pid_nh, DOCS, CHOFF, T, NT, H, VARLEN)
    cols = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    smask = (cols < Dk)[:, None] & (cv < Dv)[None, :]
    sptr = cols[:, None] * Dv + cv[None, :]
    st = tl.zeros([BK, BV], dtype=ACC)
    if HAS_H0:
        st += tl.load(H0 + pid_nh.to(tl.int64) * Dk * Dv + sptr, mask=smask, other=0.0).to(ACC)
    koff = b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h
    goff = b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h
    voff = b.to(tl.int64) * sv_b + (h // V_DIV).to(tl.int64) * sv_h
    srow = (b * H + h).to(tl.int64) * T
    for c in range(tl.cdiv(eos - bos, C)):
        rows = bos + c * C + tl.arange(0, C)
        ok = rows < eos
        tl.store(HS + ((gi0 + c) * H + h).to(tl.int64) * Dk * Dv + sptr, st.to(HS.dtype.element_ty), mask=smask)
        kk, _ = load_qk(K, koff, rows, ok, cols, Dk, sk_t, sk_d, L2, ACC)
        g, bb, rb, bC = chunk_gates(Gp, goff, rows, ok, cols, Dk, sg_t, sg_d, GATE, ACC)
        if DELTA:
            w = load_tile(W, srow * Dk, rows, ok, cols, Dk, Dk, 1)
            u = load_tile(U0, srow * Dv, rows, ok, cv, Dv, Dv, 1).to(ACC)
            u -= tl.dot(w.to(DT), st.to(DT), input_precision=PREC, out_dtype=ACC)
            store_tile(UN, srow * Dv, rows, ok, cv, Dv, Dv, 1, u)
        else:
            u = load_tile(V, voff, rows, ok, cv, Dv, sv_t, sv_d).to(ACC)
        kh = row_scale(kk, tl.exp(rb), GATE)
        st = state_scale(st, tl.exp(bC), GATE) + tl.dot(tl.trans(kh.to(DT)), u.to(DT), input_precision=PREC,
                                                         out_dtype=ACC)
    if STORE_HT:
        tl.store(HT + pid_nh.to(tl.int64) * Dk * Dv + sptr, st.to(HT.dtype.element_ty), mask=smask)


@triton.jit
def chunk_out_kernel(Q, K, Gp, U, HS, X, O, CHUNKS, DOCS,
                     sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sg_b, sg_h, sg_t, sg_d,
                     su_b, su_h, su_t, su_d, sx_b, sx_h, sx_t, sx_d,
                     T, NT, H, QK_DIV, U_DIV, Dk, Dv, scale,
                     MODE: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     GATE: tl.constexpr, L2: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr,
                     DT: tl.constexpr, PREC: tl.constexpr):
    """MODE 0: ``O = Q̄ S + A U`` (U: V or the delta rules' UN; HS: the chunks' start states). MODE 1:
    ``O = Aᵀ X`` (X = dO: the local part of the delta rules' dU). MODE 2 (additive rules' dV): ``O = Aᵀ X + K̂ dS'``
    (HS: the chunks' end-state gradients)."""
    b, h, t0, eos, gi = chunk_coords(tl.program_id(0), tl.program_id(1), CHUNKS, DOCS, T, NT, H, C, VARLEN)
    rows = t0 + tl.arange(0, C)
    ok = rows < eos
    cols = tl.arange(0, BK)
    qq, _ = load_qk(Q, b.to(tl.int64) * sq_b + (h // QK_DIV).to(tl.int64) * sq_h, rows, ok, cols, Dk, sq_t, sq_d,
                    L2, ACC)
    qq = qq * scale
    kk, _ = load_qk(K, b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h, rows, ok, cols, Dk, sk_t, sk_d,
                    L2, ACC)
    g, bb, rb, bC = chunk_gates(Gp, b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h, rows, ok, cols, Dk, sg_t, sg_d,
                                GATE, ACC)
    Ad = gram(qq, kk, g, bb, False, GATE, C, LOG2C, BK, ACC, DT, PREC).to(DT)
    if MODE == 0:
        qb = row_scale(qq, tl.exp(bb), GATE).to(DT)
    elif MODE == 2:
        kh = row_scale(kk, tl.exp(rb), GATE).to(DT)
    uoff = b.to(tl.int64) * su_b + (h // U_DIV).to(tl.int64) * su_h
    xoff = b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    ooff = (b * H + h).to(tl.int64) * T * Dv
    for iv in range(tl.cdiv(Dv, BV)):
        cv = iv * BV + tl.arange(0, BV)
        if MODE == 0:
            u = load_tile(U, uoff, rows, ok, cv, Dv, su_t, su_d).to(DT)
            hs = load_tile(HS, (gi * H + h).to(tl.int64) * Dk * Dv, cols, cols < Dk, cv, Dv, Dv, 1).to(DT)
            o = tl.dot(qb, hs, input_precision=PREC, out_dtype=ACC)
            o = tl.dot(Ad, u, o, input_precision=PREC, out_dtype=ACC)
        else:
            x = load_tile(X, xoff, rows, ok, cv, Dv, sx_t, sx_d).to(DT)
            o = tl.dot(tl.trans(Ad), x, input_precision=PREC, out_dtype=ACC)
            if MODE == 2:
                dhs = load_tile(HS, (gi * H + h).to(tl.int64) * Dk * Dv, cols, cols < Dk, cv, Dv, Dv, 1).to(DT)
                o = tl.dot(kh, dhs, o, input_precision=PREC, out_dtype=ACC)
        store_tile(O, ooff, rows, ok, cv, Dv, Dv, 1, o)


@triton.jit
def chunk_dh_kernel(Q, K, Gp, W, DO, DU, DHT, DHS, DH0, DOCS, CHOFF,
                    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sg_b, sg_h, sg_t, sg_d, so_b, so_h, so_t, so_d,
                    T, NT, H, QK_DIV, Dk, Dv, scale,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                    L2: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, VARLEN: tl.constexpr,
                    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Backward state pass, last chunk first: ``dS = Q̄ᵀ dO + e^{b_C} ⊙ dS' − Wᵀ dU`` with (delta rules)
    ``dU = Aᵀ dO + K̂ dS'`` (DU holds ``Aᵀ dO`` on entry, ``dU`` on exit). Stores every chunk's ``dS'``."""
    iv = tl.program_id(0)
    pid_nh = tl.program_id(1)
    b, h, bos, eos, gi0 = doc_coords(pid_nh, DOCS, CHOFF, T, NT, H, VARLEN)
    cols = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    smask = (cols < Dk)[:, None] & (cv < Dv)[None, :]
    sptr = cols[:, None] * Dv + cv[None, :]
    dh = tl.zeros([BK, BV], dtype=ACC)
    if HAS_DHT:
        dh += tl.load(DHT + pid_nh.to(tl.int64) * Dk * Dv + sptr, mask=smask, other=0.0).to(ACC)
    qoff = b.to(tl.int64) * sq_b + (h // QK_DIV).to(tl.int64) * sq_h
    koff = b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h
    goff = b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h
    ooff = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    srow = (b * H + h).to(tl.int64) * T
    nch = tl.cdiv(eos - bos, C)
    for i in range(nch):
        c = nch - 1 - i
        rows = bos + c * C + tl.arange(0, C)
        ok = rows < eos
        tl.store(DHS + ((gi0 + c) * H + h).to(tl.int64) * Dk * Dv + sptr, dh.to(DHS.dtype.element_ty), mask=smask)
        qq, _ = load_qk(Q, qoff, rows, ok, cols, Dk, sq_t, sq_d, L2, ACC)
        g, bb, rb, bC = chunk_gates(Gp, goff, rows, ok, cols, Dk, sg_t, sg_d, GATE, ACC)
        do = load_tile(DO, ooff, rows, ok, cv, Dv, so_t, so_d).to(DT)
        qb = row_scale(qq * scale, tl.exp(bb), GATE).to(DT)
        dnew = state_scale(dh, tl.exp(bC), GATE) + tl.dot(tl.trans(qb), do, input_precision=PREC, out_dtype=ACC)
        if DELTA:
            kk, _ = load_qk(K, koff, rows, ok, cols, Dk, sk_t, sk_d, L2, ACC)
            kh = row_scale(kk, tl.exp(rb), GATE).to(DT)
            du = load_tile(DU, srow * Dv, rows, ok, cv, Dv, Dv, 1).to(ACC)
            du += tl.dot(kh, dh.to(DT), input_precision=PREC, out_dtype=ACC)
            store_tile(DU, srow * Dv, rows, ok, cv, Dv, Dv, 1, du)
            w = load_tile(W, srow * Dk, rows, ok, cols, Dk, Dk, 1).to(DT)
            dnew -= tl.dot(tl.trans(w), du.to(DT), input_precision=PREC, out_dtype=ACC)
        dh = dnew
    if STORE_DH0:
        tl.store(DH0 + pid_nh.to(tl.int64) * Dk * Dv + sptr, dh.to(DH0.dtype.element_ty), mask=smask)


@triton.jit
def chunk_grad_kernel(Q, K, U, Gp, HS, DHS, DU, DO, DQ, DK, DG, DW, CHUNKS, DOCS,
                      sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, su_b, su_h, su_t, su_d,
                      sg_b, sg_h, sg_t, sg_d, so_b, so_h, so_t, so_d,
                      T, NT, H, QK_DIV, U_DIV, Dk, Dv, scale,
                      C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                      DELTA: tl.constexpr, L2: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr):
    """Gradients of one chunk through ``O = Q̄ S + A U`` and ``S' = e^{b_C} ⊙ S + K̂ᵀ U`` (per state head;
    grouped heads are summed by the host). With ``S`` (HS), ``dS'`` (DHS), ``U`` (V, or the delta rules' UN) and
    ``dU`` (DU: the additive rules' dV, or the delta rules' dU from the dh pass), over Dv tiles:

        dQ̄ = dO Sᵀ,  dK̂ = U dS'ᵀ,  dA = dO Uᵀ,  (delta) dW = −dU Sᵀ
        d b_t = Q̄⊙dQ̄ − K̂⊙dK̂ + (q⊙dq − k⊙dk of A's gram),  d b_C = e^{b_C} Σ_v S⊙dS' + Σ_t K̂⊙dK̂

    Additive rules finish here: dq, dk, dv and ``dg_u = Σ_{t ≥ u} d b_t + d b_C``. Delta rules write dq, and
    dk, d b (with ``d b_C`` folded into the chunk's last token) and dW for :func:`chunk_wy_bwd_kernel`."""
    b, h, t0, eos, gi = chunk_coords(tl.program_id(0), tl.program_id(1), CHUNKS, DOCS, T, NT, H, C, VARLEN)
    rows = t0 + tl.arange(0, C)
    ok = rows < eos
    cols = tl.arange(0, BK)
    rr = tl.arange(0, C)
    srow = (b * H + h).to(tl.int64) * T
    uoff = b.to(tl.int64) * su_b + (h // U_DIV).to(tl.int64) * su_h
    ooff = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    soff = (gi * H + h).to(tl.int64) * Dk * Dv
    if DELTA:
        dW = tl.zeros([C, BK], dtype=ACC)
    dQb = tl.zeros([C, BK], dtype=ACC)
    dKh = tl.zeros([C, BK], dtype=ACC)
    dA = tl.zeros([C, C], dtype=ACC)
    dSC = tl.zeros([BK], dtype=ACC)
    for iv in range(tl.cdiv(Dv, BV)):
        cv = iv * BV + tl.arange(0, BV)
        hs = load_tile(HS, soff, cols, cols < Dk, cv, Dv, Dv, 1).to(DT)
        dhs = load_tile(DHS, soff, cols, cols < Dk, cv, Dv, Dv, 1).to(DT)
        do = load_tile(DO, ooff, rows, ok, cv, Dv, so_t, so_d).to(DT)
        u = load_tile(U, uoff, rows, ok, cv, Dv, su_t, su_d).to(DT)
        if DELTA:
            dud = load_tile(DU, srow * Dv, rows, ok, cv, Dv, Dv, 1).to(DT)
            dW -= tl.dot(dud, tl.trans(hs), input_precision=PREC, out_dtype=ACC)
        dQb = tl.dot(do, tl.trans(hs), dQb, input_precision=PREC, out_dtype=ACC)
        dKh = tl.dot(u, tl.trans(dhs), dKh, input_precision=PREC, out_dtype=ACC)
        dA = tl.dot(do, tl.trans(u), dA, input_precision=PREC, out_dtype=ACC)
        dSC += tl.sum(hs.to(ACC) * dhs.to(ACC), 1)
    if DELTA:
        store_tile(DW, srow * Dk, rows, ok, cols, Dk, Dk, 1, dW)
    # q, k and the gates only now: the Dv loop keeps just its accumulators live
    qq, rq = load_qk(Q, b.to(tl.int64) * sq_b + (h // QK_DIV).to(tl.int64) * sq_h, rows, ok, cols, Dk, sq_t, sq_d,
                     L2, ACC)
    qs = qq * scale
    kk, rk = load_qk(K, b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h, rows, ok, cols, Dk, sk_t, sk_d,
                     L2, ACC)
    goff = b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h
    g, bb, rb, bC = chunk_gates(Gp, goff, rows, ok, cols, Dk, sg_t, sg_d, GATE, ACC)
    dA = tl.where(rr[:, None] >= rr[None, :], dA, 0.0)
    da, dc, dbg = gram_bwd(dA, qs, kk, g, bb, False, GATE, C, LOG2C, BK, ACC, DT, PREC)
    eb = tl.exp(bb)
    dqs = row_scale(dQb, eb, GATE) + da
    store_tile(DQ, srow * Dk, rows, ok, cols, Dk, Dk, 1, l2norm_bwd(dqs * scale, qq, rq, L2))
    if GATE > 0:
        dbb = row_scale(qs, eb, GATE) * dQb
    er = tl.exp(rb)
    kh = row_scale(kk, er, GATE)
    dk = dc + row_scale(dKh, er, GATE)
    if GATE > 0:
        dbb = dbb - kh * dKh
        dbC = tl.sum(kh * dKh, 0) + tl.exp(bC) * dSC  # [BK]
        if GATE == 1:
            dbt = tl.sum(dbb, 1) + dbg
            dbC = tl.sum(dbC, 0)
        else:
            dbt = dbb + dbg
        if DELTA:  # d b_C on the chunk's last token: the reverse cumsum (wy_bwd) spreads it over the chunk
            last = rows == (tl.minimum(eos, t0 + C) - 1)
            if GATE == 1:
                dbt += tl.where(last, dbC, 0.0)
                tl.store(DG + (srow + rows), dbt, mask=ok)
            else:
                dbt += tl.where(last[:, None], dbC[None, :], 0.0)
                store_tile(DG, srow * Dk, rows, ok, cols, Dk, Dk, 1, dbt)
        else:
            if GATE == 1:
                tl.store(DG + (srow + rows), tl.cumsum(dbt, 0, reverse=True) + dbC, mask=ok)
            else:
                store_tile(DG, srow * Dk, rows, ok, cols, Dk, Dk, 1, tl.cumsum(dbt, 0, reverse=True) + dbC[None, :])
    if DELTA:
        store_tile(DK, srow * Dk, rows, ok, cols, Dk, Dk, 1, dk)
    else:
        store_tile(DK, srow * Dk, rows, ok, cols, Dk, Dk, 1, l2norm_bwd(dk, kk, rk, L2))


@triton.jit
def chunk_wy_bwd_kernel(K, V, Gp, BETA, TI, W, U0, DU, DW, DK, DV, DG, DBETA, CHUNKS, DOCS,
                        sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sg_b, sg_h, sg_t, sg_d, sbe_b, sbe_h, sbe_t,
                        T, NT, H, QK_DIV, V_DIV, Dk, Dv,
                        C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                        L2: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr,
                        PREC: tl.constexpr):
    """The UT transform's backward (delta rules) and the final dk, dg: with ``dU₀ = dU`` and dW,

        dX_v = Tᵀ dU,  dX_k = Tᵀ dW,  dM = −(dX_v U₀ᵀ + dX_k Wᵀ) (strictly lower),  dV = β dX_v,
        dβ = Σ dX_v⊙V + Σ dX_k⊙K̄ + Σ_s dM⊙Ā,  dK̄ = β dX_k,  dĀ = β dM

    then dk (+ the partial from :func:`chunk_grad_kernel`, through the L2 norm) and ``dg_u = Σ_{t ≥ u} d b_t``."""
    b, h, t0, eos, gi = chunk_coords(tl.program_id(0), tl.program_id(1), CHUNKS, DOCS, T, NT, H, C, VARLEN)
    rows = t0 + tl.arange(0, C)
    ok = rows < eos
    cols = tl.arange(0, BK)
    rr = tl.arange(0, C)
    srow = (b * H + h).to(tl.int64) * T
    beta = tl.load(BETA + b.to(tl.int64) * sbe_b + h.to(tl.int64) * sbe_h + rows.to(tl.int64) * sbe_t, mask=ok,
                   other=0.0).to(ACC)
    TdT = tl.trans(load_tile(TI, srow * C, rows, ok, rr, C, C, 1).to(DT))
    voff = b.to(tl.int64) * sv_b + (h // V_DIV).to(tl.int64) * sv_h
    dM = tl.zeros([C, C], dtype=ACC)
    dbeta = tl.zeros([C], dtype=ACC)
    for iv in range(tl.cdiv(Dv, BV)):
        cv = iv * BV + tl.arange(0, BV)
        dxv = tl.dot(TdT, load_tile(DU, srow * Dv, rows, ok, cv, Dv, Dv, 1).to(DT), input_precision=PREC,
                     out_dtype=ACC)
        store_tile(DV, srow * Dv, rows, ok, cv, Dv, Dv, 1, dxv * beta[:, None])
        dbeta += tl.sum(dxv * load_tile(V, voff, rows, ok, cv, Dv, sv_t, sv_d).to(ACC), 1)
        u0 = load_tile(U0, srow * Dv, rows, ok, cv, Dv, Dv, 1).to(DT)
        dM -= tl.dot(dxv.to(DT), tl.trans(u0), input_precision=PREC, out_dtype=ACC)
    dxk = tl.dot(TdT, load_tile(DW, srow * Dk, rows, ok, cols, Dk, Dk, 1).to(DT), input_precision=PREC,
                 out_dtype=ACC)
    w = load_tile(W, srow * Dk, rows, ok, cols, Dk, Dk, 1).to(DT)
    dM -= tl.dot(dxk.to(DT), tl.trans(w), input_precision=PREC, out_dtype=ACC)
    dM = tl.where(rr[:, None] > rr[None, :], dM, 0.0)
    kk, rk = load_qk(K, b.to(tl.int64) * sk_b + (h // QK_DIV).to(tl.int64) * sk_h, rows, ok, cols, Dk, sk_t, sk_d,
                     L2, ACC)
    g, bb, rb, bC = chunk_gates(Gp, b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h, rows, ok, cols, Dk, sg_t, sg_d,
                                GATE, ACC)
    kb = row_scale(kk, tl.exp(bb), GATE)
    dbeta += tl.sum(dxk * kb, 1)
    dkb = dxk * beta[:, None]
    # Ā's gram with dĀ = Diag(β) dM, called with a = β ⊙ k: da is then Σ_s dM[t,s] k_s e^{…} (so that
    # Σ_d k ⊙ da = Σ_s dM ⊙ Ā, β's share), the row side of dk is β ⊙ da, dc and db are those of dĀ
    da, dc, dbg = gram_bwd(dM, kk * beta[:, None], kk, g, bb, True, GATE, C, LOG2C, BK, ACC, DT, PREC)
    dbeta += tl.sum(kk * da, 1)
    tl.store(DBETA + (srow + rows), dbeta, mask=ok)
    dk = load_tile(DK, srow * Dk, rows, ok, cols, Dk, Dk, 1) + row_scale(dkb, tl.exp(bb), GATE) \
        + da * beta[:, None] + dc
    store_tile(DK, srow * Dk, rows, ok, cols, Dk, Dk, 1, l2norm_bwd(dk, kk, rk, L2))
    if GATE == 1:
        dbt = tl.load(DG + (srow + rows), mask=ok, other=0.0) + tl.sum(kb * dkb, 1) + dbg
        tl.store(DG + (srow + rows), tl.cumsum(dbt, 0, reverse=True), mask=ok)
    elif GATE == 2:
        dbt = load_tile(DG, srow * Dk, rows, ok, cols, Dk, Dk, 1) + kb * dkb + dbg
        store_tile(DG, srow * Dk, rows, ok, cols, Dk, Dk, 1, tl.cumsum(dbt, 0, reverse=True))


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    """Chunk length and Dv tiles (per kernel) with their warps."""

    C: int
    bv_state: int
    bv_out: int
    bv_grad: int
    warps_state: int = 8
    warps_out: int = 8
    warps_grad: int = 8
    warps_wy: int = 8
    stages: int = 2


def tiles(Dk: int, Dv: int, dtype: torch.dtype, chunk_size: Optional[int], n_seq_heads: int = 1 << 30) -> Tiles:
    """Interpreter: 16-token chunks and 16-wide Dv tiles (every tile loop runs more than once in the tests).
    GPU: 64-token chunks (the issue's design point); the sequential kernels (state, dh) take Dv tiles of 64, or 32
    when documents × heads leave fewer than ~2 programs per SM of a 132-SM GPU (B = 1, H = 16 at T = 16k);
    the parallel kernels the whole Dv (≤ 128) for the output, 64 for the gradient; float32 inputs half those
    tiles and one pipeline stage (sm_90's 227 KiB of shared memory)."""
    if interpreting():
        C = chunk_size or 16
        return Tiles(C, 16, 16, 16)
    C = chunk_size or 64
    bv_state = min(pow2(Dv), 64 if n_seq_heads * -(-Dv // 64) >= 256 else 32)
    if dtype.itemsize >= 4:  # float32 tiles: the output kernel's 128-wide Dv tile needs 288 KiB of shared memory
        return Tiles(C, bv_state, min(pow2(Dv), 64 if Dk <= 128 else 32), min(pow2(Dv), 32), stages=1)
    return Tiles(C, bv_state, min(pow2(Dv), 128 if Dk <= 128 else 64), min(pow2(Dv), 64))


@dataclass
class Problem:
    """Shapes, switches and varlen tables of one call (what the kernels need besides tensors)."""

    B: int
    H: int
    T: int
    Dk: int
    Dv: int
    qk_div: int
    v_div: int
    gate: int
    delta: bool
    l2: bool
    scale: float
    tiles: Tiles
    n_seq: int  # documents (varlen) or batch rows
    nch: int  # chunks over all documents
    nt: int  # chunks per row (equal-length batch)
    docs: Optional[Tensor]
    chunks: Optional[Tensor]
    choff: Optional[Tensor]
    dtype: torch.dtype

    @property
    def varlen(self) -> bool:
        return self.docs is not None

    def consts(self):
        acc, dt, prec, iprec = precisions(self.dtype)
        C = self.tiles.C
        return dict(C=C, LOG2C=int(math.log2(C)), BK=pow2(self.Dk), GATE=self.gate, L2=self.l2,
                    VARLEN=self.varlen, ACC=acc, DT=dt, PREC=prec), iprec

    def seq_consts(self):
        """The constexprs of the sequential kernels (no gram: no LOG2C)."""
        cx, _ = self.consts()
        cx.pop("LOG2C")
        return cx

    @property
    def grid_c(self):
        """Chunk programs: (chunks per row, B·H), or (all chunks, H) for packed documents."""
        return (self.nch if self.varlen else self.nt, self.B * self.H)

    @property
    def grid_s(self):
        """Sequential programs: (Dv tiles, documents·H)."""
        return (-(-self.Dv // self.tiles.bv_state), self.n_seq * self.H)

    def tables(self, dev):
        if self.varlen:
            return self.docs, self.chunks, self.choff
        z = torch.zeros(2, dtype=torch.int32, device=dev)
        return z, z, z


def _st(t: Optional[Tensor], n: int):
    """Strides of a tensor (zeros for an absent one), padded to ``n`` entries."""
    if t is None:
        return (0,) * n
    s = tuple(t.stride())
    return s + (0,) * (n - len(s))


def _launch_states(p: Problem, q, k, v, g, beta, h0, keep_t: bool, want_ht: bool):
    """wy (delta rules) and state: every chunk's start state HS, the delta rules' W, U₀, U (and T when
    ``keep_t``), the final state when ``want_ht``."""
    dev = q.device
    cx, iprec = p.consts()
    tb = p.tiles
    acc_t = torch.float64 if p.dtype == torch.float64 else torch.float32
    docs, chunks, choff = p.tables(dev)
    B, H, T, Dk, Dv = p.B, p.H, p.T, p.Dk, p.Dv
    gt = g if g is not None else q
    sc = dict(W=None, U0=None, UN=None, TI=None)
    if p.delta:
        sc["W"] = torch.empty(B, H, T, Dk, device=dev, dtype=q.dtype)
        sc["U0"] = torch.empty(B, H, T, Dv, device=dev, dtype=q.dtype)
        sc["UN"] = torch.empty(B, H, T, Dv, device=dev, dtype=q.dtype)
        if keep_t:
            sc["TI"] = torch.empty(B, H, T, tb.C, device=dev, dtype=acc_t)
        chunk_wy_kernel[p.grid_c](k, v, gt, beta, sc["W"], sc["U0"], _or(sc["TI"], q), chunks, docs,
                                  *_st(k, 4), *_st(v, 4), *_st(g, 4), *_st(beta, 3),
                                  T, p.nt, H, p.qk_div, p.v_div, Dk, Dv, BV=tb.bv_out, STORE_T=keep_t, IPREC=iprec,
                                  num_warps=tb.warps_wy, **cx)
    sc["HS"] = torch.empty(p.nch, H, Dk, Dv, device=dev, dtype=q.dtype)
    sc["ht"] = torch.empty(p.n_seq, H, Dk, Dv, device=dev, dtype=acc_t) if want_ht else None
    if _POISON and want_ht:
        sc["ht"].fill_(float("nan"))
    chunk_state_kernel[p.grid_s](k, v, gt, _or(sc["W"], q), _or(sc["U0"], q), _or(h0, q), sc["HS"],
                                 _or(sc["UN"], q), _or(sc["ht"], q), docs, choff,
                                 *_st(k, 4), *_st(v, 4), *_st(g, 4), T, p.nt, H, p.qk_div, p.v_div, Dk, Dv,
                                 BV=tb.bv_state, DELTA=p.delta, HAS_H0=h0 is not None, STORE_HT=want_ht,
                                 num_warps=tb.warps_state, num_stages=tb.stages, **p.seq_consts())
    return sc


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    """A kernel argument that its constexpr switches leave unread."""
    return dummy if t is None else t


def _forward(p: Problem, q, k, v, g, beta, h0, want_ht: bool, out_dtype):
    """wy, state, out: ``(o, final state or None)``."""
    cx, _ = p.consts()
    docs, chunks, _ = p.tables(q.device)
    sc = _launch_states(p, q, k, v, g, beta, h0, keep_t=False, want_ht=want_ht)
    o = torch.empty(p.B, p.H, p.T, p.Dv, device=q.device, dtype=out_dtype)
    if _POISON:
        o.fill_(float("nan"))
    U, u_div = (sc["UN"], 1) if p.delta else (v, p.v_div)
    chunk_out_kernel[p.grid_c](q, k, _or(g, q), U, sc["HS"], q, o, chunks, docs,
                               *_st(q, 4), *_st(k, 4), *_st(g, 4), *_st(U, 4), *_st(None, 4),
                               p.T, p.nt, p.H, p.qk_div, u_div, p.Dk, p.Dv, p.scale, MODE=0, BV=p.tiles.bv_out,
                               num_warps=p.tiles.warps_out, num_stages=p.tiles.stages, **cx)
    return o, sc["ht"]


def _backward(p: Problem, q, k, v, g, beta, h0, do, dht, need_dh0: bool):
    """Recompute wy + state, then out (MODE 1, delta rules), dh, grad. Per-state-head gradients (fp32)."""
    dev = q.device
    cx, _ = p.consts()
    tb = p.tiles
    acc_t = torch.float64 if p.dtype == torch.float64 else torch.float32
    docs, chunks, choff = p.tables(dev)
    B, H, T, Dk, Dv = p.B, p.H, p.T, p.Dk, p.Dv
    gt = _or(g, q)
    sc = _launch_states(p, q, k, v, g, beta, h0, keep_t=True, want_ht=False)
    DU = torch.empty(B, H, T, Dv, device=dev, dtype=acc_t)  # the delta rules' dU; the additive rules' dV
    if p.delta:
        chunk_out_kernel[p.grid_c](q, k, gt, q, q, do, DU, chunks, docs,
                                   *_st(q, 4), *_st(k, 4), *_st(g, 4), *_st(None, 4), *_st(do, 4),
                                   T, p.nt, H, p.qk_div, 1, Dk, Dv, p.scale, MODE=1, BV=tb.bv_out,
                                   num_warps=tb.warps_out, num_stages=tb.stages, **cx)
    elif _POISON:
        DU.fill_(float("nan"))
    DHS = torch.empty(p.nch, H, Dk, Dv, device=dev, dtype=q.dtype)
    dh0 = torch.empty(p.n_seq, H, Dk, Dv, device=dev, dtype=acc_t) if need_dh0 else None
    if _POISON and dh0 is not None:
        dh0.fill_(float("nan"))
    chunk_dh_kernel[p.grid_s](q, k, gt, _or(sc["W"], q), do, _or(DU, q), _or(dht, q), DHS, _or(dh0, q), docs, choff,
                              *_st(q, 4), *_st(k, 4), *_st(g, 4), *_st(do, 4), T, p.nt, H, p.qk_div, Dk, Dv, p.scale,
                              BV=tb.bv_state, DELTA=p.delta, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
                              num_warps=tb.warps_state, num_stages=tb.stages, **p.seq_consts())
    if not p.delta:
        chunk_out_kernel[p.grid_c](q, k, gt, q, DHS, do, DU, chunks, docs,
                                   *_st(q, 4), *_st(k, 4), *_st(g, 4), *_st(None, 4), *_st(do, 4),
                                   T, p.nt, H, p.qk_div, 1, Dk, Dv, p.scale, MODE=2, BV=tb.bv_out,
                                   num_warps=tb.warps_out, num_stages=tb.stages, **cx)
    dq = torch.empty(B, H, T, Dk, device=dev, dtype=acc_t)
    dk = torch.empty(B, H, T, Dk, device=dev, dtype=acc_t)
    dv = torch.empty(B, H, T, Dv, device=dev, dtype=acc_t) if p.delta else DU
    dg = None
    if p.gate == GATE_SCALAR:
        dg = torch.empty(B, H, T, device=dev, dtype=acc_t)
    elif p.gate == GATE_CHANNEL:
        dg = torch.empty(B, H, T, Dk, device=dev, dtype=acc_t)
    dbeta = torch.empty(B, H, T, device=dev, dtype=acc_t) if p.delta else None
    dW = torch.empty(B, H, T, Dk, device=dev, dtype=acc_t) if p.delta else None
    if _POISON:
        for t in (dq, dk, dg, dbeta, dW) + ((dv,) if p.delta else ()):
            if t is not None:
                t.fill_(float("nan"))
    U, u_div = (sc["UN"], 1) if p.delta else (v, p.v_div)
    chunk_grad_kernel[p.grid_c](q, k, U, gt, sc["HS"], DHS, DU, do, dq, dk, _or(dg, dq), _or(dW, dq), chunks, docs,
                                *_st(q, 4), *_st(k, 4), *_st(U, 4), *_st(g, 4), *_st(do, 4),
                                T, p.nt, H, p.qk_div, u_div, Dk, Dv, p.scale, BV=tb.bv_grad, DELTA=p.delta,
                                num_warps=tb.warps_grad, num_stages=1, **cx)
    if p.delta:
        chunk_wy_bwd_kernel[p.grid_c](k, v, gt, beta, sc["TI"], sc["W"], sc["U0"], DU, dW, dk, dv, _or(dg, dq),
                                      dbeta, chunks, docs, *_st(k, 4), *_st(v, 4), *_st(g, 4), *_st(beta, 3),
                                      T, p.nt, H, p.qk_div, p.v_div, Dk, Dv, BV=tb.bv_grad,
                                      num_warps=tb.warps_grad, num_stages=1,
                                      **{k_: v_ for k_, v_ in cx.items()})
    return dq, dk, dv, dg, dbeta, dh0


#: fill outputs with NaN before the kernels write them (tests: every element must be written)
_POISON = False


class _ChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, p: Problem, want_ht: bool, out_dtype):
        o, ht = _forward(p, q, k, v, g, beta, h0, want_ht, out_dtype)
        ctx.p = p
        ctx.save_for_backward(q, k, v, g, beta, h0)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        p: Problem = ctx.p
        dht = None if dht is None else dht.contiguous()  # the kernels read dht densely (a sum's gradient is expanded)
        need = ctx.needs_input_grad
        dq, dk, dv, dg, dbeta, dh0 = _backward(p, q, k, v, g, beta, h0, do, dht, need_dh0=h0 is not None and need[5])
        B, H, T = p.B, p.H, p.T
        if p.qk_div > 1:
            dq = dq.view(B, H // p.qk_div, p.qk_div, T, p.Dk).sum(2)
            dk = dk.view(B, H // p.qk_div, p.qk_div, T, p.Dk).sum(2)
        if p.v_div > 1:
            dv = dv.view(B, H // p.v_div, p.v_div, T, p.Dv).sum(2)
        cast = lambda d, x: None if d is None or x is None else d.to(x.dtype)  # noqa: E731
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dg, g), cast(dbeta, beta), cast(dh0, h0),
                None, None, None)


def _check(name: str, t, shape, dev, dtype=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != dev:
        raise ValueError(f"{name} must be on {dev}, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_device(q: Tensor) -> None:
    """CUDA tensors, or CPU tensors under Triton's interpreter (where bfloat16 products are not supported)."""
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            raise TypeError("the Triton linear kernels take float16, bfloat16 or float32 on CUDA (float64 only under "
                            "TRITON_INTERPRET=1); got float64")
        return
    if not interpreting():
        raise ValueError(f"the Triton linear kernels need CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU "
                         f"interpreter), got device {q.device}")
    if q.dtype == torch.bfloat16:
        raise TypeError("bfloat16 is not supported under Triton's CPU interpreter (TRITON_INTERPRET=1); use float16, "
                        "float32 or float64 there")


def prepare(q: Tensor, k: Tensor, v: Tensor, gate, beta, delta: bool, scale, initial_state, cu_seqlens,
            qk_l2norm: bool, chunk_size: Optional[int], tiles_fn=None, extra_v: int = 0):
    """Validate the canonical tensors and build the :class:`Problem` (shared by chunk and fused_recurrent).

    Returns ``(problem, g)`` where ``g`` is the gate as the kernels read it (a fixed per-head decay ``[H]`` is
    expanded to ``[B, H, T]`` without a copy)."""
    for name, t, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if not isinstance(t, Tensor) or t.dim() != nd:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {got}")
    if q.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q must be float64/float32/bfloat16/float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_device(q)
    dev = q.device
    B, Hk, T, Dk = q.shape
    Hv, Dv = v.shape[1], v.shape[3] + extra_v
    _check("k", k, q.shape, dev)
    if v.shape[0] != B or v.shape[2] != T or v.device != dev:
        raise ValueError(f"v must be [B={B}, Hv, T={T}, Dv] on {dev}, got {tuple(v.shape)} on {v.device}")
    if min(B, Hk, T, Dk, Hv, Dv) == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} or v {tuple(v.shape)}")
    H = max(Hk, Hv)
    if H % Hk or H % Hv:
        raise ValueError(f"q/k heads ({Hk}) and v heads ({Hv}) must divide one another")
    if Dk > 256:
        raise ValueError(f"the Triton linear kernels hold a key row in registers: Dk <= 256, got {Dk}")
    if Dv > 1024:
        raise ValueError(f"Dv must be <= 1024, got {Dv}")
    if gate is None:
        kind, g = GATE_NONE, None
    elif not isinstance(gate, Tensor):
        raise TypeError(f"gate must be a tensor ([H], [B, H, T] or [B, H, T, Dk]) or None, got {type(gate).__name__}")
    elif gate.dim() == 1:
        _check("gate", gate, (H,), dev)
        kind, g = GATE_SCALAR, gate[None, :, None].expand(B, H, T)
    elif gate.dim() == 3:
        kind, g = GATE_SCALAR, _check("gate", gate, (B, H, T), dev)
    elif gate.dim() == 4:
        kind, g = GATE_CHANNEL, _check("gate", gate, (B, H, T, Dk), dev)
    else:
        raise ValueError(f"gate must be [H], [B, H, T] or [B, H, T, Dk] (log decays), got {tuple(gate.shape)}")
    if delta:
        if beta is None:
            raise ValueError("delta rules need beta [B, H, T]")
        _check("beta", beta, (B, H, T), dev)
    elif beta is not None:
        raise ValueError("beta belongs to the delta rules (delta=True)")
    if scale is None:
        scale = Dk ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    if chunk_size is not None and chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size of the Triton kernels must be 16, 32 or 64, got {chunk_size!r}")
    cu = None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
                or cu_seqlens.dtype == torch.bool:
            raise TypeError("cu_seqlens must be a 1-D integer tensor [N + 1]")
        cu = [int(x) for x in cu_seqlens.tolist()]
        if B != 1:
            raise ValueError(f"cu_seqlens needs the documents packed into batch 1, got batch {B}")
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b_ < a_ for a_, b_ in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, end at T={T} and not decrease, got {cu}")
    tb = (tiles_fn or tiles)(Dk, Dv, q.dtype, chunk_size, (B if cu is None else len(cu) - 1) * H)
    if cu is not None:
        docs, chunks, choff, nch = varlen_tables(cu, tb.C, dev)
        n_seq, nt = len(cu) - 1, 0
    else:
        docs = chunks = choff = None
        nt = -(-T // tb.C)
        n_seq, nch = B, B * nt
    if initial_state is not None:
        _check("initial_state", initial_state, (n_seq, H, Dk, Dv), dev)
    p = Problem(B, H, T, Dk, Dv, H // Hk, H // Hv, kind, bool(delta), bool(qk_l2norm), float(scale), tb, n_seq,
                nch, nt, docs, chunks, choff, q.dtype)
    return p, g


def chunk(q: Tensor, k: Tensor, v: Tensor, *, gate: Optional[Tensor] = None, beta: Optional[Tensor] = None,
          delta: bool = False, scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
          output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None, qk_l2norm: bool = False,
          normalize: bool = False, chunk_size: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunkwise-parallel linear attention of any additive or delta rule, forward and backward (autograd).

    Args:
        q, k: ``[B, Hk, T, Dk]`` (feature map already applied; any strides, e.g. a ``bthd`` tensor transposed).
        v: ``[B, Hv, T, Dv]``; the state has ``H = max(Hk, Hv)`` heads, head h reading q/k head ``h // (H/Hk)``
            and v head ``h // (H/Hv)``.
        gate: log decays ≤ 0 (validated by the caller): None; ``[H]`` (retention / lightning); ``[B, H, T]``
            (scalar: Mamba-2, Gated DeltaNet); ``[B, H, T, Dk]`` (per channel: GLA, HGRN2, KDA).
        beta: ``[B, H, T]`` write strengths of the delta rules (``delta=True``).
        delta: the delta rule ``S_t = (I − β k kᵀ) Diag(α_t) S_{t−1} + β k vᵀ`` (decay first, as KDA; equal to
            Gated DeltaNet for a scalar gate) instead of ``S_t = Diag(α_t) S_{t−1} + k vᵀ``.
        scale: multiplies q inside the kernels, after ``qk_l2norm`` (default ``Dk ** -0.5``).
        initial_state: ``[N, H, Dk, Dv]`` (``Dv + 1`` with normalize; N = B, or the documents of cu_seqlens).
        output_final_state: also return the state after the last token (fp32; float64 for float64 inputs).
        cu_seqlens: ``[N + 1]`` offsets of documents packed in batch 1 (empty documents allowed).
        qk_l2norm: L2-normalize the rows of q and k inside the kernels.
        normalize: additive rules with a positive feature map: ``o = qᵀS / (qᵀz + 1e-6)`` where z is the state's
            last column (the reference's ones column of v).
        chunk_size: 16, 32 or 64 (default 64 on CUDA, 16 in the interpreter).

    Returns ``(o [B, H, T, Dv] in q's dtype, final state or None)``.
    """
    if normalize:
        if delta:
            raise ValueError("normalize=True belongs to the additive rules (delta=False)")
        ones = torch.ones_like(v[..., :1])
        v = torch.cat([v, ones], -1)
    p, g = prepare(q, k, v, gate, beta, delta, scale, initial_state, cu_seqlens, qk_l2norm, chunk_size)
    h0 = None if initial_state is None else initial_state.contiguous()
    out_dtype = torch.float32 if normalize and q.dtype != torch.float64 else q.dtype
    o, ht = _ChunkFn.apply(q, k, v, g, beta, h0, p, bool(output_final_state), out_dtype)
    if normalize:
        o = (o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)).to(q.dtype)
    return o, (ht if output_final_state else None)
