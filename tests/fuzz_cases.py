"""The attention fuzzer's cases and its float64 reference, shared by tests/test_fuzz.py (CPU: the reference forms
and the Triton kernels under Triton's interpreter) and tests/test_fuzz_gpu.py (CUDA: the real kernels).

A :class:`Case` is one call of ``attnkit.attention``: shapes (B 1-2, GQA / MQA head ratios, T = 1, ragged
lengths, Lq != Lk end-aligned, D != Dv), a mask composed with ``& | ~`` (depth <= 3) of every built-in leaf,
up to three score mods, a normalizer, a scale, a layout / stride of the inputs and, for the non-finite
properties, NaN / ±inf planted at chosen positions. Every piece is kept as the Python source that builds it:
the tests execute exactly that source (:func:`build`), and :func:`snippet` prints it as a self-contained
reproducer (``hypothesis.note``) when a property fails.

The expected values never come from attnkit: :func:`reference` evaluates each mask leaf, score mod and
normalizer from its definition on explicit index grids (queries end-aligned: row ``i`` sits at position
``i + Lk − Lq``) and multiplies by V in float64 (or float32 for the low-precision error estimate of the GPU
checks). conftest's ALiBi slopes and T5 buckets (the papers' code) are reused.

Examples per property scale with ``ATTNKIT_FUZZ_EXAMPLES`` (a multiplier, default 1: the CI budget; e.g.
``ATTNKIT_FUZZ_EXAMPLES=20`` for a long local run). Randomness is fresh every run: hypothesis is seeded
from conftest's per-test seed, so a failure's ``ATTNKIT_SEED=...`` line reruns the same search, and every
example draws its own input seed (in the reproducer).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from hypothesis import HealthCheck, Phase, assume, example, given, note, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from conftest import alibi_slopes_ref, t5_bucket_ref

try:  # the Triton twins of the pointwise score mods (decorated for the interpreter when TRITON_INTERPRET=1)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs triton
    triton = None

F64 = torch.float64
EXAMPLES_ENV = "ATTNKIT_FUZZ_EXAMPLES"
SOFTMAX_FAMILY = ("softmax", "sink", "off_by_one", "relaxed")


def first_attr(modules: Sequence[str], attr: str):
    """``(module, module.attr)`` from the first importable module that has ``attr`` (modules are moving in the
    package re-layout); ImportError naming every place tried otherwise."""
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, attr):
            return mod, getattr(mod, attr)
    raise ImportError(f"none of {list(modules)} defines {attr}")


STREAMING_MODULES = ("attnkit.ops.softmax", "attnkit.ops.utils.tiles", "attnkit.variants.softmax")


# ------------------------------------------------------------------------------------------------
# User functions: pointwise score mods (torch + Triton twin and its derivative)
# ------------------------------------------------------------------------------------------------

def wave(s, b, h, q, kv):
    """s + sin(s)/2 + (q − kv)(h + 1)/1024 (small at the GPU file's lengths too)."""
    return s + 0.5 * torch.sin(s) + 0.0009765625 * (q - kv).to(s.dtype) * (h + 1).to(s.dtype)


def tilt(s, b, h, q, kv):
    """s·(1 + b/4) + kv/256 (depends on the batch index and the key position)."""
    return s * (1.0 + 0.25 * b.to(s.dtype)) + 0.00390625 * kv.to(s.dtype)


POINTWISE = {"wave": wave, "tilt": tilt}

if triton is not None:
    @triton.jit
    def wave_tl(s, b, h, q, kv):
        return s + 0.5 * tl.sin(s) + 0.0009765625 * (q - kv).to(tl.float32) * (h + 1).to(tl.float32)

    @triton.jit
    def dwave_tl(s, b, h, q, kv):
        return 1.0 + 0.5 * tl.cos(s)

    @triton.jit
    def tilt_tl(s, b, h, q, kv):
        return s * (1.0 + 0.25 * b.to(tl.float32)) + 0.00390625 * kv.to(tl.float32)

    @triton.jit
    def dtilt_tl(s, b, h, q, kv):
        return tl.zeros_like(s) + (1.0 + 0.25 * b.to(tl.float32))

    TWINS = {"wave": (wave_tl, dwave_tl), "tilt": (tilt_tl, dtilt_tl)}
else:  # pragma: no cover
    TWINS = {}


# ------------------------------------------------------------------------------------------------
# Masks: source for attnkit and the definition on index grids, composed with & | ~
# ------------------------------------------------------------------------------------------------

class Leaf:
    """A built-in mask leaf: ``src`` builds it with attnkit, ``fn(b, h, q, kv)`` is its definition on broadcast
    int64 index grids (``q`` aligned positions)."""

    def __init__(self, src: str, fn: Callable):
        self.src, self.fn = src, fn

    def dense(self, b, h, q, kv):
        return self.fn(b, h, q, kv)

    def __repr__(self):
        return self.src


class Op:
    """``a & b``, ``a | b`` or ``~a`` of masks."""

    def __init__(self, op: str, a, b=None):
        self.op, self.a, self.b = op, a, b

    def __repr__(self):
        return self.src

    @property
    def src(self) -> str:
        return f"~{self.a.src}" if self.op == "~" else f"({self.a.src} {self.op} {self.b.src})"

    def dense(self, b, h, q, kv):
        x = self.a.dense(b, h, q, kv)
        if self.op == "~":
            return ~x
        y = self.b.dense(b, h, q, kv)
        return x & y if self.op == "&" else x | y


def ids_from_cu(cu: List[int], Lk: int) -> List[int]:
    """Document of each position: how many interior boundaries lie at or before it (empty documents own no
    position)."""
    return [sum(c <= t for c in cu[1:-1]) for t in range(Lk)]


def _gather_ids(ids: List[List[int]], b, pos):
    t = torch.tensor(ids, device=pos.device)
    return t[b, pos] if t.shape[0] > 1 else t[0][pos]


#: user predicates: source of ``fn(b, h, q, kv)`` with an integer parameter ``{a}``
PREDICATES = ["lambda b, h, q, kv: (q + 2 * kv + h + b) % {a} != 0",
              "lambda b, h, q, kv: ((q - kv) % (h + {a}) == 0) | (kv == b)",
              "lambda b, h, q, kv: (kv * {a} <= q + h) ^ (b == 1)"]


@st.composite
def leaves(draw, B: int, Lq: int, Lk: int) -> Leaf:
    kinds = ["full", "causal", "window", "chunked", "prefix", "prefix_b", "sinks", "dilated", "predicate"]
    if Lq <= Lk:  # document masks are defined for Lq <= Lk
        kinds += ["doc", "doc_b", "cu"]
    kind = draw(st.sampled_from(kinds))
    if kind == "full":
        return Leaf("M.full", lambda b, h, q, kv: torch.ones_like(kv, dtype=torch.bool))
    if kind == "causal":
        return Leaf("M.causal", lambda b, h, q, kv: kv <= q)
    if kind == "window":
        lo, hi = draw(st.integers(0, 8)), draw(st.integers(0, 8))
        return Leaf(f"M.sliding_window({lo}, {hi})", lambda b, h, q, kv: (kv >= q - lo) & (kv <= q + hi))
    if kind == "chunked":
        c = draw(st.integers(1, 9))
        return Leaf(f"M.chunked({c})", lambda b, h, q, kv: torch.div(kv, c, rounding_mode="floor")
                    <= torch.div(q, c, rounding_mode="floor"))
    if kind == "prefix":
        p = draw(st.integers(0, Lk))
        return Leaf(f"M.prefix_lm({p})", lambda b, h, q, kv: (kv < p) | (kv <= q))
    if kind == "prefix_b":
        ps = draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B))
        return Leaf(f"M.prefix_lm(torch.tensor({ps}))",
                    lambda b, h, q, kv: (kv < torch.tensor(ps, device=b.device)[b]) | (kv <= q))
    if kind == "sinks":
        n = draw(st.integers(0, 5))
        return Leaf(f"M.sinks({n})", lambda b, h, q, kv: kv < n)
    if kind == "dilated":
        r = draw(st.integers(1, 5))
        return Leaf(f"M.dilated({r})", lambda b, h, q, kv: torch.remainder(q - kv, r) == 0)
    if kind == "predicate":
        src = draw(st.sampled_from(PREDICATES)).format(a=draw(st.integers(2, 4)))
        return Leaf(f"M.predicate({src})", eval(src))  # the user's function is the definition
    if kind == "cu":  # cu_seqlens, empty and one-token documents included
        cuts = draw(st.lists(st.integers(0, Lk), max_size=4))
        if Lk > 1 and draw(st.booleans()):
            c = draw(st.integers(0, Lk - 1))
            cuts += [c, c + 1]
        cu = [0] + sorted(cuts) + [Lk]
        ids = [ids_from_cu(cu, Lk)]
        return Leaf(f"M.document(cu_seqlens=torch.tensor({cu}))",
                    lambda b, h, q, kv: _gather_ids(ids, b, q) == _gather_ids(ids, b, kv))
    rows = 1 if kind == "doc" else B  # doc_ids [Lk] or [B, Lk], labelled segments (unsorted when labels repeat)
    ids = []
    for _ in range(rows):
        cuts = sorted(draw(st.lists(st.integers(1, max(Lk - 1, 1)), max_size=4)))
        labels = draw(st.lists(st.integers(0, 3), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
        ids.append([labels[sum(c <= t for c in cuts)] for t in range(Lk)])
    src = f"torch.tensor({ids[0] if kind == 'doc' else ids})"
    return Leaf(f"M.document({src})", lambda b, h, q, kv: _gather_ids(ids, b, q) == _gather_ids(ids, b, kv))


@st.composite
def masks(draw, B: int, Lq: int, Lk: int, depth: int = 3):
    """A leaf, or ``a & b``, ``a | b``, ``~a`` of masks of depth - 1."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(leaves(B, Lq, Lk))
    op = draw(st.sampled_from(["&", "|", "~"]))
    a = draw(masks(B, Lq, Lk, depth - 1))
    return Op("~", a) if op == "~" else Op(op, a, draw(masks(B, Lq, Lk, depth - 1)))


# ------------------------------------------------------------------------------------------------
# Score mods and normalizers: source and definition
# ------------------------------------------------------------------------------------------------

@dataclass
class Piece:
    """A score mod or normalizer: ``src`` builds it (``P(...)`` makes a learnable tensor, in order), ``kind`` and
    ``arg`` say what :func:`reference` computes, ``nparams`` how many ``P`` tensors it makes."""

    kind: str
    src: str
    arg: object = None
    nparams: int = 0


def _p(seed: int, shape, lo: float, hi: float) -> str:
    """Source of a learnable tensor: ``shape`` an int, a "nb, H" string, or "" for a 0-d tensor."""
    return f"P({seed}, {shape}, lo={lo}, hi={hi})" if shape != "" else f"P({seed}, lo={lo}, hi={hi})"


@st.composite
def score_mods(draw, Hq: int, relbias: bool = True) -> Piece:
    kinds = ["softcap", "alibi", "alibi_p", "ssmax", "ssmax_p", "temp", "temp_p", "pointwise"]
    kind = draw(st.sampled_from(kinds + (["relbias"] if relbias else [])))
    seed = draw(st.integers(0, 2 ** 16))
    heads = draw(st.sampled_from([Hq, Hq, ""]))  # a learnable per-head tensor, or a learnable 0-d one
    if kind == "softcap":
        c = draw(st.sampled_from([0.5, 1.5, 3.0, 20.0]))
        return Piece("softcap", f"S.softcap({c})", c)
    if kind == "alibi":
        return Piece("alibi", "S.alibi()")
    if kind == "alibi_p":
        return Piece("alibi_p", f"S.alibi({_p(seed, Hq, 0.05, 1.0)})", nparams=1)
    if kind == "ssmax":
        s = draw(st.sampled_from([0.43, 0.8]))
        return Piece("ssmax", f"S.ssmax({s})", s)
    if kind == "ssmax_p":
        return Piece("ssmax_p", f"S.ssmax({_p(seed, heads, 0.2, 1.0)})", nparams=1)
    if kind == "temp":
        t = draw(st.sampled_from([0.6, 1.7]))
        return Piece("temp", f"S.temperature({t})", t)
    if kind == "temp_p":
        return Piece("temp_p", f"S.temperature({_p(seed, heads, 0.5, 1.5)})", nparams=1)
    if kind == "pointwise":
        name = draw(st.sampled_from(sorted(POINTWISE)))
        twin = f", triton_fn=({name}_tl, d{name}_tl)" if name in TWINS else ""
        return Piece("pointwise", f"S.pointwise({name}{twin})", name)
    bidir = draw(st.booleans())
    nb = draw(st.sampled_from([4, 8, 16] if bidir else [4, 5, 8]))
    md = draw(st.integers(nb // (4 if bidir else 2) + 1, 24))
    return Piece("relbias", f"S.relative_bias({Hq}, num_buckets={nb}, max_distance={md}, bidirectional={bidir}, "
                            f"table={_p(seed, f'{nb}, {Hq}', -1.0, 1.0)})", (nb, md, bidir), nparams=1)


@st.composite
def normalizers(draw, Hq: int, family: Optional[str] = None) -> Piece:
    """Any normalizer; ``family`` "softmax" / "elementwise" restricts the draw."""
    soft = ["softmax", "sink", "off_by_one", "relaxed"]
    elem = ["sigmoid", "sigmoid_p", "relu", "relu2", "none"]
    kind = draw(st.sampled_from({"softmax": soft, "elementwise": elem}.get(family, soft + elem)))
    seed = draw(st.integers(0, 2 ** 16))
    heads = draw(st.sampled_from([Hq, Hq, ""]))  # a learnable per-head tensor, or a learnable 0-d one
    if kind == "sink":
        return Piece("sink", f"N.softmax_sink({_p(seed, heads, -2.0, 2.0)})", nparams=1)
    if kind == "relaxed":
        g = draw(st.sampled_from([0.1, 0.5, 0.9]))
        return Piece("relaxed", f"N.relaxed({g})", g)
    if kind == "sigmoid_p":
        return Piece("sigmoid", f"N.sigmoid({_p(seed, heads, -2.0, 1.0)})", nparams=1)
    name = {"softmax": "softmax", "off_by_one": "softmax_off_by_one"}.get(kind, kind)
    src = f"N.{name}()" if draw(st.booleans()) else repr(name)  # an object or its name
    return Piece(kind, src)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One attention call (see the module doc). ``plants``: ``(tensor, b, h, t, d, value)`` written into the
    logical ``[B, H, T, D]`` values of q / k / v before they are laid out (``d`` None: the whole vector)."""

    seed: int
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    mask: object
    mods: List[Piece]
    norm: Piece
    scale: Optional[float] = None
    layout: str = "bhtd"
    view: str = "contig"
    tiles: Tuple[int, int] = (3, 5)
    plants: list = field(default_factory=list)

    def __repr__(self):
        return (f"Case({self.mask.src}; mods [{', '.join(m.src for m in self.mods)}]; {self.norm.src}; "
                f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Lq={self.Lq} Lk={self.Lk} D={self.D} Dv={self.Dv} "
                f"scale={self.scale} {self.layout}/{self.view} tiles={self.tiles} seed={self.seed}"
                + (f" plants={self.plants}" if self.plants else "") + ")")

    @property
    def lse_on(self) -> bool:
        return self.norm.kind in SOFTMAX_FAMILY


@st.composite
def cases(draw, *, max_len: int = 40, lengths=None, dims=None, triton: bool = False,
          family: Optional[str] = None, max_bh: Optional[int] = None) -> Case:
    """Random shapes, mask, mods and normalizer. ``triton``: only what the fused kernels take (one relative
    bias at most; pointwise mods have twins anyway); ``max_bh``: at most this many (batch, query head) pairs
    (Triton's interpreter runs every program in Python)."""
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    if max_bh is not None and B * Hkv * G > max_bh:
        B, Hkv = 1, (Hkv if Hkv * G <= max_bh else 1)
    Hq = Hkv * G
    lengths = lengths or st.integers(1, max_len)
    Lq = draw(lengths)
    Lk = Lq if draw(st.booleans()) else draw(lengths)
    dims = dims or st.integers(1, 24)
    D, Dv = draw(dims), draw(dims)
    mask = draw(masks(B, Lq, Lk))
    mods: List[Piece] = []
    for _ in range(draw(st.integers(0, 3))):
        mods.append(draw(score_mods(Hq, relbias=not (triton and any(m.kind == "relbias" for m in mods)))))
    norm = draw(normalizers(Hq, family))
    scale = None if draw(st.integers(0, 3)) else draw(st.sampled_from([0.3, -0.45, 1.1]))
    layout = draw(st.sampled_from(["bhtd", "bthd"]))
    view = draw(st.sampled_from(["contig", "slice", "step", "perm"]))
    bq, bk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return Case(draw(st.integers(0, 2 ** 31 - 1)), B, Hq, Hkv, Lq, Lk, D, Dv, mask, mods, norm, scale, layout,
                view, (bq, bk))


NONFINITE = ["float('nan')", "float('inf')", "-float('inf')"]


@st.composite
def planted_cases(draw, base) -> Case:
    """A case from ``base`` with NaN / ±inf planted in k and v at keys that some query row cannot see, and in q
    at rows that see no key (at least one plant)."""
    case = draw(base)
    vis = dense_mask(case, "cpu")
    G, B, Hkv = case.Hq // case.Hkv, case.B, case.Hkv
    hidden = (~vis.reshape(B, Hkv, G * case.Lq, case.Lk).all(2)).nonzero().tolist()  # [b, hk, j]
    empty = (~vis.any(-1)).nonzero().tolist()  # [b, hq, i]
    spots = [("k", *x) for x in hidden] + [("v", *x) for x in hidden] + [("q", *x) for x in empty]
    assume(spots)
    plants = []
    for _ in range(draw(st.integers(1, 3))):
        name, b, h, t = draw(st.sampled_from(spots))
        width = case.Dv if name == "v" else case.D
        d = draw(st.one_of(st.none(), st.integers(0, width - 1)))
        plants.append((name, b, h, t, d, draw(st.sampled_from(NONFINITE))))
    case.plants = plants
    return case


# ------------------------------------------------------------------------------------------------
# Building a case: the code that runs is the code the reproducer prints
# ------------------------------------------------------------------------------------------------

HEADER = '''\
import torch
import attnkit
from attnkit import masks as M, scores as S, normalizers as N

PARAMS = []  # the learnable tensors made below, in order


def P(seed, *shape, lo=-1.0, hi=1.0, nan_at=None):
    """A learnable tensor on DEV in PDT, uniform in [lo, hi) from its own seed (NaN at ``nan_at``)."""
    t = lo + (hi - lo) * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if nan_at is not None:
        t[nan_at] = float("nan")
    t = t.to(DEV, PDT).requires_grad_()
    PARAMS.append(t)
    return t


def lay(x, layout, view):
    """Logical [B, H, T, D] values as attention() receives them: stored in ``layout``, contiguous or a strided view
    into a NaN-filled larger tensor ("slice": the head dim cut from wider rows, "step": every other token), or
    "perm": stored with the head and token dims swapped."""
    x = x.to(DEV, DT)
    x = (x.transpose(1, 2) if layout == "bthd" else x).contiguous()
    if view == "perm":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif view in ("slice", "step"):
        dim = 3 if view == "slice" else (1 if layout == "bthd" else 2)
        shape = list(x.shape)
        shape[dim] = shape[dim] + 3 if view == "slice" else 2 * shape[dim]
        idx = [slice(None)] * 4
        idx[dim] = slice(0, x.shape[dim]) if view == "slice" else slice(0, None, 2)
        wide = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
        wide[tuple(idx)] = x
        x = wide[tuple(idx)]
    return x.detach().requires_grad_()
'''


def mods_src(case: Case) -> str:
    if not case.mods:
        return "None"
    if len(case.mods) == 1:
        return case.mods[0].src
    return "[" + ", ".join(m.src for m in case.mods) + "]"


def setup_src(case: Case, dev: str, dtype: torch.dtype, pdtype: torch.dtype) -> str:
    """The case as code: pieces, inputs (seeded), planted values, layout."""
    lines = [f"DEV, DT, PDT = {dev!r}, {dtype}, {pdtype}",
             f"B, Hq, Hkv, Lq, Lk, D, Dv = {case.B}, {case.Hq}, {case.Hkv}, {case.Lq}, {case.Lk}, {case.D}, {case.Dv}",
             f"mask = {case.mask.src}",
             f"score_mod = {mods_src(case)}",
             f"normalizer = {case.norm.src}",
             f"scale = {case.scale}",
             f"g = torch.Generator().manual_seed({case.seed})",
             "q0 = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)",
             "k0 = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)",
             "v0 = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64)"]
    for name, b, h, t, d, val in case.plants:
        lines.append(f"{name}0[{b}, {h}, {t}{'' if d is None else f', {d}'}] = {val}")
    lines.append(f"q, k, v = (lay(t, {case.layout!r}, {case.view!r}) for t in (q0, k0, v0))")
    return "\n".join(lines) + "\n"


def call_src(case: Case, form: str) -> str:
    """One attention call; ``form``: materialized, streaming, streaming-tiles, recurrent, triton."""
    backend = "triton" if form == "triton" else "reference"
    f = "streaming" if form == "streaming-tiles" else form
    args = (f"q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer, scale=scale, layout={case.layout!r}, "
            + (f"backend={backend!r}" if form == "triton" else f"form={f!r}, backend={backend!r}")
            + f", return_lse={case.lse_on}")
    line = f"res = attnkit.attention({args})"
    if form == "streaming-tiles":
        line = f"with streaming_blocks({case.tiles[0]}, {case.tiles[1]}):\n    {line}"
    return line + "\n"


def build(case: Case, dev: str = "cpu", dtype: torch.dtype = F64, pdtype: torch.dtype = F64) -> dict:
    """Execute the case's setup code: a namespace holding mask, score_mod, normalizer, scale, q, k, v (the
    tensors attention() receives) and PARAMS."""
    ns = {"__name__": "fuzz_case", **POINTWISE}
    ns.update({f"{n}_tl": f for n, (f, _) in TWINS.items()})
    ns.update({f"d{n}_tl": d for n, (_, d) in TWINS.items()})
    exec(HEADER, ns)  # noqa: S102 - the reproducer's own code
    exec(setup_src(case, dev, dtype, pdtype), ns)  # noqa: S102
    return ns


def run(case: Case, ns: dict, form: str):
    """``(out, lse or None)`` of one form (logical [B, H, L, ...] views); exceptions propagate."""
    if form == "streaming-tiles" and "streaming_blocks" not in ns:
        ns["streaming_blocks"] = first_attr(STREAMING_MODULES, "streaming_blocks")[1]
    exec(call_src(case, form), ns)  # noqa: S102
    res = ns.pop("res")
    out, lse = res if case.lse_on else (res, None)
    return logical(out, case.layout), lse


def logical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``[B, H, T, D]`` view of a tensor in ``layout``."""
    return x.transpose(1, 2) if layout == "bthd" else x


def snippet(case: Case, forms: Sequence[str], dev: str = "cpu", dtype: torch.dtype = F64,
            pdtype: torch.dtype = F64) -> str:
    """A self-contained reproducer: imports, helpers, the case, and one call per form."""
    parts = ["# ---- attnkit fuzz reproducer: save as a file and run; the failing form is named in the error ----"]
    if "triton" in forms and dev == "cpu":
        parts.append('import os\nos.environ["TRITON_INTERPRET"] = "1"  # Triton on CPU: its interpreter')
    if any(f.startswith("streaming-tiles") for f in forms):
        mod = first_attr(STREAMING_MODULES, "streaming_blocks")[0].__name__
        parts.append(f"from {mod} import streaming_blocks")
    parts.append(HEADER)
    used = {m.arg for m in case.mods if m.kind == "pointwise"}
    if used:
        parts.append("import triton\nimport triton.language as tl")
        for name in sorted(used):
            parts.append(inspect.getsource(POINTWISE[name]))
            for fn in TWINS.get(name, ()):
                parts.append(textwrap.dedent(inspect.getsource(getattr(fn, "fn", fn))))
    parts.append(setup_src(case, dev, dtype, pdtype))
    for f in forms:
        parts.append(f"# form {f}\n" + call_src(case, f))
    parts.append("out, lse = res if isinstance(res, tuple) else (res, None)\nprint(out, lse)")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Reference (float64 from the definitions)
# ------------------------------------------------------------------------------------------------

def grids(case: Case, device):
    """Broadcast int64 grids b [B,1,1,1], h [1,Hq,1,1], q [1,1,Lq,1] (aligned positions), kv [1,1,1,Lk]."""
    b = torch.arange(case.B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(case.Hq, device=device).view(1, -1, 1, 1)
    q = (torch.arange(case.Lq, device=device) + (case.Lk - case.Lq)).view(1, 1, -1, 1)
    kv = torch.arange(case.Lk, device=device).view(1, 1, 1, -1)
    return b, h, q, kv


def dense_mask(case: Case, device) -> torch.Tensor:
    """Visibility ``[B, Hq, Lq, Lk]`` from the leaves' definitions."""
    b, h, q, kv = grids(case, device)
    return case.mask.dense(b, h, q, kv).expand(case.B, case.Hq, case.Lq, case.Lk)


def lookahead(case: Case, vis: torch.Tensor) -> bool:
    """Does any visible key sit after its query's aligned position?"""
    b, h, q, kv = grids(case, vis.device)
    return bool((vis & (kv > q)).any())


def _per_head(x, h, like):
    """A number, list or tensor (scalar or per head) at head indices ``h``, in ``like``'s dtype."""
    x = x.to(like.dtype) if torch.is_tensor(x) else torch.tensor(x, dtype=like.dtype, device=like.device)
    return x[h] if x.dim() == 1 else x


def _mod(piece: Piece, s, g, n, ps):
    """One score mod from its definition; ``g`` = (b, h, q, kv) grids, ``n`` visible keys per row."""
    b, h, q, kv = g
    kind, a = piece.kind, piece.arg
    if kind == "softcap":
        return a * torch.tanh(s / a)
    if kind in ("alibi", "alibi_p"):
        m = alibi_slopes_ref(s.shape[1]) if kind == "alibi" else ps[0]
        return s - _per_head(m, h, s) * (q - kv).abs().to(s.dtype)
    if kind == "relbias":
        nb, md, bidir = a
        rel = (kv - q).expand(1, 1, s.shape[2], s.shape[3])
        lut = {r: t5_bucket_ref(r, bidir, nb, md) for r in rel.unique().tolist()}
        bucket = torch.tensor([lut[r] for r in rel.flatten().tolist()], device=s.device).view(rel.shape)
        return s + ps[0].to(s.dtype)[bucket, h]
    if kind in ("ssmax", "ssmax_p"):
        return s * _per_head(a if kind == "ssmax" else ps[0], h, s) * torch.log(n.clamp(min=1))
    if kind in ("temp", "temp_p"):
        return s / _per_head(a if kind == "temp" else ps[0], h, s)
    if kind == "pointwise":
        return POINTWISE[a](s, b, h, q, kv)
    raise KeyError(kind)


def _normalize(piece: Piece, s, vis, n, ps, Lk: int):
    """Weights p (exactly 0 where masked) and lse (softmax family) from the normalizer's definition:
    softmax exp(s)/Σ exp(s) (+ exp(σ_h) for a sink, + 1 off-by-one), relaxed (1−γ)·softmax + γ/n,
    sigmoid(s + b) with b = −log Lk by default, relu(s)/n, relu(s)²/n, none: s. A row without visible keys
    gets weights 0 (lse −inf, or σ_h with a sink)."""
    kind = piece.kind
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if kind in SOFTMAX_FAMILY:
        sink = None
        if kind == "sink":
            sink = ps[0].to(s.dtype).view(1, -1, 1, 1)
        elif kind == "off_by_one":
            sink = torch.zeros(1, 1, 1, 1, dtype=s.dtype, device=s.device)
        sm = torch.where(vis, s, -math.inf)
        mx = sm.amax(-1, keepdim=True)
        if sink is not None:
            mx = torch.maximum(mx, sink.expand_as(mx))
        mx = torch.where(torch.isfinite(mx), mx, zero).detach()  # a shift: any finite value gives the same p
        e = torch.exp(sm - mx)
        den = e.sum(-1, keepdim=True)
        if sink is not None:
            den = den + torch.exp(sink - mx)
        p = e / torch.where(den == 0, torch.ones_like(den), den)
        lse = (torch.log(den) + mx).squeeze(-1)
        if kind == "relaxed":
            p = (1 - piece.arg) * p + piece.arg * vis.to(s.dtype) / n.clamp(min=1)
        return p, lse
    if kind == "sigmoid":
        bias = -math.log(Lk) if not ps else ps[0].to(s.dtype).view(1, -1, 1, 1)
        return torch.where(vis, torch.sigmoid(s + bias), zero), None
    if kind == "relu":
        return torch.where(vis, torch.relu(s) / n.clamp(min=1), zero), None
    if kind == "relu2":
        return torch.where(vis, torch.relu(s) ** 2 / n.clamp(min=1), zero), None
    if kind == "none":
        return torch.where(vis, s, zero), None
    raise KeyError(kind)


def reference(case: Case, q, k, v, params: Sequence[torch.Tensor], *, vis: Optional[torch.Tensor] = None,
              where_v: bool = False, compute: torch.dtype = F64, weights: bool = False):
    """``(out [B,Hq,Lq,Dv], lse [B,Hq,Lq] or None)`` in ``compute`` precision for logical ``[B, H, T, D]`` inputs:
    s = scale·q·k (K, V repeated over each GQA group), the score mods in order, the normalizer over visible
    keys, o = Σ_j p_ij v_j. ``where_v``: sum only visible (i, j) pairs, so non-finite values at keys a row
    cannot see stay out of it (IEEE propagation from the definition; no gradients needed there). ``weights``:
    also return p."""
    dev = q.device
    vis = dense_mask(case, dev) if vis is None else vis
    G = case.Hq // case.Hkv
    q, k, v = (x.to(compute) for x in (q, k, v))
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scale = 1.0 / math.sqrt(case.D) if case.scale is None else case.scale
    s = scale * torch.einsum("bhid,bhjd->bhij", q, kk)
    n = vis.sum(-1, keepdim=True).to(compute)
    g = grids(case, dev)
    it = iter(params)
    for piece in case.mods:
        s = _mod(piece, s, g, n, [next(it) for _ in range(piece.nparams)])
    p, lse = _normalize(case.norm, s, vis, n, [next(it) for _ in range(case.norm.nparams)], case.Lk)
    if not where_v:
        out = p @ vv
    else:
        out = torch.stack([torch.where(vis[:, :, i, :, None], p[:, :, i, :, None] * vv, 0).sum(-2)
                           for i in range(case.Lq)], 2)
    return (out, lse, p) if weights else (out, lse)


# ------------------------------------------------------------------------------------------------
# What a call must give, and where
# ------------------------------------------------------------------------------------------------

class Expected:
    """The float64 reference of a built case: ``out``, ``lse`` by IEEE propagation over visible pairs only,
    gradients (of <out, go> + <lse, gl>) from the inputs with planted values zeroed, and where each is defined:
    ``rows`` [B,Hq,Lq] that see no planted value, ``keys`` [B,Hkv,Lk] seen only by such rows, ``params_ok`` when
    every row is clean. ``empty`` rows see no key: zeros and zero gradients. ``magnitude``: the largest finite
    weight or output (float16 range)."""

    def __init__(self, case: Case, ns: dict, compute: torch.dtype = F64, raw: Optional[bool] = None):
        q, k, v = (logical(ns[n], case.layout).detach() for n in "qkv")
        dev = q.device
        self.case, self.params = case, list(ns["PARAMS"])
        self.vis = vis = dense_mask(case, dev)
        self.empty = ~vis.any(-1)
        self.lookahead = lookahead(case, vis)
        G = case.Hq // case.Hkv
        bad_k = ~torch.isfinite(k.to(F64)).all(-1)  # [B,Hkv,Lk]
        bad_v = ~torch.isfinite(v.to(F64)).all(-1)
        bad = (bad_k | bad_v).repeat_interleave(G, 1)[:, :, None, :]
        dirty = (vis & bad).any(-1)  # rows that see a planted value [B,Hq,Lq]
        self.rows = ~dirty
        self.keys = ~(vis & dirty[..., None]).reshape(case.B, case.Hkv, G * case.Lq, case.Lk).any(2)
        self.params_ok = not bool(dirty.any())
        with torch.no_grad():
            self.out, self.lse, p = reference(case, q, k, v, [p.detach() for p in self.params], vis=vis,
                                              where_v=bool(case.plants) if raw is None else raw, compute=compute,
                                              weights=True)
        self.magnitude = max(float(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).abs().max())
                             for x in (p, self.out))
        clean = [torch.where(torch.isfinite(x), x, torch.zeros_like(x)).to(compute).requires_grad_() for x in (q, k, v)]
        ro, rl = reference(case, *clean, self.params, vis=vis, compute=compute)
        gen = torch.Generator(device="cpu").manual_seed(case.seed + 1)
        self.go = torch.randn(ro.shape, generator=gen, dtype=F64).to(dev)
        outs, gos = [ro], [self.go.to(ro.dtype)]
        self.gl = None
        if rl is not None:
            self.gl = torch.randn(rl.shape, generator=gen, dtype=F64).to(dev)
            self.gl = torch.where(torch.isneginf(self.lse), 0.0, self.gl)  # no gradient through an empty row's −inf
            outs.append(rl)
            gos.append(self.gl.to(rl.dtype))
        grads = torch.autograd.grad(outs, clean + self.params, gos, allow_unused=True)
        self.grads = [torch.zeros_like(x) if gx is None else gx for gx, x in zip(grads, clean + self.params)]

    def cotangents(self, out: torch.Tensor, lse: Optional[torch.Tensor]):
        """The same cotangents for a call's (logical) outputs."""
        outs, gos = [out], [self.go.to(out.dtype)]
        if lse is not None:
            outs.append(lse)
            gos.append(self.gl.to(lse.dtype))
        return outs, gos

    def grads_of(self, ns: dict, out, lse):
        """Gradients of the call's q, k, v (logical) and PARAMS (None where unused)."""
        outs, gos = self.cotangents(out, lse)
        leaves = [ns[n] for n in "qkv"] + self.params
        got = torch.autograd.grad(outs, leaves, gos, allow_unused=True)
        return [logical(g, self.case.layout) if (g is not None and i < 3) else g for i, g in enumerate(got)]


GRAD_NAMES = ["dq", "dk", "dv"]


def grad_names(n_params: int) -> List[str]:
    return GRAD_NAMES + [f"dparam{i}" for i in range(n_params)]


# ------------------------------------------------------------------------------------------------
# Running a property
# ------------------------------------------------------------------------------------------------

def examples(n: int) -> int:
    """``n`` scaled by ATTNKIT_FUZZ_EXAMPLES (a multiplier, default 1)."""
    return max(1, round(n * float(os.environ.get(EXAMPLES_ENV, "1"))))


def run_property(request, strategy, body: Callable, n: int, explicit: Sequence[Case] = ()) -> None:
    """Run ``body(case)`` on ``examples(n)`` draws of ``strategy`` (after the ``explicit`` cases), hypothesis
    seeded from conftest's per-test seed. A test marked xfail does not shrink (it fails on purpose until its
    fix lands; shrinking comes back with the mark's removal)."""
    xfail = request.node.get_closest_marker("xfail") is not None
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([] if xfail else [Phase.shrink])
    test = given(strategy)(body)
    for c in explicit:
        test = example(c)(test)
    test = hypothesis_seed(request.node._attnkit_seed[1])(test)
    test = settings(max_examples=examples(n), deadline=None, phases=phases, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])(test)
    test()


def note_case(case: Case, forms: Sequence[str], **kw) -> None:
    note(snippet(case, forms, **kw))


def _where(mask: torch.Tensor, limit: int = 4) -> list:
    return mask.nonzero()[:limit].tolist()


def same_nonfinite(what: str, got: torch.Tensor, want: torch.Tensor, neginf: bool = False) -> torch.Tensor:
    """Assert ``got`` is non-finite exactly where ``want`` is (NaN and ±inf alike; with ``neginf``, −inf only where
    ``want`` is −inf: an lse's empty rows); returns where ``want`` is finite."""
    fin = torch.isfinite(want)
    diff = torch.isfinite(got) != fin
    assert not diff.any(), (f"{what}: finite in one and not the other at {_where(diff)}: got "
                            f"{[got[tuple(i)].item() for i in _where(diff)]}, reference "
                            f"{[want[tuple(i)].item() for i in _where(diff)]}")
    ninf = torch.isneginf(got) != torch.isneginf(want)
    assert not (neginf and ninf.any()), f"{what}: -inf in one and not the other at {_where(ninf)}"
    return fin


def check_call(exp: Expected, ns: dict, out, lse, what: str, close: Callable, close_grads: Callable,
               grads: bool = True) -> None:
    """One call's output, lse and gradients against ``exp``. ``close(what, got, want)`` compares finite values;
    ``close_grads(names, got, want, sel)`` the gradients where they are defined (see :class:`Expected`; ``sel``: the
    row / key masks applied, None for parameters). Rows with no visible key: exact zeros and zero dq."""
    q = ns["q"]
    assert out.dtype == q.dtype, f"{what}: output dtype {out.dtype} for {q.dtype} inputs"
    assert out.shape == exp.out.shape, f"{what}: output shape {tuple(out.shape)} vs {tuple(exp.out.shape)}"
    fin = same_nonfinite(f"{what} out", out, exp.out)
    close(f"{what} out", out[fin], exp.out[fin])
    assert (out[exp.empty] == 0).all(), f"{what}: rows without a visible key are not zero at {_where(exp.empty)}"
    if exp.lse is not None:
        assert lse is not None and lse.shape == exp.lse.shape, f"{what}: lse {None if lse is None else lse.shape}"
        fin = same_nonfinite(f"{what} lse", lse, exp.lse, neginf=True)
        close(f"{what} lse", lse[fin], exp.lse[fin])
    if not grads:
        return
    got = exp.grads_of(ns, out, lse)
    dq = got[0]
    if dq is not None:
        zero = dq[exp.empty]
        assert (zero == 0).all(), f"{what}: dq of rows without a visible key is not zero: {zero.abs().max().item()}"
    sel = [exp.rows, exp.keys, exp.keys] + [None] * len(exp.params)
    names, a, b, used = [], [], [], []
    for i, (name, g, w, m) in enumerate(zip(grad_names(len(exp.params)), got, exp.grads, sel)):
        if i >= 3 and not exp.params_ok:
            continue
        g = torch.zeros_like(w) if g is None else g
        assert g.dtype == ([q, q, q] + exp.params)[i].dtype, f"{what}: {name} dtype {g.dtype}"
        if m is not None:
            g, w = g[m], w[m]
        bad = ~torch.isfinite(g)
        assert not bad.any(), f"{what}: non-finite {name} where it is defined, at {_where(bad)}"
        names.append(f"{what} {name}")
        a.append(g)
        b.append(w)
        used.append(m)
    close_grads(names, a, b, used)
