"""Implicit attention maps of linear / recurrent rules, chunk by chunk: row statistics and block means at any T.

Every rule of :func:`attnkit.linear_attention` is linear in ``V``: ``o = M V`` (plus the initial-state term,
left out here as in ``return_weights``), with ``M`` lower triangular. For query chunk ``i`` and an earlier key
position ``s`` (per head, ``Φ_c`` the state map of chunk ``c`` without inputs, see ``attnkit.ops.linear.engine``):

    M[t, s] = Q_eff,i[t] · X_i[:, s],     X_i = Φ_{i−1} … Φ_{j+1} G_j[:, s]   (s in chunk j < i)

``Q_eff, G, Φ`` come from the engine's chunk operators (``matrix_form`` / ``transfer``): additive rules have
``Q_eff = q ⊙ e^{b}``, ``G = (k ⊙ e^{b_C − b})ᵀ`` and a diagonal ``Φ = Diag(e^{b_C})`` (so every factor's exponent
is ≤ 0: decay-aware, no overflow); delta rules ``G = K̂ᵀ T Diag(β)``, ``Φ = Diag(e^{b_C}) − G K̄``. The walk keeps
``X`` for all earlier keys (``[B, H, Dk, T]``) and, per query chunk, produces ``M``'s rows tile by tile (the
chunk's own block is the engine's intra-chunk ``M``), feeding the same sinks as the softmax walk
(:mod:`attnkit.analysis.stats`). Memory O(B·H·T·Dk + B·H·C·block_k); time O(T²·Dk) (delta rules O(T²·Dk·(1 +
Dk/C))). Log-linear attention multiplies by ``λ_t^{ℓ(t,s)}``: constant over a block of two aligned chunks.
Normalized rules (``normalize=True``) divide each row by its sum + ``NORMALIZE_EPS`` at the end of the row.
Aaren's map is a causal softmax map (of its learned or per-token queries) and bidirectional linear attention's
is ``q kᵀ``: both go through the softmax-family walk.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core import masks as M
from ..core.normalizers import as_normalizer
from ..ops.linear import functional as F_lin
from ..ops.linear.common import expand_heads, level_of, to_bhtd
from ..ops.linear.engine import Problem, chunk_ops, transfer
from ..ops.softmax import Call
from .stats import BlockSink, RowStats, RowStatsSink, StatSpec, _Geo, walk_softmax

__all__ = ["linear_stats", "linear_block_map", "linear_map"]

#: default query chunk of the walk (a power of two; delta rules use 2× to amortize the Dk×Dk state maps)
DEFAULT_CHUNK = 64


def linear_map(q: Optional[Tensor], k: Optional[Tensor], **kw) -> Tensor:
    """The full implicit ``[B, H, T, T]`` map (``linear_attention(..., form="parallel", return_weights=True)``);
    keyword arguments as :func:`attnkit.linear_attention` (``rule=`` required, no ``v`` needed). Small T only."""
    q_, v = _dummy_v(q, k, kw.get("layout", "bhtd"), kw.get("query"))
    return F_lin.linear_attention(q, k, v, form="parallel", return_weights=True, **kw)[2]


def linear_stats(q: Optional[Tensor], k: Optional[Tensor], *, sink_tokens: int = 4, window: int = 64, topk: int = 8,
                 chunk: Optional[int] = None, block_k: Optional[int] = None, **kw) -> RowStats:
    """Exact row statistics (:mod:`attnkit.analysis.stats`) of a linear rule's implicit map, chunkwise.

    ``q, k`` and the keyword arguments as :func:`attnkit.linear_attention` (``rule``, ``gate``, ``beta``,
    ``feature_map``, ``normalize``, ``scale``, ``qk_l2norm``, ``level_weights``, ``base``, ``query``,
    ``layer_idx``, ``num_layers``, ``causal``, ``layout``); no ``v``. Rows are the state heads ``H``.
    """
    spec = StatSpec(sink_tokens, window, topk)
    prob = _Prepared(q, k, kw)
    sink = RowStatsSink(prob.B, prob.H, prob.T, spec, _Geo(0, 0, prob.cd, prob.device))
    prob.walk([sink], chunk, block_k)
    return sink.result()


def linear_block_map(q: Optional[Tensor], k: Optional[Tensor], *, size: int = 256, chunk: Optional[int] = None,
                     **kw) -> Tensor:
    """Exact block means ``[B, H, n, n]`` of the implicit map, ``n = min(size, T)`` blocks per side of
    ``ceil(T / n)`` positions (the last block shorter), chunkwise."""
    prob = _Prepared(q, k, kw)
    bs = _block_side(prob.T, size)
    C = prob.chunk(chunk)
    sink = BlockSink(prob.B, prob.H, prob.T, prob.T, bs, bs, _Geo(0, 0, prob.cd, prob.device))
    prob.walk([sink], C, None)
    return sink.result()


def _block_side(T: int, size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (blocks per side), got {size!r}")
    return -(-T // min(size, T))


def _dummy_v(q, k, layout, query):
    """A one-column ``v`` of the right batch, heads and length (the maps do not depend on v)."""
    ref = k if k is not None else q
    if ref is None:
        raise TypeError("give q (or k with aaren's query=)")
    t = to_bhtd(ref, layout) if isinstance(ref, Tensor) and ref.dim() == 4 else None
    if t is None:
        raise ValueError(f"q / k must be 4-D [B, H, T, D] (layout {layout!r}), got "
                         f"{tuple(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__}")
    v = t.new_zeros(t.shape[0], t.shape[1], t.shape[2], 1)
    return q, (v.transpose(1, 2) if layout == "bthd" else v)


class _Prepared:
    """A rule's problem after the op's own validation and preprocessing (feature maps, scale, gates, l2 norm)."""

    def __init__(self, q, k, kw: dict):
        kw = dict(kw)
        for bad in ("v", "form", "initial_state", "output_final_state", "cu_seqlens", "return_weights",
                    "return_attention", "chunk_size", "backend"):
            if bad in kw:
                raise TypeError(f"implicit-map statistics take no {bad}= (the map of one sequence from a zero state)")
        rule = F_lin.rule_name(kw.pop("rule", None))
        if kw.get("base") is not None:
            kw["base"] = F_lin.rule_name(kw["base"], "base")
        if rule not in F_lin.ALL_RULES:
            raise ValueError(f"rule must be one of {F_lin.ALL_RULES}, got {rule!r}")
        layout = kw.get("layout", "bhtd")
        self.rule, self.normalize = rule, bool(kw.get("normalize", False))
        causal = kw.pop("causal", True)
        _, v = _dummy_v(q, k, layout, kw.get("query"))
        if rule == "aaren":
            self._aaren(q, k, v, kw, layout, causal)
            return
        query = kw.pop("query", None)
        if query is not None:
            raise ValueError(f"query= is aaren's learned query; rule {rule!r} takes per-token q")
        if not causal and rule != "linear":
            raise ValueError(f"causal=False (bidirectional) exists for rule 'linear' only, got {rule!r}")
        if rule == "log_linear":
            base = kw.pop("base", None) or "linear"
            if base not in F_lin.LOG_LINEAR_BASES:
                raise ValueError(f"log_linear base must be one of {F_lin.LOG_LINEAR_BASES}, got {base!r}")
            if kw.get("level_weights") is None:
                raise ValueError("log_linear needs level_weights= [B, H, T, L]")
            spec = F_lin.RULES[base]
        else:
            if kw.get("base") is not None or kw.get("level_weights") is not None:
                raise ValueError(f"base= and level_weights= belong to rule 'log_linear', not {rule!r}")
            kw.pop("base", None)
            spec = F_lin.RULES[rule]
        if q is None:
            raise TypeError(f"rule {rule!r} needs per-token queries q")
        args = dict(gate=None, beta=None, feature_map=None, normalize=False, scale=None, layout="bhtd",
                    qk_l2norm=False, layer_idx=0, num_layers=1, level_weights=None)
        unknown = set(kw) - set(args)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        args.update(kw)
        self.p, meta = F_lin._prepare(spec, q, k, v, **args)
        self.B, self.H, self.T, self.cd = meta["B"], meta["H"], meta["T"], meta["cd"]
        self.device = self.p.q.device
        if self.p.lam is not None and self.T - 1 >= 1 << (self.p.lam.shape[-1] - 1):
            L = self.p.lam.shape[-1]
            raise ValueError(f"level_weights has L={L} levels, enough for positions < 2^{L - 1}; T={self.T}")
        self.route = "chunk" if causal else "bidirectional"

    def _aaren(self, q, k, v, kw, layout, causal):
        if not causal:
            raise ValueError("aaren is causal only (a prefix scan)")
        query = kw.pop("query", None)
        scale = kw.pop("scale", None)
        kw.pop("layout", None)
        if kw:
            raise ValueError(f"aaren takes only query= / scale= / layout=, got {sorted(kw)}")
        k = to_bhtd(k, layout)
        B, Hkv, T, D = k.shape
        self.cd = torch.float64 if k.dtype == torch.float64 else torch.float32
        sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
        if (q is None) == (query is None):
            raise ValueError("aaren takes either per-token queries q or a learned query= [H, D] / [B, H, D]")
        if query is None:
            qq = to_bhtd(q, layout)
        else:
            if not isinstance(query, Tensor) or query.dim() not in (2, 3) or query.shape[-1] != D:
                raise ValueError(f"aaren query must be [H, D] or [B, H, D] with D={D}")
            qv = query if query.dim() == 3 else query[None].expand(B, *query.shape)
            qq = qv[:, :, None, :].expand(B, qv.shape[1], T, D)
        self.B, self.H, self.T, self.device = B, qq.shape[1], T, k.device
        self.q_s, self.k_s, self.scale_s = qq.to(self.cd), k.to(self.cd), sc
        self.route = "aaren"

    def chunk(self, chunk: Optional[int]) -> int:
        if chunk is None:
            delta = getattr(self, "p", None) is not None and self.p.delta
            return DEFAULT_CHUNK * (2 if delta else 1)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a positive power of two, got {chunk!r}")
        return chunk

    # -- walks ------------------------------------------------------------------------------------------
    def walk(self, sinks, chunk: Optional[int], block_k: Optional[int]) -> None:
        with torch.no_grad():
            if self.route == "aaren":
                call = Call(self.q_s, self.k_s, self.k_s, M.causal, None, as_normalizer("softmax"), self.scale_s)
                walk_softmax(call, self.q_s, self.k_s, sinks, self.chunk(chunk), block_k or 1024)
            elif self.route == "bidirectional":
                p = self.p
                call = Call(p.q, p.k, p.k, M.full, None, as_normalizer("none"), 1.0)
                scale = None
                if self.normalize:  # M / (Σ_s M[t, s] + eps), Σ_s M[t, s] = q_t · Σ_s k_s
                    scale = 1.0 / (p.q @ p.k.sum(2, keepdim=True).transpose(-1, -2) + F_lin.NORMALIZE_EPS)[..., 0]
                walk_softmax(call, p.q, p.k, sinks, self.chunk(chunk), block_k or 1024, row_scale=scale)
            else:
                self._walk_chunks(sinks, self.chunk(chunk), block_k)

    def _walk_chunks(self, sinks, C: int, block_k: Optional[int]) -> None:
        p, B, H, T = self.p, self.B, self.H, self.T
        N = -(-T // C)
        pp = p.pad(0, N * C - T)
        view = lambda t: None if t is None else t.reshape(t.shape[:2] + (N, C) + t.shape[3:])  # noqa: E731
        q, k, g, beta, lam = map(view, (pp.q, pp.k, pp.g, pp.beta, pp.lam))
        Dk = q.shape[-1]
        bk = block_k or max(C, 1024 // C * C)
        if bk % C:
            raise ValueError(f"block_k ({bk}) must be a multiple of the chunk ({C})")
        X = q.new_zeros(B, H, Dk, N * C)  # X[:, :, :, s]: token s's contribution to the state at this chunk
        one = lambda t, i: None if t is None else t[:, :, i:i + 1]  # noqa: E731
        logC = C.bit_length() - 1
        pos = torch.arange(N * C, device=q.device)
        like = q.new_empty(B, H, 1)
        for i in range(N):
            ops = chunk_ops(one(q, i), one(k, i), one(g, i), one(beta, i), p.delta)
            Mi, Q_eff, G = (t[:, :, 0] for t in ops.matrix_form())
            r0, r1 = i * C, min((i + 1) * C, T)
            lr = r1 - r0
            for sk in sinks:
                sk.begin(r0, r1, like)
            rowsum = q.new_zeros(B, H, lr) if self.normalize else None
            for c0 in range(0, i * C, bk):  # earlier chunks, tiles of bk keys
                c1 = min(c0 + bk, i * C)
                tile = (Q_eff @ X[..., c0:c1])[:, :, :lr]
                if lam is not None:  # λ_t at level msb(i ⊕ j) + log2 C + 1 for key chunk j
                    js = torch.arange(c0 // C, c1 // C, device=q.device)
                    lev = (level_of(torch.tensor(i, device=q.device), js) + logC).clamp(max=lam.shape[-1] - 1)
                    fac = lam[:, :, i, :lr].index_select(-1, lev)  # [B, H, lr, n_chunks]
                    tile = (tile.unflatten(-1, (-1, C)) * fac[..., None]).flatten(-2)
                self._emit(sinks, tile, r0, r1, c0, c1, None, rowsum)
            diag = Mi[:, :, :lr, :lr]
            if lam is not None:
                pi = pos[r0:r1]
                lev = level_of(pi[:, None], pi[None, :]).clamp(0, lam.shape[-1] - 1)
                diag = diag * lam[:, :, i, :lr].gather(-1, lev.expand(B, H, lr, lr))
            vis = torch.tril(torch.ones(lr, lr, dtype=torch.bool, device=q.device))
            self._emit(sinks, diag.masked_fill(~vis, 0.0), r0, r1, r0, r1, vis, rowsum)
            scale = None if rowsum is None else 1.0 / (rowsum + F_lin.NORMALIZE_EPS)
            for sk in sinks:
                sk.end(scale)
            if i < N - 1:  # carry every earlier key's column through this chunk, then add its own keys
                if i and (p.delta or ops.d_end is not None):
                    kd = ops.k_dec[:, :, 0] if p.delta else None
                    d_end = None if ops.d_end is None else ops.d_end[:, :, 0]
                    X[..., :i * C] = transfer(X[..., :i * C], d_end, G if p.delta else None, kd)
                X[..., i * C:(i + 1) * C] = G

    @staticmethod
    def _emit(sinks, tile: Tensor, r0, r1, c0, c1, vis, rowsum) -> None:
        if rowsum is not None:
            rowsum += tile.sum(-1)
        for sk in sinks:
            sk.add_exact(tile, r0, r1, c0, c1, vis)
