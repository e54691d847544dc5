"""Backward kernels: recompute the scores tile by tile (no Lq×Lk tensor), deterministic by construction.

* :func:`attn_bwd_pre`: ``delta_i = (1 − γ)·Σ_d dO_id · O_id − dlse_i`` (``O`` is the softmax part for
  relaxed softmax).
* :func:`attn_bwd`, dK/dV programs: one per (key block, batch, KV head) accumulates dK and dV in
  registers over the query heads of its group (GQA without repeating K/V) and the non-empty query blocks
  of the transposed block map; tiles are computed transposed, ``[BN, BM]``.
* :func:`attn_bwd`, dQ programs: one per (query block, batch, query head) accumulates dQ over its
  non-empty key blocks, and the per-program partial sums of learnable score-mod / normalizer parameters
  (summed on the host in a fixed order: no atomics anywhere).
  Both kinds of program run in one launch (``PHASE = 2``, as FlexAttention's backward does), or each
  in a launch of its own (``PHASE = 0`` / ``1``) when their tile choices need different warps or stages.

Gradients, with ``s`` the score after the mods and ``g = dL/ds``:
softmax family ``g = p ⊙ ((1 − γ)·dP − delta)``, ``p = exp(s − lse)``; elementwise ``g = dP ⊙ f'(s) / n``;
then ``g`` flows back through the mod slots, and ``dQ = scale·g·K``, ``dK = scale·gᵀ·Q``,
``dV = wᵀ·dO`` with ``w`` the weights of the forward.

Non-finite values (see :mod:`.fwd`): FULL blocks are unchanged (every pair is visible). In PARTIAL blocks ``w``,
``g`` and the per-element parameter gradients are selected to 0 at hidden pairs (the recomputed scores, dP and
the mods' derivatives may be non-finite there), and the three products that contract over pairs (dV = wᵀ·dO,
dK = gᵀ·Q, dQ = g·K) go through :func:`.mods.dot_visible`, so a non-finite dO / q row or k row reaches only the
gradients of the pairs that see it.
"""
import triton
import triton.language as tl

from .mods import (LOG2E, MODE_BITMAP, N_SOFTMAX, S_RELBIAS, dot_visible, load_rows, load_tile, mask_tile, mods_chain,
                   nth_block, norm_weight, relbias_bucket_sums, row_counts, row_softmax_stats, score_mod_bwd)


@triton.jit
def _row_dot(o, do):
    """``Σ_d o·dO`` per row; 0 for a row whose ``o`` is exactly zero (NaN in ``o`` is not zero)."""
    zero = tl.max(tl.where(o == 0.0, 0, 1), 1) == 0
    return tl.where(zero, 0.0, tl.sum(o * do, 1))


@triton.jit
def attn_bwd_pre(O, OS, DO, DLSE, DELTA, LAM, Lq, DV, scale_o, stride_dob, stride_doh, stride_dom, stride_dod, HQ,
                 HAS_DLSE: tl.constexpr, DIFF: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                 BDV: tl.constexpr):
    """``DIFF``: ``O = O1 − λ·O2`` and ``OS = O2``; writes map 1's ``delta = Σ dO·O1 = Σ dO·(O + λ·O2)`` at
    ``DELTA[row]`` and ``Σ dO·O2`` at ``DELTA[B·HQ·Lq + row]`` (map 2's delta is −λ times it; its sum over rows
    is −dL/dλ). A row whose output is exactly zero (a row without a visible key, in particular) adds nothing,
    whatever its dO (a non-finite dO row that sees no key reaches neither a sink logit's gradient nor λ's)."""
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = i * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BDV)
    row_ok = offs_m < Lq
    msk = row_ok[:, None] & (offs_d < DV)[None, :]
    row = pid_bh.to(tl.int64) * Lq + offs_m
    o = tl.load(O + row[:, None] * DV + offs_d[None, :], mask=msk, other=0.0).to(ACC)
    do = load_rows(DO, pid_bh // HQ, pid_bh % HQ, offs_m, offs_d, stride_dob, stride_doh, stride_dom, stride_dod,
                   Lq, DV).to(ACC)
    delta = _row_dot(o, do) * scale_o
    if DIFF:
        o2 = tl.load(OS + row[:, None] * DV + offs_d[None, :], mask=msk, other=0.0).to(ACC)
        d2 = _row_dot(o2, do)
        delta += tl.load(LAM + pid_bh % HQ).to(ACC) * d2
        tl.store(DELTA + tl.num_programs(1).to(tl.int64) * Lq + row, d2, mask=row_ok)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=row_ok, other=0.0).to(ACC)
    tl.store(DELTA + row, delta, mask=row_ok)


@triton.jit
def _bwd_weights(qk, qrow, qpos, kidx, kpos, b, h, lse2, logn, inv_n, nbias, tile,
                 MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, scale,
                 MASKED: tl.constexpr, MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr,
                 MASK_TT: tl.constexpr, MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr,
                 PW2: tl.constexpr, PW3: tl.constexpr, NORM: tl.constexpr, RELAXED: tl.constexpr,
                 FAST_TANH: tl.constexpr):
    """First half of a recomputed tile (either orientation): ``(w, dw, s0..s4, vis)``.

    ``w``: the forward's weights (they multiply dO for dV); ``dw``: ``p`` for the softmax family, ``f'(s)/n``
    for elementwise normalizers; ``s0..s4``: the score before and after each mod slot; ``vis``: the mask."""
    s0 = qk * scale
    s1, s2, s3, s4 = mods_chain(s0, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF, MODS, PW0, PW1, PW2, PW3,
                                FAST_TANH)
    vis = True
    if MASKED:
        vis = mask_tile(qrow, qpos, kidx, kpos, b, Lq, Lk, MASKP, MASKD, BITS, tile, MASK_MODE, MASK_LEAVES, N_LEAVES,
                        MASK_TT)
    if NORM == N_SOFTMAX:
        if MODS == 0:
            p = tl.math.exp2(qk * (scale * LOG2E) - lse2)
        else:
            p = tl.math.exp2(s4 * LOG2E - lse2)
        if MASKED:
            p = tl.where(vis, p, 0.0)
        w = p
        if RELAXED:
            w = p * (1.0 - GAMMA)
            if MASKED:
                w += tl.where(vis, GAMMA * inv_n, 0.0)
            else:
                w += GAMMA * inv_n
        dw = p
    else:
        w, dw = norm_weight(s4, nbias, NORM)
        w = w * inv_n
        dw = dw * inv_n
        if MASKED:
            w = tl.where(vis, w, 0.0)
            dw = tl.where(vis, dw, 0.0)
    return w, dw, s0, s1, s2, s3, s4, vis


@triton.jit
def _bwd_grads(dp, dw, s0, s1, s2, s3, s4, vis, qpos, kpos, b, h, delta, logn, MODF, HQ, GAMMA,
               MASKED: tl.constexpr, MODS: tl.constexpr, DPW0: tl.constexpr, DPW1: tl.constexpr,
               DPW2: tl.constexpr, DPW3: tl.constexpr, NORM: tl.constexpr, RELAXED: tl.constexpr):
    """Second half: ``(g, d0, d1, d2, d3, gn)`` with ``g = dL/d(scale·q·k)``, ``d0..d3`` the per-element
    dL/dparam of each mod slot and ``gn`` dL/d(normalizer bias) per element."""
    if NORM == N_SOFTMAX:
        if RELAXED:
            g = dw * ((1.0 - GAMMA) * dp - delta)
        else:
            g = dw * (dp - delta)
    else:
        g = dp * dw
    gn = g
    g, d3 = score_mod_bwd(g, s3, s4, (MODS >> 12) & 15, 3, qpos, kpos, b, h, logn, MODF, HQ, DPW3)
    g, d2 = score_mod_bwd(g, s2, s3, (MODS >> 8) & 15, 2, qpos, kpos, b, h, logn, MODF, HQ, DPW2)
    g, d1 = score_mod_bwd(g, s1, s2, (MODS >> 4) & 15, 1, qpos, kpos, b, h, logn, MODF, HQ, DPW1)
    g, d0 = score_mod_bwd(g, s0, s1, MODS & 15, 0, qpos, kpos, b, h, logn, MODF, HQ, DPW0)
    if MASKED:  # hidden scores, dP and the mods' derivatives may be non-finite there: 0, by selects
        g = tl.where(vis, g, 0.0)
        d0 = tl.where(vis, d0, 0.0)  # the per-element parameter gradients are dead code unless PGRAD
        d1 = tl.where(vis, d1, 0.0)
        d2 = tl.where(vis, d2, 0.0)
        d3 = tl.where(vis, d3, 0.0)
        gn = tl.where(vis, gn, 0.0)
    return g, d0, d1, d2, d3, gn


@triton.jit
def _dkdv_block(dk, dv, dk2, k, k2, v, lam, Q, DO, LSE, DELTA, NROWS, CNT, cnt_base, qoff, dooff, start_m, k0, kidx,
                kpos, b, h, pid_bh, blut, offs_d, offs_dv, nbias, stride_qm, stride_qd, stride_dom, stride_dod,
                MASKP, MASKD, BITS, NK128, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, QOFF, D, DV, scale,
                MASKED: tl.constexpr, MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr,
                MASK_TT: tl.constexpr, MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr,
                PW2: tl.constexpr, PW3: tl.constexpr, DPW0: tl.constexpr, DPW1: tl.constexpr, DPW2: tl.constexpr,
                DPW3: tl.constexpr, NORM: tl.constexpr, RELAXED: tl.constexpr, DIFF: tl.constexpr,
                COUNTS: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                BM: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr):
    offs_m = start_m + tl.arange(0, BM)
    row_ok = offs_m < Lq
    qpos = offs_m + QOFF
    row = pid_bh.to(tl.int64) * Lq + offs_m
    qT = load_tile(Q + qoff + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd, row_ok[None, :],
                   (offs_d < D)[:, None], MASKED, not EVEN_D)
    do = load_tile(DO + dooff + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod, row_ok[:, None],
                   (offs_dv < DV)[None, :], MASKED, not EVEN_DV)
    lse2, delta = row_softmax_stats(LSE, DELTA, row, row_ok, NORM, ACC, BM)
    logn, inv_n = row_counts(CNT, cnt_base, offs_m, row_ok, COUNTS, ACC, BM)
    tile = 0
    if MASKED:
        if MASK_MODE == MODE_BITMAP:
            tile = tl.load(blut + (start_m // 128) * NK128 + k0 // 128)
    qkT = tl.dot(k, qT, input_precision=DOT_PREC, out_dtype=ACC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC, out_dtype=ACC)
    wT, dwT, s0, s1, s2, s3, s4, vis = _bwd_weights(
        qkT, offs_m[None, :], qpos[None, :], kidx[:, None], kpos[:, None], b, h, lse2[None, :], logn[None, :],
        inv_n[None, :],
        nbias, tile, MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, scale, MASKED, MASK_MODE,
        MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM, RELAXED, FAST_TANH)
    if DIFF:  # map 2: keys and queries from the upper halves; dV takes the weights A1 − λ·A2
        qT2 = load_tile(Q + qoff + D * stride_qd + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                        row_ok[None, :], (offs_d < D)[:, None], MASKED, not EVEN_D)
        lse2b, deltab = row_softmax_stats(LSE + NROWS, DELTA + NROWS, row, row_ok, NORM, ACC, BM)
        qkT2 = tl.dot(k2, qT2, input_precision=DOT_PREC, out_dtype=ACC)
        wT2, dwT2, t0, t1, t2, t3, t4, _ = _bwd_weights(
            qkT2, offs_m[None, :], qpos[None, :], kidx[:, None], kpos[:, None], b, h, lse2b[None, :], logn[None, :],
            inv_n[None, :], nbias, tile, MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, scale,
            MASKED, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM, RELAXED, FAST_TANH)
        wT = wT - lam * wT2
    dv = dot_visible(dv, wT, do, vis, MASKED, ACC, DOT_PREC, False)
    gT, _, _, _, _, _ = _bwd_grads(dpT, dwT, s0, s1, s2, s3, s4, vis, qpos[None, :], kpos[:, None], b, h,
                                   delta[None, :], logn[None, :], MODF, HQ, GAMMA, MASKED, MODS, DPW0, DPW1, DPW2,
                                   DPW3, NORM, RELAXED)
    dk = dot_visible(dk, gT, tl.trans(qT), vis, MASKED, ACC, DOT_PREC, False)
    if DIFF:  # map 2's dO is −λ·dO: its dP and delta are −λ times map 1's product and the stored sum
        gT2, _, _, _, _, _ = _bwd_grads(dpT * (-lam), dwT2, t0, t1, t2, t3, t4, vis, qpos[None, :], kpos[:, None],
                                        b, h, deltab[None, :] * (-lam), logn[None, :], MODF, HQ, GAMMA, MASKED, MODS,
                                        DPW0, DPW1, DPW2, DPW3, NORM, RELAXED)
        dk2 = dot_visible(dk2, gT2, tl.trans(qT2), vis, MASKED, ACC, DOT_PREC, False)
    return dk, dv, dk2


@triton.jit
def _param_sums(pacc, rbacc, d0, d1, d2, d3, gn, qpos, kpos, RBL, RB_OFF, MODS: tl.constexpr, NBP: tl.constexpr):
    """Add one tile's per-element parameter gradients: slot sums ``pacc[0:4]``, normalizer bias ``pacc[4]``, and
    the relative-bias slot's gradient reduced per bucket (``rbacc``)."""
    slots = tl.arange(0, 8)
    pacc += tl.where(slots == 0, tl.sum(tl.sum(d0, 1), 0), 0.0)
    pacc += tl.where(slots == 1, tl.sum(tl.sum(d1, 1), 0), 0.0)
    pacc += tl.where(slots == 2, tl.sum(tl.sum(d2, 1), 0), 0.0)
    pacc += tl.where(slots == 3, tl.sum(tl.sum(d3, 1), 0), 0.0)
    pacc += tl.where(slots == 4, tl.sum(tl.sum(gn, 1), 0), 0.0)
    if NBP > 1:
        if (MODS & 15) == S_RELBIAS:
            rbacc = relbias_bucket_sums(rbacc, d0, qpos, kpos, RBL, RB_OFF, NBP)
        if ((MODS >> 4) & 15) == S_RELBIAS:
            rbacc = relbias_bucket_sums(rbacc, d1, qpos, kpos, RBL, RB_OFF, NBP)
        if ((MODS >> 8) & 15) == S_RELBIAS:
            rbacc = relbias_bucket_sums(rbacc, d2, qpos, kpos, RBL, RB_OFF, NBP)
        if ((MODS >> 12) & 15) == S_RELBIAS:
            rbacc = relbias_bucket_sums(rbacc, d3, qpos, kpos, RBL, RB_OFF, NBP)
    return pacc, rbacc


@triton.jit
def _dq_block(dq, dq2, pacc, rbacc, q, q2, lam, do, lse2, delta, lse2b, deltab, logn, inv_n, kbase, vbase, start_n,
              q0, offs_m, qpos, b, h, blut, offs_d, offs_dv, nbias, stride_kn, stride_kd, stride_vn, stride_vd,
              MASKP, MASKD, BITS, NK128, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, KOFF, D, DV, scale,
              MASKED: tl.constexpr, MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr,
              MASK_TT: tl.constexpr, MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr,
              PW2: tl.constexpr, PW3: tl.constexpr, DPW0: tl.constexpr, DPW1: tl.constexpr, DPW2: tl.constexpr,
              DPW3: tl.constexpr, NORM: tl.constexpr, RELAXED: tl.constexpr, DIFF: tl.constexpr,
              FAST_TANH: tl.constexpr, PGRAD: tl.constexpr, NBP: tl.constexpr, ACC: tl.constexpr,
              DOT_PREC: tl.constexpr, BN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr):
    kidx = start_n + tl.arange(0, BN)
    kpos = kidx + KOFF
    col_ok = kidx < Lk
    kT = load_tile(kbase + kidx[None, :] * stride_kn + offs_d[:, None] * stride_kd, col_ok[None, :],
                   (offs_d < D)[:, None], MASKED, not EVEN_D)
    vT = load_tile(vbase + kidx[None, :] * stride_vn + offs_dv[:, None] * stride_vd, col_ok[None, :],
                   (offs_dv < DV)[:, None], MASKED, not EVEN_DV)
    tile = 0
    if MASKED:
        if MASK_MODE == MODE_BITMAP:
            tile = tl.load(blut + (q0 // 128) * NK128 + start_n // 128)
    qk = tl.dot(q, kT, input_precision=DOT_PREC, out_dtype=ACC)
    dp = tl.dot(do, vT, input_precision=DOT_PREC, out_dtype=ACC)
    _, dw, s0, s1, s2, s3, s4, vis = _bwd_weights(
        qk, offs_m[:, None], qpos[:, None], kidx[None, :], kpos[None, :], b, h, lse2[:, None], logn[:, None],
        inv_n[:, None],
        nbias, tile, MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, scale, MASKED, MASK_MODE,
        MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM, RELAXED, FAST_TANH)
    g, d0, d1, d2, d3, gn = _bwd_grads(dp, dw, s0, s1, s2, s3, s4, vis, qpos[:, None], kpos[None, :], b, h,
                                       delta[:, None], logn[:, None], MODF, HQ, GAMMA, MASKED, MODS, DPW0, DPW1,
                                       DPW2, DPW3, NORM, RELAXED)
    dq = dot_visible(dq, g, tl.trans(kT), vis, MASKED, ACC, DOT_PREC, False)
    if PGRAD:
        pacc, rbacc = _param_sums(pacc, rbacc, d0, d1, d2, d3, gn, qpos[:, None], kpos[None, :], RBL, RB_OFF, MODS,
                                  NBP)
    if DIFF:  # map 2 (upper halves of q and k; its dO is −λ·dO, see _dkdv_block)
        kT2 = load_tile(kbase + D * stride_kd + kidx[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        col_ok[None, :], (offs_d < D)[:, None], MASKED, not EVEN_D)
        qk2 = tl.dot(q2, kT2, input_precision=DOT_PREC, out_dtype=ACC)
        _, dw2, t0, t1, t2, t3, t4, _ = _bwd_weights(
            qk2, offs_m[:, None], qpos[:, None], kidx[None, :], kpos[None, :], b, h, lse2b[:, None], logn[:, None],
            inv_n[:, None], nbias, tile, MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, scale,
            MASKED, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM, RELAXED, FAST_TANH)
        g2, e0, e1, e2, e3, gn2 = _bwd_grads(dp * (-lam), dw2, t0, t1, t2, t3, t4, vis, qpos[:, None],
                                             kpos[None, :], b, h, deltab[:, None] * (-lam), logn[:, None], MODF, HQ,
                                             GAMMA, MASKED, MODS, DPW0, DPW1, DPW2, DPW3, NORM, RELAXED)
        dq2 = dot_visible(dq2, g2, tl.trans(kT2), vis, MASKED, ACC, DOT_PREC, False)
        if PGRAD:
            pacc, rbacc = _param_sums(pacc, rbacc, e0, e1, e2, e3, gn2, qpos[:, None], kpos[None, :], RBL, RB_OFF,
                                      MODS, NBP)
    return dq, dq2, pacc, rbacc


@triton.jit
def attn_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV_, PART, RBPART,
             stride_qb, stride_qh, stride_qm, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_dob, stride_doh, stride_dom, stride_dod,
             LCNT1, LIDX1, ls1_b, ls1_h, NLIST1,
             LCNT2, LIDX2, ls2_b, ls2_h, NLIST2,
             CNT, cs_b, cs_h, MASKP, MASKD, BITS, BLUT, bl_b, bl_h, NK128,
             MODF, RBT, RBL, RB_OFF, NORMF, LAM, GAMMA, HQ, G, Lq, Lk, QOFF, KOFF, D, DV, scale,
             MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr, MASK_TT: tl.constexpr,
             MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, PW3: tl.constexpr,
             DPW0: tl.constexpr, DPW1: tl.constexpr, DPW2: tl.constexpr, DPW3: tl.constexpr,
             NORM: tl.constexpr, HAS_SINK: tl.constexpr, RELAXED: tl.constexpr, DIFF: tl.constexpr,
             COUNTS: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
             PHASE: tl.constexpr, PGRAD: tl.constexpr, NBP: tl.constexpr,
             BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr,
             BD: tl.constexpr, BDV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr):
    """dK/dV programs (one per key block of ``BN1`` keys and KV head, ``BM1`` query rows a step, lists 1:
    the transposed block lists) and dQ programs (one per query block of ``BM2`` rows and query head, ``BN2`` keys
    a step, lists 2). Grid ``(n, B·HKV)``: ``PHASE = 0`` dK/dV only, ``n = cdiv(Lk, BN1)``; ``PHASE = 1`` dQ
    only, ``n = G·cdiv(Lq, BM2)``; ``PHASE = 2`` both in one launch, ``n = cdiv(Lk, BN1) + G·cdiv(Lq, BM2)``
    (dK/dV programs first). dQ programs also write ``PART[b·HQ + h, i, 0:8]`` / ``RBPART[b·HQ + h, i, :]``
    (``PGRAD``). ``DIFF``: both maps of differential attention (see ``attn_fwd``); dQ and dK rows hold ``2·D``
    values (map 1's gradient, then map 2's)."""
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    DQK = D  # row length of dQ and dK
    if DIFF:
        DQK = 2 * D
    pid0 = tl.program_id(0)
    pid = tl.program_id(1)
    HKV = HQ // G
    b = pid // HKV
    hk = pid % HKV
    NROWS = (tl.num_programs(1) * G).to(tl.int64) * Lq  # B·HQ·Lq: map 2's lse and delta follow map 1's
    NKV = 0
    if PHASE != 1:
        NKV = tl.cdiv(Lk, BN1)
    is_kv = PHASE == 0
    if PHASE == 2:
        is_kv = pid0 < NKV
    if is_kv:
        j = pid0
        kidx = j * BN1 + tl.arange(0, BN1)
        kpos = kidx + KOFF
        k = load_rows(K, b, hk, kidx, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, Lk, D)
        v = load_rows(V, b, hk, kidx, offs_dv, stride_vb, stride_vh, stride_vn, stride_vd, Lk, DV)
        dk = tl.zeros([BN1, BD], dtype=ACC)
        dv = tl.zeros([BN1, BDV], dtype=ACC)
        if DIFF:
            k2 = load_rows(K + D * stride_kd, b, hk, kidx, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, Lk, D)
            dk2 = tl.zeros([BN1, BD], dtype=ACC)
        else:  # placeholders the compiler drops
            k2 = k
            dk2 = 0.0
        for g in range(G):
            h = hk * G + g
            nbias = 0.0
            if NORM != N_SOFTMAX:
                nbias = tl.load(NORMF + h).to(ACC)
            lam = 0.0
            if DIFF:
                lam = tl.load(LAM + h).to(ACC)
            qoff = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            dooff = b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
            blut = BLUT + b * bl_b + h * bl_h
            cnt_base = b * cs_b + h * cs_h
            lst = b * ls1_b + h * ls1_h + j
            for part in tl.static_range(2):  # FULL query blocks, then PARTIAL ones
                lrow = (2 * lst + part) * NLIST1
                i0 = tl.load(LIDX1 + lrow)
                for t in range(tl.load(LCNT1 + 2 * lst + part)):
                    i = nth_block(LIDX1, lrow, t, i0, part == 0)
                    dk, dv, dk2 = _dkdv_block(
                        dk, dv, dk2, k, k2, v, lam, Q, DO, LSE, DELTA, NROWS, CNT, cnt_base, qoff, dooff, i * BM1,
                        j * BN1, kidx, kpos, b, h, b * HQ + h, blut, offs_d, offs_dv, nbias, stride_qm, stride_qd,
                        stride_dom, stride_dod, MASKP, MASKD, BITS, NK128, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk,
                        QOFF, D, DV, scale, part == 1, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3,
                        DPW0, DPW1, DPW2, DPW3, NORM, RELAXED, DIFF, COUNTS, FAST_TANH, ACC, DOT_PREC, BM1,
                        EVEN_D, EVEN_DV)
        col_ok = kidx < Lk
        base = pid.to(tl.int64) * Lk + kidx
        dk_mask = col_ok[:, None] & (offs_d < D)[None, :]
        tl.store(DK + base[:, None] * DQK + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=dk_mask)
        if DIFF:
            tl.store(DK + base[:, None] * DQK + D + offs_d[None, :], (dk2 * scale).to(DK.dtype.element_ty),
                     mask=dk_mask)
        tl.store(DV_ + base[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=col_ok[:, None] & (offs_dv < DV)[None, :])
    else:
        NQ = tl.cdiv(Lq, BM2)
        r = pid0 - NKV
        h = hk * G + r // NQ
        i = NQ - 1 - r % NQ  # the longest causal rows start early
        pid_bh = b * HQ + h
        offs_m = i * BM2 + tl.arange(0, BM2)
        q0 = i * BM2
        row_ok = offs_m < Lq
        qpos = offs_m + QOFF
        q = load_rows(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, Lq, D)
        do = load_rows(DO, b, h, offs_m, offs_dv, stride_dob, stride_doh, stride_dom, stride_dod, Lq, DV)
        row = pid_bh.to(tl.int64) * Lq + offs_m
        lse2, delta = row_softmax_stats(LSE, DELTA, row, row_ok, NORM, ACC, BM2)
        if DIFF:
            q2 = load_rows(Q + D * stride_qd, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, Lq, D)
            lse2b, deltab = row_softmax_stats(LSE + NROWS, DELTA + NROWS, row, row_ok, NORM, ACC, BM2)
            lam = tl.load(LAM + h).to(ACC)
            dq2 = tl.zeros([BM2, BD], dtype=ACC)
        else:  # placeholders the compiler drops
            q2 = q
            lse2b = lse2
            deltab = delta
            lam = 0.0
            dq2 = 0.0
        logn, inv_n = row_counts(CNT, b * cs_b + h * cs_h, offs_m, row_ok, COUNTS, ACC, BM2)
        nbias = 0.0
        if NORM != N_SOFTMAX:
            nbias = tl.load(NORMF + h).to(ACC)
        kbase = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        vbase = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        blut = BLUT + b * bl_b + h * bl_h
        dq = tl.zeros([BM2, BD], dtype=ACC)
        pacc = tl.zeros([8], dtype=ACC)
        rbacc = tl.zeros([NBP], dtype=ACC)
        lst = b * ls2_b + h * ls2_h + i
        for part in tl.static_range(2):  # FULL key blocks, then PARTIAL ones
            lrow = (2 * lst + part) * NLIST2
            j0 = tl.load(LIDX2 + lrow)
            for t in range(tl.load(LCNT2 + 2 * lst + part)):
                j = nth_block(LIDX2, lrow, t, j0, part == 0)
                dq, dq2, pacc, rbacc = _dq_block(
                    dq, dq2, pacc, rbacc, q, q2, lam, do, lse2, delta, lse2b, deltab, logn, inv_n, kbase, vbase,
                    j * BN2, q0, offs_m, qpos, b, h, blut, offs_d, offs_dv, nbias, stride_kn, stride_kd, stride_vn,
                    stride_vd, MASKP, MASKD, BITS, NK128, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, KOFF, D, DV, scale,
                    part == 1, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, DPW0, DPW1,
                    DPW2, DPW3, NORM, RELAXED, DIFF, FAST_TANH, PGRAD, NBP, ACC, DOT_PREC, BN2, EVEN_D, EVEN_DV)
        dq_mask = row_ok[:, None] & (offs_d < D)[None, :]
        tl.store(DQ + row[:, None] * DQK + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)
        if DIFF:
            tl.store(DQ + row[:, None] * DQK + D + offs_d[None, :], (dq2 * scale).to(DQ.dtype.element_ty),
                     mask=dq_mask)
        if PGRAD:
            prog = pid_bh.to(tl.int64) * NQ + i
            tl.store(PART + prog * 8 + tl.arange(0, 8), pacc)
            if NBP > 1:
                tl.store(RBPART + prog * NBP + tl.arange(0, NBP), rbacc)
