"""Context parallelism for the linear family: sequence-parallel state passing.

Every rule with a matrix state (``S ∈ R^{Dk×Dv}`` per head: linear, retention, lightning, scalar_gate, gla,
hgrn2, delta, gated_delta, kda) is affine in its initial state. Over one contiguous piece of the sequence,

    S_end = P · S_in + S⁰,        o_t = o⁰_t + Q_t · S_in,

where ``(o⁰, S⁰)`` is the piece run from a zero state, ``P ∈ R^{Dk×Dk}`` the product of the piece's
transitions (a diagonal of decays for additive rules, ``Π_t (I − β_t k_t k_tᵀ) Diag(α_t)`` for delta rules) and
``Q_t = (P_tᵀ q_t)ᵀ`` the queries carried back to the piece start. One call of the public
:func:`attnkit.linear_attention` gives all four: the value columns of a rule evolve independently, so running
the piece on values ``[v | 0]`` from the initial state ``[0 | I]`` returns outputs ``[o⁰ | Q]`` and final state
``[S⁰ | P]`` (``Dk`` extra value columns; the Triton kernels are used as soon as linear_attention dispatches to
them).

Each rank computes ``(P, S⁰)`` of its pieces, an all-gather shares them (LASP-2 style: one collective instead of
``n − 1`` ring hops; ``n`` small matrices per rank), and each rank composes the exclusive prefix
``S_in = P_{e−1}(⋯(P_0 S_init + S⁰_0)⋯) + S⁰_{e−1}`` of the pieces before its own, then
``o = o⁰ + Q S_in``. Backward is autograd: the gradients of the composition flow back through the all-gather
(a reduce-scatter: the reverse scan) into each rank's own pieces. Bidirectional linear attention
(``causal=False``) uses ``S_in = S_init + Σ_{other pieces} S⁰``.

Packed documents (``cu_seqlens`` of the whole, padded sequence): the state restarts at every boundary, so a piece
that contains a boundary has ``P = 0`` beyond it; a document cut by a shard boundary carries its state across.

log_linear: the Fenwick levels ``[Lv, Dk, Dv]`` are affine in the initial levels too (merges are sums, the base
rule's transition is linear), so the same construction runs with ``R = Lv·Dk`` state rows, each piece at its
global position. aaren (learned query): the prefix-softmax state (max, num, den) is a monoid, not a matrix; each
piece runs from an empty state, the states are all-gathered and combined in global order, and each piece runs
again from the combination of the pieces before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

import attnkit
from attnkit import AarenState, LogLinearState

from ._compat import aaren_combine, linear_name
from .comm import Group, all_gather_stack, check_group, connect as _connect
from .shard import ShardLayout, pad_cu_seqlens

__all__ = ["context_parallel_linear_attention", "SUPPORTED_RULES"]

RULES = linear_name("RULES")
NORMALIZE_EPS = linear_name("NORMALIZE_EPS")
rule_name = linear_name("rule_name")  # a deprecated rule alias -> the rule, with a DeprecationWarning
SUPPORTED_RULES = tuple(RULES) + ("log_linear", "aaren")
WHAT = "context_parallel_linear_attention"


def _bhtd(t: Optional[Tensor], layout: str) -> Optional[Tensor]:
    return t.transpose(1, 2) if (t is not None and layout == "bthd") else t


def _seg(t: Optional[Tensor], a: int, n: int) -> Optional[Tensor]:
    return None if t is None else t[:, :, a:a + n]


def context_parallel_linear_attention(
    q: Optional[Tensor],
    k: Optional[Tensor],
    v: Tensor,
    *,
    rule: str,
    group=None,
    gate: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    feature_map=None,
    normalize: bool = False,
    scale: Optional[float] = None,
    form: str = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    layout: str = "bhtd",
    qk_l2norm: bool = False,
    causal: bool = True,
    layer_idx: int = 0,
    num_layers: int = 1,
    level_weights: Optional[Tensor] = None,
    base: Optional[str] = None,
    query: Optional[Tensor] = None,
    load_balance: Optional[str] = None,
    seq_len: Optional[int] = None,
    backend: str = "auto",
    check: bool = True,
):
    """:func:`attnkit.linear_attention` over a sequence sharded across the ranks of ``group``.

    Arguments as in :func:`attnkit.linear_attention`, each per-token tensor (q, k, v, gate, beta) being this rank's
    shard (the same local length on every rank; ``load_balance`` None = contiguous pieces, ``"zigzag"`` = pieces
    ``r`` and ``2n−1−r``, e.g. to share the layout of the softmax layers of a hybrid model). Per-head gates
    (retention, lightning) are passed whole. ``seq_len``: the true length when the shards are padded (padded
    tokens write nothing and do not decay the state). ``initial_state``: the state before position 0, the same on
    every rank (``[N, ...]`` per document with ``cu_seqlens``). ``cu_seqlens``: the document boundaries of the
    whole sequence (batch 1), as for the unsharded call.

    ``rule="log_linear"``: the Fenwick levels are affine in the initial levels too (R = levels·Dk state rows);
    ``level_weights`` is sharded like the other per-token tensors and ``initial_state`` is a LogLinearState.
    ``rule="aaren"`` with a learned ``query``: the prefix-softmax states (max, num, den) combine associatively, so
    each rank runs its pieces twice: from an empty state (its local state), then from the combined states of the
    pieces before it.

    Returns ``(o, final_state)``: this rank's output shard and, with ``output_final_state``, the state after the
    whole sequence (per document with ``cu_seqlens``), identical on every rank. Every rank must run backward
    through the call (the gradients pass through a collective).
    """
    rule, base = rule_name(rule), rule_name(base, "base")
    g = Group.of(group)
    err, sig, local = None, {}, None
    try:
        if rule == "aaren":
            local = _AarenLocal.run(g, k, v, q=q, query=query, scale=scale, form=form, chunk_size=chunk_size,
                                    initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, layout=layout, causal=causal, load_balance=load_balance,
                                    seq_len=seq_len, backend=backend, rest=dict(gate=gate, beta=beta,
                                    level_weights=level_weights, feature_map=feature_map, normalize=normalize))
        else:
            if query is not None:
                raise ValueError(f"query= is aaren's learned query; rule {rule!r} takes per-token q")
            local = _local(g, q, k, v, rule=rule, gate=gate, beta=beta, feature_map=feature_map,
                           normalize=normalize, scale=scale, form=form, chunk_size=chunk_size,
                           initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, layout=layout, qk_l2norm=qk_l2norm, causal=causal,
                           layer_idx=layer_idx, num_layers=num_layers, level_weights=level_weights, base=base,
                           load_balance=load_balance, seq_len=seq_len, backend=backend)
        sig = local.signature
    except Exception as e:  # shared with every rank by check_group, then raised everywhere
        err = e
    if check:
        check_group(g, WHAT, sig, err)
    elif err is not None:
        raise err
    return local.finish(g)


@dataclass
class _Local:
    """One rank's pieces run from ``[0 | I]``: per piece ``o_aug [B, H, len, Dv' + R]`` (outputs ``o⁰`` and the
    carried-back queries ``Q``) and ``S_out [N, H, R, Dv' + R]`` (``S⁰`` and ``P``; N = 1, or the piece's documents).
    ``Dv_tot`` = Dv (+ 1 normalizer column), ``R`` = the state's rows (Dk after the feature map)."""

    lay: ShardLayout
    o_aug: List[Tensor]
    S_out: List[Tensor]
    seg_docs: List[Optional[List[Tuple[int, bool]]]]  # per piece: (global document, continues from before)
    Dv_tot: int
    R: int
    S_init: Tensor
    causal: bool
    normalize: bool
    dtype: torch.dtype
    layout: str
    output_final_state: bool
    cu: Optional[Tensor]
    n_docs: Optional[int]
    cd: torch.dtype
    device: torch.device
    signature: dict
    wrap_final: Callable[[Tensor], object] = lambda S: S  # log_linear: back to a LogLinearState

    def finish(self, g: Group):
        lay = self.lay
        Dv = self.Dv_tot
        last = [s if self.cu is None else s[-1:] for s in self.S_out]  # the state each piece hands on
        # one collective for (P, S⁰): two would run their backward all-reduces in an order that may differ by rank
        PS = all_gather_stack(torch.stack(last), g)  # [n, nseg, B, H, R, Dv + R]
        P_all, S_all = PS[..., Dv:], PS[..., :Dv]
        order = sorted((s, r, i) for r in range(g.world_size) for i, (s, _) in enumerate(lay.segments(r)))
        S_init = self.S_init
        mine = {}
        if self.causal:
            S = S_init
            for _, r, i in order:
                if r == g.rank:
                    mine[i] = S
                S = P_all[r, i] @ S + S_all[r, i]
            final = S
        else:
            total = S_init + S_all.sum((0, 1))
            for i in range(len(self.o_aug)):
                others = [S_all[r, j] for _, r, j in order if (r, j) != (g.rank, i)]
                mine[i] = S_init + sum(others) if others else S_init
            final = total
        outs = []
        for i, o in enumerate(self.o_aug):
            S_in = mine[i]  # with cu_seqlens only the piece's first document reads it (Q is 0 elsewhere)
            corr = o[..., Dv:].to(S_in.dtype) @ S_in
            outs.append(o[..., :Dv].to(S_in.dtype) + corr)
        out = _connect(torch.cat(outs, 2), PS)
        if self.normalize:
            out = out[..., :-1] / (out[..., -1:] + NORMALIZE_EPS)
        out = out.to(self.dtype)
        if self.layout == "bthd":
            out = out.transpose(1, 2)
        if not self.output_final_state:
            return out, None
        if self.cu is not None:
            final = self._doc_finals(g, mine, PS)
        return out, self.wrap_final(final)

    def _doc_finals(self, g: Group, mine, PS):
        """Final state of every document: computed on the rank holding its end, summed over ranks."""
        lay = self.lay
        Dv = self.Dv_tot
        part = torch.zeros(self.n_docs, *self.S_out[0].shape[1:-1], Dv, dtype=self.cd, device=self.device)
        for i, (s, n) in enumerate(lay.segments(g.rank)):
            for d, (doc, first) in enumerate(self.seg_docs[i]):
                end = int(self.cu[doc + 1])
                if doc < self.n_docs and s < end <= s + n:
                    st = self.S_out[i][d]
                    fin = st[..., :Dv] + (st[..., Dv:] @ mine[i][-1] if first else 0)
                    part = part.index_add(0, torch.tensor([doc], device=self.device), fin[None])
        return all_gather_stack(_connect(part, PS), g).sum(0)  # every rank joins the backward


def _local(g: Group, q, k, v, *, rule, gate, beta, feature_map, normalize, scale, form, chunk_size, initial_state,
           output_final_state, cu_seqlens, layout, qk_l2norm, causal, layer_idx, num_layers, level_weights, base,
           load_balance, seq_len, backend) -> _Local:
    ll = rule == "log_linear"
    if rule not in SUPPORTED_RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {SUPPORTED_RULES}")
    if ll and cu_seqlens is not None:
        raise ValueError("log_linear with cu_seqlens is not supported in context parallelism (the Fenwick levels "
                         "restart per document at document positions); shard whole documents instead")
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    if not isinstance(v, Tensor) or v.dim() != 4:
        raise ValueError(f"v must be a 4-D tensor, got {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    head_gate = RULES[(base or "linear") if ll else rule].gate == "head"
    qb, kb, vb = _bhtd(q, layout), _bhtd(k, layout), _bhtd(v, layout)
    gb = gate if head_gate else _bhtd(gate, layout)
    bb, lwb = _bhtd(beta, layout), _bhtd(level_weights, layout)
    B, Hv, L, Dv = vb.shape
    lay = ShardLayout(g.world_size, L, load_balance, seq_len)
    padded = lay.length < lay.total
    if padded and (head_gate or ll) and output_final_state:
        raise ValueError(f"rule {rule!r}: padded tokens still move the state (a fixed per-head decay / the Fenwick "
                         "levels follow positions), so the final state of a padded sequence would be off: shard a "
                         "sequence whose length divides evenly" + ("" if ll else ", or use scalar_gate with the same "
                                                                   "log decays"))
    common = dict(rule=rule, feature_map=feature_map, scale=scale, qk_l2norm=qk_l2norm, causal=causal,
                  layer_idx=layer_idx, num_layers=num_layers, backend=backend, chunk_size=chunk_size)
    if ll:
        common["base"] = base
    # probe one token with the caller's own options (validation, e.g. normalize; the state's shape)
    one = lambda t: None if t is None else t[:, :, :1]  # noqa: E731
    with torch.no_grad():
        _, S1 = attnkit.linear_attention(one(qb), one(kb), one(vb), form="recurrent" if causal else "chunk",
                                         gate=gb if head_gate else one(gb), beta=one(bb), normalize=normalize,
                                         output_final_state=True, **({"level_weights": one(lwb)} if ll else {}),
                                         **common)
    kind = _Levels(S1.levels.shape[2], S1.levels.shape[3]) if ll else _Matrix()
    S1 = S1.levels.flatten(2, 3) if ll else S1
    _, H, R, Dv_tot = S1.shape
    cd, dev = S1.dtype, S1.device
    cu = None
    if cu_seqlens is not None:
        if not causal:
            raise ValueError("cu_seqlens with causal=False is not supported in context parallelism (a document's "
                             "bidirectional state would sum its own pieces only); shard whole documents instead")
        if B != 1:
            raise ValueError(f"cu_seqlens needs the documents packed into batch 1, got batch {B}")
        cu = pad_cu_seqlens(cu_seqlens, lay.total)
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must strictly increase, got {cu.tolist()}")
    n_docs = None if cu is None else (len(cu) - 1 if int(torch.as_tensor(cu_seqlens)[-1]) == lay.total
                                      else len(cu) - 2)
    # the state before position 0
    n_states = B if cu is None else n_docs
    p0 = 0
    if ll and initial_state is not None:
        initial_state, p0 = kind.user(initial_state, B, H, R, Dv_tot)
    if initial_state is not None:
        want = (n_states, H, R, Dv_tot)
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be {list(want)} (batch or documents, heads, Dk, Dv"
                             f"{' + 1' if normalize else ''}), got "
                             f"{tuple(initial_state.shape) if isinstance(initial_state, Tensor) else initial_state!r}")
        init_user = initial_state.to(device=dev, dtype=cd)
    else:
        init_user = None
    eye = torch.eye(R, dtype=cd, device=dev)
    o_aug, S_out, seg_docs = [], [], []
    off = 0
    for s, n in lay.segments(g.rank):
        valid = (torch.arange(s, s + n, device=vb.device) < lay.length)
        vs = _seg(vb, off, n)
        cols = [vs * valid.view(1, 1, -1, 1).to(vs.dtype)]
        if normalize:  # the normalizer column z of linear_attention(normalize=True), run as a value column
            cols.append(valid.view(1, 1, -1, 1).to(vs.dtype).expand(B, Hv, n, 1))
        cols.append(vs.new_zeros(B, Hv, n, R))
        v_aug = torch.cat(cols, -1)
        gs = gb if head_gate or gb is None else _seg(gb, off, n) * valid.view(1, 1, -1, *([1] * (gb.dim() - 3)))
        bs = None if bb is None else _seg(bb, off, n) * valid.view(1, 1, -1).to(bb.dtype)
        extra = {} if not ll else dict(level_weights=_seg(lwb, off, n) * valid.view(1, 1, -1, 1).to(lwb.dtype))
        if cu is None:
            init = torch.cat([torch.zeros(B, H, R, Dv_tot, dtype=cd, device=dev),
                              eye.expand(B, H, R, R)], -1)
            loc_cu, docs = None, None
        else:
            inner = [int(c) - s for c in cu.tolist() if s < c < s + n]
            loc_cu = torch.tensor([0] + inner + [n], device=dev)
            first_doc = int(torch.searchsorted(cu, torch.tensor(s), right=True)) - 1
            cont = s not in cu.tolist()
            docs = [(first_doc + d, cont and d == 0) for d in range(len(inner) + 1)]
            init = torch.zeros(len(docs), H, R, Dv_tot + R, dtype=cd, device=dev)
            for d, (doc, first) in enumerate(docs):
                if first:
                    init[d, :, :, Dv_tot:] = eye
                elif init_user is not None and doc < n_docs:
                    init[d, :, :, :Dv_tot] = init_user[doc]
        o, S = attnkit.linear_attention(_seg(qb, off, n), _seg(kb, off, n), v_aug, gate=gs, beta=bs, form=form,
                                        initial_state=kind.state(init, p0 + s), output_final_state=True,
                                        cu_seqlens=loc_cu, **extra, **common)
        o_aug.append(o)
        S_out.append(kind.flat(S))
        seg_docs.append(docs)
        off += n
    if cu is None:
        S_init = torch.zeros(B, H, R, Dv_tot, dtype=cd, device=dev) if init_user is None else init_user
    else:  # documents restart from their own initial state inside the pieces; nothing enters at position 0
        S_init = torch.zeros(1, H, R, Dv_tot, dtype=cd, device=dev)
    signature = dict(v=tuple(vb.shape), q=None if qb is None else tuple(qb.shape), rule=rule, state=(H, R, Dv_tot),
                     dtype=str(v.dtype), layout=layout, load_balance=load_balance, seq_len=seq_len, causal=causal,
                     normalize=normalize, form=form, cu_seqlens=None if cu is None else cu.tolist(),
                     final=output_final_state, base=base, start=p0)
    return _Local(lay=lay, o_aug=o_aug, S_out=S_out, Dv_tot=Dv_tot, R=R, S_init=S_init, causal=causal,
                  normalize=normalize, dtype=v.dtype, layout=layout, output_final_state=output_final_state, cu=cu,
                  n_docs=n_docs, seg_docs=seg_docs, cd=cd, device=dev, signature=signature,
                  wrap_final=lambda S: kind.final(S, p0 + lay.total))


class _Matrix:
    """A Dk×Dv matrix state (every rule but log_linear): the flat form is the state itself."""

    def state(self, S: Tensor, position: int):
        return S

    def flat(self, S: Tensor) -> Tensor:
        return S

    def final(self, S: Tensor, position: int):
        return S


class _Levels:
    """log_linear's LogLinearState: levels ``[B, H, Lv, Dk, C]`` flattened to ``[B, H, Lv·Dk, C]`` rows."""

    def __init__(self, Lv: int, Dk: int):
        self.Lv, self.Dk = Lv, Dk

    def state(self, S: Tensor, position: int):
        levels = S.view(S.shape[0], S.shape[1], self.Lv, self.Dk, S.shape[-1])
        return LogLinearState(levels, torch.full((S.shape[0],), position, dtype=torch.long))

    def flat(self, st) -> Tensor:
        return st.levels.flatten(2, 3)

    def final(self, S: Tensor, position: int):
        return self.state(S, position)

    def user(self, st, B: int, H: int, R: int, C: int) -> Tuple[Tensor, int]:
        """The caller's LogLinearState as flat rows and its (common) position."""
        if not isinstance(st, LogLinearState):
            raise TypeError(f"log_linear initial_state must be a LogLinearState, got {type(st).__name__}")
        pos = st.position
        if not isinstance(pos, Tensor) or pos.numel() != B or bool((pos != pos.flatten()[0]).any()):
            raise ValueError(f"log_linear initial_state.position must hold one position for every row, got {pos!r}")
        if tuple(st.levels.shape) != (B, H, self.Lv, self.Dk, C):
            raise ValueError(f"initial_state.levels must be {[B, H, self.Lv, self.Dk, C]}, got "
                             f"{tuple(st.levels.shape)}")
        return st.levels.flatten(2, 3), int(pos.flatten()[0])


@dataclass
class _AarenLocal:
    """aaren with a learned query: each piece's prefix-softmax state from an empty start (pass 1), combined across
    ranks in global order, then the piece again from the combined state of the pieces before it (pass 2)."""

    lay: ShardLayout
    pieces: List[Tuple[Tensor, Tensor]]  # (k, v) per local piece, bhtd
    states: List[AarenState]
    S_init: Optional[AarenState]
    call: dict
    dtype: torch.dtype
    layout: str
    output_final_state: bool
    signature: dict

    @classmethod
    def run(cls, g: Group, k, v, *, q, query, scale, form, chunk_size, initial_state, output_final_state, cu_seqlens,
            layout, causal, load_balance, seq_len, backend, rest) -> "_AarenLocal":
        if query is None or q is not None:
            raise ValueError("context-parallel aaren needs a learned query= (and q=None); aaren with per-token "
                             "queries is causal softmax attention: use context_parallel_attention(mask='causal')")
        if any(x not in (None, False) for x in rest.values()) or cu_seqlens is not None or not causal:
            raise ValueError("aaren takes no gate, beta, level_weights, feature_map, normalize or cu_seqlens here, "
                             "and is causal only")
        if layout not in ("bhtd", "bthd"):
            raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
        kb, vb = _bhtd(k, layout), _bhtd(v, layout)
        lay = ShardLayout(g.world_size, kb.shape[2], load_balance, seq_len)
        if lay.length < lay.total and output_final_state:
            raise ValueError("aaren: padded tokens enter the prefix softmax, so the final state of a padded "
                             "sequence would be off: shard a sequence whose length divides evenly")
        call = dict(rule="aaren", query=query, scale=scale, form=form, chunk_size=chunk_size, backend=backend)
        pieces, states, off = [], [], 0
        for _, n in lay.segments(g.rank):
            ks, vs = _seg(kb, off, n), _seg(vb, off, n)
            _, st = attnkit.linear_attention(None, ks, vs, output_final_state=True, **call)
            pieces.append((ks, vs))
            states.append(st)
            off += n
        signature = dict(k=tuple(kb.shape), v=tuple(vb.shape), rule="aaren", dtype=str(v.dtype), layout=layout,
                         load_balance=load_balance, seq_len=seq_len, form=form, final=output_final_state,
                         init=initial_state is not None)
        return cls(lay, pieces, states, initial_state, call, v.dtype, layout, output_final_state, signature)

    def finish(self, g: Group):
        combine = aaren_combine()
        packed = torch.stack([torch.cat([st.max[..., None], st.den[..., None], st.num], -1) for st in self.states])
        allp = all_gather_stack(packed, g)  # one collective: [n, pieces, B, H, Dv + 2]
        unpack = lambda x: AarenState(x[..., 0], x[..., 2:], x[..., 1])  # noqa: E731
        order = sorted((s, r, i) for r in range(g.world_size) for i, (s, _) in enumerate(self.lay.segments(r)))
        acc, mine = self.S_init, {}
        for _, r, i in order:
            if r == g.rank:
                mine[i] = acc
            st = unpack(allp[r, i])
            acc = st if acc is None else combine(acc, st)
        outs = []
        for i, (ks, vs) in enumerate(self.pieces):
            o, _ = attnkit.linear_attention(None, ks, vs, initial_state=mine[i], **self.call)
            outs.append(o)
        out = _connect(torch.cat(outs, 2), allp).to(self.dtype)
        if self.layout == "bthd":
            out = out.transpose(1, 2)
        return out, (acc if self.output_final_state else None)
