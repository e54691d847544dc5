"""Split-KV decode kernels (Flash-Decoding): a few query tokens against a long KV cache.

One program owns one (sequence ``b``, KV head ``hk``, row block) and one *split* of that sequence's key
blocks. Its query rows are the ``G·Lq`` rows of the KV group (``G = HQ / HKV`` query heads × ``Lq`` tokens,
row ``r`` → head ``hk·G + r // Lq``, token ``r % Lq``), so every K/V tile is read once for the whole group.
The programs of one sequence share its key blocks evenly (``NSPLIT`` splits); each writes a partial
``(o_s, lse_s)`` (softmax family: ``o_s`` normalized over its keys, base-2 ``lse_s``; elementwise
normalizers: the plain sum) and :func:`attn_decode_combine` merges them by log-sum-exp (adding the sink
logit, relaxed softmax's uniform part, or summing). With one split the first kernel writes the output.

Keys live either in a contiguous cache ``K[b, hk, j, :]`` (rows ``j < seqlen[b]``) or in a paged pool
``K[page, hk, slot, :]`` with ``page = TBL[b, hk, j // PAGE]``, ``slot = j % PAGE`` (any strides: HND or NHD
pools). Positions: token ``t`` of sequence ``b`` sits at ``qpos = seqlen[b] − Lq + t``, key ``j`` at
``kpos = j`` (queries end-aligned to their own sequence; ragged lengths per sequence).

Which key blocks are read, per sequence of ``L`` keys (bounds from the mask's structure, host side):

* *needed*: blocks touching ``[0, HEAD_S) ∪ [L − TAIL_W, L)`` (sinks read their blocks, a sliding window its band,
  anything else the whole cache); no other block is loaded;
* *FULL*: blocks inside ``[0, min(FS, L − FHB)) ∪ [L − FA, L − FB)``, keys every query row sees: walked first, in one
  loop with no element mask and no bounds checks (plain pipelined loads, one FMA per score without score mods);
* *PARTIAL*: the other needed blocks (a handful at the edges): the exact in-kernel mask (``mask_tile``) and the
  visible-pairs product of the prefill kernels.

Every element goes through the prefill kernels' own helpers — masks (``mask_tile``), score mods (``mods_chain``),
normalizers (``norm_weight``, ``_softmax_step``), non-finite handling (``dot_visible``, ``nan_for_inf``) — so decode
computes the same function for every mask / score mod / normalizer, with the same rule for NaN / ±inf.

Row counts (Scalable-Softmax, relu, relu², relaxed) come from a first pass of the same kernel (``PHASE = 1``: the
mask only, no K/V reads; FULL blocks counted whole) adding each split's visible keys per row with atomics
(integers in fp32: exact and order-free). ``TRACE`` (tests) counts the reads of every key block.
"""
import triton
import triton.language as tl

from .fwd import _softmax_finish, _softmax_step, dot_visible, nan_for_inf
from .mods import LOG2E, MODE_BITMAP, N_SOFTMAX, load_tile, mask_tile, mods_chain, norm_weight, row_counts


@triton.jit
def _layout(L, HEAD_S, TAIL_W, FS, FHB, FA, FB, BN: tl.constexpr):
    """Key-block layout of a sequence of ``L`` keys: needed head ``[0, nh)`` and tail ``[tb0, tb1)``; FULL head
    ``[0, fh)`` and tail ``[ft0, ft1)`` (whole blocks only)."""
    tail_lo = tl.maximum(L - TAIL_W, 0)
    nh = tl.cdiv(tl.minimum(HEAD_S, tail_lo), BN)
    tb0 = tl.maximum(tail_lo // BN, nh)
    tb1 = tl.maximum(tl.cdiv(L, BN), tb0)
    fh = tl.maximum(tl.minimum(FS, L - FHB), 0) // BN
    ft0 = tl.maximum(tl.cdiv(tl.maximum(L - FA, 0), BN), fh)
    ft1 = tl.maximum(tl.maximum(L - FB, 0) // BN, ft0)
    return nh, tb0, tb1, fh, ft0, ft1


@triton.jit
def _partial_block(u, nh, tb0, tb1, fh, ft0, ft1):
    """Key block of the ``u``-th PARTIAL block: the needed blocks minus the FULL ones, as four ascending pieces."""
    a0 = fh
    la = tl.maximum(tl.minimum(nh, ft0) - a0, 0)
    b0 = tl.maximum(fh, ft1)
    lb = tl.maximum(nh - b0, 0)
    c0 = tl.maximum(tb0, fh)
    lc = tl.maximum(tl.minimum(tb1, ft0) - c0, 0)
    d0 = tl.maximum(tl.maximum(tb0, fh), ft1)
    j = tl.where(u < la, a0 + u,
                 tl.where(u < la + lb, b0 + u - la,
                          tl.where(u < la + lb + lc, c0 + u - la - lb, d0 + u - la - lb - lc)))
    return j


@triton.jit
def _counts_of(nh, tb0, tb1, fh, ft0, ft1):
    """``(FULL blocks, all needed blocks)``."""
    nf = fh + ft1 - ft0
    need = nh + tb1 - tb0
    return nf, need


@triton.jit
def _kv_rows(BASE, b, hk, kidx, ok, TBL, stride_tb, stride_th, stride_b, stride_h, stride_n,
             PAGED: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr):
    """Row offsets of keys ``kidx`` of (b, hk): contiguous ``b·sb + hk·sh + j·sn`` or paged through the table."""
    if PAGED:
        tp = TBL + b.to(tl.int64) * stride_tb + hk * stride_th + kidx // PAGE
        if MASKED:
            page = tl.load(tp, mask=ok, other=0)
        else:
            page = tl.load(tp)
        ptrs = BASE + page.to(tl.int64) * stride_b + hk.to(tl.int64) * stride_h + (kidx % PAGE) * stride_n
    else:
        ptrs = BASE + b.to(tl.int64) * stride_b + hk.to(tl.int64) * stride_h + kidx.to(tl.int64) * stride_n
    return ptrs


@triton.jit
def _block(acc, m_i, l_i, acc_u, q, j, K, V, TBL, b, hk, h, t, qpos, L, Lq, logn, inv_n, nbias, blut,
           stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_tb, stride_th,
           MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, HQ, D, DV, scale, offs_n, offs_d, offs_dv,
           MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
           MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr, MASK_TT: tl.constexpr,
           MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, PW3: tl.constexpr,
           NORM: tl.constexpr, RELAXED: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr,
           DOT_PREC: tl.constexpr, SCALE_NEG: tl.constexpr, BN: tl.constexpr, EVEN_D: tl.constexpr,
           EVEN_DV: tl.constexpr):
    """One key block ``j``: FULL (``MASKED`` False: every key in bounds and seen by every row) or PARTIAL."""
    kidx = j * BN + offs_n
    ok = kidx < L
    kp = _kv_rows(K, b, hk, kidx, ok, TBL, stride_tb, stride_th, stride_kb, stride_kh, stride_kn, PAGED, PAGE, MASKED)
    vp = _kv_rows(V, b, hk, kidx, ok, TBL, stride_tb, stride_th, stride_vb, stride_vh, stride_vn, PAGED, PAGE, MASKED)
    kT = load_tile(kp[None, :] + offs_d[:, None] * stride_kd, ok[None, :], (offs_d < D)[:, None], MASKED,
                   not EVEN_D)
    v = load_tile(vp[:, None] + offs_dv[None, :] * stride_vd, ok[:, None], (offs_dv < DV)[None, :], MASKED,
                  not EVEN_DV)
    qk = tl.dot(q, kT, input_precision=DOT_PREC, out_dtype=ACC)
    vis = True
    if MASKED:
        tile = 0
        if MASK_MODE == MODE_BITMAP:
            tile = tl.load(blut + (j * BN) // 128)
        vis = mask_tile(t[:, None], qpos[:, None], kidx[None, :], kidx[None, :], b, Lq, L, MASKP, MASKD, BITS,
                        tile, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT)
    if NORM == N_SOFTMAX:
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, vis, qpos, kidx, b, h[:, None], logn, MODF, RBT, RBL,
                                      RB_OFF, HQ, scale, MASKED, MODS, PW0, PW1, PW2, PW3, FAST_TANH, ACC, DOT_PREC,
                                      SCALE_NEG)
        if RELAXED:
            if MASKED:
                acc_u = dot_visible(acc_u, vis, v, vis, MASKED, ACC, DOT_PREC, True)
            else:
                acc_u += tl.sum(v.to(ACC), 0)[None, :]
    else:
        _, _, _, s = mods_chain(qk * scale, qpos[:, None], kidx[None, :], b, h[:, None], logn[:, None], MODF, HQ,
                                RBT, RBL, RB_OFF, MODS, PW0, PW1, PW2, PW3, FAST_TANH)
        w, _ = norm_weight(s, nbias[:, None], NORM)
        w = w * inv_n[:, None]
        if MASKED:
            w = tl.where(vis, w, 0.0)
        acc = dot_visible(acc, w, v, vis, MASKED, ACC, DOT_PREC, True)
    return acc, m_i, l_i, acc_u


@triton.jit
def attn_decode(Q, K, V, O, LSE, OP, LP, UP, SEQ, TBL, CNT, TRC,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_tb, stride_th,
                MASKP, MASKD, BITS, BLUT, bl_b, bl_h, NK128,
                MODF, RBT, RBL, RB_OFF, NORMF, GAMMA,
                HQ, G, Lq, NSPLIT, HEAD_S, TAIL_W, FS, FHB, FA, FB, NBMAX, D, DV, scale,
                PHASE: tl.constexpr, SPLIT: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                SIG_LOGN: tl.constexpr, WANT_LSE: tl.constexpr, TRACE: tl.constexpr,
                MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr, MASK_TT: tl.constexpr,
                MODS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, PW3: tl.constexpr,
                NORM: tl.constexpr, HAS_SINK: tl.constexpr, RELAXED: tl.constexpr, COUNTS: tl.constexpr,
                FAST_TANH: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, SCALE_NEG: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr):
    """Grid ``(NSPLIT, B · HKV · RB)``, ``RB = cdiv(G·Lq, BM)`` row blocks per KV group.

    ``PHASE`` 0: attention. Writes ``O [B,HQ,Lq,DV]`` (+ natural-log ``LSE`` when ``WANT_LSE``) with one split,
    else the partials ``OP [rows, NSPLIT, DV]``, ``LP [rows, NSPLIT]`` (base-2 lse, softmax family) and
    ``UP [rows, NSPLIT, DV]`` (relaxed: Σ of visible V), ``rows = B·HQ·Lq`` in (b, h, t) order.
    ``PHASE`` 1: visible keys per row added into ``CNT [rows]`` (zero-filled by the host)."""
    pid_s = tl.program_id(0)
    pid = tl.program_id(1)
    RB = tl.cdiv(G * Lq, BM)
    rb = pid % RB
    bk = pid // RB
    HKV = HQ // G
    b = bk // HKV
    hk = bk % HKV
    r = rb * BM + tl.arange(0, BM)
    r_ok = r < G * Lq
    h = hk * G + tl.minimum(r // Lq, G - 1)
    t = tl.where(r_ok, r % Lq, Lq)  # rows past the group get t = Lq: out of bounds, so nothing is visible
    L = tl.load(SEQ + b)
    qpos = L - Lq + t
    row = (b * HQ + h).to(tl.int64) * Lq + t
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    nh, tb0, tb1, fh, ft0, ft1 = _layout(L, HEAD_S, TAIL_W, FS, FHB, FA, FB, BN)
    nf, nb = _counts_of(nh, tb0, tb1, fh, ft0, ft1)
    per = tl.cdiv(nb, NSPLIT)
    v0 = pid_s * per
    v1 = tl.minimum(v0 + per, nb)
    blut = BLUT + b * bl_b + h[:, None] * bl_h
    if PHASE == 1:
        nfull = tl.maximum(tl.minimum(v1, nf) - v0, 0)
        cnt = tl.zeros([BM], dtype=tl.float32) + (nfull * BN).to(tl.float32)
        for vb in range(tl.maximum(v0, nf), v1):
            j = _partial_block(vb - nf, nh, tb0, tb1, fh, ft0, ft1)
            kidx = j * BN + offs_n
            tile = 0
            if MASK_MODE == MODE_BITMAP:
                tile = tl.load(blut + (j * BN) // 128)
            vis = mask_tile(t[:, None], qpos[:, None], kidx[None, :], kidx[None, :], b, Lq, L, MASKP, MASKD, BITS,
                            tile, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT)
            cnt += tl.sum(vis.to(tl.float32), 1)
        tl.atomic_add(CNT + row, cnt, mask=r_ok)
    else:
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + t[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=r_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        logn, inv_n = row_counts(CNT, 0, row, r_ok, COUNTS, ACC, BM)
        logn = tl.maximum(logn, 0.0)  # a row without visible keys: n taken as 1 (its weights are 0 anyway)
        inv_n = tl.minimum(inv_n, 1.0)
        nbias = tl.zeros([BM], dtype=ACC)
        if NORM != N_SOFTMAX:
            if SIG_LOGN:  # sigmoid's default bias −log(n keys) of this sequence
                nbias += -tl.log(L.to(ACC))
            else:
                nbias += tl.load(NORMF + h).to(ACC)
        if HAS_SINK and not SPLIT:
            m_i = tl.load(NORMF + h).to(ACC) * LOG2E
            l_i = tl.full([BM], 1.0, ACC)
        else:
            m_i = tl.full([BM], float("-inf"), ACC)
            l_i = tl.full([BM], 0.0, ACC)
        acc = tl.zeros([BM, BDV], dtype=ACC)
        acc_u = tl.zeros([BM, BDV], dtype=ACC)
        trc = TRC + (b * HKV + hk).to(tl.int64) * NBMAX
        for vb in range(v0, tl.minimum(v1, nf)):  # FULL blocks: no mask, no bounds
            j = tl.where(vb < fh, vb, ft0 + vb - fh)
            if TRACE:
                tl.atomic_add(trc + j, 1)
            acc, m_i, l_i, acc_u = _block(
                acc, m_i, l_i, acc_u, q, j, K, V, TBL, b, hk, h, t, qpos, L, Lq, logn, inv_n, nbias, blut,
                stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_tb,
                stride_th, MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, HQ, D, DV, scale, offs_n, offs_d, offs_dv,
                False, PAGED, PAGE, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM,
                RELAXED, FAST_TANH, ACC, DOT_PREC, SCALE_NEG, BN, EVEN_D, EVEN_DV)
        for vb in range(tl.maximum(v0, nf), v1):  # PARTIAL blocks: the exact mask
            j = _partial_block(vb - nf, nh, tb0, tb1, fh, ft0, ft1)
            if TRACE:
                tl.atomic_add(trc + j, 1)
            acc, m_i, l_i, acc_u = _block(
                acc, m_i, l_i, acc_u, q, j, K, V, TBL, b, hk, h, t, qpos, L, Lq, logn, inv_n, nbias, blut,
                stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_tb,
                stride_th, MASKP, MASKD, BITS, MODF, RBT, RBL, RB_OFF, HQ, D, DV, scale, offs_n, offs_d, offs_dv,
                True, PAGED, PAGE, MASK_MODE, MASK_LEAVES, N_LEAVES, MASK_TT, MODS, PW0, PW1, PW2, PW3, NORM,
                RELAXED, FAST_TANH, ACC, DOT_PREC, SCALE_NEG, BN, EVEN_D, EVEN_DV)
        o_mask = r_ok[:, None] & (offs_dv < DV)[None, :]
        if SPLIT:
            prow = row * NSPLIT + pid_s
            if NORM == N_SOFTMAX:
                acc, lse2 = _softmax_finish(acc, m_i, l_i)
                tl.store(LP + prow, lse2, mask=r_ok)
                if RELAXED:
                    tl.store(UP + prow[:, None] * DV + offs_dv[None, :], acc_u, mask=o_mask)
            tl.store(OP + prow[:, None] * DV + offs_dv[None, :], acc, mask=o_mask)
        else:
            if NORM == N_SOFTMAX:
                o, lse2 = _softmax_finish(acc, m_i, l_i)
                if HAS_SINK:  # a non-finite sink logit leaves every row of the head undefined
                    sink_ok = tl.abs(tl.load(NORMF + h).to(ACC)) < float("inf")
                    o = tl.where(sink_ok[:, None], o, float("nan"))
                    lse2 = tl.where(sink_ok, lse2, float("nan"))
                if RELAXED:
                    o = (1.0 - GAMMA) * o + GAMMA * acc_u * inv_n[:, None]
                if WANT_LSE:
                    tl.store(LSE + row, lse2 / LOG2E, mask=r_ok)
            else:
                o = acc
            tl.store(O + row[:, None] * DV + offs_dv[None, :], nan_for_inf(o).to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def attn_decode_combine(OP, LP, UP, O, LSE, NORMF, CNT, HQ, Lq, NSPLIT, DV, GAMMA,
                        NORM: tl.constexpr, HAS_SINK: tl.constexpr, RELAXED: tl.constexpr, WANT_LSE: tl.constexpr,
                        ACC: tl.constexpr, NSP: tl.constexpr, BDV: tl.constexpr):
    """Merge the ``NSPLIT`` partials of one output row (grid ``(B·HQ·Lq,)``):
    ``lse = log2(Σ_s 2^lse_s [+ 2^(σ_h·log2 e)])``, ``o = Σ_s 2^(lse_s − lse)·o_s`` (softmax family; relaxed adds
    ``γ·Σ_s u_s / n``), or ``o = Σ_s o_s`` (elementwise normalizers). A NaN partial makes the row NaN; ±inf
    outputs are written as NaN (the prefill kernels' rule)."""
    row = tl.program_id(0).to(tl.int64)
    h = (row // Lq) % HQ
    s = tl.arange(0, NSP)
    s_ok = s < NSPLIT
    offs_dv = tl.arange(0, BDV)
    ptrs = (row * NSPLIT + s)[:, None] * DV + offs_dv[None, :]
    pm = s_ok[:, None] & (offs_dv < DV)[None, :]
    o_s = tl.load(OP + ptrs, mask=pm, other=0.0).to(ACC)
    if NORM == N_SOFTMAX:
        lse_s = tl.load(LP + row * NSPLIT + s, mask=s_ok, other=float("-inf")).to(ACC)
        m = tl.max(lse_s, 0)
        sink = 0.0
        if HAS_SINK:
            sink = tl.load(NORMF + h).to(ACC) * LOG2E
            m = tl.maximum(m, sink)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse_s - m_use)
        den = tl.sum(w, 0)
        if HAS_SINK:
            den += tl.math.exp2(sink - m_use)
        den_safe = tl.where(den == 0.0, 1.0, den)
        o = tl.sum(tl.where(w[:, None] == 0.0, 0.0, o_s * w[:, None]), 0) / den_safe
        lse = m_use + tl.math.log2(den_safe)
        lse = tl.where(den == 0.0, float("-inf"), lse)
        if HAS_SINK:
            sink_ok = tl.abs(sink) < float("inf")
            o = tl.where(sink_ok, o, float("nan"))
            lse = tl.where(sink_ok, lse, float("nan"))
        if RELAXED:
            u = tl.sum(tl.load(UP + ptrs, mask=pm, other=0.0).to(ACC), 0)
            n = tl.maximum(tl.load(CNT + row).to(ACC), 1.0)
            o = (1.0 - GAMMA) * o + GAMMA * u / n
        if WANT_LSE:
            tl.store(LSE + row, lse / LOG2E)
    else:
        o = tl.sum(o_s, 0)
    tl.store(O + row * DV + offs_dv, nan_for_inf(o).to(O.dtype.element_ty), mask=offs_dv < DV)
