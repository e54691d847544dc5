"""Shared test pieces: per-test seeding and float64 references written from the definitions.

Nothing here calls attnkit's own helpers to compute an expected value: masks are built by Python
loops over (b, h, i, j) from each mask's definition, scores by ``repeat_interleave`` for GQA and an
explicit product, normalizers by their plain formulas.

Seeds: every test draws a fresh base seed (or takes ``ATTNKIT_SEED`` from the environment) and
mixes it with its node id; a failing test prints the line that reproduces it.
"""
from __future__ import annotations

import math
import os
import random
import zlib
from typing import Callable, Optional

import pytest
import torch
from hypothesis import strategies as st

import attnkit.masks as M

SEED_ENV = "ATTNKIT_SEED"
F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Seeding
# ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run; the seed is reported when the test fails."""
    base = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2 ** 31))
    seed = (base + zlib.crc32(request.node.nodeid.encode())) % 2 ** 31
    torch.manual_seed(seed)
    random.seed(seed)
    request.node._attnkit_seed = (base, seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and hasattr(item, "_attnkit_seed"):
        base, seed = item._attnkit_seed
        rep.sections.append(("attnkit seed", f"reproduce with {SEED_ENV}={base} (torch seed {seed})"))


def one_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread per worker. A test module turns it on with
    ``_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randn(*shape, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=F64, requires_grad=False):
    """Fresh q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv]."""
    return (randn(B, Hq, Lq, D, dtype=dtype, requires_grad=requires_grad),
            randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=requires_grad),
            randn(B, Hkv, Lk, Dv, dtype=dtype, requires_grad=requires_grad))


# ------------------------------------------------------------------------------------------------
# Masks twice: attnkit's object and an independent Python predicate
# ------------------------------------------------------------------------------------------------

def qpos(i: int, Lq: int, Lk: int) -> int:
    """Aligned position of query row i: queries sit at the end of the keys."""
    return i + (Lk - Lq)


class RMask:
    """A mask as attnkit builds it (``ak``) and as the definition says (``fn(b, h, q, kv) -> bool`` on
    Python ints with the aligned query position)."""

    def __init__(self, ak: M.Mask, fn: Callable[[int, int, int, int], bool], name: str,
                 needs_lq_le_lk: bool = False):
        self.ak, self.fn, self.name, self.needs_lq_le_lk = ak, fn, name, needs_lq_le_lk

    def __and__(self, o: "RMask") -> "RMask":
        return RMask(self.ak & o.ak, lambda b, h, q, kv: self.fn(b, h, q, kv) and o.fn(b, h, q, kv),
                     f"({self.name} & {o.name})", self.needs_lq_le_lk or o.needs_lq_le_lk)

    def __or__(self, o: "RMask") -> "RMask":
        return RMask(self.ak | o.ak, lambda b, h, q, kv: self.fn(b, h, q, kv) or o.fn(b, h, q, kv),
                     f"({self.name} | {o.name})", self.needs_lq_le_lk or o.needs_lq_le_lk)

    def __invert__(self) -> "RMask":
        return RMask(~self.ak, lambda b, h, q, kv: not self.fn(b, h, q, kv), f"~{self.name}", self.needs_lq_le_lk)

    def __repr__(self):
        return self.name

    def dense(self, B: int, H: int, Lq: int, Lk: int) -> torch.Tensor:
        """Boolean [B, H, Lq, Lk] by explicit loops over every (b, h, i, j)."""
        return torch.tensor([[[[bool(self.fn(b, h, qpos(i, Lq, Lk), j)) for j in range(Lk)] for i in range(Lq)]
                              for h in range(H)] for b in range(B)], dtype=torch.bool).view(B, H, Lq, Lk)


def _ids_from_cu(cu: list, Lk: int) -> list:
    """Document index of each position: the largest d with cu[d] <= t (empty documents skipped)."""
    return [max(d for d in range(len(cu) - 1) if cu[d] <= t) for t in range(Lk)]


def random_cu(Lk: int) -> list:
    """Random cu_seqlens over Lk tokens with 1-4 documents, possibly one empty."""
    n = random.randint(1, 4)
    cuts = sorted(random.randint(0, Lk) for _ in range(n - 1))
    return [0] + cuts + [Lk]


def mask_case(name: str, B: int, H: int, Lq: int, Lk: int) -> RMask:
    """Build the named mask case with fresh random parameters for these sizes."""
    c = random.randint(2, 5)
    if name == "full":
        return RMask(M.full, lambda b, h, q, kv: True, "full")
    if name == "none":
        return RMask(None, lambda b, h, q, kv: True, "None")
    if name == "causal-str":
        return RMask("causal", lambda b, h, q, kv: kv <= q, "'causal'")
    if name == "causal":
        return RMask(M.causal, lambda b, h, q, kv: kv <= q, "causal")
    if name == "window":
        left = random.randint(0, 6)
        return RMask(M.sliding_window(left), lambda b, h, q, kv: q - left <= kv <= q, f"sliding_window({left})")
    if name == "window2":
        left, right = random.randint(0, 5), random.randint(1, 5)
        return RMask(M.sliding_window(left, right), lambda b, h, q, kv: q - left <= kv <= q + right,
                     f"sliding_window({left}, {right})")
    if name == "chunked":
        return RMask(M.chunked(c), lambda b, h, q, kv: kv // c <= q // c, f"chunked({c})")
    if name == "prefix":
        p = random.randint(0, Lk)
        return RMask(M.prefix_lm(p), lambda b, h, q, kv: kv < p or kv <= q, f"prefix_lm({p})")
    if name == "prefix-batch":
        ps = [random.randint(0, Lk) for _ in range(B)]
        return RMask(M.prefix_lm(torch.tensor(ps)), lambda b, h, q, kv: kv < ps[b] or kv <= q, f"prefix_lm({ps})")
    if name == "doc":
        ids = sorted(random.randint(0, 3) for _ in range(Lk))
        return RMask(M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[q] == ids[kv], f"document({ids})",
                     needs_lq_le_lk=True)
    if name == "doc-batch-unsorted":
        ids = [[random.randint(0, 2) for _ in range(Lk)] for _ in range(B)]
        return RMask(M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[b][q] == ids[b][kv],
                     f"document({ids})", needs_lq_le_lk=True)
    if name == "cu_seqlens":
        cu = random_cu(Lk)
        ids = _ids_from_cu(cu, Lk)
        return RMask(M.document(cu_seqlens=torch.tensor(cu)), lambda b, h, q, kv: ids[q] == ids[kv],
                     f"document(cu_seqlens={cu})", needs_lq_le_lk=True)
    if name == "sinks":
        n = random.randint(0, 3)
        return RMask(M.sinks(n), lambda b, h, q, kv: kv < n, f"sinks({n})")
    if name == "dilated":
        return RMask(M.dilated(c), lambda b, h, q, kv: (q - kv) % c == 0, f"dilated({c})")
    if name == "predicate-bh":
        def fn(b, h, q, kv):
            return ((q - kv) % (h + 2) == 0) | (kv == b) | (kv > q + 3)
        return RMask(M.predicate(fn), lambda b, h, q, kv: (q - kv) % (h + 2) == 0 or kv == b or kv > q + 3,
                     "predicate(bh)")
    if name == "streamingllm":
        w, n = random.randint(1, 6), random.randint(1, 3)
        return (mask_case("causal", B, H, Lq, Lk)
                & (RMask(M.sliding_window(w), lambda b, h, q, kv: q - w <= kv <= q, f"sliding_window({w})")
                   | RMask(M.sinks(n), lambda b, h, q, kv: kv < n, f"sinks({n})")))
    if name == "causal-dilated":
        return mask_case("causal", B, H, Lq, Lk) & mask_case("dilated", B, H, Lq, Lk)
    if name == "anti-causal":  # ~causal: the last query row sees nothing (fully masked rows)
        return ~mask_case("causal", B, H, Lq, Lk)
    if name == "causal-no-first":  # row 0 of a self pattern is fully masked
        return mask_case("causal", B, H, Lq, Lk) & ~RMask(M.sinks(1), lambda b, h, q, kv: kv < 1, "sinks(1)")
    if name == "empty":
        return ~mask_case("full", B, H, Lq, Lk)
    if name == "window-or-doc":
        return mask_case("window2", B, H, Lq, Lk) | mask_case("doc-batch-unsorted", B, H, Lq, Lk)
    raise KeyError(name)


# Random compositions with & | ~ (hypothesis strategies)

@st.composite
def leaf(draw, Bs, Lq, Lk):
    kind = draw(st.sampled_from(["full", "causal", "window", "chunked", "prefix", "prefix-b", "sinks", "dilated",
                                 "doc", "pred"]))
    if kind == "full":
        return RMask(M.full, lambda b, h, q, kv: True, "full")
    if kind == "causal":
        return RMask(M.causal, lambda b, h, q, kv: kv <= q, "causal")
    if kind == "window":
        lo, hi = draw(st.integers(0, 8)), draw(st.integers(0, 8))
        return RMask(M.sliding_window(lo, hi), lambda b, h, q, kv: q - lo <= kv <= q + hi, f"sw({lo},{hi})")
    if kind == "chunked":
        c = draw(st.integers(1, 9))
        return RMask(M.chunked(c), lambda b, h, q, kv: kv // c <= q // c, f"chunked({c})")
    if kind == "prefix":
        p = draw(st.integers(0, Lk))
        return RMask(M.prefix_lm(p), lambda b, h, q, kv: kv < p or kv <= q, f"prefix({p})")
    if kind == "prefix-b":
        ps = draw(st.lists(st.integers(0, Lk), min_size=Bs, max_size=Bs))
        return RMask(M.prefix_lm(ps), lambda b, h, q, kv: kv < ps[b] or kv <= q, f"prefix({ps})")
    if kind == "sinks":
        n = draw(st.integers(0, 5))
        return RMask(M.sinks(n), lambda b, h, q, kv: kv < n, f"sinks({n})")
    if kind == "dilated":
        r = draw(st.integers(1, 5))
        return RMask(M.dilated(r), lambda b, h, q, kv: (q - kv) % r == 0, f"dilated({r})")
    if kind == "doc" and Lq <= Lk:
        ids = draw(st.lists(st.lists(st.integers(0, 3), min_size=Lk, max_size=Lk), min_size=1, max_size=1)
                   | st.lists(st.lists(st.integers(0, 3), min_size=Lk, max_size=Lk), min_size=Bs, max_size=Bs))
        if draw(st.booleans()):
            ids = [sorted(r) for r in ids]
        return RMask(M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[b % len(ids)][q] == ids[b % len(ids)][kv],
                     f"doc({ids})")
    a = draw(st.integers(2, 4))
    fn = lambda b, h, q, kv: ((q + 2 * kv + h + b) % a) != 0  # noqa: E731
    return RMask(M.predicate(fn, name=f"pred{a}"), fn, f"pred({a})")


@st.composite
def composed(draw, Bs, Lq, Lk, depth=3):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(leaf(Bs, Lq, Lk))
    op = draw(st.sampled_from(["&", "|", "~"]))
    a = draw(composed(Bs, Lq, Lk, depth - 1))
    if op == "~":
        return ~a
    b = draw(composed(Bs, Lq, Lk, depth - 1))
    return a & b if op == "&" else a | b


@st.composite
def mask_problem(draw, max_len: int = 20):
    """(RMask, B, H, Lq, Lk, block_q, block_k) with a random composed mask."""
    Bs, Hs = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq, Lk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    bq, bk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return draw(composed(Bs, Lq, Lk)), Bs, Hs, Lq, Lk, bq, bk


MASK_NAMES = ["none", "full", "causal-str", "causal", "window", "window2", "chunked", "prefix", "prefix-batch",
              "doc", "doc-batch-unsorted", "cu_seqlens", "sinks", "dilated", "predicate-bh", "streamingllm",
              "causal-dilated", "anti-causal", "causal-no-first", "empty", "window-or-doc"]


#: document masks are defined for Lq <= Lk only (Lq > Lk is an error, see test_errors.py)
NEEDS_LQ_LE_LK = {"doc", "doc-batch-unsorted", "cu_seqlens", "window-or-doc"}


def mask_shape_params(names, shapes):
    """(name, Lq, Lk) for every mask name and shape where the mask is defined."""
    return [(n, Lq, Lk) for n in names for Lq, Lk in shapes if not (n in NEEDS_LQ_LE_LK and Lq > Lk)]


def lookahead(m: torch.Tensor, Lq: int, Lk: int) -> bool:
    """Does any visible key sit after its query's aligned position?"""
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk).view(1, -1)
    return bool((m & (j > i)).any())


# ------------------------------------------------------------------------------------------------
# Reference attention (float64, from the definitions)
# ------------------------------------------------------------------------------------------------

class Pos:
    """Index tensors of a [B, H, Lq, Lk] score map: b, h, aligned query position q, key kv; n visible keys."""

    def __init__(self, B, H, Lq, Lk, m: torch.Tensor):
        self.b = torch.arange(B).view(-1, 1, 1, 1)
        self.h = torch.arange(H).view(1, -1, 1, 1)
        self.q = (torch.arange(Lq) + (Lk - Lq)).view(1, 1, -1, 1)
        self.kv = torch.arange(Lk).view(1, 1, 1, -1)
        self.n = m.sum(-1, keepdim=True).to(F64)  # [B, H, Lq, 1]
        self.B, self.H, self.Lq, self.Lk = B, H, Lq, Lk


def ref_scores(q, k, scale: Optional[float] = None) -> torch.Tensor:
    """s[b,h,i,j] = scale · Σ_d q[b,h,i,d] k[b, h // G, j, d] (K repeated for GQA)."""
    G = q.shape[1] // k.shape[1]
    kk = k.to(F64).repeat_interleave(G, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return scale * torch.einsum("bhid,bhjd->bhij", q.to(F64), kk)


def ref_normalize(s, m, kind="softmax", *, sink=None, gamma=0.0, bias=None):
    """Weights p [B,H,Lq,Lk] (exactly 0 where masked) and lse [B,H,Lq] (softmax family, else None).

    softmax: exp(s)/Σ exp(s) over visible keys; sink σ_h adds exp(σ_h) to the denominator;
    relaxed: (1-γ)·softmax + γ/n; sigmoid: sigmoid(s + b), b = -log Lk by default;
    relu / relu2: relu(s)/n, relu(s)²/n; none: s.
    """
    Lk = s.shape[-1]
    n = m.sum(-1, keepdim=True).to(s.dtype)
    if kind in ("softmax", "sink", "off_by_one", "relaxed"):
        neg = torch.full_like(s, -math.inf)
        sm = torch.where(m, s, neg)
        mx = sm.amax(-1, keepdim=True).detach()
        sig = None
        if kind == "sink":
            sig = sink.to(F64).view(1, -1, 1, 1)
        elif kind == "off_by_one":
            sig = torch.zeros(1, 1, 1, 1, dtype=F64)
        if sig is not None:
            mx = torch.maximum(mx, sig.detach().expand_as(mx))
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = torch.exp(sm - mx)
        denom = e.sum(-1, keepdim=True)
        if sig is not None:
            denom = denom + torch.exp(sig - mx)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        lse = (torch.log(denom) + mx).squeeze(-1)
        if kind == "relaxed":
            p = (1 - gamma) * p + gamma * m.to(F64) / n.clamp(min=1)
        return p, lse
    zero = torch.zeros((), dtype=s.dtype)
    if kind == "sigmoid":
        b = -math.log(Lk) if bias is None else (bias.to(F64).view(1, -1, 1, 1) if torch.is_tensor(bias) else bias)
        return torch.where(m, 1.0 / (1.0 + torch.exp(-(s + b))), zero), None
    if kind == "relu":
        return torch.where(m, s.clamp(min=0) / n.clamp(min=1), zero), None
    if kind == "relu2":
        return torch.where(m, s.clamp(min=0) ** 2 / n.clamp(min=1), zero), None
    if kind == "none":
        return torch.where(m, s, zero), None
    raise KeyError(kind)


def ref_attention(q, k, v, m, *, scale=None, mod=None, kind="softmax", **nkw):
    """o_i = Σ_j p_ij v_j in float64; ``mod(s, Pos) -> s`` a reference score mod; returns (out, lse, p)."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    m = m.expand(B, Hq, Lq, Lk)
    s = ref_scores(q, k, scale)
    if mod is not None:
        s = mod(s, Pos(B, Hq, Lq, Lk, m))
    p, lse = ref_normalize(s, m, kind, **nkw)
    vv = v.to(F64).repeat_interleave(Hq // v.shape[1], dim=1)
    return p @ vv, lse, p


def t5_bucket_ref(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's relative_position_bucket for one ``rel = kv - q`` (mesh-tensorflow / HF transformers)."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


def alibi_slopes_ref(n: int) -> list:
    """The ALiBi reference code's get_slopes (Press et al.)."""
    def pow2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + alibi_slopes_ref(2 * c)[0::2][: n - c]


def assert_close(a, b, *, atol=1e-10, rtol=1e-8, what=""):
    """Both finite where expected, and close."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a.to(F64), b.to(F64), atol=atol, rtol=rtol, equal_nan=False,
                               msg=lambda msg: f"{what}: {msg}")


# ------------------------------------------------------------------------------------------------
# attnkit in each form
# ------------------------------------------------------------------------------------------------

#: "streaming-blocks" calls the engine's streaming form directly with small odd tiles
FORMS = ["materialized", "streaming", "streaming-blocks", "recurrent"]


def run_form(form: str, q, k, v, *, mask=None, score_mod=None, normalizer="softmax", scale=None,
             blocks=(3, 5), return_lse=False):
    """attnkit's output (and lse when asked) in one form; ``blocks`` = (block_q, block_k) for streaming-blocks."""
    import attnkit
    if form == "streaming-blocks":
        from attnkit.normalizers import as_normalizer
        from attnkit.scores import as_score_mod
        from attnkit.ops.softmax import Call, streaming
        sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        call = Call(q, k, v, M.as_mask(mask), as_score_mod(score_mod), as_normalizer(normalizer), sc)
        out, lse = streaming(call, q, k, v, block_q=blocks[0], block_k=blocks[1])
        return (out, lse) if return_lse else out
    return attnkit.attention(q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer, scale=scale,
                             form=form, backend="reference", return_lse=return_lse)


SOFTMAX_KINDS = ("softmax", "sink", "off_by_one", "relaxed")


def check_form(form, q, k, v, m, *, mask=None, score_mod=None, normalizer="softmax", scale=None,
               ref_mod=None, ref_kind="softmax", ref_kw=None, params=(), blocks=(3, 5), atol=1e-9, rtol=1e-7,
               what=""):
    """attnkit in ``form`` against ref_attention: output, lse (-inf exactly on rows without keys), and the
    gradients of <out, g> + <lse, g'> (finite rows) w.r.t. q, k, v and ``params``; never NaN."""
    use_lse = ref_kind in SOFTMAX_KINDS
    inputs = [q, k, v, *params]
    res = run_form(form, q, k, v, mask=mask, score_mod=score_mod, normalizer=normalizer, scale=scale,
                   blocks=blocks, return_lse=use_lse)
    out, lse = res if use_lse else (res, None)
    ro, rl, _ = ref_attention(q, k, v, m, scale=scale, mod=ref_mod, kind=ref_kind, **(ref_kw or {}))
    what = f"{what} [{form}]"
    assert out.dtype == q.dtype and out.shape == ro.shape
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert_close(out, ro, atol=atol, rtol=rtol, what=f"{what} out")
    loss = (out * (g := torch.randn_like(ro))).sum()
    rloss = (ro * g).sum()
    if use_lse:
        assert lse.shape == rl.shape, f"{what}: lse shape {tuple(lse.shape)} vs {tuple(rl.shape)}"
        bad = (torch.isneginf(lse) != torch.isneginf(rl)).nonzero()[:4].tolist()
        assert not bad, f"{what}: lse is -inf in one and not the other at [b,h,i] {bad}: " \
                        f"{[lse[tuple(i)].item() for i in bad]} vs reference {[rl[tuple(i)].item() for i in bad]}"
        fin = torch.isfinite(rl)
        assert_close(lse[fin], rl[fin], atol=atol, rtol=rtol, what=f"{what} lse")
        gl = torch.randn_like(rl)
        loss = loss + (torch.where(fin, lse, 0.0) * gl).sum()
        rloss = rloss + (torch.where(fin, rl, 0.0) * gl).sum()
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    want = torch.autograd.grad(rloss, inputs, allow_unused=True)
    names = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))]
    for name, a, b, x in zip(names, got, want, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert torch.isfinite(a).all(), f"{what}: non-finite {name}"
        assert a.dtype == x.dtype, f"{what}: {name} dtype {a.dtype} for a {x.dtype} input"
        tol = dict(atol=atol, rtol=rtol) if x.dtype == F64 else dict(atol=1e-5, rtol=1e-5)  # float32 parameters
        assert_close(a, b, **tol, what=f"{what} {name}")
    return out, lse
