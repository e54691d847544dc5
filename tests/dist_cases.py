"""Cases for tests/test_distributed.py, run inside spawned gloo process groups (one group serves many cases).

Every case builds the global float64 inputs from a seed shared by all ranks, runs the single-process call on
them (the expected value), runs the context-parallel call on this rank's shard and compares the shard of the
output and of every gradient (parameter gradients summed over the ranks).
"""
from __future__ import annotations

import os
import random
import tempfile
import time
import traceback
import types
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
import attnkit.distributed as cp
from attnkit.distributed._compat import linear_name
from attnkit import masks as M
from attnkit import AarenState, LogLinearState
from attnkit import normalizers as N
from attnkit import scores as S

F64 = torch.float64
T_IMPORT = time.time()
TOL = 1e-10


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------

def launch(world_size: int, job: str, seed: int, timeout_s: int = 30) -> Dict[str, Optional[str]]:
    """Run every case of ``job`` on ``world_size`` gloo processes; ``{case: None (passed) or the failure}``."""
    with tempfile.TemporaryDirectory() as tmp:
        # forkserver: one clean server process imports torch and attnkit once; every job's ranks fork from it
        mp.set_forkserver_preload(["torch", "attnkit", "attnkit.distributed", "dist_cases"])
        mp.start_processes(_worker, args=(world_size, tmp, job, seed, timeout_s), nprocs=world_size, join=True,
                           start_method="forkserver")
        res: Dict[str, Optional[str]] = {}
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.txt")) as f:
                for block in f.read().split("\x00"):
                    if not block:
                        continue
                    name, _, msg = block.partition("\x01")
                    if msg and res.get(name) is None:
                        res[name] = f"rank {r}: {msg}"
                    res.setdefault(name, None)
        return res


def _worker(rank: int, world_size: int, tmp: str, job: str, seed: int, timeout_s: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    out = []
    try:
        for name, fn in JOBS[job]:
            ctx = Ctx(rank, world_size, seed + zlib_hash(name))
            msg = ""
            if os.environ.get("ATTNKIT_DIST_VERBOSE"):
                print(f"rank {rank}: {name} at {time.time() - T_IMPORT:.1f} s", flush=True)
            try:
                fn(ctx)
                if ctx.errors:  # mismatches are collected, not raised, so every rank reaches every collective
                    raise AssertionError("; ".join(ctx.errors))
            except Exception:
                msg = traceback.format_exc(limit=6)
                if os.environ.get("ATTNKIT_DIST_VERBOSE"):
                    print(f"rank {rank}: {name} failed:\n{msg}", flush=True)
            out.append(f"{name}\x01{msg}")
            ok = torch.tensor([0 if not msg else 1])
            dist.all_reduce(ok)  # keep the ranks in step after a case that failed on some of them
    finally:
        with open(os.path.join(tmp, f"rank{rank}.txt"), "w") as f:
            f.write("\x00".join(out))
        dist.destroy_process_group()


def zlib_hash(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode()) % 100003


class Ctx:
    def __init__(self, rank: int, world_size: int, seed: int):
        self.rank, self.n = rank, world_size
        self.errors: List[str] = []
        self.gen = torch.Generator().manual_seed(seed)
        random.seed(seed)

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=F64) * scale

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=F64)

    def shard(self, x: torch.Tensor, lb, dim: int = 2) -> torch.Tensor:
        return cp.shard(x, self.rank, self.n, dim=dim, load_balance=lb).detach().requires_grad_(x.requires_grad)

    def local(self, x: torch.Tensor, lb, dim: int = 2) -> torch.Tensor:
        """This rank's rows of a global expected value (padding rows dropped)."""
        T = x.shape[dim]
        lay = cp.ShardLayout.for_sequence(T, self.n, lb)
        pos = lay.positions(self.rank)
        keep = pos < T
        return x.index_select(dim, pos[keep]), keep


def close(c: "Ctx", name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    """Record (in ``c.errors``) a mismatch beyond ``tol`` relative to max(1, max |want|)."""
    if got is None or want is None:
        c.errors.append(f"{name}: got {'None' if got is None else 'a tensor'}, want "
                        f"{'None' if want is None else 'a tensor'}")
    elif got.shape != want.shape:
        c.errors.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    else:
        err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
        if not err <= tol * scale:
            c.errors.append(f"{name}: max abs error {err:.3e} > {tol:.0e} x {scale:.3g}")


def sum_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (every rank must call it: pass zeros where a rank has no contribution)."""
    t = t.clone()
    dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------
# Softmax family
# ------------------------------------------------------------------------------------------------

def _make(x, c: "Ctx"):
    """Case arguments that need random values are factories ``f(ctx)`` (fresh values, equal on every rank)."""
    return x(c) if isinstance(x, types.FunctionType) else x


def softmax_case(T: int, *, mask=None, score_mod=None, normalizer="softmax", lb="zigzag", strategy="ring",
                 Hq: int = 2, Hkv: int = 1, D: int = 8, B: int = 2, layout: str = "bhtd",
                 return_lse: bool = False, recompute: bool = True) -> Callable[[Ctx], None]:
    """Compare context_parallel_attention with attnkit.attention on the whole sequence (``T`` true tokens; the
    shards are padded when ``T`` does not divide). ``mask="doc"``: random documents (the padding one more)."""

    def run(c: Ctx):
        lay = cp.ShardLayout.for_sequence(T, c.n, lb)
        if mask == "doc":
            cu = torch.tensor([0] + sorted(random.sample(range(1, T), 3)) + [T])
            m_ref, m_pad = M.document(cu_seqlens=cu), M.document(cu_seqlens=cp.pad_cu_seqlens(cu, lay.total))
        else:
            m_ref = m_pad = mask
        sm, nm = _make(score_mod, c), _make(normalizer, c)
        q = c.randn(B, Hq, T, D).requires_grad_()
        k = c.randn(B, Hkv, T, D).requires_grad_()
        v = c.randn(B, Hkv, T, D).requires_grad_()
        ps = [p for mod in (sm, nm) if isinstance(mod, torch.nn.Module) for p in mod.parameters() if p.requires_grad]
        ref = attnkit.attention(q, k, v, mask=m_ref, score_mod=sm, normalizer=nm, backend="reference",
                                return_lse=return_lse)
        ref_o, ref_l = ref if return_lse else (ref, None)
        do = c.randn(*ref_o.shape)
        dl = c.randn(*ref_l.shape) if return_lse else None
        grads_ref = torch.autograd.grad([ref_o] + ([ref_l] if return_lse else []), [q, k, v] + ps,
                                        [do] + ([dl] if return_lse else []))
        tr = (lambda x: x.transpose(1, 2)) if layout == "bthd" else (lambda x: x)
        dim = 1 if layout == "bthd" else 2
        ql, kl, vl = (c.shard(tr(x.detach()).requires_grad_(), lb, dim) for x in (q, k, v))
        res = cp.context_parallel_attention(ql, kl, vl, mask=m_pad, score_mod=sm, normalizer=nm, backend="reference",
                                            strategy=strategy, layout=layout, load_balance=lb,
                                            seq_len=T if lay.total != T else None, return_lse=return_lse,
                                            recompute=recompute)
        o, l = res if return_lse else (res, None)
        want, keep = c.local(tr(ref_o.detach()), lb, dim)
        real, pad = keep.nonzero().flatten(), (~keep).nonzero().flatten()
        close(c, "out", o.index_select(dim, real), want)
        if return_lse:
            close(c, "lse", l.index_select(2, real), c.local(ref_l.detach(), lb, 2)[0])
        outs, gouts = [o], [c.shard(tr(do), lb, dim)]
        if return_lse:
            outs.append(l)
            gouts.append(c.shard(dl, lb, 2))
        g = torch.autograd.grad(outs, [ql, kl, vl] + ps, gouts, allow_unused=True)
        for name, got, want_full in zip(("dq", "dk", "dv"), g[:3], grads_ref[:3]):
            close(c, name, got.index_select(dim, real), c.local(tr(want_full), lb, dim)[0])
            if not bool((got.index_select(dim, pad) == 0).all()):
                c.errors.append(f"{name}: padded rows got a nonzero gradient")
        for i, (got, want) in enumerate(zip(g[3:], grads_ref[3:])):
            close(c, f"param{i}", sum_ranks(torch.zeros_like(want) if got is None else got), want)
    return run


def softmax_cases(n: int) -> list:
    sink = lambda c: N.softmax_sink(torch.nn.Parameter(c.randn(2)))  # noqa: E731
    slopes = lambda c: S.alibi(torch.nn.Parameter(c.rand(2)))  # noqa: E731
    t5 = lambda c: S.relative_bias(2, 8, 16, table=torch.nn.Parameter(c.randn(8, 2, scale=0.5)))  # noqa: E731
    T = 8 * n
    cases = []
    for lb in ("zigzag", None):
        tag = "zz" if lb else "contig"
        cases += [
            (f"causal/{tag}", softmax_case(T, mask="causal", lb=lb)),
            (f"full/{tag}", softmax_case(T, mask=None, lb=lb)),
            (f"window/{tag}", softmax_case(T, mask=M.sliding_window(3), lb=lb)),
            (f"document/{tag}", softmax_case(T, mask="doc", lb=lb)),
            (f"prefix_lm/{tag}", softmax_case(T, mask=M.prefix_lm(5), lb=lb)),
            (f"alibi/{tag}", softmax_case(T, mask="causal", score_mod=S.alibi(), lb=lb)),
            (f"sigmoid/{tag}", softmax_case(T, mask="causal", normalizer="sigmoid", lb=lb)),
            (f"odd_length_causal/{tag}", softmax_case(T - 3, mask="causal", lb=lb)),
        ]
    if n > 2:  # the variants below run on 2 processes only (same code paths; start-up and CPU time are shared)
        return cases + [("kept_graphs_sink_window_lse", softmax_case(T, mask=M.sliding_window(5), normalizer=sink,
                                                                     return_lse=True, recompute=False)),
                        ("allgather_relaxed_odd", softmax_case(T - 3, mask="causal", strategy="allgather",
                                                               normalizer=N.relaxed(0.2)))]
    cases += [
        ("odd_length_doc", softmax_case(T - 5, mask="doc")),
        ("odd_length_full_sigmoid", softmax_case(T - 1, mask=None, normalizer="sigmoid", lb=None)),
        ("relu_window_right", softmax_case(T, mask=M.sliding_window(5, 2), normalizer="relu")),
        ("relu2_odd", softmax_case(T - 1, mask="causal", normalizer="relu2", lb=None)),
        ("none_prefix", softmax_case(T, mask=M.prefix_lm(3), normalizer="none")),
        ("off_by_one", softmax_case(T, mask="causal", normalizer="softmax_off_by_one")),
        ("sink_learnable_window", softmax_case(T, mask=M.sliding_window(4), normalizer=sink)),
        ("alibi_learnable_full", softmax_case(T, mask=None, score_mod=slopes)),
        ("t5_bias_learnable", softmax_case(T, mask="causal", score_mod=t5)),
        ("dilated_or_sinks", softmax_case(T, mask=M.causal & (M.dilated(2) | M.sinks(2)))),
        ("gqa_bthd_lse", softmax_case(T, mask="causal", Hq=4, Hkv=2, layout="bthd", return_lse=True)),
        ("lse_sink_prefix", softmax_case(T, mask=M.prefix_lm(6), return_lse=True, normalizer=sink)),
        ("kept_graphs_causal_odd", softmax_case(T - 3, mask="causal", recompute=False)),
        ("kept_graphs_sink_window_lse", softmax_case(T, mask=M.sliding_window(5), normalizer=sink, return_lse=True,
                                                     lb=None, recompute=False)),
        ("kept_graphs_relu_alibi", softmax_case(T, mask=None, normalizer="relu", score_mod=slopes, recompute=False)),
        ("allgather_causal", softmax_case(T, mask="causal", strategy="allgather")),
        ("allgather_relaxed_odd", softmax_case(T - 3, mask="causal", strategy="allgather",
                                               normalizer=N.relaxed(0.2))),
        ("allgather_ssmax_doc", softmax_case(T, mask="doc", strategy="allgather", score_mod=S.ssmax())),
        ("allgather_sigmoid_window", softmax_case(T, mask=M.sliding_window(3), strategy="allgather",
                                                  normalizer="sigmoid", lb=None)),
    ]
    return cases


# ------------------------------------------------------------------------------------------------
# Linear family
# ------------------------------------------------------------------------------------------------

def linear_case(T: int, rule: str, *, lb=None, fm=None, normalize=False, causal=True, init=False, final=False,
                docs: Optional[int] = None, D: int = 4, Dv: int = 3, B: int = 2, H: int = 2,
                chunk_size: int = 4, form: str = "chunk", base: Optional[str] = None) -> Callable[[Ctx], None]:
    """Compare context_parallel_linear_attention with linear_attention on the whole sequence (``rule="log_linear"``
    with ``base``: level weights of 7 levels, states as LogLinearState)."""
    ll = rule == "log_linear"

    def run(c: Ctx):
        lay = cp.ShardLayout.for_sequence(T, c.n, lb)
        b = 1 if docs else B
        spec = linear_name("RULES")[base if ll else rule]
        q = c.randn(b, H, T, D).requires_grad_()
        k = None if rule == "hgrn2" else c.randn(b, H, T, D).requires_grad_()
        v = c.randn(b, H, T, Dv).requires_grad_()
        kw, grads = {}, [q, v] + ([k] if k is not None else [])
        if spec.gate == "scalar":
            kw["gate"] = (-c.rand(b, H, T) * 0.5).requires_grad_()
        elif spec.gate == "channel":
            kw["gate"] = (-c.rand(b, H, T, D) * 0.5).requires_grad_()
        if spec.delta:
            kw["beta"] = c.rand(b, H, T).requires_grad_()
        if ll:
            kw["level_weights"] = c.rand(b, H, T, 7).requires_grad_()
        grads += [kw[x] for x in ("gate", "beta", "level_weights") if x in kw]
        cu = None
        if docs:
            cu = torch.tensor([0] + sorted(random.sample(range(1, T), docs - 1)) + [T])
        Dk = (D if fm is None else linear_name("as_feature_map")(fm).dim(D))
        n_states = b if cu is None else docs
        shape = (n_states, H) + ((7,) if ll else ()) + (Dk, Dv + (1 if normalize else 0))
        S0 = c.randn(*shape).requires_grad_() if init else None
        if S0 is not None and normalize:
            S0 = S0.detach().abs().requires_grad_()
        if S0 is not None:
            grads.append(S0)
        wrap = (lambda x: None if x is None else LogLinearState(x, torch.zeros(b, dtype=torch.long))) if ll \
            else (lambda x: x)
        unwrap = (lambda st: st.levels) if ll else (lambda st: st)
        common = dict(rule=rule, feature_map=fm, normalize=normalize, causal=causal, chunk_size=chunk_size,
                      qk_l2norm=spec.delta, form=form, **({"base": base} if ll else {}))
        o_ref, s_ref = attnkit.linear_attention(q, k, v, initial_state=wrap(S0), output_final_state=final,
                                                cu_seqlens=cu, **common, **kw)
        s_ref = unwrap(s_ref) if final else None
        do = c.randn(*o_ref.shape)
        dS = c.randn(*s_ref.shape) if final else None
        g_ref = torch.autograd.grad([o_ref] + ([s_ref] if final else []), grads, [do] + ([dS] if final else []))
        sh = lambda x, dim=2: None if x is None else c.shard(x, lb, dim)  # noqa: E731
        kwl = {name: sh(t) for name, t in kw.items()}
        ql, kl, vl = sh(q), sh(k), sh(v)
        S0l = None if S0 is None else S0.detach().clone().requires_grad_()
        o, s = cp.context_parallel_linear_attention(ql, kl, vl, initial_state=wrap(S0l), output_final_state=final,
                                                    cu_seqlens=cu, load_balance=lb,
                                                    seq_len=T if lay.total != T else None, **common, **kwl)
        want, keep = c.local(o_ref.detach(), lb)
        idx = keep.nonzero().flatten()
        close(c, "out", o.index_select(2, idx), want)
        if final:
            if ll and not torch.equal(s.position, torch.full((b,), lay.total)):
                c.errors.append(f"final position {s.position.tolist()}, want {lay.total}")
            s = unwrap(s)
            close(c, "final_state", s, s_ref.detach())
        locals_ = [ql, vl] + ([kl] if kl is not None else []) + [kwl[x] for x in ("gate", "beta", "level_weights")
                                                                 if x in kwl]
        ins = locals_ + ([S0l] if S0l is not None else [])
        # the final state is replicated: each rank's loss takes 1/n of its cotangent (the gradients sum over ranks)
        g = torch.autograd.grad([o] + ([s] if final else []), ins,
                                [sh(do)] + ([dS / c.n] if final else []), allow_unused=True)
        names = ["dq", "dv"] + (["dk"] if k is not None else []) + [f"d{x}" for x in ("gate", "beta", "level_weights")
                                                                    if x in kw]
        for name, got, want_full in zip(names, g, g_ref):
            want, _ = c.local(want_full, lb)
            close(c, name, got.index_select(2, idx), want)
        if S0l is not None:
            close(c, "d_initial_state", sum_ranks(torch.zeros_like(S0l) if g[-1] is None else g[-1]), g_ref[-1])
    return run


def aaren_case(T: int, *, lb=None, init=False, final=False, D: int = 4, Dv: int = 3, B: int = 2,
               H: int = 2) -> Callable[[Ctx], None]:
    """Aaren with a learned query (parameter gradient summed over the ranks)."""

    def run(c: Ctx):
        lay = cp.ShardLayout.for_sequence(T, c.n, lb)
        k = c.randn(B, H, T, D).requires_grad_()
        v = c.randn(B, H, T, Dv).requires_grad_()
        query = torch.nn.Parameter(c.randn(H, D))
        S0 = AarenState(c.randn(B, H), c.randn(B, H, Dv), c.rand(B, H) + 0.5) if init else None
        call = dict(rule="aaren", query=query, chunk_size=4)
        o_ref, s_ref = attnkit.linear_attention(None, k, v, initial_state=S0, output_final_state=final, **call)
        do = c.randn(*o_ref.shape)
        outs, gouts = [o_ref], [do]
        if final:
            dn, dd = c.randn(B, H, Dv), c.randn(B, H)
            outs += [s_ref.num, s_ref.den]
            gouts += [dn, dd]
        g_ref = torch.autograd.grad(outs, [k, v, query], gouts)
        kl, vl = c.shard(k, lb), c.shard(v, lb)
        o, s = cp.context_parallel_linear_attention(None, kl, vl, initial_state=S0, output_final_state=final,
                                                    load_balance=lb, seq_len=T if lay.total != T else None, **call)
        want, keep = c.local(o_ref.detach(), lb)
        idx = keep.nonzero().flatten()
        close(c, "out", o.index_select(2, idx), want)
        outs, gouts = [o], [c.shard(do, lb)]
        if final:
            for name in ("max", "num", "den"):
                close(c, f"final_{name}", getattr(s, name), getattr(s_ref, name).detach())
            outs += [s.num, s.den]
            gouts += [dn / c.n, dd / c.n]
        g = torch.autograd.grad(outs, [kl, vl, query], gouts, allow_unused=True)
        for name, got, want_full in zip(("dk", "dv"), g[:2], g_ref[:2]):
            close(c, name, got.index_select(2, idx), c.local(want_full, lb)[0])
        close(c, "dquery", sum_ranks(g[2]), g_ref[2])
    return run


def linear_cases(n: int) -> list:
    T = 8 * n
    if n > 2:  # the required rules (and zigzag, padding, documents); every option runs on 2 processes
        return [("linear_zz_odd_init_final", linear_case(T - 3, "linear", lb="zigzag", init=True, final=True)),
                ("scalar_gate", linear_case(T, "scalar_gate", init=True, final=True)),
                ("gla_zz", linear_case(T, "gla", lb="zigzag", final=True)),
                ("delta", linear_case(T, "delta", init=True, final=True)),
                ("gated_delta_odd", linear_case(T - 5, "gated_delta", final=True, init=True)),
                ("kda_docs_zz", linear_case(T, "kda", docs=3, lb="zigzag", final=True)),
                ("log_linear_gated_delta_zz", linear_case(T, "log_linear", base="gated_delta", lb="zigzag")),
                ("aaren_zz_odd", aaren_case(T - 3, lb="zigzag"))]
    return [
        ("linear", linear_case(T, "linear")),
        ("linear_zz_odd_init_final", linear_case(T - 3, "linear", lb="zigzag", init=True, final=True)),
        ("linear_elu_normalize", linear_case(T, "linear", fm="elu", normalize=True, init=True, final=True)),
        ("linear_bidirectional", linear_case(T, "linear", causal=False, init=True, final=True)),
        ("retention", linear_case(T, "retention", final=True)),
        ("lightning_odd", linear_case(T - 1, "lightning")),
        ("scalar_gate", linear_case(T, "scalar_gate", init=True, final=True)),
        ("gla_zz", linear_case(T, "gla", lb="zigzag", final=True)),
        ("hgrn2", linear_case(T, "hgrn2", final=True)),
        ("delta", linear_case(T, "delta", init=True, final=True)),
        ("gated_delta_odd", linear_case(T - 5, "gated_delta", final=True, init=True)),
        ("gated_delta_recurrent_form", linear_case(T, "gated_delta", form="recurrent")),
        ("kda_zz_odd", linear_case(T - 3, "kda", lb="zigzag", init=True, final=True)),
        ("gla_docs_final", linear_case(T, "gla", docs=4, init=True, final=True)),
        ("kda_docs_zz", linear_case(T, "kda", docs=3, lb="zigzag", final=True)),
        ("log_linear_init_final", linear_case(T, "log_linear", base="linear", init=True, final=True)),
        ("log_linear_mamba2_zz_odd", linear_case(T - 3, "log_linear", base="scalar_gate", lb="zigzag")),
        ("log_linear_gated_delta_zz", linear_case(T, "log_linear", base="gated_delta", lb="zigzag", final=True)),
        ("aaren_init_final", aaren_case(T, init=True, final=True)),
        ("aaren_zz_odd", aaren_case(T - 3, lb="zigzag")),
    ]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def expect_error(fn, types, needle: str):
    try:
        fn()
    except types as e:
        if needle not in str(e):
            raise AssertionError(f"error message lacks {needle!r}: {e}") from e
        return e
    raise AssertionError(f"no {types} raised")


def err_mismatched_shard(c: Ctx):
    L = 4 if c.rank == 0 else 6
    q = c.randn(1, 2, L, 8)
    expect_error(lambda: cp.context_parallel_attention(q, q, q, mask="causal", load_balance=None), ValueError,
                 "disagree")


def err_rank_bad_input(c: Ctx):
    q = c.randn(1, 2, 4, 8)
    k = q.float() if c.rank == c.n - 1 else q  # one rank passes mixed dtypes
    e = expect_error(lambda: cp.context_parallel_attention(q, k, q, mask="causal"), (ValueError, TypeError), "")
    if c.rank != c.n - 1 and f"rank {c.n - 1}" not in str(e):
        raise AssertionError(f"the error does not name the failing rank: {e}")


def err_linear_mismatch(c: Ctx):
    L = 4 if c.rank == 0 else 5
    q = c.randn(1, 2, L, 4)
    expect_error(lambda: cp.context_parallel_linear_attention(q, q, q, rule="linear"), ValueError, "disagree")


def err_rank_dies_mid_ring(c: Ctx):
    """A rank that raises inside the ring: the others get RingError within the group timeout, not a hang."""
    g = dist.new_group(list(range(c.n)), timeout=timedelta(seconds=8))
    q = c.randn(1, 2, 8, 8)
    if c.rank == 1:
        orig = cp.ring.Spec.call

        def boom(self, *a, **kw):
            raise RuntimeError("simulated failure on rank 1")
        cp.ring.Spec.call = boom
        try:
            expect_error(lambda: cp.context_parallel_attention(q, q, q, group=g, mask=None, load_balance=None),
                         RuntimeError, "simulated failure")
        finally:
            cp.ring.Spec.call = orig
    else:  # forward and backward: with 2 ranks the forward may already hold everything it needs
        qr = q.clone().requires_grad_()
        expect_error(lambda: cp.context_parallel_attention(qr, qr, qr, group=g, mask=None, load_balance=None).sum()
                     .backward(), cp.RingError, "ring step")
    dist.destroy_process_group(g)


def err_refusals(c: Ctx):
    q = c.randn(1, 2, 4, 8)
    expect_error(lambda: cp.context_parallel_attention(q, q, q, normalizer=N.relaxed(0.1)), ValueError, "allgather")
    expect_error(lambda: cp.context_parallel_attention(q, q, q, score_mod=S.ssmax()), ValueError, "allgather")
    expect_error(lambda: cp.context_parallel_attention(q, q, q, strategy="tree"), ValueError, "strategy")
    expect_error(lambda: cp.context_parallel_attention(q, q, q, load_balance="zigzag", return_lse=True,
                                                       normalizer="sigmoid"), ValueError, "return_lse")
    expect_error(lambda: cp.context_parallel_linear_attention(q, q, q, rule="aaren"), ValueError,
                 "context_parallel_attention")
    expect_error(lambda: cp.context_parallel_linear_attention(q, q, q, rule="log_linear", cu_seqlens=torch.tensor(
        [0, 4 * c.n]), level_weights=q[..., :3]), ValueError, "whole documents")
    expect_error(lambda: cp.context_parallel_linear_attention(q, q, q, rule="retention", seq_len=4 * c.n - 1,
                                                              output_final_state=True), ValueError, "padded")


def wrapper_case(c: Ctx):
    """ContextParallel around a q/k/v maker that uses the global positions (a rotation by position)."""
    T, d, H, D = 8 * c.n - 3, 6, 2, 4
    lb = "zigzag"
    x = c.randn(2, T, d).requires_grad_()
    W = c.randn(d, 3 * H * D, scale=0.3).requires_grad_()
    Wo = c.randn(H * D, d, scale=0.3)

    def qkv(xx, pos):
        y = (xx @ W).view(*xx.shape[:2], 3, H, D)
        rot = torch.cos(pos.to(F64) * 0.3).view(1, -1, 1, 1)
        return y[:, :, 0] * rot, y[:, :, 1] * rot, y[:, :, 2]

    out = lambda o: o.reshape(*o.shape[:2], H * D) @ Wo  # noqa: E731
    q, k, v = qkv(x, torch.arange(T))
    ref = out(attnkit.attention(q, k, v, mask="causal", layout="bthd", backend="reference"))
    dy = c.randn(*ref.shape)
    gx, gW = torch.autograd.grad(ref, (x, W), dy)
    cfg = cp.CPConfig(load_balance=lb, seq_len=T)
    layer = cp.ContextParallel(qkv, out, config=cfg, mask="causal", layout="bthd", backend="reference")
    xl = cfg.shard(x.detach(), dim=1).requires_grad_()
    y = layer(xl)
    close(c, "layer_out", cfg.gather(y), ref.detach())
    gxl, gWl = torch.autograd.grad(y, (xl, W), cfg.shard(dy, dim=1))
    close(c, "layer_dx", cfg.gather(gxl), gx)
    close(c, "layer_dW", sum_ranks(gWl), gW)
    # halo: the 2 tokens before each local piece
    halos = cfg.halo(xl.detach(), 2)
    xp = torch.cat([x.detach(), x.new_zeros(2, cfg.layout(xl.shape[1]).total - T, d)], 1)
    for (s, _), h in zip(cfg.layout(xl.shape[1]).segments(c.rank), halos):
        want = xp[:, max(s - 2, 0):s] if s else torch.zeros_like(h)
        close(c, "halo", h, want)


JOBS: Dict[str, list] = {}


def _build():
    for n in (2, 4):
        JOBS[f"softmax{n}"] = softmax_cases(n) + [("wrapper", wrapper_case)]
        JOBS[f"linear{n}"] = linear_cases(n) + [  # the error cases last: the dying rank's group is torn down
            ("mismatched_shard", err_mismatched_shard), ("rank_bad_input", err_rank_bad_input),
            ("linear_mismatch", err_linear_mismatch), ("refusals", err_refusals),
            ("rank_dies_mid_ring", err_rank_dies_mid_ring)]


_build()
