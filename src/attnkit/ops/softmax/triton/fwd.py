"""Forward kernel: FlashAttention-2-style online softmax over the non-empty key blocks of a block map.

One program owns ``BM`` query rows of one (batch, query head). It walks the two lists of key blocks
taken from the mask's block map: FULL blocks (no element mask) then PARTIAL blocks (exact in-kernel
mask). Scores are ``s = mods(scale · q·kᵀ)``; the softmax family keeps a running max and sum in base 2
(``exp2``, with log2(e) folded into the scale: one FMA per score on FULL blocks without score mods),
elementwise normalizers add ``f(s)·V`` directly. Writes ``out``, the base-2 ``lse`` (softmax family;
the host converts it when the caller asks) and, for relaxed softmax, the softmax part ``o_soft`` the
backward needs. Memory: O(BM·BN) per program, nothing of size Lq×Lk.

Non-finite values (the rule of :mod:`attnkit.ops.softmax.call`): every key of a FULL block is visible to every
row of the tile, so there plain IEEE arithmetic already gives each row exactly what it sees (a visible NaN /
+inf score makes the row's ``l`` NaN, a visible non-finite ``v_jd`` makes entry ``(i, d)`` non-finite) and the
FULL loop is unchanged. In PARTIAL blocks hidden scores are replaced by −inf with a select (as before) and the
products with V go through :func:`dot_visible`, whose per-tile check sends a V tile holding a non-finite value
down an exact path (selects); finite tiles pay one reduction of the tile. The epilogue writes NaN for ±inf
outputs and for every row of a head whose sink logit is not finite.
"""
import triton
import triton.language as tl

from .mods import (LOG2E, MODE_BITMAP, N_SOFTMAX, dot_visible, load_rows, load_tile, mask_tile, mods_chain,  # noqa: F401
                   nan_for_inf, norm_weight, nth_block, program_rows, row_counts)


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, v, vis, qpos, kpos, b, h, logn, MODF, RBT, RBL, RB_OFF, HQ, scale,
                  MASKED: tl.constexpr, MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr,
                  PW2: tl.constexpr, PW3: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr,
                  DOT_PREC: tl.constexpr, SCALE_NEG: tl.constexpr):
    """One online-softmax update of ``(acc, m, l)`` (base 2) with the products ``qk`` of one key block."""
    if (MODS == 0) & (not MASKED):  # row max of the raw products, then one FMA per score
        if SCALE_NEG:
            m_new = tl.maximum(m_i, tl.min(qk, 1) * (scale * LOG2E))
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * (scale * LOG2E))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * (scale * LOG2E) - m_use[:, None])
    else:
        if MODS == 0:
            s2 = qk * (scale * LOG2E)
        else:
            _, _, _, s = mods_chain(qk * scale, qpos[:, None], kpos[None, :], b, h, logn[:, None], MODF, HQ,
                                    RBT, RBL, RB_OFF, MODS, PW0, PW1, PW2, PW3, FAST_TANH)
            s2 = s * LOG2E
        if MASKED:
            s2 = tl.where(vis, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s2 - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot_visible(acc, p, v, vis, MASKED, ACC, DOT_PREC, True)
    return acc, m_new, l_i


@triton.jit
def _fwd_block(acc, m_i, l_i, acc_u, acc2, m2, l2, q, q2, kbase, vbase, start_n, q0, offs_m, qpos, offs_n, offs_d,
               offs_dv, b, h, logn, inv_n, nbias, blut, stride_kn, stride_kd, stride_vn, stride_vd,
               MASKP, MASKD, BITS, NK128, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, KOFF, D, DV, scale,
               MASKED: tl.constexpr, MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr,
               MASK_TT: tl.constexpr, MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
               PW3: tl.constexpr, NORM: tl.constexpr, RELAXED: tl.constexpr, DIFF: tl.constexpr,
               FAST_TANH: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BN: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, SCALE_NEG: tl.constexpr):
    kidx = start_n + offs_n
    kpos = kidx + KOFF
    col_ok = kidx < Lk
    kT = load_tile(kbase + kidx[None, :] * stride_kn + offs_d[:, None] * stride_kd, col_ok[None, :],
                   (offs_d < D)[:, None], MASKED, not EVEN_D)
    v = load_tile(vbase + kidx[:, None] * stride_vn + offs_dv[None, :] * stride_vd, col_ok[:, None],
                  (offs_dv < DV)[None, :], MASKED, not EVEN_DV)
    qk = tl.dot(q, kT, input_precision=DOT_PREC, out_dtype=ACC)
    vis = True
    if MASKED:
        tile = 0
        if MASK_MODE == MODE_BITMAP:
            tile = tl.load(blut + (q0 // 128) * NK128 + start_n // 128)
        vis = mask_tile(offs_m[:, None], qpos[:, None], kidx[None, :], kpos[None, :], b, Lq, Lk, MASKP, MASKD, BITS,
                        tile,
                        MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT)
    if NORM == N_SOFTMAX:
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, vis, qpos, kpos, b, h, logn, MODF, RBT, RBL, RB_OFF,
                                      HQ, scale, MASKED, MODS, PW0, PW1, PW2, PW3, FAST_TANH, ACC, DOT_PREC,
                                      SCALE_NEG)
        if DIFF:  # the second map: its own keys (the upper half of K's head dim), the same V tile and mask
            kT2 = load_tile(kbase + D * stride_kd + kidx[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                            col_ok[None, :], (offs_d < D)[:, None], MASKED, not EVEN_D)
            qk2 = tl.dot(q2, kT2, input_precision=DOT_PREC, out_dtype=ACC)
            acc2, m2, l2 = _softmax_step(acc2, m2, l2, qk2, v, vis, qpos, kpos, b, h, logn, MODF, RBT, RBL, RB_OFF,
                                         HQ, scale, MASKED, MODS, PW0, PW1, PW2, PW3, FAST_TANH, ACC, DOT_PREC,
                                         SCALE_NEG)
        if RELAXED:
            if MASKED:
                acc_u = dot_visible(acc_u, vis, v, vis, MASKED, ACC, DOT_PREC, True)
            else:
                acc_u += tl.sum(v.to(ACC), 0)[None, :]
    else:
        _, _, _, s = mods_chain(qk * scale, qpos[:, None], kpos[None, :], b, h, logn[:, None], MODF, HQ, RBT, RBL,
                                RB_OFF, MODS, PW0, PW1, PW2, PW3, FAST_TANH)
        w, _ = norm_weight(s, nbias, NORM)
        w = w * inv_n[:, None]
        if MASKED:
            w = tl.where(vis, w, 0.0)
        acc = dot_visible(acc, w, v, vis, MASKED, ACC, DOT_PREC, True)
    return acc, m_i, l_i, acc_u, acc2, m2, l2


@triton.jit
def _softmax_finish(acc, m_i, l_i):
    """``(acc / l, base-2 lse)``; rows without a visible key give 0 and lse −inf (``m = −inf``, ``l = 0``); rows
    with undefined weights (``l`` NaN: a visible NaN / +inf score, whatever ``m`` a NaN-ignoring max kept) NaN."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], m_i + tl.math.log2(l_safe)


@triton.jit
def attn_fwd(Q, K, V, O, LSE, OS,
             stride_qb, stride_qh, stride_qm, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             LCNT, LIDX, ls_b, ls_h, NLIST,
             CNT, cs_b, cs_h, MASKP, MASKD, BITS, BLUT, bl_b, bl_h, NK128,
             MODF, RBT, RBL, RB_OFF, NORMF, LAM, GAMMA, HQ, G, Lq, Lk, QOFF, KOFF, D, DV, scale,
             MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr, MASK_TT: tl.constexpr,
             MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, PW3: tl.constexpr,
             NORM: tl.constexpr, HAS_SINK: tl.constexpr, RELAXED: tl.constexpr, DIFF: tl.constexpr,
             COUNTS: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
             SCALE_NEG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr):
    """Grid ``(cdiv(Lq, BM), B * HQ)``.

    ``DIFF`` (differential attention): q and k hold two maps in the halves ``[0, D)`` and ``[D, 2D)`` of
    their head dim; both share each V tile and mask tile. Writes ``O = O1 − λ_h·O2``, ``OS = O2`` and the
    base-2 lse of map 1 at ``LSE[row]``, of map 2 at ``LSE[B·HQ·Lq + row]``."""
    i, pid_bh, b, h, hk, offs_m = program_rows(HQ, G, BM)
    q0 = i * BM
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < Lq
    qpos = offs_m + QOFF
    q = load_rows(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, Lq, D)
    kbase = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    vbase = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    logn, inv_n = row_counts(CNT, b * cs_b + h * cs_h, offs_m, row_ok, COUNTS, ACC, BM)
    nbias = 0.0
    if NORM != N_SOFTMAX:
        nbias = tl.load(NORMF + h).to(ACC)
    if HAS_SINK:
        m_i = tl.full([BM], 0.0, ACC) + tl.load(NORMF + h).to(ACC) * LOG2E
        l_i = tl.full([BM], 1.0, ACC)
    else:
        m_i = tl.full([BM], float("-inf"), ACC)
        l_i = tl.full([BM], 0.0, ACC)
    acc = tl.zeros([BM, BDV], dtype=ACC)
    acc_u = tl.zeros([BM, BDV], dtype=ACC)
    if DIFF:
        q2 = load_rows(Q + D * stride_qd, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, Lq, D)
        acc2 = tl.zeros([BM, BDV], dtype=ACC)
        m2 = tl.full([BM], float("-inf"), ACC)
        l2 = tl.full([BM], 0.0, ACC)
    else:  # placeholders the compiler drops
        q2 = q
        acc2 = 0.0
        m2 = 0.0
        l2 = 0.0
    blut = BLUT + b * bl_b + h * bl_h
    lst = b * ls_b + h * ls_h + i
    for part in tl.static_range(2):  # FULL key blocks (no element mask), then PARTIAL ones (exact mask)
        lrow = (2 * lst + part) * NLIST
        j0 = tl.load(LIDX + lrow)
        for t in range(tl.load(LCNT + 2 * lst + part)):
            j = nth_block(LIDX, lrow, t, j0, part == 0)
            acc, m_i, l_i, acc_u, acc2, m2, l2 = _fwd_block(
                acc, m_i, l_i, acc_u, acc2, m2, l2, q, q2, kbase, vbase, j * BN, q0, offs_m, qpos, offs_n, offs_d,
                offs_dv, b, h, logn, inv_n, nbias, blut, stride_kn, stride_kd, stride_vn, stride_vd,
                MASKP, MASKD, BITS, NK128, MODF, RBT, RBL, RB_OFF, GAMMA, HQ, Lq, Lk, KOFF, D, DV, scale,
                part == 1, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM, RELAXED,
                DIFF, FAST_TANH, ACC, DOT_PREC, BN, EVEN_D, EVEN_DV, SCALE_NEG)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    o_ptrs = row[:, None] * DV + offs_dv[None, :]
    o_mask = row_ok[:, None] & (offs_dv < DV)[None, :]
    if NORM == N_SOFTMAX:
        o, lse = _softmax_finish(acc, m_i, l_i)
        if HAS_SINK:  # a non-finite sink logit leaves every row of the head undefined, rows without keys included
            sink_ok = tl.abs(tl.load(NORMF + h).to(ACC)) < float("inf")
            o = tl.where(sink_ok, o, float("nan"))
            lse = tl.where(sink_ok, lse, float("nan"))
        tl.store(LSE + row, lse, mask=row_ok)
        if RELAXED:
            tl.store(OS + o_ptrs, o.to(OS.dtype.element_ty), mask=o_mask)
            o = (1.0 - GAMMA) * o + GAMMA * acc_u * inv_n[:, None]
        if DIFF:
            o2, lse2 = _softmax_finish(acc2, m2, l2)
            tl.store(LSE + tl.num_programs(1).to(tl.int64) * Lq + row, lse2, mask=row_ok)
            tl.store(OS + o_ptrs, o2.to(OS.dtype.element_ty), mask=o_mask)
            o = o - tl.load(LAM + h).to(ACC) * o2
    else:
        o = acc
    tl.store(O + o_ptrs, nan_for_inf(o).to(O.dtype.element_ty), mask=o_mask)

