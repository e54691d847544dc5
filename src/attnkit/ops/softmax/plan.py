"""Host side of the fused kernels: turn (mask, score mod, normalizer) into kernel switches, parameter
buffers and block lists, and cache what depends only on the mask and the sizes.

* Masks made of at most four built-in leaves (causal, sliding window, chunked, prefix-LM, sinks,
  dilated, document, full) combined with ``&``, ``|``, ``~`` are evaluated in-kernel from their
  parameters: each leaf gives one bit and a 2^n-entry truth table combines the bits, so any
  boolean expression of the leaves costs the same. Anything else (``predicate``, a Mask subclass,
  more than four leaves) is evaluated once on the host into packed bitmaps of its PARTIAL
  128×128 tiles (``BITS``, 2 KiB a tile; ``BLUT`` maps a tile to its bitmap or -1).
* Block lists: from the mask's exact EMPTY/PARTIAL/FULL map at the kernel's block sizes, per
  (batch', head', row block) the FULL blocks and the PARTIAL blocks as two ascending lists
  (``count [B',H',n]``, ``index [B',H',n,m]``). The last row / column block of a length that is
  not a multiple of the block is listed as PARTIAL so bounds are checked there only.

Cached per mask (structural key for parameter-only masks, the mask object itself otherwise) and
per sizes / block sizes / device: a model pays the block-map scan once per shape, not per call.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ...core import masks as M
from ...core.normalizers import Normalizer
from ...core.scores import Pointwise, RelativeBias, ScoreMod, t5_bucket

MODE_NONE, MODE_LEAVES, MODE_BITMAP = 0, 1, 2
MAX_LEAVES = 4
MAX_MODS = 4
TILE = 128  # bitmap tile edge; kernel block sizes divide it


class Unsupported(ValueError):
    """The fused kernels cannot compute this exact function."""


# ---------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------

_lock = threading.Lock()
_structural: "OrderedDict[Any, Any]" = OrderedDict()
_STRUCTURAL_MAX = 512


def _leaves(mask: M.Mask) -> List[M.Mask]:
    out, seen = [], set()
    for leaf in mask.leaves():
        if id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


def structural_key(mask: M.Mask) -> Optional[Any]:
    """:meth:`Mask.key` (equal for masks computing the same function now), or None for masks known by identity."""
    return mask.key()


def cached(mask: M.Mask, key: Tuple, build):
    """``build()`` once per (mask, key): shared by equal masks (:meth:`Mask.key`), else kept on the mask object
    and rebuilt when a tensor the mask holds is updated in place (:meth:`Mask.version`)."""
    skey = structural_key(mask)
    if skey is not None:
        full_key = (skey,) + key
        with _lock:
            if full_key in _structural:
                _structural.move_to_end(full_key)
                return _structural[full_key]
        value = build()
        with _lock:
            _structural[full_key] = value
            while len(_structural) > _STRUCTURAL_MAX:
                _structural.popitem(last=False)
        return value
    store = mask.__dict__.setdefault("_attnkit_kernel_cache", {})
    version = mask.version()
    if store.get("version") != version:  # a held tensor changed: nothing built from the old values is kept
        store.clear()
        store["version"] = version
    if key not in store:
        store[key] = build()
    return store[key]


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

@dataclass
class MaskPlan:
    mask: M.Mask
    mode: int
    leaves: int = 0
    n_leaves: int = 0
    tt: int = 0
    maskp: Optional[Tensor] = None
    maskd: Optional[Tensor] = None

    @property
    def kind(self) -> str:
        """The mask kind of the tuning key: ``none``, ``bitmap``, or the in-kernel leaves with their truth table
        (``causal``, ``sliding_window``, ``causal.document/8``, ...; parameters and lengths left out)."""
        if self.mode != MODE_LEAVES:
            return ("none", "leaves", "bitmap")[self.mode]
        names = {code: name for name, code in M.LEAF_CODES.items()}
        leaves = ".".join(names[(self.leaves >> (4 * i)) & 15] for i in range(self.n_leaves))
        return leaves if self.n_leaves == 1 else f"{leaves}/{self.tt}"


def _truth_table(mask: M.Mask, index: Dict[int, int]) -> int:
    n = len(index)

    def ev(m, bits):
        if isinstance(m, M._Or):
            return ev(m.a, bits) or ev(m.b, bits)
        if isinstance(m, M._And):
            return ev(m.a, bits) and ev(m.b, bits)
        if isinstance(m, M._Not):
            return not ev(m.a, bits)
        return bool((bits >> index[id(m)]) & 1)

    return sum(1 << code for code in range(1 << n) if ev(mask, code))


def mask_plan(mask: M.Mask, B: int, device) -> MaskPlan:
    """Kernel switches and parameters of a mask (cached per mask and device): each leaf gives its code and
    parameters (:meth:`Mask.kernel_params`); a leaf's tensor is stored in ``maskd``, its offset first."""
    return cached(mask, ("plan", B, str(device)), lambda: _mask_plan(mask, B, device))


def _mask_plan(mask: M.Mask, B: int, device) -> MaskPlan:
    leaves = _leaves(mask)
    if len(leaves) > MAX_LEAVES or any(not leaf.kernel_code for leaf in leaves):
        return MaskPlan(mask, MODE_BITMAP)
    index = {id(leaf): i for i, leaf in enumerate(leaves)}
    tt = _truth_table(mask, index)
    always = sum(1 << i for i, leaf in enumerate(leaves) if leaf.kind == "full")  # leaves that are always 1
    if all((tt >> code) & 1 for code in range(1 << len(leaves)) if code & always == always):
        return MaskPlan(mask, MODE_NONE)  # visible everywhere (e.g. full, full | causal)
    params, data = [0] * (4 * MAX_LEAVES), []
    packed = 0
    for i, leaf in enumerate(leaves):
        packed |= leaf.kernel_code << (4 * i)
        ints, tensor = leaf.kernel_params()
        if tensor is not None:
            ints = (sum(t.numel() for t in data),) + tuple(ints)
            data.append(tensor.reshape(-1).to(torch.int64))
        params[4 * i:4 * i + len(ints)] = ints
    maskd = torch.cat([t.cpu() for t in data]) if data else torch.zeros(1, dtype=torch.int64)
    if maskd.numel() and (maskd.abs().max() >= 2 ** 31):
        raise Unsupported("mask parameters must fit in int32")
    return MaskPlan(mask, MODE_LEAVES, packed, len(leaves), tt,
                    torch.tensor(params, dtype=torch.int32, device=device), maskd.to(torch.int32).to(device))


def _pack_bits(m: Tensor) -> Tensor:
    """bool ``[..., TILE, TILE]`` -> int32 ``[..., TILE, TILE // 32]`` (bit c % 32 of word c // 32)."""
    w = m.reshape(*m.shape[:-1], TILE // 32, 32).to(torch.int64)
    words = (w << torch.arange(32, device=m.device)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


@dataclass
class Bitmap:
    state: Tensor  # [B', H', nq128, nk128] int8 exact map at TILE granularity
    lut: Tensor  # [B', H', nq128, nk128] int32 slot of each PARTIAL tile, -1 elsewhere
    bits: Tensor  # [n_slots * TILE * TILE // 32] int32


#: default placement of queries and keys (:class:`attnkit.masks.Geometry`): ``(q_offset, kv_offset)``
DEFAULT_POS = (None, 0)


def bitmap(mask: M.Mask, B: int, H: int, Lq: int, Lk: int, device, pos=DEFAULT_POS) -> Bitmap:
    return cached(mask, ("bitmap", B, H, Lq, Lk, pos, str(device)), lambda: _bitmap(mask, B, H, Lq, Lk, device, pos))


def _bitmap(mask: M.Mask, B: int, H: int, Lq: int, Lk: int, device, pos) -> Bitmap:
    g = M.Geometry(B, H, Lq, Lk, *pos)
    bm = mask.block_map(B, H, Lq, Lk, TILE, TILE, device=device, q_offset=pos[0], kv_offset=pos[1])
    state = _full_state(bm.state, Lq, Lk, TILE, TILE)
    Bp, Hp, nq, nk = state.shape
    part = state == M.PARTIAL
    n_slots = int(part.sum())
    lut = torch.full(state.shape, -1, dtype=torch.int32, device=device)
    lut[part] = torch.arange(n_slots, dtype=torch.int32, device=device)
    bits = torch.zeros(max(n_slots, 1), TILE, TILE // 32, dtype=torch.int32, device=device)
    for i in range(nq):
        js = part[:, :, i].any(0).any(0).nonzero().flatten().tolist()
        if not js:
            continue
        r0, r1 = i * TILE, min((i + 1) * TILE, Lq)
        cols = torch.cat([torch.arange(j * TILE, min((j + 1) * TILE, Lk), device=device) for j in js])
        m = mask.dense(g, device, torch.arange(r0, r1, device=device), cols).expand(Bp, Hp, r1 - r0, cols.numel())
        start = 0
        for j in js:
            w = min((j + 1) * TILE, Lk) - j * TILE
            blk = torch.zeros(Bp, Hp, TILE, TILE, dtype=torch.bool, device=device)
            blk[:, :, :r1 - r0, :w] = m[..., start:start + w]
            start += w
            sel = part[:, :, i, j]
            bits[lut[:, :, i, j][sel].long()] = _pack_bits(blk)[sel]
    return Bitmap(state, lut.contiguous(), bits.reshape(-1).contiguous())


def _full_state(st: Tensor, Lq: int, Lk: int, BM: int, BN: int) -> Tensor:
    """The map with its row / column block dims spelled out (a leaf's bounds may broadcast them)."""
    return st.expand(st.shape[0], st.shape[1], -(-Lq // BM), -(-Lk // BN)).contiguous()


@dataclass
class Lists:
    """FULL and PARTIAL block lists of one block size (see module doc): ``cnt [B',H',n,2]`` holds how many
    FULL (``[..., 0]``) and PARTIAL (``[..., 1]``) blocks row block ``i`` has, ``idx [B',H',n,2,m]`` which,
    ascending. A kernel walks list ``lst = b·ls_b + h·ls_h + i``: ``cnt[2·lst + part]`` entries of
    ``idx[(2·lst + part)·m + t]``. A row's FULL blocks are one contiguous run (FULL blocks outside the
    row's longest run are listed as PARTIAL: exact either way), so kernels walk them as the range
    ``idx[2·lst·m] + t`` with no index load in the loop (Triton pipelines such loops fully)."""

    cnt: Tensor
    idx: Tensor
    ls_b: int
    ls_h: int
    nlist: int

    def args(self):
        return (self.cnt, self.idx, self.ls_b, self.ls_h, self.nlist)


def block_lists(mp: MaskPlan, B: int, H: int, Lq: int, Lk: int, BM: int, BN: int, transpose: bool,
                device, pos=DEFAULT_POS) -> Lists:
    """Lists over key blocks per query block (``transpose``: over query blocks per key block)."""
    key = ("lists", B, H, Lq, Lk, BM, BN, transpose, pos, str(device))
    return cached(mp.mask, key, lambda: _block_lists(mp, B, H, Lq, Lk, BM, BN, transpose, device, pos))


def _block_lists(mp: MaskPlan, B, H, Lq, Lk, BM, BN, transpose, device, pos) -> Lists:
    nq, nk = -(-Lq // BM), -(-Lk // BN)
    if mp.mode == MODE_BITMAP:
        base = bitmap(mp.mask, B, H, Lq, Lk, device, pos).state
        st = base.repeat_interleave(TILE // BM, -2).repeat_interleave(TILE // BN, -1)[..., :nq, :nk].clone()
    elif mp.mode == MODE_NONE:
        st = torch.full((1, 1, nq, nk), M.FULL, dtype=torch.int8, device=device)
    else:
        bm = mp.mask.block_map(B, H, Lq, Lk, BM, BN, device=device, q_offset=pos[0], kv_offset=pos[1])
        st = _full_state(bm.state, Lq, Lk, BM, BN).clone()
    full = torch.tensor(M.FULL, dtype=st.dtype, device=device)
    part = torch.tensor(M.PARTIAL, dtype=st.dtype, device=device)
    if Lk % BN:
        st[..., -1] = torch.where(st[..., -1] == full, part, st[..., -1])
    if Lq % BM:
        st[..., -1, :] = torch.where(st[..., -1, :] == full, part, st[..., -1, :])
    if transpose:
        st = st.transpose(-1, -2)
    st = _one_full_run(st)
    Bp, Hp, nrow, ncol = st.shape
    cols = torch.arange(ncol, device=device)
    sel = torch.stack([st == M.FULL, st == M.PARTIAL], -2)  # [B', H', nrow, 2, ncol]
    cnt = sel.sum(-1).to(torch.int32).contiguous()
    idx = torch.where(sel, cols, cols + ncol).argsort(dim=-1, stable=True).to(torch.int32).contiguous()
    return Lists(cnt, idx, Hp * nrow if Bp > 1 else 0, nrow if Hp > 1 else 0, ncol)


def _one_full_run(st: Tensor) -> Tensor:
    """``st`` with the FULL blocks outside each row's longest contiguous FULL run turned PARTIAL."""
    full = st == M.FULL
    ncol = st.shape[-1]
    cur = torch.zeros(st.shape[:-1], dtype=torch.int32, device=st.device)
    best, end = cur.clone(), cur.clone()
    for c in range(ncol):
        cur = (cur + 1) * full[..., c]
        longer = cur > best
        best = torch.where(longer, cur, best)
        end = torch.where(longer, torch.full_like(end, c), end)
    cols = torch.arange(ncol, device=st.device)
    in_run = (cols > (end - best)[..., None]) & (cols <= end[..., None])
    return torch.where(full & ~in_run, torch.tensor(M.PARTIAL, dtype=st.dtype, device=st.device), st)


def row_counts(mask: M.Mask, B: int, H: int, Lq: int, Lk: int, device, pos=DEFAULT_POS) -> Tensor:
    """Visible keys per query row, float32 ``[B', H', Lq]`` clamped to >= 1 (cached)."""
    def build():
        n = mask.row_counts(B, H, Lq, Lk, device=device, q_offset=pos[0], kv_offset=pos[1])
        return n.clamp(min=1).to(torch.float32).contiguous()
    return cached(mask, ("counts", B, H, Lq, Lk, pos, str(device)), build)


# ---------------------------------------------------------------------------------------------
# score mods and normalizers
# ---------------------------------------------------------------------------------------------

@dataclass
class Learnable:
    tensor: Tensor
    role: str  # "mod" (per-head slot), "relbias" (table), "sink", "nbias"
    slot: int = 0


@dataclass
class ModPlan:
    packed: int = 0
    fns: Tuple = (None, None, None, None)  # pointwise forward per slot (None: identity)
    dfns: Tuple = (None, None, None, None)
    values: List[Tuple[int, Tensor]] = field(default_factory=list)  # (slot, per-head or scalar value)
    relbias: Any = None  # the RelativeBias module
    needs_counts: bool = False
    learnable: List[Learnable] = field(default_factory=list)


def mods_key(score_mod: Optional[ScoreMod]) -> Optional[Tuple]:
    """What a fused kernel plan depends on in a score mod (:meth:`ScoreMod.key` of each)."""
    return None if score_mod is None else tuple(m.key() for m in score_mod.mods())


def norm_key(normalizer: Normalizer) -> Any:
    """What a fused kernel plan depends on in a normalizer (:meth:`Normalizer.key`)."""
    return normalizer.key()


def _twin(mod) -> Tuple[Any, Any]:
    tf = mod.triton_fn
    if isinstance(tf, (tuple, list)):
        if len(tf) != 2:
            raise Unsupported(f"pointwise {mod.name}: triton_fn must be a triton.jit function or a pair "
                              f"(fn, dfn), got {len(tf)} items")
        return tf[0], tf[1]
    return tf, None


def learnable_tensors(score_mod: Optional[ScoreMod], normalizer: Normalizer, Lk: int) -> List[Tensor]:
    """The tensors of a score mod and normalizer that get gradients from the fused kernels, in the kernels' order
    (score-mod slots, then the normalizer's value): what :class:`ModPlan` + :class:`NormPlan` list as learnable."""
    out = []
    for mod in (score_mod.mods() if score_mod is not None else ()):
        if isinstance(mod, Pointwise):
            continue
        t = mod.table if isinstance(mod, RelativeBias) else mod.kernel_learnable()
        if t is not None and t.requires_grad:
            out.append(t)
    value = normalizer.kernel_value(Lk)
    if isinstance(value, Tensor) and value.requires_grad:
        out.append(value)
    return out


def _pointwise_twin(mod: Pointwise, need_grad: bool) -> Tuple[Any, Any]:
    fn, dfn = _twin(mod)
    if fn is None:
        raise Unsupported(f"pointwise score mod {mod.name!r} has no Triton twin (pass "
                          "pointwise(fn, triton_fn=(fn_jit, dfn_jit)))")
    if any(p.requires_grad for p in mod.parameters()) or any(
            isinstance(t, Tensor) and t.requires_grad for t in vars(mod).values()):
        raise Unsupported(f"pointwise score mod {mod.name!r} has learnable params (the fused backward "
                          "differentiates built-in mods only)")
    if need_grad and dfn is None:
        raise Unsupported(f"pointwise score mod {mod.name!r}: the backward needs its derivative; pass "
                          "triton_fn=(fn, dfn) with dfn(score, b, h, q_idx, kv_idx) = d fn / d score")
    return fn, dfn


def mod_plan(score_mod: Optional[ScoreMod], Hq: int, need_grad: bool) -> ModPlan:
    mp = ModPlan()
    if score_mod is None:
        return mp
    leaves = list(score_mod.mods())
    if len(leaves) > MAX_MODS:
        raise Unsupported(f"at most {MAX_MODS} composed score mods, got {len(leaves)}")
    fns, dfns = [None] * 4, [None] * 4
    for slot, mod in enumerate(leaves):
        if not mod.kernel_code:
            raise Unsupported(f"score mod kind {mod.kind!r} ({type(mod).__name__})")
        mp.packed |= mod.kernel_code << (4 * slot)
        mp.needs_counts |= mod.needs_counts
        if isinstance(mod, RelativeBias):  # its table and bucket lookup are separate kernel arguments
            if mp.relbias is not None:
                raise Unsupported("at most one relative_bias score mod")
            mp.relbias = mod
            if mod.table.requires_grad:
                mp.learnable.append(Learnable(mod.table, "relbias", slot))
        elif isinstance(mod, Pointwise):
            fns[slot], dfns[slot] = _pointwise_twin(mod, need_grad)
        else:
            mp.values.append((slot, mod.kernel_value(Hq)))
            lt = mod.kernel_learnable()
            if lt is not None and lt.requires_grad:
                mp.learnable.append(Learnable(lt, "mod", slot))
    mp.fns, mp.dfns = tuple(fns), tuple(dfns)
    return mp


@dataclass
class NormPlan:
    code: int = 0
    has_sink: bool = False
    gamma: float = 0.0
    value: Optional[Tensor] = None  # sink logits or sigmoid bias (scalar or [H])
    needs_counts: bool = False
    learnable: List[Learnable] = field(default_factory=list)

    @property
    def softmax(self) -> bool:
        return self.code == 0


def norm_plan(normalizer: Normalizer, Lk: int) -> NormPlan:
    """Kernel code, per-head value (sink logit / sigmoid bias) and learnable tensors of a normalizer."""
    code = normalizer.kernel_code
    if code is None:
        raise Unsupported(f"normalizer {getattr(normalizer, 'name', type(normalizer).__name__)!r}")
    value = normalizer.kernel_value(Lk)
    softmax = normalizer.family == "softmax"
    np_ = NormPlan(code, softmax and value is not None, getattr(normalizer, "gamma", 0.0) if softmax else 0.0, value,
                   needs_counts=normalizer.needs_counts)
    if isinstance(value, Tensor) and value.requires_grad:
        np_.learnable.append(Learnable(value, "sink" if softmax else "nbias"))
    return np_


def per_head(t: Tensor, Hq: int, device, dtype) -> Tensor:
    t = t.detach().to(device=device, dtype=dtype)
    return t.reshape(1).expand(Hq) if t.dim() == 0 or t.numel() == 1 else t.reshape(Hq)


def relbias_lut(mod, Lq: int, Lk: int, device, q0: int, k0: int) -> Tuple[Tensor, int]:
    """Bucket of every relative offset ``kv − q`` the kernels can meet (padding rows and keys included), with
    query row 0 at position ``q0`` and key 0 at ``k0``: ``(lut, offset)``, ``lut[kv − q + offset]``."""
    def build():  # on the inputs' device, as the reference computes it (log rounding at bucket edges)
        lo = k0 - (q0 + Lq + TILE)
        hi = k0 + Lk + TILE - q0
        rel = torch.arange(lo, hi + 1, dtype=torch.long, device=device)
        b = t5_bucket(rel, mod.num_buckets, mod.max_distance, mod.bidirectional)
        return b.to(torch.int32).contiguous(), -lo
    key = ("rb", mod.num_buckets, mod.max_distance, mod.bidirectional, Lq, Lk, q0, k0, str(device))
    cache = _structural
    with _lock:
        if key in cache:
            return cache[key]
    val = build()
    with _lock:
        cache[key] = val
    return val
