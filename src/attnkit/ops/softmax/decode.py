"""Host side of the split-KV decode kernels (:mod:`.triton.decode`): plans, split counts, launches.

A :class:`DecodeProblem` is everything one decode signature needs (mask / score mods / normalizer, sizes
except the key count, dtype, device, contiguous or paged): it reuses :class:`.fused.Problem`'s parameter
buffers and kernel switches (the same plan functions of :mod:`.plan`), but not its fixed-length pieces (block
lists, bitmaps, row counts), which decoding rebuilds from the cache's lengths:

* which key blocks to read: ``[0, S) ∪ [L − W, L)`` per sequence from the mask's structure
  (:func:`support`; exact masking happens in-kernel, so this only has to cover every visible key), and which of
  them every query row sees whole (:func:`full_support`: read without an element mask);
* predicate / non-leaf masks: packed bitmaps of the ``Lq`` query rows over each sequence's keys, rebuilt per
  call (``Lq × L`` bits: decoding has few query rows);
* row counts (Scalable-Softmax, relu, relu², relaxed): a counting pass of the kernel;
* T5 relative bias: the bucket table over a power-of-two bound of the key count (rebuilt when it doubles).

The split count fills the GPU in one wave: ``NSPLIT = ⌊pps · SMs / (B · HKV · row blocks)⌋`` (``pps``: programs of the
configuration resident per SM, from its shared memory), at least 1 and at most one split per
``MIN_BLOCKS_PER_SPLIT`` key blocks of the longest sequence.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor

from ...core import masks as M
from ...core.masks import Geometry
from ..utils import tuning
from . import fused as F
from . import plan as P
from .triton.decode import attn_decode, attn_decode_combine

__all__ = ["DecodeProblem", "decode", "support", "full_support", "splits_for", "config_for", "DecodeConfig",
           "problem"]

#: the fewest key blocks a split gets (GPU)
MIN_BLOCKS_PER_SPLIT = int(os.environ.get("ATTNKIT_DECODE_MIN_BLOCKS", "4"))
#: the most query rows (``G · Lq``) one program holds; more rows run as several row blocks
MAX_ROWS = 64
INF_W = 1 << 30
MAX_PROBLEMS = 128
#: tests: count the reads of every key block (``last_trace [B, Hkv, blocks]`` after each call)
TRACE = False
last_trace: Optional[Tensor] = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    """The smallest power of two >= x (plain Python: the per-call path avoids Triton's JIT-wrapped helpers)."""
    return 1 << max(0, (x - 1).bit_length())


@dataclass(frozen=True)
class DecodeConfig:
    """Keys per block ``BN``, warps and pipeline stages of the decode kernel, and ``pps``: programs the split count
    puts on each SM (as many as fit at once: 3 stages of 64-key bf16 K and V tiles at D = 128 take 96 KiB of the
    H100 / H200's 228 KiB of shared memory, so 2)."""

    BN: int
    warps: int = 4
    stages: int = 3
    pps: int = 2


# ---------------------------------------------------------------------------------------------
# which keys a mask can show to the last Lq query rows
# ---------------------------------------------------------------------------------------------

def support(mask: M.Mask, Lq: int) -> Tuple[int, int]:
    """``(S, W)``: every key visible to the last ``Lq`` query rows of a sequence of ``L`` keys lies in
    ``[0, S) ∪ [L − W, L)`` (queries end-aligned, keys at positions ``0 … L−1``). Conservative: ``(0, ∞)`` (all
    keys) unless the structure bounds it (sinks: ``[0, n)``; a sliding window: the last ``left + Lq`` keys;
    ``&`` keeps the smaller of its sides, ``|`` the union)."""
    if type(mask) is M._Or:
        (s1, w1), (s2, w2) = support(mask.a, Lq), support(mask.b, Lq)
        return max(s1, s2), max(w1, w2)
    if type(mask) is M._And:
        a, b = support(mask.a, Lq), support(mask.b, Lq)
        return min(a, b, key=lambda sw: sw[0] + sw[1])
    if mask.kind == "sinks":
        return mask.n, 0
    if mask.kind == "sliding_window":
        return 0, min(INF_W, mask.left + Lq)
    return 0, INF_W


def full_support(mask: M.Mask, Lq: int) -> Tuple[int, int, int, int]:
    """``(FS, FHB, FA, FB)``: every key in ``[0, min(FS, L − FHB)) ∪ [L − FA, L − FB)`` is visible to every one of the
    last ``Lq`` query rows of a sequence of ``L`` keys (an under-approximation: the kernels read those keys with no
    element mask; ``(0, 0, 0, 0)`` is the empty set). Leaves: full ``[0, L)``; causal ``[0, L − Lq + 1)``; a sliding
    window ``[L − 1 − left, L − Lq + 1 + right)``; sinks ``[0, n)``; others nothing. ``|`` keeps the larger head and
    tail, ``&`` intersects (pieces the form cannot hold are dropped)."""
    if type(mask) is M._Or:
        a, b = full_support(mask.a, Lq), full_support(mask.b, Lq)
        return (*max(a[:2], b[:2], key=lambda x: (x[0], -x[1])), *max(a[2:], b[2:], key=lambda x: x[0] - x[1]))
    if type(mask) is M._And:
        a, b = full_support(mask.a, Lq), full_support(mask.b, Lq)
        heads = [(min(a[0], b[0]), max(a[1], b[1]))]
        tails = [(min(a[2], b[2]), max(a[3], b[3]))]
        for x, y in ((a, b), (b, a)):
            if y[2] >= INF_W:  # y's tail is a prefix [0, L − FB): x's head ∩ it is a head
                heads.append((x[0], max(x[1], y[3])))
            if x[0] >= INF_W:  # x's head is a prefix [0, L − FHB): ∩ y's tail is a tail
                tails.append((y[2], max(y[3], x[1])))
        return (*max(heads, key=lambda x: (x[0], -x[1])), *max(tails, key=lambda x: x[0] - x[1]))
    if mask.kind == "full":
        return INF_W, 0, 0, 0
    if mask.kind == "causal":
        return INF_W, Lq - 1, 0, 0
    if mask.kind == "sliding_window":
        return 0, 0, min(INF_W, 1 + mask.left), max(0, Lq - 1 - mask.right)
    if mask.kind == "sinks":
        return mask.n, 0, 0, 0
    return 0, 0, 0, 0


# ---------------------------------------------------------------------------------------------
# the plan of one decode signature
# ---------------------------------------------------------------------------------------------

class DecodeProblem(F.Problem):
    """The host plan of one decode signature (see the module doc).

    Subclasses :class:`.fused.Problem` for its parameter buffers (:meth:`buffers`) and kernel switches
    (:meth:`constexprs`), setting the attributes those read; ``Problem.__init__`` is not called because it
    plans a fixed key count (block lists, bitmaps, counts), which decoding does per call."""

    def __init__(self, mask, score_mod, normalizer, B: int, Hq: int, Hkv: int, Lq: int, D: int, Dv: int,
                 scale: float, dtype: torch.dtype, device: torch.device, paged: bool, page: int):
        self.keep = (mask, score_mod, normalizer)
        self.B, self.Hq, self.Hkv, self.Lq, self.D, self.Dv = B, Hq, Hkv, Lq, D, Dv
        self.Lk = None
        self.scale, self.dtype, self.device = scale, dtype, device
        self.paged, self.page = paged, page
        self.diff, self.need_grad = False, False
        self.mp = P.mask_plan(mask, B, device)
        self.mods = P.mod_plan(score_mod, Hq, False)
        self.norm = P.norm_plan(normalizer, 1)  # sigmoid's default bias −log L is taken per sequence in-kernel
        self.sig_logn = getattr(normalizer, "name", "") == "sigmoid" and normalizer.bias is None
        self.G = Hq // Hkv
        self.acc_t = torch.float64 if dtype == torch.float64 else torch.float32
        self.need_counts = self.mods.needs_counts or self.norm.needs_counts
        self.dummy_f, self.dummy_i = F._dummy(device, self.acc_t), F._dummy(device, torch.int32)
        self.learnable = []
        self.learnable_tensors = []
        rb = self.mods.relbias
        values = [v for _, v in self.mods.values] + ([self.norm.value] if not self.sig_logn else [])
        values += [rb.table] if rb is not None else []
        self.dynamic = any(F._changes(t) for t in values)
        self._const: Dict[int, Tensor] = {}
        if self.sig_logn:
            self.norm.value = None  # not read by the kernel
        self._static_buffers = None if self.dynamic else self._param_buffers()
        self.support = support(mask, Lq)
        self.full = full_support(mask, Lq) if self.mp.mode != P.MODE_BITMAP else (0, 0, 0, 0)
        self.BM = max(16, _pow2(min(self.G * Lq, MAX_ROWS)))
        self.RB = _cdiv(self.G * Lq, self.BM)
        self._cfg: Tuple[Optional[str], Optional[DecodeConfig]] = (None, None)
        self.cx = self.constexprs(False)
        self.cx.pop("DIFF")
        self.phases: Dict[tuple, F.Phase] = {}
        self._rb_cache: Tuple[int, Tensor, int] = (0, self.dummy_i, 0)

    def relbias(self, max_len: int) -> Tuple[Tensor, int]:
        """The T5 bucket table covering every ``kv − q`` of sequences up to ``max_len`` keys (kept per power of 2)."""
        rb = self.mods.relbias
        if rb is None:
            return self.dummy_i, 0
        bound = max(256, _pow2(max_len))
        if self._rb_cache[0] != bound:
            lut, off = P.relbias_lut(rb, self.Lq, bound, self.device, bound - self.Lq, 0)
            self._rb_cache = (bound, lut, off)
        return self._rb_cache[1], self._rb_cache[2]

    def bitmap(self, lens: Sequence[int], max_len: int) -> tuple:
        """``(bits, lut, bl_b, bl_h, nk128)``: the mask of each sequence's ``Lq`` query rows over its keys in the
        128×128-tile bit layout of :func:`.triton.mods.mask_tile` (rows past ``Lq`` unused)."""
        mask, dev, Lq = self.mp.mask, self.device, self.Lq
        nk = _cdiv(max_len, P.TILE)
        B = len(lens)
        L = torch.tensor(list(lens), device=dev).view(-1, 1, 1, 1)
        b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.Hq, device=dev).view(1, -1, 1, 1)
        q = L - Lq + torch.arange(Lq, device=dev).view(1, 1, -1, 1)
        kv = torch.arange(nk * P.TILE, device=dev).view(1, 1, 1, -1)
        m = mask(b, h, q, kv)
        if m.dtype != torch.bool:
            raise TypeError(f"mask {mask!r} returned dtype {m.dtype}, expected torch.bool")
        m = m.expand(B, m.shape[1], Lq, nk * P.TILE) & (kv < L)
        Hp = m.shape[1]
        tiles = torch.zeros(B, Hp, nk, P.TILE, P.TILE, dtype=torch.bool, device=dev)
        tiles[:, :, :, :Lq] = m.view(B, Hp, Lq, nk, P.TILE).permute(0, 1, 3, 2, 4)
        bits = P._pack_bits(tiles).reshape(-1).contiguous()
        lut = torch.arange(B * Hp * nk, dtype=torch.int32, device=dev).view(B, Hp, 1, nk).contiguous()
        return bits, lut, Hp * nk, (nk if Hp > 1 else 0), nk


_problems: "OrderedDict[tuple, DecodeProblem]" = OrderedDict()
_lock = threading.Lock()


def problem(q: Tensor, k: Tensor, v: Tensor, mask, score_mod, normalizer, scale: float, paged: bool,
            max_len: int) -> DecodeProblem:
    """The cached :class:`DecodeProblem` of this signature (validated on first use)."""
    B, Hq, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    page = k.shape[2] if paged else 0
    key = (F._mask_key(mask), P.mods_key(score_mod), P.norm_key(normalizer), B, Hq, Hkv, Lq, D, Dv, scale, q.dtype,
           q.device, paged, page)
    pb = _problems.get(key)
    if pb is not None:
        _problems.move_to_end(key)
        return pb
    if score_mod is not None:
        score_mod.validate(Hq)
    normalizer.validate(Hq)
    pb = DecodeProblem(mask, score_mod, normalizer, B, Hq, Hkv, Lq, D, Dv, scale, q.dtype, q.device, paged, page)
    with _lock:
        _problems[key] = pb
        while len(_problems) > MAX_PROBLEMS:
            _problems.popitem(last=False)
    return pb


# ---------------------------------------------------------------------------------------------
# configurations and split counts
# ---------------------------------------------------------------------------------------------

_sms: Dict[str, int] = {}
_tuned: Dict[tuple, DecodeConfig] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests exercise the merge
    k = str(device)
    if k not in _sms:
        _sms[k] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[k]


def candidates(pb: DecodeProblem) -> List[DecodeConfig]:
    """The configurations autotuning tries (each one compile), default first."""
    base = config_for(pb)
    extra = [DecodeConfig(64, 4, 2, 3), DecodeConfig(64, 4, 4, 1), DecodeConfig(32, 4, 4, 3), DecodeConfig(32, 4, 3, 4),
             DecodeConfig(128, 8, 2, 1), DecodeConfig(64, 8, 3, 2), DecodeConfig(64, 4, 3, 4), DecodeConfig(32, 2, 3, 6)]
    return [base] + [c for c in extra if c != base and (max(pb.D, pb.Dv) <= 128 or c.BN <= 64)]


def config_for(pb: DecodeProblem) -> DecodeConfig:
    """Default configuration: 16-key blocks in the interpreter; on the GPU 64 keys × 3 stages at head dims ≤ 128
    in half precision (16-byte loads, three K/V tiles in flight), smaller blocks for float32 / wide heads.
    ``ATTNKIT_DECODE_CONFIG`` (``ATTNKIT_DECODE_CONFIG_PAGED`` for paged caches) = ``"BN,warps,stages[,pps]"``
    overrides it (benchmark sweeps)."""
    env = os.environ.get("ATTNKIT_DECODE_CONFIG_PAGED" if pb.paged else "ATTNKIT_DECODE_CONFIG")
    if pb._cfg[0] == env and pb._cfg[1] is not None:
        return pb._cfg[1]
    if env:
        cfg = DecodeConfig(*(int(x) for x in env.split(",")))
    elif tuning.interpreting():
        cfg = DecodeConfig(16, 4, 1, 2)
    elif pb.dtype in (torch.float32, torch.float64) or max(_pow2(pb.D), _pow2(pb.Dv)) > 128:
        cfg = DecodeConfig(32, 4, 2, 2)
    else:
        cfg = DecodeConfig(64, 4, 3, 2)
    pb._cfg = (env, cfg)
    return cfg


def splits_for(pb: DecodeProblem, max_len: int, cfg: DecodeConfig) -> int:
    """How many splits share each sequence's key blocks (see the module doc)."""
    S, W = pb.support
    need = min(max_len, S + W)
    blocks = _cdiv(max(need, 1), cfg.BN)
    base = pb.B * pb.Hkv * pb.RB
    fill = (cfg.pps * _num_sms(pb.device)) // base
    most = blocks // MIN_BLOCKS_PER_SPLIT if pb.device.type == "cuda" else blocks
    return max(1, min(fill, most))


# ---------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------

def _ints_sig(*xs: int) -> tuple:
    """What Triton specializes an int argument on (value 1, divisibility by 16): part of a compiled kernel's key."""
    return tuple((x == 1, x % 16 == 0) for x in xs)


def decode(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, *, max_len: int, block_table: Optional[Tensor] = None,
           mask, score_mod, normalizer, scale: float, want_lse: bool = False, splits: Optional[int] = None,
           lens: Optional[Sequence[int]] = None, config: Optional[DecodeConfig] = None
           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Split-KV decode on validated inputs; returns ``(out [B,Hq,Lq,Dv] in q's dtype, natural-log lse or None)``.

    ``q [B,Hq,Lq,D]``; contiguous ``k [B,Hkv,cap,D]``, ``v [B,Hkv,cap,Dv]`` or, with ``block_table``
    (int32 ``[B, pages]`` or ``[B, Hkv, pages]``), paged pools ``k [P,Hkv,page,D]``, ``v [P,Hkv,page,Dv]``
    (views with any strides). ``seqlens`` int32 ``[B]`` on the device, each in ``[Lq, max_len]``; ``lens`` the
    same on the host (needed only by bitmap masks). ``splits`` forces the split count; ``config`` the tiles."""
    paged = block_table is not None
    pb = problem(q, k, v, mask, score_mod, normalizer, scale, paged, max_len)
    cfg = config or _config(pb, q, k, v, seqlens, max_len, block_table, want_lse, lens)
    return _launch(pb, cfg, q, k, v, seqlens, max_len, block_table, want_lse, splits, lens)


def _config(pb, q, k, v, seqlens, max_len, block_table, want_lse, lens) -> DecodeConfig:
    cfg = config_for(pb)
    if not tuning.enabled() or tuning.interpreting() or pb._cfg[0]:
        return cfg
    key = (torch.cuda.get_device_name(pb.device), pb.D, pb.Dv, pb.dtype, pb.paged, pb.page, pb.BM, pb.mp.kind,
           pb.norm.code, pb.mods.packed != 0)
    if key not in _tuned:
        from triton.testing import do_bench
        best = (float("inf"), config_for(pb))
        for c in candidates(pb):
            try:
                ms = do_bench(lambda: _launch(pb, c, q, k, v, seqlens, max_len, block_table, want_lse, None, lens),
                              warmup=5, rep=25, return_mode="median")
            except Exception:  # noqa: BLE001 - a candidate that does not compile (resources) is skipped
                continue
            if ms < best[0]:
                best = (ms, c)
        _tuned[key] = best[1]
    return _tuned[key]


def _launch(pb: DecodeProblem, cfg: DecodeConfig, q, k, v, seqlens, max_len, block_table, want_lse, splits, lens):
    B, Hq, Lq, Dv, dev = pb.B, pb.Hq, pb.Lq, pb.Dv, pb.device
    ns = splits or splits_for(pb, max_len, cfg)
    rows = B * Hq * Lq
    split = ns > 1
    out = F._empty(B, Hq, Lq, Dv, dtype=q.dtype, device=dev)
    lse = F._empty(B, Hq, Lq, dtype=pb.acc_t, device=dev) if (want_lse and pb.norm.softmax) else pb.dummy_f
    d = pb.dummy_f
    op = F._empty(rows * ns * Dv, dtype=pb.acc_t, device=dev) if split else d
    lp = F._empty(rows * ns, dtype=pb.acc_t, device=dev) if split and pb.norm.softmax else d
    up = F._empty(rows * ns * Dv, dtype=pb.acc_t, device=dev) if split and pb.norm.gamma > 0 else d
    cnt = torch.zeros(rows, dtype=torch.float32, device=dev) if pb.need_counts else d
    nbmax = _cdiv(max_len, cfg.BN)
    if TRACE:
        global last_trace
        trc = torch.zeros(B * pb.Hkv * nbmax, dtype=torch.int32, device=dev)
        last_trace = trc.view(B, pb.Hkv, nbmax)
    else:
        trc = pb.dummy_i
    if pb.paged:
        tbl = block_table if block_table.dim() == 3 else block_table.unsqueeze(1)
        stb, sth = tbl.stride(0), (tbl.stride(1) if tbl.shape[1] > 1 else 0)
    else:
        tbl, stb, sth = pb.dummy_i, 0, 0
    if pb.mp.mode == P.MODE_BITMAP:
        bits, blut, bl_b, bl_h, nk128 = pb.bitmap(lens if lens is not None else seqlens.tolist(), max_len)
    else:
        bits, blut, bl_b, bl_h, nk128 = pb.dummy_i, pb.dummy_i, 0, 0, 1
    rbl, rb_off = pb.relbias(max_len)
    modf, rbt, normf = pb.buffers()
    S, W = pb.support
    maskp = pb.mp.maskp if pb.mp.maskp is not None else pb.dummy_i
    maskd = pb.mp.maskd if pb.mp.maskd is not None else pb.dummy_i
    head = (q, k, v, out, lse, op, lp, up, seqlens, tbl, cnt, trc, *q.stride(), *k.stride(), *v.stride(), stb, sth)
    tail = (maskp, maskd, bits, blut, bl_b, bl_h, nk128, modf, rbt, rbl, rb_off, normf, float(pb.norm.gamma),
            Hq, pb.G, Lq, ns, S, W, *pb.full, nbmax, pb.D, Dv, float(pb.scale))
    sig = (q.stride(), k.stride(), v.stride(), k.dtype,
           _ints_sig(stb, sth, bl_b, bl_h, nk128, rb_off, ns, S, W, *pb.full, nbmax),
           F._aligned(q, k, v, seqlens, tbl, modf, normf, rbt, rbl, maskp, maskd, bits, blut))
    grid = (ns, B * pb.Hkv * pb.RB, 1)
    base = dict(pb.cx, SPLIT=split, PAGED=pb.paged, PAGE=pb.page if pb.paged else 1, SIG_LOGN=pb.sig_logn,
                WANT_LSE=bool(want_lse and pb.norm.softmax), TRACE=TRACE, BM=pb.BM, BN=cfg.BN)
    variant = (cfg, ns, base["WANT_LSE"], TRACE)
    if pb.need_counts:
        _phase(pb, ("count",) + variant, grid, dict(base, PHASE=1), cfg).launch(sig, head + tail)
    _phase(pb, ("main",) + variant, grid, dict(base, PHASE=0), cfg).launch(sig, head + tail)
    if split:
        nsp = _pow2(ns)
        cx = dict(NORM=pb.norm.code, HAS_SINK=pb.norm.has_sink, RELAXED=pb.norm.gamma > 0,
                  WANT_LSE=bool(want_lse and pb.norm.softmax), ACC=pb.acc_tl, NSP=nsp, BDV=pb.cx["BDV"])
        ph = _phase(pb, ("combine", ns, cx["WANT_LSE"]), (rows, 1, 1), cx, DecodeConfig(16, 4 if Dv > 64 else 2, 1),
                    kernel=attn_decode_combine)
        ph.launch((_ints_sig(ns), F._aligned(op, lp, out, normf)),
                  (op, lp, up, out, lse, normf, cnt, Hq, Lq, ns, Dv, float(pb.norm.gamma)))
    return out, (lse if (want_lse and pb.norm.softmax) else None)


def _phase(pb: DecodeProblem, key, grid, cx: dict, cfg: DecodeConfig, kernel=attn_decode) -> F.Phase:
    ph = pb.phases.get(key)
    if ph is None or ph.grid != grid:
        ph = pb.phases[key] = F.Phase(kernel, tuning.Config(16, cfg.BN, cfg.warps, cfg.stages), grid, cx, ())
    return ph
