"""Decoding: a few query tokens per sequence against a KV cache, :func:`decode_attention`.

    out = decode_attention(q, cache, layer_idx=3, mask=masks.causal)              # an attnkit cache
    out = decode_attention(q, k, v, seqlens=lens, mask=masks.causal)              # contiguous [B, Hkv, cap, D]
    out = decode_attention(q, k_pool, v_pool, seqlens=lens, block_table=table)    # paged [P, Hkv, page, D]

Query token ``t`` of sequence ``b`` sits at position ``seqlens[b] − Lq + t`` (the end of its own sequence), key
``j`` at position ``j``: exactly :func:`attnkit.attention` on that sequence's first ``seqlens[b]`` keys, for
every mask, score mod and normalizer. Sequences may have different lengths (ragged batches).

Backends (``backend=``), and what ``"auto"`` picks (recorded: :func:`attnkit.last_backend`):

* ``"sdpa"``: PyTorch SDPA (cuDNN, then flash: :data:`SDPA_DECODE`) where it computes exactly the same function:
  plain softmax, no score mod, a full mask (or causal with one query token), contiguous cache, every
  sequence of the same length, half precision. ``auto`` takes it on CUDA (measured at ~95 % of HBM bandwidth).
* ``"triton"``: the split-KV kernel (:mod:`attnkit.ops.softmax.decode`); CUDA, or CPU under
  ``TRITON_INTERPRET=1``. ``auto`` takes it for everything SDPA cannot compute exactly.
* ``"reference"``: the materialized float64-capable reference on each sequence's keys (paged caches gathered);
  ``auto`` falls back to it (with a one-time warning) for what the kernel does not support, and on CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core import masks as M
from ..core.masks import Geometry
from ..core.normalizers import Normalizer, Softmax, as_normalizer
from ..core.record import record_backend
from ..core.scores import ScoreMod, as_score_mod
from ..core.validation import resolve_scale
from ..ops.softmax.plan import Unsupported
from ..ops.softmax.reference import run_reference
from . import backends

__all__ = ["decode_attention", "KVView", "SDPA_DECODE", "DECODE_BACKENDS", "route", "ROUTE_MAX_Q", "ROUTE_MIN_K"]

#: SDPA backends ``auto`` uses for exactly-equal plain softmax decoding, in order (empty: always the kernel)
SDPA_DECODE: Tuple[str, ...] = ("cudnn", "flash")
DECODE_BACKENDS = ("auto", "triton", "sdpa", "reference")
_sdpa_refused = set()
#: :func:`route`: ``attention()`` calls with at most this many query rows and at least this many keys decode
ROUTE_MAX_Q = 16
ROUTE_MIN_K = 256


@dataclass
class KVView:
    """What a cache holds for one layer, as the decode kernels read it.

    Contiguous: ``k [B, Hkv, cap, D]``, ``v [B, Hkv, cap, Dv]`` (``block_table`` None). Paged: pools
    ``k [P, Hkv, page, D]``, ``v [P, Hkv, page, Dv]`` and ``block_table`` int32 ``[B, n]`` (or ``[B, Hkv, n]``: one
    table per KV head) mapping block ``i`` of sequence ``b`` (keys ``i·page … i·page + page − 1``) to a pool page.
    ``seqlens`` int32 ``[B]`` on the device; ``max_len`` ≥ every length (host); ``lens`` the lengths on the host
    when known (saves a device sync where one is needed)."""

    k: Tensor
    v: Tensor
    seqlens: Tensor
    max_len: int
    block_table: Optional[Tensor] = None
    lens: Optional[List[int]] = None

    @property
    def paged(self) -> bool:
        return self.block_table is not None


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _as_view(q: Tensor, k, v, layer_idx, seqlens, block_table, max_seqlen) -> KVView:
    if isinstance(k, KVView):
        return k
    if hasattr(k, "kv_view"):
        if layer_idx is None:
            raise ValueError("decode_attention(q, cache) needs layer_idx= (which layer's keys to read)")
        return k.kv_view(layer_idx)
    if not isinstance(k, Tensor) or not isinstance(v, Tensor):
        raise TypeError(f"decode_attention takes (q, k, v) tensors, a KVView or an attnkit cache; got k {_shape(k)}, "
                        f"v {_shape(v)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"decode_attention takes {name} as [B, Hkv, L, D] (or a paged pool [pages, Hkv, page, "
                             f"D]), got {_shape(t)}")
    B = q.shape[0]
    if block_table is not None:
        if block_table.dtype not in (torch.int32, torch.int64) or block_table.dim() not in (2, 3):
            raise ValueError(f"block_table must be an int32 [B, pages] or [B, Hkv, pages] tensor, got "
                             f"{block_table.dtype} {_shape(block_table)}")
        block_table = block_table.to(torch.int32)
        cap = block_table.shape[-1] * k.shape[2]
    else:
        cap = k.shape[2]
    if seqlens is None:  # every sequence holds max_seqlen (default: all) keys
        if block_table is not None:
            raise ValueError("a paged cache (block_table=) needs seqlens= (the keys each sequence holds)")
        n = cap if max_seqlen is None else int(max_seqlen)
        if not 1 <= n <= cap:
            raise ValueError(f"max_seqlen {n} exceeds what the cache holds ({cap} keys)" if n > cap else
                             f"max_seqlen must be >= 1, got {n}")
        lens = [n] * B
        seqlens = _lengths_on(tuple(lens), q.device)
        max_len = n
    else:
        if not isinstance(seqlens, Tensor):
            lens = [int(x) for x in seqlens]
            seqlens = _lengths_on(tuple(lens), q.device)
        else:
            lens = None
            if seqlens.is_floating_point() or seqlens.dim() != 1:
                raise ValueError(f"seqlens must be an integer tensor [B], got {seqlens.dtype} {_shape(seqlens)}")
            seqlens = seqlens.to(device=q.device, dtype=torch.int32)
        max_len = cap if max_seqlen is None else int(max_seqlen)
        if max_len > cap:
            raise ValueError(f"max_seqlen {max_len} exceeds what the cache holds ({cap} keys)")
    return KVView(k, v, seqlens, max_len, block_table, lens)


_lengths: "dict" = {}


def _lengths_on(lens: Tuple[int, ...], device) -> Tensor:
    """int32 lengths on ``device`` for host lengths (a few kept: a decode loop repeats them, or they grow by one)."""
    key = (lens, str(device))
    t = _lengths.get(key)
    if t is None:
        if len(_lengths) > 32:
            _lengths.clear()
        t = _lengths[key] = torch.tensor(lens, dtype=torch.int32, device=device)
    return t


def _validate(q: Tensor, view: KVView, check: bool) -> None:
    k, v = view.k, view.v
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"decode_attention takes q as [B, Hq, Lq, D], got {_shape(q)}")
    B, Hq, Lq, D = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"decode_attention takes floating-point inputs, got {q.dtype}")
    if k.device != q.device or v.device != q.device or view.seqlens.device != q.device:
        raise ValueError(f"q, k, v and seqlens must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{view.seqlens.device}")
    if k.shape[:3] != v.shape[:3] or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share their first three dims, and k's head "
                         f"dim must equal q's ({D})")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of the KV heads ({Hkv})")
    if Lq < 1 or Lq > 128:
        raise ValueError(f"decode_attention takes 1 to 128 query tokens per sequence, got Lq={Lq} (prefill with "
                         "attnkit.attention)")
    if view.seqlens.shape != (B,):
        raise ValueError(f"seqlens must be [B] = [{B}], got {_shape(view.seqlens)}")
    t = view.block_table
    if t is not None:
        if t.device != q.device or t.dtype != torch.int32:
            raise ValueError(f"block_table must be int32 on {q.device}, got {t.dtype} on {t.device}")
        if t.shape[0] != B or (t.dim() == 3 and t.shape[1] not in (1, Hkv)) or t.dim() not in (2, 3):
            raise ValueError(f"block_table must be [B, pages] or [B, Hkv, pages] with B={B}, Hkv={Hkv}, got "
                             f"{_shape(t)}")
        if view.max_len > t.shape[-1] * k.shape[2]:
            raise ValueError(f"max_len {view.max_len} needs {-(-view.max_len // k.shape[2])} pages of {k.shape[2]} "
                             f"keys, the block table has {t.shape[-1]}")
    elif view.max_len > k.shape[2]:
        raise ValueError(f"max_len {view.max_len} exceeds the cache's {k.shape[2]} keys")
    if check:
        lens = view.lens if view.lens is not None else view.seqlens.tolist()
        if min(lens) < 1 or max(lens) > view.max_len:
            raise ValueError(f"seqlens must lie in [1, {view.max_len}], got {lens}")
        if t is not None:
            P, page = k.shape[0], k.shape[2]
            tt = t if t.dim() == 3 else t.unsqueeze(1)
            for b, n in enumerate(lens):
                used = tt[b, :, : -(-n // page)]
                if used.numel() and (int(used.min()) < 0 or int(used.max()) >= P):
                    raise ValueError(f"block_table row {b} points outside the pool of {P} pages for its {n} keys: "
                                     f"{used.tolist()}")


def decode_attention(q: Tensor, k, v: Optional[Tensor] = None, *, layer_idx: Optional[int] = None,
                     seqlens: Union[Tensor, Sequence[int], None] = None, block_table: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None, mask: M.MaskLike = None,
                     score_mod: Union[ScoreMod, Sequence[ScoreMod], None] = None,
                     normalizer: Union[str, Normalizer] = "softmax", scale: Optional[float] = None,
                     backend: str = "auto", return_lse: bool = False, layout: str = "bhtd",
                     splits: Optional[int] = None, check: bool = True):
    """Attention of ``Lq`` new query tokens per sequence over that sequence's cached keys.

    Args:
        q: ``[B, Hq, Lq, D]`` (``layout="bthd"``: ``[B, Lq, Hq, D]``), ``1 ≤ Lq ≤ 128``.
        k, v: contiguous ``[B, Hkv, cap, D]`` / ``[B, Hkv, cap, Dv]`` (views allowed), paged pools
            ``[pages, Hkv, page, D]`` with ``block_table``, a :class:`KVView`, or an attnkit cache (then
            ``layer_idx``; ``v`` omitted).
        seqlens: keys held by each sequence (int tensor or list ``[B]``; default: ``max_seqlen``, else all ``cap``).
        block_table: int ``[B, n]`` or ``[B, Hkv, n]`` page indices (paged pools).
        max_seqlen: a host bound on ``seqlens`` (default: the capacity; a tighter bound sizes the splits better).
        mask, score_mod, normalizer, scale: as :func:`attnkit.attention` (queries end-aligned per sequence).
        backend: ``"auto"``, ``"triton"``, ``"sdpa"`` or ``"reference"`` (module doc).
        return_lse: also return the natural-log lse ``[B, Hq, Lq]`` (softmax family).
        splits: force the number of key splits of the kernel (default: enough programs to fill the GPU).
        check: validate ``seqlens`` and ``block_table`` values (one host sync on CUDA; caches pass False for
            tables they built).

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout (and the lse). Rows with no visible key give 0.
    """
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if isinstance(q, Tensor) and layout == "bthd" and q.dim() == 4:
        q = q.transpose(1, 2)
    view = _as_view(q, k, v, layer_idx, seqlens, block_table, max_seqlen)
    _validate(q, view, check)
    mask = M.as_mask(mask)
    score_mod = as_score_mod(score_mod)
    normalizer = as_normalizer(normalizer)
    scale = resolve_scale(scale, q.shape[-1])
    if return_lse and normalizer.family != "softmax":
        raise ValueError(f"return_lse needs a softmax-family normalizer, got {normalizer.name!r}")
    B, Hq, Lq, _ = q.shape
    mask.validate(Geometry(B, Hq, Lq, view.max_len, view.max_len - Lq, 0))
    out = lse = None
    ran = None
    if backend in ("auto", "sdpa"):
        hit = _try_sdpa(q, view, mask, score_mod, normalizer, scale, return_lse, forced=backend == "sdpa")
        if hit is not None:
            ran, out = hit
    if out is None and backend in ("auto", "triton"):
        got = _try_kernel(backend, q, view, mask, score_mod, normalizer, scale, return_lse, splits)
        if got is not None:
            ran, (out, lse) = "triton", got
    if out is None:
        out, lse = _reference(q, view, mask, score_mod, normalizer, scale, return_lse)
    else:
        record_backend(ran, "decode")
    if layout == "bthd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def route(q: Tensor, k: Tensor, v: Tensor, backend: str, score_mod, normalizer, positions,
          deterministic: Optional[bool]) -> Optional[str]:
    """For :func:`attnkit.attention`: the backend to call :func:`decode_attention` with for this ``[B, H, L, D]`` call,
    or None to keep attention()'s own path. Decoding takes calls with few query rows (``≤ ROUTE_MAX_Q``) over many
    keys (``≥ ROUTE_MIN_K``) at the default placement, on CUDA (or the interpreter), that need no gradient (the
    decode kernels have no backward). ``deterministic`` keeps to the kernel (no SDPA)."""
    if backend not in ("auto", "triton") or positions is not None:
        return None
    if q.shape[2] > ROUTE_MAX_Q or k.shape[2] < ROUTE_MIN_K:
        return None
    if not backends._fusable(backend, q):
        return None
    if torch.is_grad_enabled():
        held = [q, k, v] + [p for m in (score_mod, normalizer) if m is not None for p in m.parameters()]
        held += [t for m in (score_mod, normalizer) if m is not None for mm in m.modules()
                 for t in vars(mm).values() if isinstance(t, Tensor)]
        if any(t.requires_grad for t in held):
            return None
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return "triton" if deterministic else backend


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

def _sdpa_exact(q: Tensor, view: KVView, mask, score_mod, normalizer) -> bool:
    if score_mod is not None or not isinstance(normalizer, Softmax) or normalizer.sink is not None:
        return False
    if normalizer.gamma > 0 or view.paged:
        return False
    if not (mask.kind == "full" or (mask.kind == "causal" and q.shape[2] == 1)):
        return False
    return view.lens is not None and all(n == view.max_len for n in view.lens)


def _try_sdpa(q, view: KVView, mask, score_mod, normalizer, scale, return_lse, forced: bool):
    """``(name, out)`` from SDPA where it computes exactly this call, else None (``forced``: ValueError)."""
    from . import sdpa
    ok = (_sdpa_exact(q, view, mask, score_mod, normalizer) and not return_lse and q.device.type == "cuda"
          and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == view.v.shape[-1])
    if not ok:
        if forced:
            raise ValueError("backend='sdpa' computes plain softmax with a full mask (or causal with one query "
                             "token) over a contiguous cache whose sequences all have the same length, in float16 / "
                             "bfloat16 on CUDA, without return_lse; this call is something else")
        return None
    L = view.max_len
    k, v = view.k[:, :, :L], view.v[:, :, :L]
    for name in (SDPA_DECODE if not forced else SDPA_DECODE + ("efficient", "math")):
        key = (name, q.dtype, q.shape[1], k.shape[1], q.shape[-1], q.shape[2])
        if key in _sdpa_refused:
            continue
        try:
            return f"sdpa-{name}", sdpa.call(name, q, k, v, {"is_causal": False}, scale)
        except RuntimeError:
            _sdpa_refused.add(key)
    if forced:
        raise ValueError("no SDPA backend accepted these inputs")
    return None


def _try_kernel(backend, q, view: KVView, mask, score_mod, normalizer, scale, return_lse, splits):
    """``(out, lse)`` from the split-KV kernel, or None (``auto``: unsupported call or no kernel here)."""
    if not backends._fusable(backend, q):
        return None
    from ..ops.softmax.decode import decode
    try:
        backends._check(q, view.k, view.v)
        if max(q.shape[-1], view.v.shape[-1]) > 256:
            raise Unsupported("head dims up to 256")
        return decode(q, view.k, view.v, view.seqlens, max_len=view.max_len, block_table=view.block_table,
                      mask=mask, score_mod=score_mod, normalizer=normalizer, scale=scale, want_lse=return_lse,
                      splits=splits, lens=view.lens)
    except Unsupported as e:
        return backends._unsupported(backend, e)


def gather(view: KVView, b: int, n: int) -> Tuple[Tensor, Tensor]:
    """The first ``n`` keys and values of sequence ``b`` as ``[1, Hkv, n, D]`` / ``[1, Hkv, n, Dv]`` (copies pages)."""
    if not view.paged:
        return view.k[b:b + 1, :, :n], view.v[b:b + 1, :, :n]
    page = view.k.shape[2]
    t = view.block_table if view.block_table.dim() == 3 else view.block_table.unsqueeze(1)
    npg = -(-n // page)
    Hkv = view.k.shape[1]
    ks, vs = [], []
    for h in range(Hkv):
        idx = t[b, h if t.shape[1] > 1 else 0, :npg].long()
        ks.append(view.k[idx, h].reshape(npg * page, -1)[:n])
        vs.append(view.v[idx, h].reshape(npg * page, -1)[:n])
    return torch.stack(ks).unsqueeze(0), torch.stack(vs).unsqueeze(0)


class _AtBatch(M.Mask):
    """``inner`` evaluated as batch row ``b0`` of a batch of ``B`` (one sequence of a ragged batch at a time)."""

    def __init__(self, inner: M.Mask, b0: int, B: int):
        self.inner, self.b0, self.B = inner, b0, B

    def __call__(self, b, h, q, kv):
        return self.inner(torch.full_like(b, self.b0), h, q, kv)

    def validate(self, g):
        self.inner.validate(dataclasses.replace(g, B=self.B))

    def __repr__(self):
        return f"{self.inner!r}@b{self.b0}"


class _ModAtBatch(ScoreMod):
    """A score mod evaluated as batch row ``b0`` (see :class:`_AtBatch`)."""

    def __init__(self, inner: ScoreMod, b0: int):
        super().__init__()
        self.inner, self.b0 = inner, b0
        self.needs_counts = inner.needs_counts

    def forward(self, score, idx):
        return self.inner(score, dataclasses.replace(idx, b=torch.full_like(idx.b, self.b0)))

    def validate(self, H):
        self.inner.validate(H)


def _reference(q, view: KVView, mask, score_mod, normalizer, scale, return_lse):
    """The materialized reference per sequence (one batched call when every sequence has the same length)."""
    lens = view.lens if view.lens is not None else view.seqlens.tolist()
    B = q.shape[0]
    if not view.paged and all(n == lens[0] for n in lens):
        n = lens[0]
        return _ref_call(q, view.k[:, :, :n], view.v[:, :, :n], mask, score_mod, normalizer, scale, return_lse)
    outs, lses = [], []
    for b, n in enumerate(lens):
        k, v = gather(view, b, n)
        m, sm = mask, score_mod
        if B > 1:
            m = _AtBatch(mask, b, B)
            sm = None if score_mod is None else _ModAtBatch(score_mod, b)
        o, lse = _ref_call(q[b:b + 1], k, v, m, sm, normalizer, scale, return_lse)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), (torch.cat(lses) if return_lse else None)


def _ref_call(q, k, v, mask, score_mod, normalizer, scale, return_lse):
    pos = (k.shape[2] - q.shape[2], 0)  # the default placement, explicit: position-indexed masks may cover more keys
    res = run_reference(q, k, v, mask, score_mod, normalizer, scale, "materialized", return_lse, False, "bhtd",
                        positions=pos)
    return res if return_lse else (res, None)

