"""The CAB-style sweep behind ``attnkit bench``: every form of each variant and every peer computing exactly the
same function, on the same inputs, timed with spread (:mod:`attnkit.tools.timing`).

A *cell* is (variant, pattern, T, mode); its random inputs are built once and every attnkit form and every peer
runs on them. Each row names the implementation that ran and carries every sample (ms), min / quartiles /
median / max, TFLOP/s over the visible (query, key) pairs (forward+backward counted as 3.5x forward), peak extra
memory and flags: ``noisy`` (slowest sample > 2x median), ``unstable`` (warm-up never settled), ``off-trend``
(slower by more than :data:`OFF_TREND` x than a longer length of the same series, still so after one
re-measurement). A peer that cannot compute a cell gets an ``n/a`` row with the reason; a peer whose output differs
from attnkit's is not timed (status ``mismatch``).

:func:`efficiency_lengths` gives CAB's efficiency length: the sequence length from which a variant's fastest
implementation beats the fastest implementation of plain softmax attention (attnkit or peer) on the same pattern.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..catalog.registry import Spec, Variant
from .calls import TOLERANCE, first, leaves, rel_err
from .timing import Timing, cpu_peak_supported, measure, peak_memory, sync, time_ms  # noqa: F401 (re-exported)

__all__ = ["sync", "time_ms", "peak_memory", "cpu_peak_supported", "measure", "make_step", "BenchRow", "sweep", "environment",
           "PEERS", "peer_names", "efficiency_lengths", "pivot_tables", "wide_table", "Table", "write_json",
           "read_json", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA, SCHEMA_VERSION = "attnkit.bench", 2
#: a cell slower than this multiple of a longer length's time (same series) is re-measured, then flagged
OFF_TREND = 1.5


# -- steps ----------------------------------------------------------------------------------------

def _require_grad(inputs: Dict[str, Any]) -> None:
    for t in leaves(inputs):
        if not isinstance(t, torch.nn.Parameter):
            t.requires_grad_(True)


def step_of(run: Callable[[], torch.Tensor], inputs: Dict[str, Any], backward: bool) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running ``run()`` once: under no_grad, or followed by a backward pass with
    a fixed random cotangent (gradients of the inputs cleared after each call)."""
    if not backward:
        def step():
            with torch.no_grad():
                return run()
        return step
    _require_grad(inputs)
    grad_holder = {}

    def step():
        out = run()
        g = grad_holder.get("g")
        if g is None or g.shape != out.shape:
            g = grad_holder["g"] = torch.randn_like(out)
        out.backward(g)
        for t in leaves(inputs):
            t.grad = None
        return out
    return step


def make_step(variant: Variant, inputs: Dict[str, Any], form: str, backend: str, backward: bool):
    """A zero-argument callable running the variant once (and its backward when asked)."""
    return step_of(lambda: first(variant.fn(**inputs, form=form, backend=backend)), inputs, backward)


# -- rows -----------------------------------------------------------------------------------------

@dataclass
class BenchRow:
    """One timed (or refused) implementation of one cell. ``impl`` is ``"attnkit"`` for attnkit's forms (``form``
    names the form, ``backend`` what ran) or the peer's name (``form`` = ``backend`` = that name)."""

    variant: str
    family: str
    pattern: str
    T: int
    Lq: int
    Lk: int
    form: str
    mode: str  # "fwd" or "fwd+bwd"
    backend: str = ""
    ms: Optional[float] = None  # median
    tflops: Optional[float] = None
    mem_mib: Optional[float] = None
    status: str = "ok"  # ok / n/a / error / mismatch
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    impl: str = "attnkit"
    ms_min: Optional[float] = None
    ms_q1: Optional[float] = None
    ms_q3: Optional[float] = None
    ms_max: Optional[float] = None
    n: int = 0
    samples: List[float] = field(default_factory=list)
    warmup_calls: int = 0
    flags: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The implementation as a table shows it: the attnkit form, or the peer's name."""
        return self.form if self.impl == "attnkit" else self.impl

    def set_timing(self, t: Timing) -> None:
        """The row's samples (6 significant digits, as stored) and the statistics of exactly those samples."""
        t = replace(t, samples=[float(f"{s:.6g}") for s in t.samples])
        self.ms, self.ms_min, self.ms_q1, self.ms_q3, self.ms_max = t.median, t.min, t.q1, t.q3, t.max
        self.n, self.samples, self.warmup_calls = t.n, t.samples, t.warmup_calls
        self.flags = list(t.flags)
        self.extra["timer"] = t.method if t.per_sample == 1 else f"{t.method} ({t.per_sample} calls/sample)"


def environment(device) -> Dict[str, Any]:
    """Where a result was measured: date, versions (torch, triton, CUDA, cuDNN, peers), device, CPU and load."""
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device), "cpu_threads": torch.get_num_threads()}
    for mod, key in (("triton", "triton"), ("fla", "fla"), ("flash_attn", "flash_attn"),
                     ("flashinfer", "flashinfer")):
        env[key] = _version(mod)
    env["cpu"] = cpu_model()
    env["cpu_count"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        env["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu"] = None
    from .. import __version__
    env["attnkit"] = __version__
    return env


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    names = {"fla": "flash-linear-attention", "flash_attn": "flash-attn"}
    try:
        return version(names.get(module, module))
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- peers ----------------------------------------------------------------------------------------

#: what a peer builder returns: (zero-argument fn returning the output [B, Hq, Lq, Dv], the peer's own leaf
#: tensors for the backward pass), or the reason it cannot compute the cell
Built = Union[Tuple[Callable[[], torch.Tensor], Dict[str, Any]], str]


@dataclass(frozen=True)
class Peer:
    """An implementation outside attnkit that can compute some cells. ``family``: the variant family it serves
    (its rows appear for every variant of that family, measured or saying why not); ``devices``: where it runs."""

    name: str
    family: str
    devices: Tuple[str, ...]
    build: Callable[[Variant, Spec, Dict[str, Any], bool], Built]
    what: str = ""


def _softmax_call(v: Variant, spec: Spec, inputs: Dict[str, Any]):
    """``(mask, score_mod, normalizer)`` of a softmax-family variant that is one attention call, or a reason."""
    if v.full_mask is None:
        return f"{v.name} is not one softmax attention call (mask, score mod, normalizer)"
    from ..core.masks import as_mask
    from ..core.normalizers import as_normalizer
    from ..core.scores import as_score_mod
    return (as_mask(v.full_mask(spec)), as_score_mod(inputs.get("score_mod")),
            as_normalizer(inputs.get("normalizer", "softmax")))


def _plain_softmax(normalizer) -> bool:
    from ..core.normalizers import Softmax
    return isinstance(normalizer, Softmax) and normalizer.sink is None and normalizer.gamma == 0


def _why_not_sdpa(v: Variant, mask, score_mod, normalizer) -> str:
    if not _plain_softmax(normalizer):
        return f"SDPA computes plain softmax; {v.name} uses {type(normalizer).__name__.lower()} normalization"
    if score_mod is not None:
        return f"SDPA has no score mods; {v.name} adds {type(score_mod).__name__}"
    return f"SDPA takes a full or causal mask (without a dense mask tensor); {v.name} adds its own mask"


def _sdpa_peer(name: str) -> Peer:
    def build(v, spec, inputs, backward):
        call = _softmax_call(v, spec, inputs)
        if isinstance(call, str):
            return call
        from ..dispatch import sdpa
        mask, score_mod, normalizer = call
        q, k, vv = inputs["q"], inputs["k"], inputs["v"]
        form = sdpa.sdpa_form(q, k, mask, score_mod, normalizer)
        if form is None:
            return _why_not_sdpa(v, mask, score_mod, normalizer)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if not sdpa.available(name, q, k, vv, form, scale):
            return (f"SDPA's {name} backend refuses these inputs ({str(q.dtype).replace('torch.', '')}, "
                    f"head dim {q.shape[-1]}, {q.device.type})")
        return (lambda: sdpa.call(name, q, k, vv, form, scale)), inputs
    where = ("cpu", "cuda") if name in ("math", "flash") else ("cuda",)
    return Peer(f"sdpa-{name}", "softmax", where, build, f"torch SDPA, {name} backend only")


def _flex_build(v, spec, inputs, backward):
    call = _softmax_call(v, spec, inputs)
    if isinstance(call, str):
        return call
    mask, score_mod, normalizer = call
    q, k, vv = inputs["q"], inputs["k"], inputs["v"]
    if backward and q.device.type == "cpu":
        return f"FlexAttention has no backward on CPU (torch {torch.__version__})"
    if not _plain_softmax(normalizer):
        return f"FlexAttention computes softmax only; {v.name} uses {type(normalizer).__name__.lower()} normalization"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"FlexAttention takes float16 / bfloat16 / float32, not {q.dtype}"
    from .peers import flex_call
    B, Hq, Lq, D = q.shape
    fn = flex_call(mask, score_mod, B, Hq, k.shape[1], Lq, k.shape[2], q.device, 1.0 / math.sqrt(D))
    if fn is None:
        return f"{score_mod!r} has no FlexAttention score_mod form"

    def run():
        return fn(q, k, vv)
    run.flex = fn  # which compile ran it (peers.flex_call)
    return run, inputs


#: fla 0.6's chunk kernel per attnkit rule: (module, function, gate keyword or None)
FLA_CHUNK = {"scalar_gate": ("fla.ops.simple_gla", "chunk_simple_gla", "g"),
             "retention": ("fla.ops.simple_gla", "chunk_simple_gla", "g_gamma"),
             "gla": ("fla.ops.gla", "chunk_gla", "g"),
             "delta": ("fla.ops.delta_rule", "chunk_delta_rule", None),
             "gated_delta": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "g"),
             "kda": ("fla.ops.kda", "chunk_kda", "g")}


def _bthd(t: torch.Tensor, backward: bool) -> torch.Tensor:
    """A fresh contiguous ``[B, T, H, ...]`` leaf of a ``[B, H, T, ...]`` tensor (the peer's own copy)."""
    return t.detach().transpose(1, 2).contiguous().requires_grad_(backward and t.is_floating_point())


def _fla_build(v, spec, inputs, backward):
    rule = getattr(v, "rule", None)
    bound = getattr(v, "bound", {})
    if rule not in FLA_CHUNK or bound.get("feature_map") or bound.get("normalize"):
        return f"fla has no chunk kernel for {v.name}"
    if inputs["q"].device.type != "cuda":
        return "fla's kernels run on CUDA only (Triton)"
    if spec.Hq != spec.Hkv:
        return f"fla needs as many value heads as key heads (Hq={spec.Hq}, Hkv={spec.Hkv})"
    mod, fn_name, gate_kw = FLA_CHUNK[rule]
    try:
        import importlib
        fn = getattr(importlib.import_module(mod), fn_name)
    except (ImportError, AttributeError) as e:
        return f"fla is not importable ({type(e).__name__}: {e}); pip install flash-linear-attention"
    own = {"q": _bthd(inputs["q"], backward), "k": _bthd(inputs["k"], backward), "v": _bthd(inputs["v"], backward)}
    kw: Dict[str, Any] = {"scale": spec.D ** -0.5, "initial_state": inputs["initial_state"].detach().float(),
                          "output_final_state": False}
    if gate_kw == "g_gamma":
        kw["g_gamma"] = inputs["gate"].detach().float()
    elif gate_kw is not None:
        own["g"] = _bthd(inputs["gate"], backward)
        kw["g"] = own["g"]
    if "beta" in inputs:
        own["beta"] = _bthd(inputs["beta"], backward)
        kw["beta"] = own["beta"]
    if bound.get("qk_l2norm"):
        kw["use_qk_l2norm_in_kernel"] = True
    q, k, vv = own["q"], own["k"], own["v"]
    return (lambda: first(fn(q, k, vv, **kw)).transpose(1, 2)), own


def _flash_attn_build(v, spec, inputs, backward):
    call = _softmax_call(v, spec, inputs)
    if isinstance(call, str):
        return call
    mask, score_mod, normalizer = call
    if not _plain_softmax(normalizer) or score_mod is not None or mask.kind not in ("full", "causal"):
        return _why_not_sdpa(v, mask, score_mod, normalizer).replace("SDPA", "FlashAttention", 1)
    if inputs["q"].device.type != "cuda" or inputs["q"].dtype not in (torch.float16, torch.bfloat16):
        return "FlashAttention takes float16 / bfloat16 on CUDA"
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        return f"flash-attn is not importable ({e})"
    own = {n: _bthd(inputs[n], backward) for n in ("q", "k", "v")}
    causal = mask.kind == "causal"  # flash-attn >= 2.1 aligns causal masks to the bottom right, as attnkit does
    return (lambda: flash_attn_func(own["q"], own["k"], own["v"], causal=causal).transpose(1, 2)), own


def _flashinfer_build(v, spec, inputs, backward):
    call = _softmax_call(v, spec, inputs)
    if isinstance(call, str):
        return call
    mask, score_mod, normalizer = call
    if not _plain_softmax(normalizer) or score_mod is not None or mask.kind not in ("full", "causal"):
        return _why_not_sdpa(v, mask, score_mod, normalizer).replace("SDPA", "FlashInfer", 1)
    if backward:
        return "FlashInfer has no backward"
    if inputs["q"].device.type != "cuda" or inputs["q"].dtype not in (torch.float16, torch.bfloat16):
        return "FlashInfer takes float16 / bfloat16 on CUDA"
    if spec.B != 1:
        return f"FlashInfer's single-sequence prefill takes B=1 (got B={spec.B})"
    try:
        import flashinfer
    except ImportError as e:
        return f"flashinfer is not importable ({e})"
    q, k, vv = (inputs[n].detach()[0].transpose(0, 1).contiguous() for n in ("q", "k", "v"))
    causal = mask.kind == "causal"
    return (lambda: flashinfer.single_prefill_with_kv_cache(q, k, vv, causal=causal).transpose(0, 1)[None]), {}


#: every peer, in table order
PEERS: Tuple[Peer, ...] = (
    _sdpa_peer("cudnn"), _sdpa_peer("flash"), _sdpa_peer("efficient"), _sdpa_peer("math"),
    Peer("flex", "softmax", ("cpu", "cuda"), _flex_build,
         "FlexAttention, torch.compile'd (CPU: once per mask, dynamic lengths; CUDA: per shape)"),
    Peer("flash-attn", "softmax", ("cuda",), _flash_attn_build, "FlashAttention 2 (flash_attn_func)"),
    Peer("flashinfer", "softmax", ("cuda",), _flashinfer_build, "FlashInfer single_prefill_with_kv_cache"),
    Peer("fla", "linear", ("cpu", "cuda"), _fla_build, "flash-linear-attention chunk kernels"),
)


def peer_names(device) -> List[str]:
    """The peers a run on ``device`` includes by default (SDPA math only on CPUs: on GPUs it is not a contender)."""
    dev = torch.device(device).type
    return [p.name for p in PEERS if dev in p.devices and not (dev == "cuda" and p.name == "sdpa-math")]


#: on a CPU, each compiled FlexAttention mask costs seconds (~6 s of C++ compilation on one core)
FLEX_CPU_NOTE = ("not timed by default on a CPU where SDPA computes the cell (compiling FlexAttention costs ~6 s "
                 "per mask); --peers all times it everywhere")


# -- the sweep ------------------------------------------------------------------------------------

def _tflops(v: Variant, spec: Spec, mode: str, ms: float) -> Optional[float]:
    """TFLOP/s over the variant's counted FLOPs (forward+backward counted as 3.5x forward)."""
    if v.flops is None:
        return None
    return v.flops(spec) * (3.5 if mode == "fwd+bwd" else 1.0) / (ms * 1e-3) / 1e12


def _ran(step, backend: str) -> str:
    """What actually ran for one call of ``step`` (the last call the step made, as recorded)."""
    from ..core.record import record
    with record() as r:
        step()
    return r.calls[-1] if r.calls else backend


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


@dataclass
class _Opts:
    backend: str
    device: Any
    warmup: int
    rep: int
    min_time_s: float
    warmup_max_s: float
    measure_memory: bool
    flex_everywhere: bool = True


def _time_row(row: BenchRow, v: Variant, spec: Spec, step: Callable, o: _Opts, primed: bool = False) -> None:
    """Time ``step`` into ``row`` (``primed``: its first call, the one that fills caches, was just made)."""
    t = measure(step, o.device, min_rep=o.rep, min_time_s=o.min_time_s, warmup_max_s=o.warmup_max_s,
                warmup_min_calls=o.warmup, primed=primed, memory=o.measure_memory)
    row.set_timing(t)
    if t.peak_bytes is not None:
        row.mem_mib = t.peak_bytes / 2 ** 20
    row.tflops = _tflops(v, spec, row.mode, row.ms)


def _agree_tol(dtype) -> float:
    return 3 * TOLERANCE.get(dtype, 1e-2)


class _Cell:
    """One (variant, pattern, T): fresh inputs built once, attnkit's output on them (for the peers' check)."""

    def __init__(self, v: Variant, spec: Spec, pattern: str, T: int, o: _Opts):
        self.v, self.spec, self.pattern, self.T, self.o = v, spec, pattern, T, o
        self.inputs: Optional[Dict[str, Any]] = None
        self._ref: Any = None
        self.verdict: Dict[str, Tuple[str, str]] = {}  # peer -> (status, note) from the forward check

    def row(self, form: str, mode: str, impl: str = "attnkit") -> BenchRow:
        return BenchRow(self.v.name, self.v.family, self.pattern, self.T, self.spec.Lq, self.spec.Lk, form, mode,
                        impl=impl, backend="" if impl == "attnkit" else impl)

    def get_inputs(self) -> Dict[str, Any]:
        if self.inputs is None:
            self.inputs = self.v.make_inputs(self.spec)
        return self.inputs

    def reference(self) -> torch.Tensor:
        """attnkit's output on the cell's inputs (its streaming/chunk form, else the first supported form)."""
        if self._ref is None:
            forms = [f for f in ("streaming", "chunk") if f in self.v.forms] + list(self.v.forms)
            form = next(f for f in forms if not self.v.unsupported(self.spec, f))
            with torch.no_grad():
                self._ref = first(self.v.fn(**self.get_inputs(), form=form, backend=self.o.backend)).detach()
        return self._ref

    def form_row(self, form: str, mode: str, max_recurrent_T: Optional[int]) -> BenchRow:
        v, spec, o = self.v, self.spec, self.o
        row = self.row(form, mode)
        reason = v.unsupported(spec, form)
        if reason is None and form == "recurrent" and max_recurrent_T is not None and self.T > max_recurrent_T:
            reason = f"skipped: token-by-token form above --max-recurrent-T {max_recurrent_T}"
        if reason:
            row.status, row.note = "n/a", reason
            return row
        try:
            inputs = self.get_inputs()
            step = make_step(v, inputs, form, o.backend, backward=(mode == "fwd+bwd"))
            row.backend = _ran(step, o.backend)  # also the first warm-up call
            _time_row(row, v, spec, step, o, primed=True)
        except (RuntimeError, ValueError, MemoryError) as e:  # report, never hide
            row.status, row.note = "error", _err(e)
        return row

    def peer_row(self, peer: Peer, mode: str) -> BenchRow:
        v, spec, o = self.v, self.spec, self.o
        row = self.row(peer.name, mode, impl=peer.name)
        backward = mode == "fwd+bwd"
        if peer.name in self.verdict and self.verdict[peer.name][0] != "ok":
            row.status, row.note = self.verdict[peer.name]
            return row
        if peer.name == "flex" and not o.flex_everywhere and any(
                n.startswith("sdpa-") and st == "ok" for n, (st, _) in self.verdict.items()):
            row.status, row.note = "n/a", FLEX_CPU_NOTE
            return row
        try:
            inputs = self.get_inputs()
            if not backward:  # the forward never sees tensors that require grad (Flex refuses them on CPU)
                inputs = {k: x.detach() if isinstance(x, torch.Tensor) else x for k, x in inputs.items()}
            built = peer.build(v, spec, inputs, backward)
            if isinstance(built, str):
                row.status, row.note = "n/a", built
                return row
            fn, own = built
            primed = False
            if peer.name not in self.verdict:  # the first call (a compile for Flex), checked against attnkit
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = fn()
                sync(o.device)
                row.extra["first_call_s"] = round(time.perf_counter() - t0, 3)
                primed = not backward  # the forward step is this call
                if getattr(fn, "flex", None) is not None:
                    row.extra["flex_compile"] = fn.flex.compiled
                    if fn.flex.dynamic_error:
                        row.extra["flex_dynamic_error"] = fn.flex.dynamic_error
                err = rel_err(out.reshape(self.reference().shape), self.reference())
                tol = _agree_tol(spec.dtype)
                self.verdict[peer.name] = ("ok", "") if err <= tol else (
                    "mismatch", f"output differs from attnkit's by {err:.1e} (> {tol:.0e}); not timed")
                row.extra["rel_err_vs_attnkit"] = err
                if err > tol:
                    row.status, row.note = self.verdict[peer.name]
                    return row
            row.backend = peer.name
            _time_row(row, v, spec, step_of(fn, own, backward), o, primed=primed)
        except NotImplementedError as e:
            row.status, row.note = "n/a", _err(e)
        except (RuntimeError, ValueError, MemoryError, TypeError, AssertionError) as e:
            row.status, row.note = "error", _err(e)
        return row


def sweep(variants: Sequence[Variant], patterns: Sequence[str], lengths: Sequence[int], *,
          forms: Optional[Sequence[str]] = None, backend: str = "reference", device="cpu",
          dtype=torch.float32, B: int = 1, H: int = 4, Hkv: Optional[int] = None, D: int = 64,
          fwd_only: bool = False, warmup: int = 2, rep: int = 5, min_time_s: float = 0.05,
          warmup_max_s: float = 1.0, measure_memory: bool = True, max_recurrent_T: Optional[int] = None,
          peers: Union[bool, Sequence[str]] = True, flex_everywhere: Optional[bool] = None,
          budget_s: Optional[float] = None,
          progress: Optional[Callable[[int, int, str], None]] = None) -> List[BenchRow]:
    """Time every (variant, pattern, length, implementation, mode); cells that cannot run get a row saying why.

    ``peers``: True for :func:`peer_names` of the device, False for none, or a list of peer names.
    ``flex_everywhere``: time FlexAttention also where an SDPA backend computes the cell (default: yes on GPUs and
    for an explicit peer list; on CPUs with the default peers only where SDPA cannot, see :data:`FLEX_CPU_NOTE`).
    ``max_recurrent_T`` skips token-by-token forms above that length (noted in the row). Off-trend cells are
    re-measured once at the end (first samples kept in ``extra["first_samples"]``). ``budget_s``: no measurement
    starts later than this many seconds after the start; the cells left get an n/a row saying so.
    """
    t_start = time.perf_counter()
    over = lambda: budget_s is not None and time.perf_counter() - t_start > budget_s  # noqa: E731
    if flex_everywhere is None:
        flex_everywhere = peers is not True or torch.device(device).type != "cpu"
    if peers is True:
        use = peer_names(device)
    else:
        use = list(peers or [])
    known = {p.name: p for p in PEERS}
    bad = [n for n in use if n not in known]
    if bad:
        raise ValueError(f"unknown peers {bad}; known: {list(known)}")
    peer_list = [known[n] for n in use]
    modes = ["fwd"] if fwd_only else ["fwd", "fwd+bwd"]
    o = _Opts(backend, device, warmup, rep, min_time_s, warmup_max_s, measure_memory, flex_everywhere)
    plan = []  # (variant, pattern, T, [(kind, name, mode)])
    for v in variants:
        for pat in patterns:
            for T in lengths:
                tasks = [t for m in modes for t in
                         [("form", f, m) for f in (forms or v.forms) if f in v.forms]
                         + [("peer", p.name, m) for p in peer_list if p.family == v.family]]
                plan.append((v, pat, T, tasks))
    total = sum(len(t) for *_, t in plan)
    rows: List[BenchRow] = []
    done = 0
    cells = {}
    for v, pat, T, tasks in plan:
        spec = Spec.for_pattern(pat, T, B=B, Hq=H, Hkv=Hkv or H, D=D, Dv=D, dtype=dtype, device=str(device))
        cell = cells[(v.name, pat, T)] = _Cell(v, spec, pat, T, o)
        for kind, name, mode in tasks:
            if progress:
                progress(done, total, f"{v.name} {pat} T={T} {name} {mode}")
            if over():
                row = cell.row(name, mode, impl="attnkit" if kind == "form" else name)
                row.status, row.note = "n/a", f"not run: --budget {budget_s:g} s reached"
                rows.append(row)
            else:
                t_row = time.perf_counter()
                rows.append(cell.form_row(name, mode, max_recurrent_T) if kind == "form"
                            else cell.peer_row(known[name], mode))
                rows[-1].extra["wall_s"] = round(time.perf_counter() - t_row, 3)  # what the row cost the run
            done += 1
        cell.inputs = cell._ref = None  # free the cell's tensors
    for r in _off_trend(rows):
        if over():
            break
        cell = cells[(r.variant, r.pattern, r.T)]
        if progress:
            progress(done, total, f"re-measuring {r.variant} {r.pattern} T={r.T} {r.label} {r.mode}")
        again = (cell.form_row(r.form, r.mode, max_recurrent_T) if r.impl == "attnkit"
                 else cell.peer_row(known[r.impl], r.mode))
        cell.inputs = cell._ref = None
        if again.status == "ok":
            first_samples = r.samples
            r.__dict__.update({k: v for k, v in again.__dict__.items() if k != "extra"})
            r.extra.update(again.extra)
            r.extra["first_samples"] = first_samples
            r.flags.append("remeasured")
    for r in _off_trend(rows):
        r.flags.append("off-trend")
    if progress:
        progress(total, total, "done")
    _ratios(rows)
    return rows


def _series(rows: Sequence[BenchRow]) -> Dict[tuple, List[BenchRow]]:
    out: Dict[tuple, List[BenchRow]] = {}
    for r in rows:
        out.setdefault((r.variant, r.pattern, r.impl, r.form, r.mode), []).append(r)
    for s in out.values():
        s.sort(key=lambda r: r.T)
    return out


def _off_trend(rows: Sequence[BenchRow]) -> List[BenchRow]:
    """Cells slower than ``OFF_TREND`` x some longer length of the same series (time should not fall with T)."""
    bad = []
    for s in _series(rows).values():
        ok = [r for r in s if r.status == "ok" and r.ms]
        for i, r in enumerate(ok):
            later = [x.ms for x in ok[i + 1:]]
            if later and r.ms > OFF_TREND * min(later) and "off-trend" not in r.flags:
                bad.append(r)
    return bad


def _ratios(rows: List[BenchRow]) -> None:
    """For attnkit rows: the fastest peer on the same cell and ``peer ms / attnkit ms`` (> 1: attnkit faster)."""
    best: Dict[tuple, BenchRow] = {}
    for r in rows:
        if r.impl != "attnkit" and r.status == "ok":
            key = (r.variant, r.pattern, r.T, r.mode)
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    for r in rows:
        peer = best.get((r.variant, r.pattern, r.T, r.mode))
        if peer is not None and r.status == "ok" and r.impl == "attnkit":
            r.extra["best_peer"], r.extra["x_best_peer"] = peer.impl, peer.ms / r.ms


# -- efficiency length (CAB) ----------------------------------------------------------------------

def efficiency_lengths(rows: Sequence[BenchRow], baseline: str = "softmax") -> List[Dict[str, Any]]:
    """CAB's efficiency length per (variant, pattern, mode): the sequence length from which the variant's fastest
    attnkit implementation is faster than the fastest implementation of plain ``baseline`` attention (attnkit or
    peer) at every longer measured length; log-log interpolated between the two measured lengths around the
    crossing. ``length`` None: never faster up to the longest length; ``"≤T"``: faster at every length."""
    best: Dict[tuple, BenchRow] = {}
    for r in rows:
        if r.status != "ok" or not r.ms:
            continue
        if r.variant == baseline:
            key = ("__base__", r.pattern, r.mode, r.T)
            if key not in best or r.ms < best[key].ms:
                best[key] = r
        if r.impl == "attnkit":
            key = (r.variant, r.pattern, r.mode, r.T)
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    out = []
    order = list(dict.fromkeys(r.variant for r in rows))
    seen = sorted({k[:3] for k in best if k[0] not in ("__base__", baseline)},
                  key=lambda k: (order.index(k[0]), k[1], k[2]))
    for name, pat, mode in seen:
        Ts = sorted(k[3] for k in best if k[:3] == (name, pat, mode) and ("__base__", pat, mode, k[3]) in best)
        if not Ts:
            continue
        ratio = {T: best[(name, pat, mode, T)].ms / best[("__base__", pat, mode, T)].ms for T in Ts}
        entry = {"variant": name, "pattern": pat, "mode": mode, "ratios": ratio,
                 "baseline": {T: best[("__base__", pat, mode, T)].label for T in Ts},
                 "impl": {T: best[(name, pat, mode, T)].label for T in Ts}}
        faster = [ratio[T] < 1 for T in Ts]
        if all(faster):
            entry.update(length=Ts[0], text=f"≤{Ts[0]}")
        elif not faster[-1]:
            entry.update(length=None, text=f">{Ts[-1]}")
        else:
            i = max(j for j, f in enumerate(faster) if not f)  # the last length where it is still slower
            ta, tb, ra, rb = Ts[i], Ts[i + 1], ratio[Ts[i]], ratio[Ts[i + 1]]
            frac = math.log(ra) / (math.log(ra) - math.log(rb)) if ra != rb else 0.5
            L = math.exp(math.log(ta) + frac * (math.log(tb) - math.log(ta)))
            entry.update(length=int(round(L)), text=f"≈{int(round(L))}")
        out.append(entry)
    return out


# -- tables ---------------------------------------------------------------------------------------

@dataclass
class Table:
    """A table to render (rich on a terminal, markdown, or plain text): title, header, body, notes below."""

    title: str
    head: List[str]
    body: List[List[str]]
    notes: List[str] = field(default_factory=list)


def fmt_ms(x: Optional[float]) -> str:
    """Milliseconds with about three significant digits."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


FLAG_MARK = {"noisy": "!", "off-trend": "~", "unstable": "?"}


def _cell_text(r: Optional[BenchRow]) -> str:
    if r is None:
        return ""
    if r.status != "ok":
        return r.status
    marks = "".join(FLAG_MARK[f] for f in FLAG_MARK if f in r.flags)
    if r.n <= 1:
        return f"{fmt_ms(r.ms)}{marks}"
    return f"{fmt_ms(r.ms)} [{fmt_ms(r.ms_min)}-{fmt_ms(r.ms_max)}]{marks}"


def _not_measured(rows: Sequence[BenchRow]) -> List[str]:
    """One line per (status, reason): the implementations and where (variant and patterns) it applies."""
    patterns = list(dict.fromkeys(r.pattern for r in rows))
    groups: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        if r.status == "ok":
            continue
        g = groups.setdefault((r.status, r.note), {"labels": [], "where": {}})
        if r.label not in g["labels"]:
            g["labels"].append(r.label)
        where = r.pattern if r.status == "n/a" else f"{r.pattern} T={r.T} {r.mode}"
        w = g["where"].setdefault(r.variant, [])
        if where not in w:
            w.append(where)
    lines = []
    for (status, note), g in groups.items():
        places = ", ".join(f"{n} ({'all patterns' if len(w) == len(patterns) > 1 else ', '.join(w)})"
                           for n, w in g["where"].items())
        lines.append(f"{status}: {', '.join(g['labels'])} on {places}: {note}")
    return lines


def pivot_tables(rows: Sequence[BenchRow], max_width: int = 120, title: str = "") -> List[Table]:
    """The default view: one table per (pattern, mode), a row per (variant, implementation), a column per length,
    cells ``median [min-max]`` ms; length columns split over several tables when they would pass ``max_width``.
    Rows whose every cell is n/a move to the notes (the reason, once)."""
    lengths = sorted({r.T for r in rows})
    groups: Dict[tuple, Dict[tuple, Dict[int, BenchRow]]] = {}
    for r in rows:
        groups.setdefault((r.pattern, r.mode), {}).setdefault((r.variant, r.label), {})[r.T] = r
    shown = {g: {k: c for k, c in by.items() if any(x.status != "n/a" for x in c.values())}
             for g, by in groups.items()}
    name_w = max([len("variant")] + [len(k[0]) for by in shown.values() for k in by])
    impl_w = max([len("impl")] + [len(k[1]) for by in shown.values() for k in by])
    cell_w = max([8] + [len(_cell_text(x)) for by in shown.values() for c in by.values() for x in c.values()])
    per = max(1, (max_width - name_w - impl_w - 4) // (cell_w + 2))
    chunks = [lengths[i:i + per] for i in range(0, len(lengths), per)]
    tables = []
    for (pat, mode), by in shown.items():
        for Ts in chunks:
            body = [[name, impl, *(_cell_text(c.get(T)) for T in Ts)] for (name, impl), c in by.items()]
            if body:
                tables.append(Table(f"{pat} · {mode}" + (f" · {title}" if title else ""),
                                    ["variant", "impl", *(f"T={T}" for T in Ts)], body))
    return tables


def notes(rows: Sequence[BenchRow]) -> List[str]:
    """Legend, flagged cells and everything that was not measured (with the reason)."""
    lines = ["cells: median [min-max] ms per call over >= --rep samples after warm-up (CPU: a sample is the mean of a "
             "block of calls); ! noisy (max > 2x median), "
             f"~ off-trend (> {OFF_TREND}x a longer length, also when re-measured), ? warm-up never settled"]
    ok = [r for r in rows if r.status == "ok"]
    counts = {f: sum(f in r.flags for r in ok) for f in ("noisy", "off-trend", "unstable")}
    if any(counts.values()):
        lines.append("flagged: " + ", ".join(f"{n} {f}" for f, n in counts.items() if n)
                     + f" of {len(ok)} cells (--wide lists every cell with its flags)")
    return lines + _not_measured(rows)


def efficiency_table(eff: Sequence[Dict[str, Any]]) -> Optional[Table]:
    """Efficiency length per variant (rows) and pattern · mode (columns)."""
    if not eff:
        return None
    pats = list(dict.fromkeys(e["pattern"] for e in eff))
    modes = list(dict.fromkeys(e["mode"] for e in eff))
    by = {(e["variant"], e["pattern"], e["mode"]): e["text"] for e in eff}
    names = list(dict.fromkeys(e["variant"] for e in eff))
    body = [[n, *(" / ".join(by.get((n, p, m), "-") for m in modes) for p in pats)] for n in names]
    return Table("efficiency length (CAB)", ["variant", *pats], body,
                 [f"efficiency length ({' / '.join(modes)}): the T from which the variant's fastest attnkit form beats "
                  "the fastest plain softmax (attnkit or peer) at every longer T; ≈ interpolated, >T never, ≤T always"])


WIDE_HEAD = ["variant", "pattern", "T", "mode", "impl", "ran", "median", "min", "q1", "q3", "max", "n", "TF/s",
             "MiB", "x peer", "flags", "status", "note"]


def wide_table(rows: Sequence[BenchRow]) -> Table:
    """Every row with every column (``--wide``)."""
    def num(x, f="{:.3g}"):
        return "" if x is None else f.format(x)
    body = []
    for r in rows:
        xp = r.extra.get("x_best_peer")
        body.append([r.variant, r.pattern, str(r.T), r.mode, r.label, r.backend, fmt_ms(r.ms) if r.ms else "",
                     fmt_ms(r.ms_min) if r.ms_min else "", fmt_ms(r.ms_q1) if r.ms_q1 else "",
                     fmt_ms(r.ms_q3) if r.ms_q3 else "", fmt_ms(r.ms_max) if r.ms_max else "", str(r.n or ""),
                     num(r.tflops), num(r.mem_mib, "{:.0f}"),
                     f"{xp:.2f} {r.extra['best_peer']}" if xp else "", ",".join(r.flags), r.status, r.note])
    return Table("every cell", WIDE_HEAD, body)


# -- files ----------------------------------------------------------------------------------------

def write_json(path: str, rows: Sequence[BenchRow], env: Dict[str, Any], config: Dict[str, Any],
               efficiency: Optional[Sequence[Dict[str, Any]]] = None) -> None:
    """``{"schema", "schema_version", "environment", "config", "rows" (attnkit), "peers", "efficiency"}``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    eff = efficiency_lengths(rows) if efficiency is None else efficiency
    with open(path, "w") as f:
        json.dump({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "environment": env, "config": config,
                   "rows": [asdict(r) for r in rows if r.impl == "attnkit"],
                   "peers": [asdict(r) for r in rows if r.impl != "attnkit"],
                   "efficiency": [{**e, "ratios": {str(k): x for k, x in e["ratios"].items()},
                                   "baseline": {str(k): x for k, x in e["baseline"].items()},
                                   "impl": {str(k): x for k, x in e["impl"].items()}} for e in eff]},
                  f, indent=1, default=str)


def rows_from_dicts(items: Sequence[Dict[str, Any]]) -> List[BenchRow]:
    """BenchRows from JSON records (schema 1 rows, whose peers carry the peer name as ``form``, included)."""
    names = set(BenchRow.__dataclass_fields__)
    out = []
    for d in items:
        r = BenchRow(**{k: v for k, v in d.items() if k in names})
        if "impl" not in d and r.form.startswith(("sdpa-", "flex")):
            r.impl = r.form
        out.append(r)
    return out


def read_json(path: str) -> Dict[str, Any]:
    """A bench results file as ``{"environment", "config", "rows": [BenchRow, ...] (attnkit and peers)}``."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path}: not an attnkit bench results file (expected a JSON object with 'rows')")
    return {"environment": data.get("environment", {}), "config": data.get("config", {}),
            "schema_version": data.get("schema_version", 1),
            "rows": rows_from_dicts(data["rows"]) + rows_from_dicts(data.get("peers", []))}
