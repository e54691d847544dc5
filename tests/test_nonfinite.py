"""Non-finite values (issue 10, defects 4, 5 and the streaming half of 2), in every form and the fused kernels.

The rule (attnkit.ops.softmax.call): every sum runs over visible pairs only, so NaN / ±inf in k or v at a key a
row cannot see, in q of a row that sees no key, or in dO of such a row, changes nothing for anyone, outputs and
gradients. A row that sees one: its weights are undefined when a visible score (after the score mods) is NaN or
+inf (softmax family; −inf is weight 0), a visible elementwise weight is non-finite, or the head's sink logit is
not finite: the whole row is NaN (output and lse; every row of a head with a non-finite sink logit). Otherwise
output entry (i, d) is NaN iff a visible key has a non-finite v_jd, and every other entry equals the computation
without the non-finite values. Outputs are NaN, never ±inf, where a non-finite value reaches them.

The expected values come from the definition in this file: per query row, floating-point sums over its visible
keys only (``expected``), and the gradients of the rows no non-finite value reaches from conftest's float64
reference on the inputs with the non-finite values replaced by zeros. The fused kernels run under Triton's
interpreter in float64 with outputs poisoned (NaN) before the kernels write them.
"""
from __future__ import annotations

import math
import os

_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # the kernels are decorated as interpreted functions when imported

import pytest  # noqa: E402
import torch  # noqa: E402

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit import normalizers as N  # noqa: E402
from attnkit import scores as S  # noqa: E402
from attnkit.ops.softmax import streaming_blocks  # noqa: E402

from conftest import Pos, one_thread, ref_attention  # noqa: E402

try:
    import triton  # noqa: F401
    from attnkit.ops.softmax import fused as KA
except ImportError:  # pragma: no cover - CI installs triton
    KA = None

if _env is None:  # after every triton.jit: the rest of the session keeps its environment
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _env

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
REFERENCE_FORMS = ["materialized", "streaming", "streaming-tiles", "recurrent"]
FORMS = REFERENCE_FORMS + (["triton"] if KA is not None else [])
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]  # NaN in the interpreter
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if KA is not None:
        monkeypatch.setattr(KA, "POISON", True)


# ------------------------------------------------------------------------------------------------
# A case: inputs with planted values, the mask twice (attnkit's and the definition), pieces and their reference
# ------------------------------------------------------------------------------------------------

class Case:
    """One call: q, k, v (float64 leaves, values planted), ``vis [B, Hq, Lq, Lk]`` from the mask's definition,
    the attnkit pieces and what the reference computes (``kind`` of conftest.ref_normalize, ``mod(s, Pos)``,
    ``sink`` / ``bias`` / ``gamma``), the learnable ``params`` and the cotangents ``dout`` / ``dlse``."""

    def __init__(self, B, Hq, Hkv, Lq, Lk, D, Dv, mask, fn, *, normalizer="softmax", kind="softmax", score_mod=None,
                 mod=None, params=(), sink=None, bias=None, gamma=0.0):
        self.q = torch.randn(B, Hq, Lq, D, dtype=F64)
        self.k = torch.randn(B, Hkv, Lk, D, dtype=F64)
        self.v = torch.randn(B, Hkv, Lk, Dv, dtype=F64)
        self.mask, self.normalizer, self.score_mod = mask, normalizer, score_mod
        self.kind, self.mod, self.params, self.sink, self.bias, self.gamma = kind, mod, list(params), sink, bias, gamma
        qp = torch.arange(Lq) + (Lk - Lq)
        self.vis = torch.tensor([[[[bool(fn(b, h, int(qp[i]), j)) for j in range(Lk)] for i in range(Lq)]
                                  for h in range(Hq)] for b in range(B)], dtype=torch.bool)
        self.dout = torch.randn(B, Hq, Lq, Dv, dtype=F64)
        self.dlse = torch.randn(B, Hq, Lq, dtype=F64)
        self.G = Hq // Hkv

    def plant(self, name, idx, value):
        getattr(self, name)[idx] = value
        return self

    @property
    def softmax(self) -> bool:
        return self.kind in ("softmax", "sink", "relaxed")

    def lookahead(self) -> bool:
        Lq, Lk = self.vis.shape[-2:]
        qp = (torch.arange(Lq) + (Lk - Lq)).view(-1, 1)
        return bool((self.vis & (torch.arange(Lk).view(1, -1) > qp)).any())


def expected(c: Case):
    """``(out, lse)`` from the definition, row by row: the scores of the row's visible keys (IEEE products, then the
    mods), its weights (undefined: NaN row), and the floating-point sum of weight · value over its visible keys
    only, non-finite results written as NaN."""
    B, Hq, Lq, Lk = c.vis.shape
    G, Dv = c.G, c.v.shape[-1]
    scale = 1.0 / math.sqrt(c.q.shape[-1])
    s_all = scale * torch.einsum("bhid,bhjd->bhij", c.q, c.k.repeat_interleave(G, 1))  # each pair on its own
    if c.mod is not None:
        with torch.no_grad():
            s_all = c.mod(s_all, Pos(B, Hq, Lq, Lk, c.vis))
    vv = c.v.repeat_interleave(G, 1)
    out = torch.zeros(B, Hq, Lq, Dv, dtype=F64)
    lse = torch.full((B, Hq, Lq), -INF, dtype=F64)
    for b in range(B):
        for h in range(Hq):
            sig = None if c.sink is None else c.sink.detach().reshape(-1)[h if c.sink.dim() else 0].item()
            for i in range(Lq):
                js = c.vis[b, h, i].nonzero().flatten()
                s = s_all[b, h, i, js]
                n = len(js)
                if c.softmax:
                    if bool((torch.isnan(s) | (s == INF)).any()) or (sig is not None and not math.isfinite(sig)):
                        out[b, h, i], lse[b, h, i] = NAN, NAN
                        continue
                    mx = max([float(x) for x in s] + ([] if sig is None else [sig]), default=-INF)
                    if mx == -INF:  # no visible key (or only -inf scores) and no sink
                        p = torch.zeros(n, dtype=F64)
                    else:
                        e = torch.exp(s - mx)
                        den = e.sum() + (0.0 if sig is None else math.exp(sig - mx))
                        p = e / den
                        lse[b, h, i] = mx + math.log(den)
                    if c.kind == "relaxed":
                        p = (1 - c.gamma) * p + c.gamma / max(n, 1)
                else:
                    if c.kind == "sigmoid":
                        bias = (-math.log(Lk) if c.bias is None
                                else c.bias.detach().reshape(-1)[h if c.bias.dim() else 0].item())
                        p = torch.sigmoid(s + bias)
                    elif c.kind == "relu":
                        p = torch.relu(s) / max(n, 1)
                    else:
                        raise KeyError(c.kind)
                    if not bool(torch.isfinite(p).all()):
                        out[b, h, i] = NAN
                        continue
                row = (p[:, None] * vv[b, h, js]).sum(0)
                out[b, h, i] = torch.where(torch.isfinite(row), row, NAN)
    return out, (lse if c.softmax else None)


def clean_reference(c: Case, q, k, v):
    """conftest's float64 reference (autograd) of the case."""
    kw = {}
    if c.kind == "sink":
        kw["sink"] = c.sink
    if c.kind == "relaxed":
        kw["gamma"] = c.gamma
    if c.kind == "sigmoid" and c.bias is not None:
        kw["bias"] = c.bias
    out, lse, _ = ref_attention(q, k, v, c.vis, mod=c.mod, kind=c.kind, **kw)
    return out, lse


def run(form: str, c: Case, q, k, v):
    """``(out, lse or None)`` of attnkit in ``form``."""
    kw = dict(mask=c.mask, score_mod=c.score_mod, normalizer=c.normalizer, return_lse=c.softmax)
    if form == "triton":
        res = attnkit.attention(q, k, v, backend="triton", **kw)
        assert attnkit.last_backend() == "triton/fused"
    elif form == "streaming-tiles":
        with streaming_blocks(3, 5):
            res = attnkit.attention(q, k, v, form="streaming", backend="reference", **kw)
    else:
        res = attnkit.attention(q, k, v, form=form, backend="reference", **kw)
    return res if c.softmax else (res, None)


def _same_nan(what, got, want):
    """NaN exactly where ``want`` is NaN, −inf exactly where it is −inf (an lse's rows without keys), never +inf."""
    assert not torch.isposinf(got).any(), f"{what}: +inf at {torch.isposinf(got).nonzero()[:4].tolist()}"
    for name, fn in (("NaN", torch.isnan), ("-inf", torch.isneginf)):
        diff = fn(got) != fn(want)
        at = diff.nonzero()[:4]
        assert not diff.any(), (f"{what}: {name} in one and not the other at {at.tolist()}: got "
                                f"{[got[tuple(i)].item() for i in at]}, want {[want[tuple(i)].item() for i in at]}")


def _close(what, got, want, atol=1e-9, rtol=1e-7):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check(c: Case, forms=FORMS):
    """Every form against the definition (outputs, lse: NaN exactly where expected, the rest close) and against the
    clean reference's gradients wherever no non-finite value reaches (dq of clean rows, dk / dv of keys only clean
    rows see, parameters when every row is clean); the gradients' non-finite entries are the same in every form.
    Returns ``{form: (out, lse, grads)}``."""
    want_out, want_lse = expected(c)
    B, Hq, Lq, Lk = c.vis.shape
    G = c.G
    # which rows a non-finite value reaches, and the keys only other rows see
    bad_k = (~torch.isfinite(c.k).all(-1)).repeat_interleave(G, 1)[:, :, None, :]
    bad_v = (~torch.isfinite(c.v).all(-1)).repeat_interleave(G, 1)[:, :, None, :]
    sees = c.vis.any(-1)
    dirty = (c.vis & (bad_k | bad_v)).any(-1) | (sees & ~torch.isfinite(c.q).all(-1))
    dirty |= sees & ~torch.isfinite(c.dout).all(-1)
    if c.sink is not None:  # a non-finite sink logit: every row of its head
        dirty |= ~torch.isfinite(c.sink.detach()).reshape(1, -1, 1).expand(B, Hq, Lq)
    clean_rows = ~dirty
    clean_keys = ~(c.vis & dirty[..., None]).reshape(B, c.k.shape[1], G * Lq, Lk).any(2)
    # the clean problem: non-finite values replaced by 0, cotangents of rows without keys included
    zq, zk, zv = (torch.where(torch.isfinite(x), x, 0.0).requires_grad_() for x in (c.q, c.k, c.v))
    ro, rl = clean_reference(c, zq, zk, zv)
    dout0 = torch.where(torch.isfinite(c.dout), c.dout, 0.0)
    loss = (ro * dout0).sum()
    if rl is not None:
        loss = loss + (torch.where(torch.isneginf(rl), 0.0, rl) * c.dlse).sum()
    want_g = [torch.zeros_like(x) if g is None else g
              for g, x in zip(torch.autograd.grad(loss, [zq, zk, zv] + c.params, allow_unused=True),
                              [zq, zk, zv] + c.params)]
    results = {}
    for form in forms:
        if form == "recurrent" and c.lookahead():
            continue
        q, k, v = (x.clone().requires_grad_() for x in (c.q, c.k, c.v))
        out, lse = run(form, c, q, k, v)
        what = f"[{form}]"
        _same_nan(f"{what} out", out, want_out)
        fin = ~torch.isnan(want_out)
        _close(f"{what} out", out[fin], want_out[fin])
        if c.softmax:
            _same_nan(f"{what} lse", lse, want_lse)
            fin = torch.isfinite(want_lse)
            _close(f"{what} lse", lse[fin], want_lse[fin])
        gl = torch.where(torch.isneginf(want_lse), 0.0, c.dlse) if c.softmax else None
        outs, gos = [out], [c.dout]
        if c.softmax:
            outs.append(lse)
            gos.append(gl)
        got = torch.autograd.grad(outs, [q, k, v] + c.params, gos, allow_unused=True)
        got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, [q, k, v] + c.params)]
        for name, g, w, sel in zip(["dq", "dk", "dv"], got, want_g, [clean_rows, clean_keys, clean_keys]):
            assert torch.isfinite(g[sel]).all(), f"{what} {name}: non-finite where no non-finite value reaches"
            _close(f"{what} {name}", g[sel], w[sel])
        if bool(clean_rows.all()):
            for i, (g, w) in enumerate(zip(got[3:], want_g[3:])):
                _close(f"{what} dparam{i}", g, w.to(g.dtype), atol=1e-8, rtol=1e-6)
        results[form] = (out, lse, got)
    first = next(iter(results), None)
    names = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(c.params))]
    for form, (_, _, got) in results.items():  # the same non-finite gradient entries everywhere
        for name, a, b in zip(names, got, results[first][2]):
            diff = torch.isfinite(a) != torch.isfinite(b)
            assert not diff.any(), (f"[{form}] vs [{first}] {name}: non-finite in one and not the other at "
                                    f"{diff.nonzero()[:4].tolist()}")
    return results


def _causal(L: int, **kw) -> Case:
    return Case(1, 2, 1, L, L, 16, 16, M.causal, lambda b, h, q, kv: kv <= q, **kw)


# ------------------------------------------------------------------------------------------------
# Defect 4: non-finite values at keys a row cannot see (and in q / dO of rows that see no key)
# ------------------------------------------------------------------------------------------------

def test_issue_example_nan_in_the_last_value():
    """Causal, NaN only in v of the last key: only the last row sees it (materialized used to poison every row,
    streaming a row block, a Triton tile 8 rows)."""
    L = 64
    c = _causal(L).plant("v", (0, 0, L - 1), NAN)
    res = check(c)
    for form, (out, _, _) in res.items():
        assert torch.isnan(out).any(-1).sum().item() == 2, form  # the last row of each of the two query heads


@pytest.mark.parametrize("plant", ["v-entry+inf", "v-entry-inf", "k-nan", "k-entry+inf", "k-entry-inf", "k-entry-nan",
                                   "v-first-entry-nan", "k-first-nan"])
def test_causal_planted(plant):
    """One planted value, every form: the rows before the planted key (or, for key 0, no row: every row sees it,
    through the kernels' FULL blocks) are exact; rows that see it are NaN exactly where the rule says (a visible
    +inf / NaN score makes the row NaN; −inf is weight 0; a non-finite v_jd makes column d NaN)."""
    L = 40
    name, where, value = {"v-entry+inf": ("v", (0, 0, L - 3, 5), INF), "v-entry-inf": ("v", (0, 0, L - 3, 5), -INF),
                          "k-nan": ("k", (0, 0, L - 2), NAN), "k-entry+inf": ("k", (0, 0, L - 5, 2), INF),
                          "k-entry-inf": ("k", (0, 0, L - 5, 2), -INF), "k-entry-nan": ("k", (0, 0, L - 5, 2), NAN),
                          "v-first-entry-nan": ("v", (0, 0, 0, 3), NAN), "k-first-nan": ("k", (0, 0, 0), NAN)}[plant]
    check(_causal(L).plant(name, where, value))


def _padded(norm: str):
    """Two packed documents and a padded tail (its own document) whose q, k, v and dO are NaN."""
    L, P = 37, 9
    ids = [0] * 12 + [1] * (L - P - 12) + [2] * P
    kw = {"softmax": dict(),
          "relaxed": dict(normalizer=N.relaxed(0.3), kind="relaxed", gamma=0.3),
          "relu": dict(normalizer="relu", kind="relu"),
          "sigmoid": dict(normalizer="sigmoid", kind="sigmoid")}.get(norm)
    if norm == "sink":
        sink = torch.randn(2, dtype=F64).requires_grad_()
        kw = dict(normalizer=N.softmax_sink(sink), kind="sink", sink=sink, params=[sink])
    c = Case(2, 2, 1, L, L, 16, 8, M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[q] == ids[kv], **kw)
    for name in ("q", "k", "v", "dout"):
        getattr(c, name)[..., L - P:, :] = NAN
    return c


@pytest.mark.parametrize("norm", ["softmax", "relaxed", "relu", "sink"])
def test_document_mask_with_a_nan_padded_tail(norm):
    """NaN in q, k, v and dO of the padded tail: every real token equals the clean computation (materialized used
    to poison every real token); the padded rows are NaN."""
    res = check(_padded(norm))
    for out, _, _ in res.values():
        assert not torch.isnan(out[..., :28, :]).any() and torch.isnan(out[..., 28:, :]).all()


@pytest.mark.parametrize("pieces", ["mods", "sink"])
def test_fully_masked_rows_with_nan_q_and_do(pieces):
    """Rows that see no key (~sinks(1) removes key 0; Lq > Lk leaves leading rows empty) with NaN q and NaN dO, and
    key 0 (+inf k, NaN v) seen by nobody: nothing changes anywhere, the gradients of learnable ALiBi slopes and
    temperature, or of sink logits (to which rows without keys do contribute, through their lse), included."""
    Lq, Lk = 41, 30
    if pieces == "mods":
        t = torch.rand(2, dtype=F64).add(0.5).requires_grad_()
        slopes = torch.rand(2, dtype=F64).requires_grad_()

        def mod(s, P):
            return (s - slopes.view(1, -1, 1, 1) * (P.q - P.kv).abs()) / t.view(1, -1, 1, 1)

        kw = dict(score_mod=[S.alibi(slopes), S.temperature(t)], mod=mod, params=[slopes, t])
    else:
        sink = torch.randn(2, dtype=F64).requires_grad_()
        kw = dict(normalizer=N.softmax_sink(sink), kind="sink", sink=sink, params=[sink])
    c = Case(1, 2, 2, Lq, Lk, 16, 16, M.causal & ~M.sinks(1), lambda b, h, q, kv: 1 <= kv <= q, **kw)
    empty = ~c.vis.any(-1)
    c.q[empty], c.dout[empty] = NAN, NAN
    c.plant("k", (0, slice(None), 0), INF).plant("v", (0, slice(None), 0), NAN)
    check(c)


def test_gqa_cross_attention_keys_seen_by_nobody():
    """Lq < Lk (queries at the end) under a sliding window: the first keys are seen by no row; non-finite values
    there change nothing, the learnable relative-bias table's gradient included; GQA (4 query heads, 2 KV heads),
    Dv != D."""
    B, Hq, Hkv, Lq, Lk = 1, 4, 2, 19, 45
    table = torch.randn(8, Hq, dtype=F64).requires_grad_()
    rb = S.relative_bias(Hq, num_buckets=8, max_distance=12, table=table)
    from conftest import t5_bucket_ref

    def mod(s, P):
        rel = (P.kv - P.q).expand(1, 1, Lq, Lk)
        bucket = torch.tensor([t5_bucket_ref(int(r), True, 8, 12) for r in rel.flatten()]).view(rel.shape)
        return s + table[bucket, P.h]

    c = Case(B, Hq, Hkv, Lq, Lk, 24, 8, M.sliding_window(6), lambda b, h, q, kv: q - 6 <= kv <= q,
             score_mod=rb, mod=mod, params=[table])
    c.plant("k", (0, 0, 3), NAN).plant("v", (0, 1, 5), -INF).plant("k", (0, 1, 10, 4), INF)
    check(c)


@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "relu"])
def test_visible_nonfinite_score(norm):
    """Visible non-finite scores: NaN / +inf (softmax family) or a non-finite weight (elementwise) make the whole
    row NaN (lse too); a −inf score is weight 0 (as a mask): those rows stay exact."""
    L = 33
    kw = {"softmax": {}, "sigmoid": dict(normalizer="sigmoid", kind="sigmoid"),
          "relu": dict(normalizer="relu", kind="relu")}[norm]
    c = Case(1, 1, 1, L, L, 16, 16, M.sliding_window(9, 2), lambda b, h, q, kv: q - 9 <= kv <= q + 2, **kw)
    c.q[0, 0, 3:15, 0] = c.q[0, 0, 3:15, 0].abs() + 0.1  # rows 3..14 see key 5: their score with it is −inf
    c.plant("k", (0, 0, 5, 0), -INF).plant("q", (0, 0, 20), INF).plant("q", (0, 0, 27, 1), NAN)
    res = check(c)
    for out, _, _ in res.values():
        assert not torch.isnan(out[0, 0, :20]).any() and torch.isnan(out[0, 0, [20, 27]]).all()


# ------------------------------------------------------------------------------------------------
# Defect 5: a non-finite sink logit makes every row of its head NaN, in every form
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_sink_logit(value):
    """softmax_sink with a NaN / ±inf logit on head 1: every row of head 1 is NaN (output and lse; rows without a
    visible key included: Lq > Lk under causal), head 0 is exact, the same in every form (materialized and
    recurrent used to return a finite, unnormalized output)."""
    Lq, Lk = 35, 27
    sink = torch.tensor([0.4, value], dtype=F64).requires_grad_()
    c = Case(1, 2, 1, Lq, Lk, 16, 16, M.causal, lambda b, h, q, kv: kv <= q, normalizer=N.softmax_sink(sink),
             kind="sink", sink=sink, params=[sink])
    res = check(c)
    for form, (out, lse, _) in res.items():
        assert torch.isnan(out[:, 1]).all() and torch.isnan(lse[:, 1]).all(), form
        assert not torch.isnan(out[:, 0]).any(), form


# ------------------------------------------------------------------------------------------------
# The fused differential kernels (both maps share each V tile)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(KA is None, reason="triton is not installed")
def test_differential_fused_hidden_nonfinite():
    """Differential attention through the fused kernels and the materialized reference: NaN in v and +inf in k at
    the last key (causal window of 10) reach only the last row; every other row's output, dq, and dk / dv of the
    keys the last row does not see agree; the non-finite gradient entries are the same."""
    from attnkit import differential_attention
    L = 40
    q = torch.randn(1, 2, L, 32, dtype=F64)
    k = torch.randn(1, 1, L, 32, dtype=F64)
    v = torch.randn(1, 1, L, 16, dtype=F64)
    k[0, 0, L - 1, 3], v[0, 0, L - 1] = INF, NAN
    go = torch.randn(1, 2, L, 16, dtype=F64)
    res = {}
    for backend in ("triton", "reference"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        lam = torch.tensor([0.3, 0.6], dtype=F64, requires_grad=True)
        kw = dict(backend=backend) if backend == "triton" else dict(backend=backend, form="materialized")
        out = differential_attention(*x, lam, mask=M.causal & M.sliding_window(10), **kw)
        if backend == "triton":
            assert attnkit.last_backend() == "triton/fused-differential"
        res[backend] = (out, torch.autograd.grad((out * go[:, :, :, :]).sum(), x, allow_unused=True))
    (o1, g1), (o2, g2) = res["triton"], res["reference"]
    assert torch.isnan(o1[:, :, -1]).all() and torch.isnan(o2[:, :, -1]).all()
    _close("out", o1[:, :, :-1], o2[:, :, :-1])
    _close("dq", g1[0][:, :, :-1], g2[0][:, :, :-1])
    _close("dk", g1[1][:, :, :L - 11], g2[1][:, :, :L - 11])
    _close("dv", g1[2][:, :, :L - 11], g2[2][:, :, :L - 11])
    for name, a, b in zip(["dq", "dk", "dv"], g1, g2):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name


# ------------------------------------------------------------------------------------------------
# Defect 2 (streaming half): double backward refuses clearly; the materialized / recurrent forms support it
# ------------------------------------------------------------------------------------------------

def _penalty_inputs():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=F64, requires_grad=True) for _ in range(3))
    return q, k, v


def test_streaming_double_backward_raises():
    """A gradient penalty through form="streaming" (create_graph=True): a clear error naming double backward and
    the forms that support it, for the streaming term alone and added to another loss term (it used to be
    silently dropped there); first-order gradients are unaffected."""
    q, k, v = _penalty_inputs()
    for other in (False, True):
        out = attnkit.attention(q, k, v, mask=M.causal, form="streaming", backend="reference")
        loss = out.pow(2).sum()
        if other:
            loss = loss + attnkit.attention(q, k, v, form="materialized", backend="reference").pow(2).sum()
        with pytest.raises(NotImplementedError, match=r"double backward.*form='materialized'.*'recurrent'"):
            torch.autograd.grad(loss, q, create_graph=True)
    out = attnkit.attention(q, k, v, mask=M.causal, form="streaming", backend="reference")
    got = torch.autograd.grad(out.pow(2).sum(), [q, k, v])
    ref = attnkit.attention(q, k, v, mask=M.causal, form="materialized", backend="reference")
    for a, b in zip(got, torch.autograd.grad(ref.pow(2).sum(), [q, k, v])):
        _close("first-order gradient", a, b)


@pytest.mark.parametrize("form", ["materialized", "recurrent"])
def test_double_backward_supported_and_unaffected_by_hidden_nan(form):
    """gradgradcheck at float64 (finite inputs), and a gradient penalty whose value and second-order gradients
    equal those of the clean inputs when NaN sits where no row looks (q rows without keys, k / v of key 0 under
    causal & ~sinks(1))."""
    mask = M.causal & ~M.sinks(1)
    q, k, v = _penalty_inputs()

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=mask, form=form, backend="reference")

    assert torch.autograd.gradgradcheck(f, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    res = []
    for poison in (False, True):
        x = [t.detach().clone() for t in (q, k, v)]
        if poison:
            x[0][0, :, 0], x[1][0, :, 0], x[2][0, :, 0] = NAN, INF, NAN  # row 0 sees nothing; key 0 nobody
        x = [t.requires_grad_() for t in x]
        out = f(*x)
        gq, gk = torch.autograd.grad((out * torch.sin(out)).sum(), x[:2], create_graph=True)
        pen = gq[:, :, 1:].pow(2).sum() + gk[:, :, 1:].pow(2).sum()
        res.append((pen, torch.autograd.grad(pen, x)))
    (p0, g0), (p1, g1) = res
    _close("penalty", p1, p0)
    for name, a, b in zip(["dq", "dk", "dv"], g1, g0):
        _close(f"second-order {name}", a[:, :, 1:], b[:, :, 1:])


# ------------------------------------------------------------------------------------------------
# The products over visible pairs, and the finite path
# ------------------------------------------------------------------------------------------------

def test_visible_products_gradcheck_and_hidden_values():
    """sum_visible / at_visible: gradcheck and gradgradcheck at float64; with non-finite values at hidden pairs
    the values and the first- and second-order gradients equal those with zeros there."""
    from attnkit.ops.softmax.call import at_visible, sum_visible
    M_, K_, N_ = 6, 7, 5
    vis = torch.rand(2, M_, K_) < 0.6
    vis[:, 0] = False  # a row that sees nothing
    a = torch.randn(2, M_, K_, dtype=F64, requires_grad=True)
    b = torch.randn(2, K_, N_, dtype=F64, requires_grad=True)
    visn = torch.rand(2, M_, N_) < 0.6
    for fn, args in ((sum_visible, (a, b, vis)), (at_visible, (a, b, visn))):
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
        assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)
    # b row 2 non-finite where no row of a sees key 2; a non-finite at hidden pairs
    hidden_k = 2
    vis[:, :, hidden_k] = False
    res = []
    for poison in (False, True):
        x = a.detach().clone()
        y = b.detach().clone()
        if poison:
            x[~vis] = NAN
            y[:, hidden_k] = INF
        x.requires_grad_()
        y.requires_grad_()
        c = sum_visible(x, y, vis)
        ga, gb = torch.autograd.grad((c * torch.cos(c)).sum(), [x, y], create_graph=True)
        pen = (ga.pow(2).sum() + gb[:, [0, 1, 3, 4, 5, 6]].pow(2).sum())
        res.append((c, torch.where(vis, ga, 0.0), torch.autograd.grad(pen, [x, y])))
    (c0, ga0, h0), (c1, ga1, h1) = res
    assert torch.equal(c0, c1) and torch.equal(ga0, ga1)
    assert torch.equal(torch.where(vis, h0[0], 0.0), torch.where(vis, h1[0], 0.0))
    assert torch.equal(h0[1][:, [0, 1, 3, 4, 5, 6]], h1[1][:, [0, 1, 3, 4, 5, 6]])
    # a non-finite b entry at a visible pair: exactly the sums that read it are NaN
    y = b.detach().clone()
    y[1, 4, 3] = -INF
    c = sum_visible(a.detach(), y, vis)
    want = torch.zeros_like(c, dtype=torch.bool)
    want[1, :, 3] = vis[1, :, 4]
    assert torch.equal(torch.isnan(c), want) and not torch.isinf(c).any()


def _old_materialized(q, k, v, vis, scale):
    """The materialized form before the non-finite rule (softmax, no mods): masked_fill, max shift, plain products."""
    G = q.shape[1] // k.shape[1]
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    s = (q.reshape(B, k.shape[1], G * Lq, D) @ k.transpose(-1, -2) * scale).view(B, Hq, Lq, Lk)
    sm = s.masked_fill(~vis, -math.inf)
    mx = sm.amax(-1, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(sm - mx)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (torch.log(denom) + mx).squeeze(-1)
    out = (p.reshape(B, k.shape[1], G * Lq, Lk) @ v).view(B, Hq, Lq, -1)
    return out, lse


def test_finite_inputs_bit_identical_to_before():
    """Finite inputs: the materialized form's output, lse and gradients are bit for bit those of the formula it
    used before (the exact path for non-finite values costs nothing there)."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 23, 31, 16
    q, k, v = (torch.randn(*s, dtype=F64, requires_grad=True)
               for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, 12)))
    mask = M.causal & ~M.sinks(2)  # rows without a visible key too
    vis = mask.dense(M.Geometry(B, Hq, Lq, Lk), "cpu")
    go, gl = torch.randn(B, Hq, Lq, 12, dtype=F64), torch.randn(B, Hq, Lq, dtype=F64)
    res = []
    for fn in (lambda: _old_materialized(q, k, v, vis, D ** -0.5),
               lambda: attnkit.attention(q, k, v, mask=mask, form="materialized", backend="reference",
                                         return_lse=True)):
        out, lse = fn()
        loss = (out * go).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * gl).sum()
        res.append((out, lse, *torch.autograd.grad(loss, [q, k, v])))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *res):
        assert torch.equal(a, b), f"{name} differs from the formula before: {(a - b).abs().max()}"
