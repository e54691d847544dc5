"""Multi-query associative recall (MQAR; Arora, Eyuboglu et al. 2023, "Zoology") on 2-layer attnkit models:
``attnkit mqar``.

The task, as Zoology's ``multiquery_ar`` generates it (written here from its definition):

* vocabulary ``V`` (8192); keys from ``[1, V/2)``, values from ``[V/2, V)``; ``N`` distinct key-value pairs per
  sequence, written first as ``k1 v1 k2 v2 ... kN vN`` (2N tokens);
* the remaining ``T - 2N`` positions ask every key once, at even offsets ``2g`` of that region with
  ``g`` drawn without replacement from the ``(T - 2N)/2`` slots with a power law ``p(g) ∝ a g^(a-1)``
  (``a = 0.01``: most queries come soon after the context), random tokens everywhere else;
* the label at a queried key is its value (``-100`` elsewhere); accuracy is the fraction of queries answered,
  averaged over sequences.

Models (:class:`RecallLM`): token embedding → two layers → RMSNorm → head tied to the embedding. A layer is Zoology's
pair of pre-norm residual sequence mixers: its gated short convolution (:class:`BaseConv`, kernel 3: the token shift
recall circuits need), then the variant's mixer; no MLP (Zoology's state mixer is the identity; ``mlp=True`` uses
:class:`attnkit.nn.Block`, ``conv=False`` drops the convolution). A model is named by a catalog variant
(``softmax``, ``gated_delta``, ...: one per layer) or a hybrid ``a+b`` (layer 0 ``a``, layer 1 ``b``); earlier
variant names (``gated-deltanet``) are accepted with the catalog's DeprecationWarning and stored under the current
name. Softmax-family variants are :class:`attnkit.nn.Attention` layers (RoPE; ``sliding_window`` with a fixed
window, :data:`WINDOW`), linear ones :class:`attnkit.nn.LinearAttention` (short convolutions, the rule's gates);
feature maps that expand the key (``taylor2``, Based) use ``feature_dim`` key channels per head.

Training (Zoology's recipe, by steps instead of epochs): AdamW (weight decay 0.1), a cosine schedule to 0, fresh
examples every step cycling over the training grid, early stop once validation accuracy passes 0.99; a
learning-rate sweep per model, the best learning rate reported. State size: bytes a model keeps to decode the
next token after the longest test sequence (K and V of the past tokens its masks let the next query see, fp32;
recurrent states and short-convolution tails), summed over layers.

Runs are deterministic given the run seed (printed, recorded): every cell's data and initialization derive from
it, and a results file (JSON lines) is extended by reruns, which skip the cells already done.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mqar_batch", "RecallLM", "ModelSpec", "model_name", "build_model", "state_bytes", "MQARConfig", "SMOKE",
           "GPU", "DEFAULT", "run", "read_results", "summarize", "TRAIN_GRID", "TEST_GRID", "VARIANTS", "SCHEMA"]

SCHEMA = "attnkit.mqar"
SCHEMA_VERSION = 1
VOCAB = 8192
#: Zoology's (sequence length, key-value pairs) for training (Figure 2 of the paper: 64..512, 4..64 pairs)
TRAIN_GRID: Tuple[Tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (512, 64))
#: and for testing (up to 1024 tokens with 256 pairs, as in the Based paper's MQAR sweep)
TEST_GRID: Tuple[Tuple[int, int], ...] = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))
#: the 12 mechanisms of the issue and a 1:1 hybrid (Gated DeltaNet layer, then softmax attention)
VARIANTS: Tuple[str, ...] = ("softmax", "sliding_window", "sigmoid", "linear_taylor2", "retention", "scalar_gate",
                             "gla", "delta", "gated_delta", "kda", "log_linear_gated_delta", "aaren",
                             "gated_delta+softmax")
#: MQAR's sliding window: a fixed number of keys (the catalog's window follows the call's length)
WINDOW = 64


# -- the task -------------------------------------------------------------------------------------

def mqar_batch(n: int, T: int, pairs: int, vocab: int = VOCAB, *, generator: torch.Generator,
               power_a: float = 0.01, random_non_queries: bool = True) -> Tuple[Tensor, Tensor]:
    """``n`` MQAR sequences: ``(inputs [n, T], labels [n, T])`` int64 on the CPU (labels ``-100`` where nothing is
    asked). See the module docstring for the layout; ``generator`` makes it deterministic."""
    if T % 2 or T < 4 * pairs or pairs < 1:
        raise ValueError(f"MQAR needs an even T >= 4 * pairs and pairs >= 1 (context 2N plus N query slots of 2), "
                         f"got T={T}, pairs={pairs}")
    if vocab <= T or vocab // 2 - 1 < pairs:
        raise ValueError(f"MQAR needs vocab > T and vocab/2 - 1 >= pairs distinct keys, got vocab={vocab}, T={T}")
    g = generator
    half, ctx = vocab // 2, 2 * pairs
    keys = torch.rand(n, half - 1, generator=g).topk(pairs, dim=1).indices + 1  # distinct, uniform, random order
    values = torch.rand(n, vocab - half, generator=g).topk(pairs, dim=1).indices + half
    space = (T - ctx) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(n, space), pairs, replacement=False, generator=g)
    inputs = (torch.randint(vocab, (n, T), generator=g) if random_non_queries
              else torch.zeros(n, T, dtype=torch.long))
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    where = ctx + 2 * gaps
    inputs.scatter_(1, where, keys)
    labels = torch.full((n, T), -100, dtype=torch.long).scatter_(1, where, values)
    return inputs, labels


# -- models ---------------------------------------------------------------------------------------

def model_name(name: str) -> str:
    """``name`` (a variant, or ``a+b`` per layer) with every part's catalog name: an earlier name is resolved by
    :func:`attnkit.get_variant` (with its DeprecationWarning); ValueError naming the known variants otherwise."""
    from .. import get_variant
    return "+".join(get_variant(part).name for part in name.split("+"))


def _stored_name(name: str) -> str:
    """A model name read from a results file, earlier variant names replaced by the current ones (no warning, no
    validation: files written before the renaming stay readable and resumable)."""
    from ..catalog import aliases
    old = aliases()
    return "+".join(old.get(part, part) for part in name.split("+"))


@dataclass(frozen=True)
class ModelSpec:
    """One MQAR model: ``name`` (a variant, or ``a+b`` per layer; stored as :func:`model_name` gives it), width,
    heads and Based's feature dim."""

    name: str
    d_model: int
    n_heads: int = 2
    feature_dim: int = 16
    n_layers: int = 2
    window: int = WINDOW
    mlp: bool = False
    conv: bool = True

    def __post_init__(self):
        object.__setattr__(self, "name", model_name(self.name))

    def layer_names(self) -> List[str]:
        parts = self.name.split("+")
        if len(parts) == 1:
            return parts * self.n_layers
        if len(parts) != self.n_layers:
            raise ValueError(f"hybrid {self.name!r} names {len(parts)} layers; the model has {self.n_layers}")
        return parts


def _expands(feature_map) -> bool:
    from ..ops.linear.feature_maps import as_feature_map
    return feature_map is not None and as_feature_map(feature_map).dim(8) > 8


def mixer(name: str, spec: ModelSpec, layer_idx: int, backend: str = "auto") -> nn.Module:
    """The token mixer of one layer for the catalog variant ``name`` (see the module docstring); the special cases
    compare the catalog's own name, so an earlier name of a variant builds the same layer."""
    from .. import get_variant, masks
    from ..nn import Attention, DiffAttention, LinearAttention, MultiTokenAttention
    d, H = spec.d_model, spec.n_heads
    v = get_variant(name)
    if v.name == "sliding_window":  # MQAR's fixed window, not the catalog's length-relative one
        return Attention(d, H, mask=masks.sliding_window(spec.window), layer_idx=layer_idx, backend=backend)
    if v.family == "softmax" and v.full_mask is not None:
        return Attention(d, H, variant=v.name, layer_idx=layer_idx, backend=backend)
    if v.name == "differential":
        return DiffAttention(d, H, layer_idx=layer_idx, backend=backend)
    if v.name == "multi_token":
        return MultiTokenAttention(d, H, layer_idx=layer_idx)
    if v.family == "linear":
        rule, bound = v.rule, dict(v.bound)
        if rule == "aaren" and v.state_bytes is None:
            raise ValueError(f"{name} (Aaren with per-token queries) is causal softmax attention: use 'softmax'")
        kw: Dict[str, Any] = {"layer_idx": layer_idx, "num_layers": spec.n_layers}
        if bound.get("feature_map"):
            kw.update(feature_map=bound["feature_map"], normalize=bool(bound.get("normalize")))
            if _expands(bound["feature_map"]):
                kw.update(head_dim=spec.feature_dim, head_dim_v=d // H)
        if bound.get("base"):
            kw["base"] = bound["base"]
        return LinearAttention(d, H, rule, **kw)
    raise ValueError(f"MQAR builds softmax-family variants that are one attention call, differential, multi_token "
                     f"and linear-family variants; {name!r} is none of these")


class BaseConv(nn.Module):
    """Zoology's gated short convolution: ``y = conv_k(x) ⊙ (x W + b)`` (depthwise, causal, kernel 3), the
    sequence mixer every Zoology MQAR model pairs with its attention or recurrent layer (it shifts tokens)."""

    def __init__(self, d_model: int, kernel_size: int = 3):
        super().__init__()
        from ..nn import ShortConv
        self.conv = ShortConv(d_model, kernel_size, bias=True, activation=False)
        self.projection = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)[0] * self.projection(x)


class _Residual(nn.Module):
    """``x + conv(RMSNorm(x))`` (when ``conv``), then ``x + mixer(RMSNorm(x))``: a Zoology block (its state mixer
    is the identity) with the gated short convolution Zoology pairs with every mixer."""

    def __init__(self, d_model: int, mixer_: nn.Module, conv: bool = True):
        super().__init__()
        from ..nn import RMSNorm
        self.conv_norm = RMSNorm(d_model) if conv else None
        self.conv = BaseConv(d_model) if conv else None
        self.attn_norm, self.mixer = RMSNorm(d_model), mixer_

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = x + self.conv(self.conv_norm(x))
        return x + self.mixer(self.attn_norm(x))


@dataclass
class _InitConfig:
    init_std: float = 0.02


class RecallLM(nn.Module):
    """Embedding → layers → RMSNorm → tied head; ``hidden(ids [B, T]) -> [B, T, d]``, ``logits(h [..., d])``.
    Initialized as :class:`attnkit.nn.HybridLM` (GPT-2 style, residual projections scaled by 1/√(2L))."""

    def __init__(self, vocab: int, d_model: int, mixers: Sequence[nn.Module], mlp: bool = False, conv: bool = True):
        super().__init__()
        from ..nn import Block, HybridLM, RMSNorm
        self.config = _InitConfig()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, m) if mlp else _Residual(d_model, m, conv) for m in mixers)
        self.norm = RMSNorm(d_model)
        HybridLM.reset_parameters(self)  # the one definition of the initialization

    def hidden(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        return h @ self.embed.weight.t()

    def loss_and_correct(self, ids: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross entropy over the asked positions only (the head runs there only) and the correct answers [n]."""
        h = self.hidden(ids)
        sel = labels != -100
        logits = self.logits(h[sel]).float()
        target = labels[sel]
        return F.cross_entropy(logits, target), logits.argmax(-1) == target


def build_model(spec: ModelSpec, vocab: int = VOCAB, backend: str = "auto") -> RecallLM:
    return RecallLM(vocab, spec.d_model, [mixer(n, spec, i, backend) for i, n in enumerate(spec.layer_names())],
                    spec.mlp, spec.conv)


def _kv_tokens(layer: nn.Module, T: int) -> int:
    """Tokens a softmax-family layer must keep cached after T tokens: the past keys (positions 0..T−1) that the
    next query, at position T, can see (its own key comes with it). Sliding window w: the last w keys."""
    from .. import Spec, masks
    m = masks.causal if getattr(layer, "mask", None) is None else masks.causal & layer.mask
    v = getattr(layer, "variant", None)
    if v is not None:
        m = m & v.full_mask(Spec(B=1, Hq=1, Hkv=1, Lq=T + 1, Lk=T + 1))
    return int(m.row_counts(1, 1, 1, T, q_offset=T).max())


def state_bytes(model: RecallLM, T: int, kv_bytes: int = 4) -> int:
    """Bytes the model keeps to decode after ``T`` tokens (module docstring), summed over layers."""
    from ..nn import LinearAttention
    from ..ops.linear.common import levels_needed
    from ..ops.linear.feature_maps import as_feature_map
    total = 0
    for b in model.blocks:
        if getattr(b, "conv", None) is not None:
            total += kv_bytes * (b.conv.conv.kernel_size - 1) * b.conv.conv.channels
        m = b.mixer
        if isinstance(m, LinearAttention):
            H, dk, dv = m.n_heads, m.head_dim, m.head_dim_v
            if m.rule == "aaren":
                total += 4 * H * (dv + 2)
            else:
                if m.feature_map is not None:
                    dk = as_feature_map(m.feature_map).dim(dk)
                levels = levels_needed(T - 1) if m.rule == "log_linear" else 1
                total += 4 * levels * H * dk * (dv + int(bool(m.normalize)))
            for conv in (m.q_conv, m.k_conv, m.v_conv):
                if conv is not None:
                    total += kv_bytes * (conv.kernel_size - 1) * conv.channels
        else:
            per_token = sum(p.out_features for p in (m.k_proj, m.v_proj))
            total += kv_bytes * per_token * _kv_tokens(m, T)
    return total


# -- runs -----------------------------------------------------------------------------------------

@dataclass
class MQARConfig:
    """A sweep: every variant × d_model (× feature dim for expanding feature maps) × learning rate."""

    variants: Tuple[str, ...] = VARIANTS
    d_models: Tuple[int, ...] = (64, 128, 256)
    lrs: Tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    feature_dims: Tuple[int, ...] = (16,)
    n_heads: int = 2
    steps: int = 1000
    batch: int = 64
    train_grid: Tuple[Tuple[int, int], ...] = TRAIN_GRID
    test_grid: Tuple[Tuple[int, int], ...] = TEST_GRID
    n_test: int = 256
    eval_batch: int = 64
    eval_every: int = 100
    early_stop: float = 0.99
    weight_decay: float = 0.1
    vocab: int = VOCAB
    window: int = WINDOW
    mlp: bool = False
    conv: bool = True
    backend: str = "auto"
    seed: Optional[int] = None

    def __post_init__(self):
        self.variants = tuple(model_name(n) for n in self.variants)

    def cells(self) -> List[Tuple[ModelSpec, float]]:
        out = []
        for name in self.variants:
            fds = self.feature_dims if any(_expands(_feature_map(n)) for n in name.split("+")) else (16,)
            for d in self.d_models:
                for fd in fds:
                    spec = ModelSpec(name, d, self.n_heads, fd, window=self.window, mlp=self.mlp, conv=self.conv)
                    out += [(spec, lr) for lr in self.lrs]
        return out


def _feature_map(name: str):
    from .. import get_variant
    v = get_variant(name)
    return getattr(v, "bound", {}).get("feature_map") if v.family == "linear" else None


#: CI: the pipeline end to end, two models, 200 steps (~30 s on a 2-core CPU); a vocabulary of 128 so that softmax
#: attention learns the task within the budget (0.92-0.97 over 3 seeds; at Zoology's 8192 nothing learned in 150)
SMOKE = MQARConfig(variants=("softmax", "gated_delta"), d_models=(64,), lrs=(1e-2,), steps=200, batch=32,
                   vocab=128, train_grid=((32, 4),), test_grid=((32, 4), (64, 8)), n_test=64, eval_every=50)
#: the default CPU sweep (minutes per model): every variant at d_model 64 and 128 on the short grid cells
DEFAULT = MQARConfig(d_models=(64, 128), lrs=(1e-3, 3e-3), steps=600, batch=64, train_grid=TRAIN_GRID[:2],
                     test_grid=TEST_GRID[:4], n_test=128)
#: one H200, one 10-minute call (benchmarks/mqar_gpu.py, 8 processes): 13 models × 3 widths × 2 learning rates, Based
#: also at feature dims 8 and 24 (90 cells), Zoology's grids; predicted ~440 s GPU-bound (mqar_gpu.py --estimate),
#: not yet measured
GPU = MQARConfig(d_models=(64, 128, 256), lrs=(3e-3, 1e-2), feature_dims=(8, 16, 24), steps=800, batch=128,
                 n_test=256, eval_batch=128, eval_every=200)
CONFIGS = {"smoke": SMOKE, "default": DEFAULT, "gpu": GPU}


def cell_key(spec: ModelSpec, lr: float, c: MQARConfig, seed: int) -> str:
    """What makes a result reusable: model, learning rate, training and test setup, seed."""
    grid = lambda g: ",".join(f"{T}x{n}" for T, n in g)  # noqa: E731
    return (f"{spec.name}|d{spec.d_model}|h{spec.n_heads}|f{spec.feature_dim}|w{spec.window}|mlp{int(spec.mlp)}"
            f"|conv{int(spec.conv)}"
            f"|lr{lr:.3g}|steps{c.steps}|b{c.batch}|train[{grid(c.train_grid)}]|test[{grid(c.test_grid)}]"
            f"|n{c.n_test}|V{c.vocab}|seed{seed}")


def _derive(seed: int, what: str) -> int:
    """A 63-bit seed for ``what`` derived from the run seed (stable across machines and Python versions)."""
    return (seed * 1_000_003 + zlib.crc32(what.encode())) % (2 ** 63 - 1)


@torch.no_grad()
def evaluate(model: RecallLM, grid: Sequence[Tuple[int, int]], n: int, c: MQARConfig, seed: int,
             device: torch.device) -> Dict[str, float]:
    """Accuracy per grid cell ``"{T}x{pairs}"`` on ``n`` sequences drawn with ``seed`` (the same for every model)."""
    model.eval()
    out = {}
    for T, pairs in grid:
        g = torch.Generator().manual_seed(_derive(seed, f"test{T}x{pairs}"))
        correct = total = 0
        for i in range(0, n, c.eval_batch):
            ids, labels = mqar_batch(min(c.eval_batch, n - i), T, pairs, c.vocab, generator=g)
            _, ok = model.loss_and_correct(ids.to(device), labels.to(device))
            correct += int(ok.sum())
            total += ok.numel()
        out[f"{T}x{pairs}"] = correct / max(total, 1)
    model.train()
    return out


def train_cell(spec: ModelSpec, lr: float, c: MQARConfig, seed: int, device,
               progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Train one model at one learning rate; its record (accuracy per test cell, state size, times)."""
    device = torch.device(device)
    rec: Dict[str, Any] = {"variant": spec.name, "d_model": spec.d_model, "n_heads": spec.n_heads,
                           "feature_dim": spec.feature_dim if any(_expands(_feature_map(n))
                                                                  for n in spec.name.split("+")) else None,
                           "lr": lr, "steps": c.steps, "batch": c.batch, "seed": seed}
    torch.manual_seed(_derive(seed, f"init|{spec}"))
    model = build_model(spec, c.vocab, c.backend).to(device)
    rec["state_bytes"] = state_bytes(model, max(T for T, _ in c.test_grid))
    rec["params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, c.steps) / c.steps)))
    data = torch.Generator().manual_seed(_derive(seed, "train"))  # the same stream for every model of the run
    t0, loss_v, step = time.perf_counter(), float("nan"), 0
    rec["early_stop_step"] = None
    for step in range(1, c.steps + 1):
        T, pairs = c.train_grid[(step - 1) % len(c.train_grid)]
        ids, labels = mqar_batch(c.batch, T, pairs, c.vocab, generator=data)
        loss, _ = model.loss_and_correct(ids.to(device), labels.to(device))
        if not torch.isfinite(loss):
            rec["status"], rec["note"] = "diverged", f"non-finite loss at step {step}"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step, c.steps)
        if step % c.eval_every == 0 or step == c.steps:
            loss_v = float(loss.detach())
            if c.early_stop and step < c.steps:
                val = evaluate(model, c.train_grid, c.eval_batch, c, _derive(seed, "valid"), device)
                if min(val.values()) > c.early_stop:
                    rec["early_stop_step"] = step
                    break
    rec["train_s"] = round(time.perf_counter() - t0, 2)
    rec["steps_run"] = step
    rec["final_loss"] = loss_v
    t1 = time.perf_counter()
    rec["by_test"] = evaluate(model, c.test_grid, c.n_test, c, seed, device)
    rec["accuracy"] = sum(rec["by_test"].values()) / len(rec["by_test"])
    rec["eval_s"] = round(time.perf_counter() - t1, 2)
    rec.setdefault("status", "ok")
    rec.setdefault("note", "")
    return rec


def read_results(path: str) -> Dict[str, Any]:
    """A results file: ``{"runs": [run records], "cells": [cell records]}`` (the last record of a key wins; earlier
    variant names in a cell's model and key read as the current ones)."""
    runs, cells = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON line (an interrupted write? delete that line and rerun)")
            if r.get("schema") != SCHEMA:
                raise ValueError(f"{path}:{n}: not an attnkit MQAR record (schema {r.get('schema')!r})")
            if r.get("kind") == "run":
                runs.append(r)
            else:
                head, sep, rest = r["key"].partition("|")
                r["key"] = _stored_name(head) + sep + rest
                if "variant" in r:
                    r["variant"] = _stored_name(r["variant"])
                cells[r["key"]] = r
    return {"runs": runs, "cells": list(cells.values())}


def run(c: MQARConfig, out: str, *, device="cpu", budget_s: Optional[float] = None, log=print,
        progress: Optional[Callable[[int, int, str], None]] = None, prior: Sequence[str] = (),
        shard: Tuple[int, int] = (0, 1)) -> List[Dict[str, Any]]:
    """Train every cell of ``c`` not yet in ``out`` (JSON lines, appended record by record) and return all of them.

    The seed: ``c.seed``, else the seed of the run already in ``out``, else a fresh one (printed). Cells run
    smallest models first. ``budget_s``: no new cell starts once the next one (estimated from the slowest so far)
    would pass it; a rerun continues. ``prior``: more results files whose finished cells are skipped;
    ``shard=(i, n)``: this process runs every n-th remaining cell from the i-th (several processes, one GPU).
    """
    from .bench import environment
    prev = read_results(out) if os.path.exists(out) else {"runs": [], "cells": []}
    for path in prior:
        if os.path.exists(path):
            more = read_results(path)
            prev = {"runs": more["runs"] + prev["runs"], "cells": more["cells"] + prev["cells"]}
    seed = c.seed
    if seed is None and prev["runs"]:
        seed = prev["runs"][-1]["seed"]
        log(f"mqar: resuming {out} with its seed {seed}")
    if seed is None:
        seed = secrets.randbelow(2 ** 31)
        log(f"mqar: seed {seed} (fresh; --seed {seed} repeats this run)")
    c = replace(c, seed=seed)
    done = {r["key"]: r for r in prev["cells"] if r.get("status") == "ok"}
    order = {n: i for i, n in enumerate(c.variants)}
    cells = sorted(((spec, lr, cell_key(spec, lr, c, seed)) for spec, lr in c.cells()),
                   key=lambda x: (x[0].d_model, x[0].feature_dim, x[1], order[x[0].name]))
    todo = [x for x in cells if x[2] not in done]
    if len(todo) < len(cells):
        log(f"mqar: {len(cells) - len(todo)} of {len(cells)} cells already in {out}; running {len(todo)}")
    todo = todo[shard[0]::shard[1]]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    header = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": "run", "seed": seed,
              "environment": environment(device), "config": _jsonable(asdict(c))}
    t0, slowest = time.perf_counter(), 0.0
    with open(out, "a") as f:
        f.write(json.dumps(header) + "\n")
        for i, (spec, lr, key) in enumerate(todo):
            elapsed = time.perf_counter() - t0
            if budget_s is not None and elapsed + 1.2 * slowest > budget_s:
                log(f"mqar: time budget {budget_s:.0f}s reached after {elapsed:.0f}s; {len(todo) - i} cells left "
                    f"(rerun the same command to continue)")
                break
            what = f"{spec.name} d={spec.d_model}" + (f" f={spec.feature_dim}" if spec.feature_dim != 16 else "") \
                + f" lr={lr:g}"
            step_cb = (lambda s, n, what=what, i=i: progress(i, len(todo), f"{what} step {s}/{n}")) if progress else None
            tc = time.perf_counter()
            try:
                rec = train_cell(spec, lr, c, seed, device, step_cb)
            except (RuntimeError, ValueError, MemoryError) as e:
                rec = {"variant": spec.name, "d_model": spec.d_model, "lr": lr, "seed": seed, "status": "error",
                       "note": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
            slowest = max(slowest, time.perf_counter() - tc)
            rec.update(schema=SCHEMA, kind="cell", key=key)
            f.write(json.dumps(_jsonable(rec)) + "\n")
            f.flush()
            done[key] = rec
            log(f"mqar: {what}: " + (f"accuracy {rec['accuracy']:.3f}, state {_fmt_bytes(rec['state_bytes'])}, "
                                     f"{rec['train_s']:.0f}s" if rec["status"] == "ok"
                                     else f"{rec['status']}: {rec['note']}"))
        if progress:
            progress(len(todo), len(todo), "done")
    keys = {k for _, _, k in cells}
    return [r for k, r in done.items() if k in keys] + [r for r in read_results(out)["cells"]
                                                         if r["key"] in keys and r["key"] not in done]


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summarize(cells: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Best learning rate per model (variant, d_model, feature dim, seed): its accuracies, state size and the lrs
    tried, in first-seen order."""
    best: Dict[tuple, Dict[str, Any]] = {}
    tried: Dict[tuple, List[float]] = {}
    for r in cells:
        if r.get("status") != "ok":
            continue
        k = (r["variant"], r["d_model"], r.get("feature_dim"), r.get("seed"))
        tried.setdefault(k, []).append(r["lr"])
        if k not in best or r["accuracy"] > best[k]["accuracy"]:
            best[k] = r
    return [{**r, "lrs_tried": sorted(tried[k])} for k, r in best.items()]


def check_orderings(summary: Sequence[Dict[str, Any]]) -> List[Tuple[str, Optional[bool], str]]:
    """The published MQAR orderings (Zoology, Based, DeltaNet, Gated DeltaNet papers), checked on a summary:
    ``(claim, held or None when the run cannot tell, detail)``."""
    acc: Dict[str, Dict[int, float]] = {}
    state: Dict[str, Dict[int, int]] = {}
    for s in summary:
        if s.get("feature_dim") not in (None, 16):
            continue
        acc.setdefault(s["variant"], {})[s["d_model"]] = s["accuracy"]
        state.setdefault(s["variant"], {})[s["d_model"]] = s["state_bytes"]
    out: List[Tuple[str, Optional[bool], str]] = []
    sm = acc.get("softmax", {})
    if sm:
        worst = min(sm.values())
        out.append(("softmax attention solves MQAR at every width (accuracy >= 0.9)", worst >= 0.9,
                    "min " + f"{worst:.2f}"))
        others = {n: a for n, a in acc.items() if n != "softmax"}
        beaten = [f"{n} d={d}" for n, a in others.items() for d, x in a.items() if d in sm and x > sm[d] + 0.02]
        out.append(("softmax is at least as accurate as every other model of the same width", not beaten,
                    ", ".join(beaten[:4])))
    for n in ("gated_delta", "delta"):
        a = acc.get(n, {})
        if len(a) >= 2:
            ds = sorted(a)
            gap = [sm[d] - a[d] for d in ds if d in sm]
            held = a[ds[-1]] >= a[ds[0]] - 0.02 and (not gap or gap[-1] <= gap[0] + 0.02)
            out.append((f"{n} approaches softmax as its state grows", held,
                        " -> ".join(f"{a[d]:.2f}" for d in ds)))
    for weak in ("gla", "scalar_gate"):
        if weak in acc and "gated_delta" in acc:
            common = [d for d in acc[weak] if d in acc["gated_delta"]]
            if common:
                held = all(acc[weak][d] <= acc["gated_delta"][d] + 0.02 for d in common)
                out.append((f"{weak} trails Gated DeltaNet at equal width", held,
                            ", ".join(f"d={d}: {acc[weak][d]:.2f} vs {acc['gated_delta'][d]:.2f}"
                                      for d in common)))
    by_f = {}
    for s in summary:
        if s["variant"] == "linear_taylor2" and s.get("feature_dim"):
            by_f.setdefault(s["d_model"], {})[s["feature_dim"]] = s["accuracy"]
    for d, fs in by_f.items():
        if len(fs) >= 2:
            ks = sorted(fs)
            out.append((f"Based (taylor2) improves with feature dimension at d={d}", fs[ks[-1]] >= fs[ks[0]] - 0.02,
                        " -> ".join(f"f={k}: {fs[k]:.2f}" for k in ks)))
    return out
