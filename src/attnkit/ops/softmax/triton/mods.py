"""In-kernel pieces shared by the forward and backward kernels, chosen by constexpr switches.

Every piece is a ``triton.jit`` helper whose behaviour is fixed at compile time by small integer
codes, so one kernel body serves every mask / score mod / normalizer combination and the compiler
removes what a combination does not use.

Codes (owned by the classes in :mod:`attnkit.core`: ``kernel_code``; host side: :mod:`attnkit.ops.softmax.plan`):

* mask leaves (4 bits each, up to 4 leaves packed in ``MASK_LEAVES``, combined by the truth table
  ``MASK_TT`` over the leaf bits): 1 full, 2 causal, 3 sliding window, 4 chunked, 5 prefix-LM,
  6 sinks, 7 dilated, 8 document. ``MASK_MODE``: 0 no element mask, 1 leaves, 2 per-block bitmap.
* score-mod slots (4 bits each, up to 4 packed in ``MODS``, applied in order): 1 softcap, 2 ALiBi,
  3 relative bias (T5 table), 4 Scalable-Softmax, 5 temperature, 6 user pointwise (slot i calls
  ``PWi`` and, in the backward, its derivative ``DPWi``).
* normalizer ``NORM``: 0 softmax family, 1 sigmoid, 2 relu, 3 relu², 4 none.

Positions follow :mod:`attnkit.masks`: query row ``r`` sits at ``qpos = r + QOFF``, key ``j`` at ``kpos = j + KOFF``
(by default ``QOFF = Lk − Lq``, ``KOFF = 0``); bounds and bitmaps use the row / key indices, masks and score
mods the positions.
All helpers take broadcastable row / column vectors, so the same code serves ``[M, N]`` tiles
(forward, dQ) and transposed ``[N, M]`` tiles (dK/dV).
"""
import triton
import triton.language as tl

from ....core.masks import LEAF_CODES
from ....core.normalizers import NORM_CODES
from ....core.scores import SCORE_CODES

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# kernel codes: each mask leaf / score mod / normalizer class owns its code (attnkit.core), these name them here
K_FULL: tl.constexpr = tl.constexpr(LEAF_CODES["full"])
K_CAUSAL: tl.constexpr = tl.constexpr(LEAF_CODES["causal"])
K_WINDOW: tl.constexpr = tl.constexpr(LEAF_CODES["sliding_window"])
K_CHUNKED: tl.constexpr = tl.constexpr(LEAF_CODES["chunked"])
K_PREFIX: tl.constexpr = tl.constexpr(LEAF_CODES["prefix_lm"])
K_SINKS: tl.constexpr = tl.constexpr(LEAF_CODES["sinks"])
K_DILATED: tl.constexpr = tl.constexpr(LEAF_CODES["dilated"])
K_DOCUMENT: tl.constexpr = tl.constexpr(LEAF_CODES["document"])
# mask modes
MODE_NONE: tl.constexpr = tl.constexpr(0)
MODE_LEAVES: tl.constexpr = tl.constexpr(1)
MODE_BITMAP: tl.constexpr = tl.constexpr(2)
# score mods
S_SOFTCAP: tl.constexpr = tl.constexpr(SCORE_CODES["softcap"])
S_ALIBI: tl.constexpr = tl.constexpr(SCORE_CODES["alibi"])
S_RELBIAS: tl.constexpr = tl.constexpr(SCORE_CODES["relative_bias"])
S_SSMAX: tl.constexpr = tl.constexpr(SCORE_CODES["ssmax"])
S_TEMP: tl.constexpr = tl.constexpr(SCORE_CODES["temperature"])
S_POINTWISE: tl.constexpr = tl.constexpr(SCORE_CODES["pointwise"])
# normalizers
N_SOFTMAX: tl.constexpr = tl.constexpr(NORM_CODES["softmax"])
N_SIGMOID: tl.constexpr = tl.constexpr(NORM_CODES["sigmoid"])
N_RELU: tl.constexpr = tl.constexpr(NORM_CODES["relu"])
N_RELU2: tl.constexpr = tl.constexpr(NORM_CODES["relu2"])
N_NONE: tl.constexpr = tl.constexpr(NORM_CODES["none"])

#: bitmap tile edge (rows and columns) of user-predicate masks
BITMAP_TILE: tl.constexpr = tl.constexpr(128)


@triton.jit
def identity_mod(score, b, h, q_idx, kv_idx):
    """Placeholder for unused pointwise slots."""
    return score


# ---------------------------------------------------------------------------------------------
# program layout, tile loads and per-row values shared by the kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def program_rows(HQ, G, BM: tl.constexpr):
    """This program's query block ``i`` (grid axis 0 runs last-first, so the longest causal rows start
    early), ``pid_bh = b·HQ + h``, batch ``b``, query head ``h``, KV head and the block's row indices."""
    i = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    return i, pid_bh, b, h, h // G, i * BM + tl.arange(0, BM)


@triton.jit
def nth_block(LIDX, lrow, t, j0, FULL: tl.constexpr):
    """Block ``t`` of a block list starting at ``LIDX + lrow``: FULL lists are one contiguous run starting at
    ``j0 = LIDX[lrow]`` (see ``plan.Lists``), walked without a load so the loop pipelines."""
    if FULL:
        j = j0 + t
    else:
        j = tl.load(LIDX + lrow + t)
    return j


@triton.jit
def load_rows(PTR, b, h, offs_r, offs_c, stride_b, stride_h, stride_r, stride_c, n_r, n_c):
    """The ``[R, C]`` tile ``PTR[b, h, offs_r, offs_c]``, zero outside ``[0, n_r) × [0, n_c)``."""
    return tl.load(PTR + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + offs_r[:, None] * stride_r
                   + offs_c[None, :] * stride_c, mask=(offs_r < n_r)[:, None] & (offs_c < n_c)[None, :], other=0.0)


@triton.jit
def load_tile(ptrs, rmask, cmask, USE_R: tl.constexpr, USE_C: tl.constexpr):
    """Load with only the bounds checks a tile needs (none on the fast path)."""
    if USE_R:
        if USE_C:
            x = tl.load(ptrs, mask=rmask & cmask, other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask, other=0.0)
    else:
        if USE_C:
            x = tl.load(ptrs, mask=cmask, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def row_counts(CNT, base, offs_m, row_ok, COUNTS: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr):
    """``(log n, 1 / n)`` per query row, ``n`` = its visible keys. ``COUNTS`` says who reads them: bit 0 a score
    mod (``log n``, Scalable-Softmax), bit 1 the normalizer (``1 / n``: relu, relu², relaxed softmax); a value
    nobody asked for is ones, so a switch meant for one piece never reaches another."""
    if COUNTS != 0:
        n = tl.load(CNT + base + offs_m, mask=row_ok, other=1.0).to(ACC)
    if (COUNTS & 1) != 0:
        logn = tl.log(n)
    else:
        logn = tl.full([BM], 1.0, ACC)
    if (COUNTS & 2) != 0:
        inv_n = 1.0 / n
    else:
        inv_n = tl.full([BM], 1.0, ACC)
    return logn, inv_n


@triton.jit
def row_softmax_stats(LSE, DELTA, row, row_ok, NORM: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr):
    """Backward per-row values: the base-2 lse (+inf on rows without a visible key, so ``p = 0`` there)
    and ``delta``; zeros for elementwise normalizers."""
    if NORM == N_SOFTMAX:
        lse = tl.load(LSE + row, mask=row_ok, other=float("-inf")).to(ACC)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + row, mask=row_ok, other=0.0).to(ACC)
    else:
        lse2 = tl.zeros([BM], dtype=ACC)
        delta = tl.zeros([BM], dtype=ACC)
    return lse2, delta


@triton.jit
def _dot_finite_part(acc, a, b, vis, fin, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc + a·b₀`` with ``b₀`` = b where finite, else 0; NaN where a visible pair meets a non-finite ``b``."""
    hit = tl.dot(vis.to(b.dtype), tl.where(fin, 0.0, 1.0).to(b.dtype), input_precision=DOT_PREC, out_dtype=ACC)
    acc = tl.dot(a.to(b.dtype), tl.where(fin, b, 0.0).to(b.dtype), acc, input_precision=DOT_PREC, out_dtype=ACC)
    return tl.where(hit > 0, float("nan"), acc)


@triton.jit
def dot_visible(acc, a, b, vis, MASKED: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                TILE_CHECK: tl.constexpr):
    """``acc + a·b`` with the contraction over visible pairs only: ``a [M, K]`` is 0 where ``vis [M, K]`` is False,
    ``b [K, N]`` may hold non-finite values. FULL blocks (``MASKED`` False): the plain product. PARTIAL blocks:
    non-finite entries of ``b`` are replaced by 0 in the product (a select) and the entries ``(m, n)`` whose sum one
    reaches through a visible pair become NaN (a second product ``vis·[b non-finite]``), so a value that only hidden
    pairs read changes nothing. ``TILE_CHECK``: a runtime ``if`` skips the select and the second product for a
    finite tile (one reduction). The forward and decode kernels take it; the backward must not: there that ``if``
    around loop-carried dots miscompiled on sm_90 with triton 3.6 (dQ/dK/dV wrong on every PARTIAL block)."""
    if MASKED:
        fin = tl.abs(b) < float("inf")  # False for NaN and ±inf
        if TILE_CHECK:
            if tl.min(fin.to(tl.int32)) == 0:
                acc = _dot_finite_part(acc, a, b, vis, fin, ACC, DOT_PREC)
            else:
                acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PREC, out_dtype=ACC)
        else:
            acc = _dot_finite_part(acc, a, b, vis, fin, ACC, DOT_PREC)
    else:
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PREC, out_dtype=ACC)
    return acc


@triton.jit
def nan_for_inf(x):
    """±inf -> NaN: an output that a non-finite value reaches is NaN (never ±inf)."""
    return tl.where(tl.abs(x) == float("inf"), float("nan"), x)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

@triton.jit
def _floordiv(x, c):
    """floor(x / c) for c > 0 and x of either sign (C division truncates)."""
    return tl.where(x >= 0, x // c, -((c - 1 - x) // c))


@triton.jit
def mask_leaf(KIND: tl.constexpr, LEAF: tl.constexpr, qpos, kpos, b, MASKP, MASKD):
    """Visibility of one built-in mask leaf at positions ``qpos``, ``kpos``; ``MASKP[4*LEAF:4*LEAF+4]`` holds its
    int parameters."""
    prm = MASKP + LEAF * 4
    if KIND == K_FULL:
        vis = (qpos * 0 + kpos * 0) == 0
    elif KIND == K_CAUSAL:
        vis = kpos <= qpos
    elif KIND == K_WINDOW:
        d = kpos - qpos
        vis = (d >= -tl.load(prm)) & (d <= tl.load(prm + 1))
    elif KIND == K_CHUNKED:
        c = tl.load(prm)
        vis = kpos // c <= _floordiv(qpos, c)
    elif KIND == K_PREFIX:
        plen = tl.load(MASKD + tl.load(prm) + b * tl.load(prm + 1))
        vis = (kpos < plen) | (kpos <= qpos)
    elif KIND == K_SINKS:
        vis = (kpos < tl.load(prm)) | (qpos * 0 + kpos * 0 != 0)
    elif KIND == K_DILATED:
        vis = ((qpos - kpos) % tl.load(prm)) == 0
    else:  # K_DOCUMENT: ids[b', pos] for every position (length prm[2]); out-of-range rows / keys are masked anyway
        base = MASKD + tl.load(prm) + b * tl.load(prm + 1)
        last = tl.load(prm + 2) - 1
        qc = tl.minimum(tl.maximum(qpos, 0), last)
        kc = tl.minimum(tl.maximum(kpos, 0), last)
        vis = tl.load(base + qc) == tl.load(base + kc)
    return vis


@triton.jit
def mask_tile(qrow, qpos, kidx, kpos, b, Lq, Lk, MASKP, MASKD, BITS, tile,
              MASK_MODE: tl.constexpr, MASK_LEAVES: tl.constexpr, N_LEAVES: tl.constexpr, MASK_TT: tl.constexpr):
    """Exact visibility of a tile (in-bounds and allowed by the mask); row / key indices ``qrow``, ``kidx`` and
    positions ``qpos``, ``kpos`` broadcastable.

    ``tile`` is the bitmap slot of this 128x128 tile (bitmap mode only).
    """
    vis = (qrow < Lq) & (kidx < Lk)
    if MASK_MODE == MODE_LEAVES:
        v0 = mask_leaf(MASK_LEAVES & 15, 0, qpos, kpos, b, MASKP, MASKD)
        if (N_LEAVES == 1) & (MASK_TT == 2):  # the single leaf itself
            vis = vis & v0
        else:
            code = v0.to(tl.int32)
            if N_LEAVES > 1:
                code += mask_leaf((MASK_LEAVES >> 4) & 15, 1, qpos, kpos, b, MASKP, MASKD).to(tl.int32) * 2
            if N_LEAVES > 2:
                code += mask_leaf((MASK_LEAVES >> 8) & 15, 2, qpos, kpos, b, MASKP, MASKD).to(tl.int32) * 4
            if N_LEAVES > 3:
                code += mask_leaf((MASK_LEAVES >> 12) & 15, 3, qpos, kpos, b, MASKP, MASKD).to(tl.int32) * 8
            vis = vis & (((MASK_TT >> code) & 1) != 0)
    elif MASK_MODE == MODE_BITMAP:  # tile < 0: a FULL tile listed as partial only for its ragged edge
        col = kidx % BITMAP_TILE
        word = tl.load(BITS + tile * (BITMAP_TILE * BITMAP_TILE // 32) + (qrow % BITMAP_TILE) * (BITMAP_TILE // 32)
                       + col // 32, mask=vis & (tile >= 0), other=-1)
        vis = vis & (((word >> (col % 32)) & 1) != 0)
    return vis


# ---------------------------------------------------------------------------------------------
# score mods
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:  # MUFU tanh (relative error ~2^-11, below bf16/fp16 input rounding)
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        y = tl.where(x >= 0, t, -t)
    return y


@triton.jit
def score_mod(s, KIND: tl.constexpr, SLOT: tl.constexpr, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF,
              PW, FAST_TANH: tl.constexpr):
    """Apply score-mod slot ``SLOT`` (kind ``KIND``) to the scores ``s``; per-head parameters in ``MODF[SLOT, h]``."""
    if KIND == S_SOFTCAP:
        c = tl.load(MODF + SLOT * HQ + h)
        out = c * _tanh(s / c, FAST_TANH)
    elif KIND == S_ALIBI:
        out = s - tl.load(MODF + SLOT * HQ + h) * tl.abs(qpos - kpos).to(s.dtype)
    elif KIND == S_RELBIAS:
        bucket = tl.load(RBL + (kpos - qpos + RB_OFF))
        out = s + tl.load(RBT + bucket * HQ + h)
    elif KIND == S_SSMAX:
        out = s * (tl.load(MODF + SLOT * HQ + h) * logn)
    elif KIND == S_TEMP:
        out = s / tl.load(MODF + SLOT * HQ + h)
    elif KIND == S_POINTWISE:
        out = PW(s, b, h, qpos, kpos)
    else:
        out = s
    return out


@triton.jit
def score_mod_bwd(g, s_in, s_out, KIND: tl.constexpr, SLOT: tl.constexpr, qpos, kpos, b, h, logn, MODF, HQ,
                  DPW):
    """Chain rule through one slot: returns (dL/ds_in, per-element dL/dparam contribution)."""
    if KIND == S_SOFTCAP:
        t = s_out / tl.load(MODF + SLOT * HQ + h)
        gi = g * (1.0 - t * t)
        dp = g * 0.0
    elif KIND == S_ALIBI:
        gi = g
        dp = -g * tl.abs(qpos - kpos).to(g.dtype)
    elif KIND == S_RELBIAS:
        gi = g
        dp = g
    elif KIND == S_SSMAX:
        f = tl.load(MODF + SLOT * HQ + h)
        gi = g * (f * logn)
        dp = g * s_in * logn
    elif KIND == S_TEMP:
        t = tl.load(MODF + SLOT * HQ + h)
        gi = g / t
        dp = -g * s_in / (t * t)
    elif KIND == S_POINTWISE:
        gi = g * DPW(s_in, b, h, qpos, kpos)
        dp = g * 0.0
    else:
        gi = g
        dp = g * 0.0
    return gi, dp


@triton.jit
def mods_chain(s0, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF, MODS: tl.constexpr,
               PW0, PW1, PW2, PW3, FAST_TANH: tl.constexpr):
    """Scores after each of the (up to 4) slots: ``(s1, s2, s3, s4)``; unused slots are the identity.

    ``PWi`` is slot i's pointwise function (``identity_mod`` where the slot is not pointwise).
    """
    s1 = score_mod(s0, MODS & 15, 0, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF, PW0, FAST_TANH)
    s2 = score_mod(s1, (MODS >> 4) & 15, 1, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF, PW1, FAST_TANH)
    s3 = score_mod(s2, (MODS >> 8) & 15, 2, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF, PW2, FAST_TANH)
    s4 = score_mod(s3, (MODS >> 12) & 15, 3, qpos, kpos, b, h, logn, MODF, HQ, RBT, RBL, RB_OFF, PW3, FAST_TANH)
    return s1, s2, s3, s4


@triton.jit
def relbias_bucket_sums(acc, dp, qpos, kpos, RBL, RB_OFF, NBP: tl.constexpr):
    """acc[k] += Σ dp over the tile's elements in bucket k (deterministic; no atomics)."""
    bucket = tl.load(RBL + (kpos - qpos + RB_OFF))
    ks = tl.arange(0, NBP)
    for kk in tl.static_range(NBP):
        acc += tl.where(ks == kk, tl.sum(tl.sum(tl.where(bucket == kk, dp, 0.0), 1), 0), 0.0)
    return acc


# ---------------------------------------------------------------------------------------------
# elementwise normalizers
# ---------------------------------------------------------------------------------------------

@triton.jit
def norm_weight(s, bias, NORM: tl.constexpr):
    """Elementwise normalizer: weight ``f(s)`` and ``f'(s)``."""
    if NORM == N_SIGMOID:
        w = 1.0 / (1.0 + tl.exp(-(s + bias)))
        d = w * (1.0 - w)
    elif NORM == N_RELU:
        w = tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) is NaN on the GPU too
        d = tl.where(s > 0, 1.0, 0.0).to(s.dtype)
    elif NORM == N_RELU2:
        r = tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)
        w = r * r
        d = 2.0 * r
    else:
        w = s
        d = s * 0.0 + 1.0
    return w, d
