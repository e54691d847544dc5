"""Shared pieces of the linear-family Triton kernels (chunk and fused recurrent).

Conventions (as in :mod:`attnkit.variants.linear`): per head the state is ``S ∈ R^{Dk×Dv}``, the read-out
``o_t = q_tᵀ S_t``; gates are log decays ``g ≤ 0``. Inside a chunk of ``C`` tokens the kernels only ever
exponentiate sums of gates taken over a range of tokens (``b_t − b_s`` with ``s ≤ t``, or a segment sum),
never a positive number: a log gate of −20 per token cannot overflow.

JIT helpers here:

* :func:`chunk_coords` / :func:`doc_coords`: which tokens a program owns, for equal-length batches and for
  documents packed by ``cu_seqlens`` (``VARLEN``), without a host loop over documents;
* :func:`load_tile`, :func:`load_qk` (with the fused L2 normalization of q / k rows), :func:`l2norm_bwd`;
* :func:`chunk_gates`: cumulative log gates of a chunk (scalar ``[C]`` or per channel ``[C, BK]``);
* :func:`gram` / :func:`gram_bwd`: the decay-weighted lower-triangular matrix
  ``M[t,s] = Σ_d a_td c_sd exp(b_td − b_sd)`` (``s ≤ t``, or ``s < t``) and its gradients. Per-channel gates
  use recursive halving (the reference's ``decay_matmul``): at level ``s`` the lower-left ``s×s`` quadrant of
  every ``2s`` block is one tensor-core product of ``a·exp(segment sum down to t)`` and ``c·exp(segment sum
  after s)``, both exponents ≤ 0; log2(C) products of ``C×C×Dk``;
* :func:`unit_lower_inverse`: ``(I + L)⁻¹`` of a strictly lower ``L`` by the same recursive 2×2 block formula as
  the reference (``[[A, 0], [X, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹XA⁻¹, B⁻¹]]``), log2(C) levels of two products.

Gate kinds (constexpr ``GATE``): 0 none, 1 one log gate per token (``[B,H,T]``), 2 one per token and key
channel (``[B,H,T,Dk]``). A fixed per-head decay is a scalar gate expanded over (B, T) by the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.tuning import interpreting  # noqa: F401  (one definition for every kernel)

GATE_NONE, GATE_SCALAR, GATE_CHANNEL = 0, 1, 2
#: F.normalize's floor on the norm (q / max(‖q‖, eps))
L2_EPS = 1e-12




def pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(x - 1, 0).bit_length())


def tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def precisions(dtype: torch.dtype):
    """(ACC, DT, PREC, IPREC): accumulation dtype, dot-operand dtype, input precision of the operand dots and of
    the fp32 UT inverse. Half inputs multiply on tensor cores in their own dtype and invert T with TF32 products (as
    fla does); fp32 inputs use 3xTF32 (about fp32 accuracy) for both; float64 (interpreter) exact products."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    prec = {torch.float64: "ieee", torch.float32: "tf32x3"}.get(dtype)
    iprec = {torch.float64: "ieee", torch.float32: "tf32x3"}.get(dtype, "tf32")
    return acc, tl_dtype(dtype), prec, iprec


def varlen_tables(cu: list, chunk: int, device):
    """(DOCS int32 [N+1], CHUNKS int32 [NCH, 2] of (document, chunk in document), CHOFF int32 [N]: a document's
    first global chunk) for documents ``cu`` (a host list of offsets). Empty documents own no chunk."""
    counts = [-(-(e - s) // chunk) for s, e in zip(cu, cu[1:])]
    choff, pairs, acc = [], [], 0
    for n, c in enumerate(counts):
        choff.append(acc)
        pairs.extend((n, i) for i in range(c))
        acc += c
    docs = torch.tensor(cu, dtype=torch.int32, device=device)
    chunks = torch.tensor(pairs if pairs else [(0, 0)], dtype=torch.int32, device=device).reshape(-1, 2)
    return docs, chunks, torch.tensor(choff, dtype=torch.int32, device=device), acc


# ------------------------------------------------------------------------------------------------
# Coordinates
# ------------------------------------------------------------------------------------------------

@triton.jit
def chunk_coords(pid_c, pid_bh, CHUNKS, DOCS, T, NT, H, C: tl.constexpr, VARLEN: tl.constexpr):
    """``(b, h, t0, eos, gi)`` of the chunk program ``(pid_c, pid_bh)``: batch row, state head, first token, end
    of its document (exclusive), global chunk index (rows of the per-chunk state buffers)."""
    h = pid_bh % H
    b = pid_bh // H
    if VARLEN:
        n = tl.load(CHUNKS + 2 * pid_c)
        t0 = tl.load(DOCS + n) + tl.load(CHUNKS + 2 * pid_c + 1) * C
        eos = tl.load(DOCS + n + 1)
        gi = pid_c
    else:
        t0 = pid_c * C
        eos = T + pid_c * 0
        gi = b * NT + pid_c
    return b, h, t0, eos, gi


@triton.jit
def doc_coords(pid_nh, DOCS, CHOFF, T, NT, H, VARLEN: tl.constexpr):
    """``(b, h, bos, eos, gi0)`` of a sequential program over document ``pid_nh // H``: batch row, head, token range
    and the global index of its first chunk."""
    h = pid_nh % H
    n = pid_nh // H
    if VARLEN:
        b = n * 0
        bos = tl.load(DOCS + n)
        eos = tl.load(DOCS + n + 1)
        gi0 = tl.load(CHOFF + n)
    else:
        b = n
        bos = n * 0
        eos = T + n * 0
        gi0 = n * NT
    return b, h, bos, eos, gi0


# ------------------------------------------------------------------------------------------------
# Loads
# ------------------------------------------------------------------------------------------------

@triton.jit
def load_tile(X, off, rows, row_ok, cols, ncols, s_t, s_d):
    """``X[off + rows·s_t + cols·s_d]`` as ``[len(rows), len(cols)]``; zero where ``~row_ok`` or ``cols ≥ ncols``."""
    ptr = X + off + rows[:, None].to(tl.int64) * s_t + cols[None, :] * s_d
    return tl.load(ptr, mask=row_ok[:, None] & (cols < ncols)[None, :], other=0.0)


@triton.jit
def store_tile(X, off, rows, row_ok, cols, ncols, s_t, s_d, val):
    ptr = X + off + rows[:, None].to(tl.int64) * s_t + cols[None, :] * s_d
    tl.store(ptr, val.to(X.dtype.element_ty), mask=row_ok[:, None] & (cols < ncols)[None, :])


@triton.jit
def l2_rnorm(x, L2: tl.constexpr):
    """``1 / max(‖x_row‖, eps)`` per row of ``x [R, BK]`` (F.normalize); 1 without ``L2``."""
    if L2:
        n = tl.sqrt(tl.sum(x * x, 1))
        return 1.0 / tl.maximum(n, 1e-12)
    else:
        return tl.sum(x * 0.0, 1) + 1.0


@triton.jit
def load_qk(X, off, rows, row_ok, cols, ncols, s_t, s_d, L2: tl.constexpr, ACC: tl.constexpr):
    """Rows of q or k in ``ACC``, L2-normalized when ``L2``. Returns ``(x̂, 1/‖x‖)``."""
    x = load_tile(X, off, rows, row_ok, cols, ncols, s_t, s_d).to(ACC)
    rn = l2_rnorm(x, L2)
    return x * rn[:, None], rn


@triton.jit
def l2norm_bwd(dy, y, rn, L2: tl.constexpr):
    """Gradient through ``y = x / max(‖x‖, eps)`` per row: ``(dy − y (y·dy)) / ‖x‖`` (a zero row: ``dy / eps``)."""
    if L2:
        return (dy - y * tl.sum(y * dy, 1)[:, None]) * rn[:, None]
    else:
        return dy


# ------------------------------------------------------------------------------------------------
# Gates
# ------------------------------------------------------------------------------------------------

@triton.jit
def chunk_gates(Gp, off, rows, row_ok, cols, ncols, s_t, s_d, GATE: tl.constexpr, ACC: tl.constexpr):
    """Log gates of one chunk and their sums: ``(g, b, r, bC)`` with ``b_t = Σ_{u ≤ t} g_u`` (inclusive),
    ``r_t = Σ_{u > t} g_u = b_C − b_t`` (a reverse sum, not a difference: exact near the chunk end), ``bC`` the
    chunk total. Shapes ``[C]`` (GATE 1) or ``[C, BK]`` (GATE 2); zeros without gates."""
    if GATE == 1:
        g = tl.load(Gp + off + rows.to(tl.int64) * s_t, mask=row_ok, other=0.0).to(ACC)
        b = tl.cumsum(g, 0)
        r = tl.cumsum(g, 0, reverse=True) - g
        bC = tl.sum(g, 0)
    elif GATE == 2:
        g = load_tile(Gp, off, rows, row_ok, cols, ncols, s_t, s_d).to(ACC)
        b = tl.cumsum(g, 0)
        r = tl.cumsum(g, 0, reverse=True) - g
        bC = tl.sum(g, 0)
    else:
        g = tl.sum(rows * 0.0, 0).to(ACC)
        b = g
        r = g
        bC = g
    return g, b, r, bC


@triton.jit
def row_scale(x, e, GATE: tl.constexpr):
    """``x [C, BK] ⊙ e``: e per row (GATE 1, ``[C]``), per element (GATE 2, ``[C, BK]``); x without gates."""
    if GATE == 1:
        return x * e[:, None]
    elif GATE == 2:
        return x * e
    else:
        return x


@triton.jit
def state_scale(h, ebC, GATE: tl.constexpr):
    """``Diag(e^{b_C}) h`` for a state tile ``h [BK, BV]``: scalar (GATE 1) or per key row (GATE 2)."""
    if GATE == 1:
        return h * ebC
    elif GATE == 2:
        return h * ebC[:, None]
    else:
        return h


# ------------------------------------------------------------------------------------------------
# Decay-weighted lower-triangular products and the UT inverse
# ------------------------------------------------------------------------------------------------

@triton.jit
def _quadrants(rr, s: tl.constexpr):
    """Rows in the lower half of their ``2s`` block, and the ``[C, C]`` mask of every block's lower-left quadrant."""
    low = ((rr // s) % 2) == 1
    quad = ((rr[:, None] // (2 * s)) == (rr[None, :] // (2 * s))) & low[:, None] & (~low)[None, :]
    return low, quad


@triton.jit
def _level(g, rr, lvl: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """Level ``lvl`` of the recursive halving (quadrants of size ``s = C / 2^{lvl+1}``): ``(down, up, low, quad)``;
    ``down_t = Σ g`` from the start of t's segment of length s to t, ``up_t = Σ g`` after t to the end of its
    segment (both ≤ 0), ``low`` / ``quad`` as in :func:`_quadrants`."""
    s: tl.constexpr = C >> (lvl + 1)
    if s == 1:
        down = g
        up = g * 0.0
    else:
        g3 = tl.reshape(g, [C // s, s, BK])
        inc = tl.cumsum(g3, 1)
        down = tl.reshape(inc, [C, BK])
        up = tl.reshape(tl.sum(g3, 1)[:, None, :] - inc, [C, BK])
    low, quad = _quadrants(rr, s)
    return down, up, low, quad


@triton.jit
def gram(a, c, g, b, STRICT: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr,
         BK: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``M[t, s] = Σ_d a_td c_sd exp(b_td − b_sd)`` for ``s ≤ t`` (``s < t`` if STRICT), 0 above; ``a, c [C, BK]``
    in ACC, ``g``/``b`` the chunk's log gates and their inclusive sums (see :func:`chunk_gates`)."""
    rr = tl.arange(0, C)
    if STRICT:
        keep = rr[:, None] > rr[None, :]
    else:
        keep = rr[:, None] >= rr[None, :]
    if GATE == 2:
        if STRICT:
            M = tl.zeros([C, C], dtype=ACC)
        else:
            M = tl.where(rr[:, None] == rr[None, :], tl.sum(a * c, 1)[:, None], 0.0).to(ACC)
        for lvl in tl.static_range(LOG2C):
            down, up, low, quad = _level(g, rr, lvl, C, BK)
            aa = tl.where(low[:, None], a * tl.exp(down), 0.0)
            cc = tl.where(low[:, None], 0.0, c * tl.exp(up))
            p = tl.dot(aa.to(DT), tl.trans(cc.to(DT)), input_precision=PREC, out_dtype=ACC)
            M += tl.where(quad, p, 0.0)
    else:
        M = tl.dot(a.to(DT), tl.trans(c.to(DT)), input_precision=PREC, out_dtype=ACC)
        if GATE == 1:
            M = M * tl.exp(tl.where(keep, b[:, None] - b[None, :], float("-inf")))
        else:
            M = tl.where(keep, M, 0.0)
    return M


@triton.jit
def gram_bwd(dM, a, c, g, b, STRICT: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr,
             BK: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Gradients of :func:`gram` for ``dM`` (zero outside the kept triangle): ``(da, dc, db)`` with ``db`` the
    gradient of the inclusive log-gate sums, ``[C]`` (GATE 1), ``[C, BK]`` (GATE 2); by
    ``∂M[t,s]/∂b_t = +a_t·(…)`` and ``∂M[t,s]/∂b_s = −c_s·(…)``: ``db = a ⊙ da − c ⊙ dc``."""
    rr = tl.arange(0, C)
    if STRICT:
        keep = rr[:, None] > rr[None, :]
    else:
        keep = rr[:, None] >= rr[None, :]
    if GATE == 2:
        if STRICT:
            da = tl.zeros([C, BK], dtype=ACC)
            dc = tl.zeros([C, BK], dtype=ACC)
        else:
            dd = tl.sum(tl.where(rr[:, None] == rr[None, :], dM, 0.0), 1)
            da = dd[:, None] * c
            dc = dd[:, None] * a
        for lvl in tl.static_range(LOG2C):
            down, up, low, quad = _level(g, rr, lvl, C, BK)
            ea = tl.exp(down)
            ec = tl.exp(up)
            dq = tl.where(quad, dM, 0.0).to(DT)
            cc = tl.where(low[:, None], 0.0, c * ec).to(DT)
            da += tl.where(low[:, None], ea * tl.dot(dq, cc, input_precision=PREC, out_dtype=ACC), 0.0)
            aa = tl.where(low[:, None], a * ea, 0.0).to(DT)
            dc += tl.where(low[:, None], 0.0, ec * tl.dot(tl.trans(dq), aa, input_precision=PREC, out_dtype=ACC))
        db = a * da - c * dc
    else:
        if GATE == 1:
            dM = dM * tl.exp(tl.where(keep, b[:, None] - b[None, :], float("-inf")))
        else:
            dM = tl.where(keep, dM, 0.0)
        dMd = dM.to(DT)
        da = tl.dot(dMd, c.to(DT), input_precision=PREC, out_dtype=ACC)
        dc = tl.dot(tl.trans(dMd), a.to(DT), input_precision=PREC, out_dtype=ACC)
        if GATE == 1:
            db = tl.sum(a * da, 1) - tl.sum(c * dc, 1)
        else:
            db = tl.sum(rr * 0.0, 0).to(ACC)
    return da, dc, db


@triton.jit
def unit_lower_inverse(L, C: tl.constexpr, LOG2C: tl.constexpr, ACC: tl.constexpr, IPREC: tl.constexpr):
    """``(I + L)⁻¹`` for strictly lower ``L [C, C]``: recursive 2×2 blocks, ``off = −B⁻¹ X A⁻¹`` of every pair of
    diagonal blocks at once (the inverse so far is block diagonal, so two products place each quadrant)."""
    rr = tl.arange(0, C)
    Ti = tl.where(rr[:, None] == rr[None, :], 1.0, 0.0).to(ACC)
    for lvl in tl.static_range(LOG2C):
        low, quad = _quadrants(rr, 1 << lvl)
        X = tl.where(quad, L, 0.0)
        Ti = Ti - tl.dot(tl.dot(Ti, X, input_precision=IPREC, out_dtype=ACC), Ti, input_precision=IPREC,
                         out_dtype=ACC)
    return Ti
