"""Block sizes, warps and pipeline stages of the fused kernels.

A choice is keyed by ``(GPU name, phase, padded head dims, dtype, mask kind, normalizer family,
score mods present)`` and never by sequence length, so a model pays tuning once per shape class.
Without tuning the defaults below apply (measured on an H100; see notes/kernels.md). Autotuning
(``ATTNKIT_AUTOTUNE=1`` or :func:`enable`) times every candidate on the first call of a class with
:func:`triton.testing.do_bench` (median) and stores the winner in memory and in
``$ATTNKIT_CACHE_DIR/tuning.json`` (default ``~/.cache/attnkit``).

Phases: ``fwd`` (BM query rows × BN keys), ``dkdv`` (BM query rows × BN keys, one program per key
block), ``dq`` (BM query rows × BN keys, one program per query block).
"""
from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Config", "enable", "enabled", "config", "defaults", "candidates", "clear"]


@dataclass(frozen=True)
class Config:
    BM: int
    BN: int
    warps: int = 4
    stages: int = 2


_state = {"enabled": os.environ.get("ATTNKIT_AUTOTUNE", "0") == "1", "loaded": False}
_choices: Dict[str, Config] = {}
_lock = threading.Lock()


def enable(on: bool = True) -> None:
    """Turn autotuning on or off for this process."""
    _state["enabled"] = bool(on)


def enabled() -> bool:
    return _state["enabled"]


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were imported)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    mod = sys.modules.get("attnkit.ops.softmax.triton.fwd")
    return mod is not None and type(mod.attn_fwd).__name__ == "InterpretedFunction"


def _path() -> str:
    root = os.environ.get("ATTNKIT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "attnkit"))
    return os.path.join(root, "tuning.json")


def _load() -> None:
    if _state["loaded"]:
        return
    _state["loaded"] = True
    try:
        with open(_path()) as f:
            for k, v in json.load(f).items():
                _choices.setdefault(k, Config(**v))
    except (OSError, ValueError, TypeError):
        pass


def _save() -> None:
    try:
        os.makedirs(os.path.dirname(_path()), exist_ok=True)
        with open(_path(), "w") as f:
            json.dump({k: asdict(v) for k, v in _choices.items()}, f, indent=1, sort_keys=True)
    except OSError:
        pass


def clear() -> None:
    """Forget tuned choices of this process (the file stays)."""
    with _lock:
        _choices.clear()


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def key(phase: str, device, D: int, Dv: int, dtype: torch.dtype, mask_kind: str, norm: str, mods: bool) -> str:
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "interpreter"
    return "|".join([gpu, phase, f"D{_pow2(D)}", f"Dv{_pow2(Dv)}", str(dtype).replace("torch.", ""), mask_kind,
                     norm, "mods" if mods else "plain"])


def defaults(phase: str, D: int, Dv: int, dtype: torch.dtype, norm: str = "softmax", mask_kind: str = "") -> Config:
    """Untuned choice (Hopper-class GPUs; FlexAttention's own H100 defaults as the starting point).

    dK/dV at head dim 128 keeps 64 query rows per step also where it spills a few registers inside the
    loop (element masks, score mods: benchmarks/kernel_resources.py): 32 rows measured 0-17 % slower on
    the H100 (notes/kernels.md, v4). Differential attention (``norm="differential"``, ``D`` = one map's
    head dim) carries two accumulators: smaller tiles keep it free of spills on sm_90. A sliding-window
    forward at head dims 65-128 runs 64×64 tiles (two programs per SM, half the masked waste on the
    band's edges): 7-11 % faster than 128×128 at T = 1k-4k, D = 128 on the H100 (notes/kernels.md, v5 sweep);
    at D ≤ 64 its backward also runs 64×64 tiles with 4 warps (13-16 % faster at T = 4k-16k, v6 sweep), and a
    document mask's forward 64×128 tiles with 4 warps (short rows; v6 sweep)."""
    if interpreting():
        return {"fwd": Config(32, 16), "dkdv": Config(16, 32), "dq": Config(32, 16)}[phase]
    d = max(_pow2(D), _pow2(Dv))
    if dtype in (torch.float32, torch.float64):
        return {"fwd": Config(64, 32, 4, 2), "dkdv": Config(32, 64, 4, 2), "dq": Config(64, 32, 4, 2)}[phase]
    if norm == "differential" and d <= 128:
        return {"fwd": Config(128, 64, 8, 3), "dkdv": Config(32, 128, 8, 3), "dq": Config(128, 64, 8, 3)}[phase]
    window = "sliding_window" in mask_kind and norm == "softmax"
    if phase == "fwd":
        if window and d <= 128:
            return Config(64, 64, 4, 3)
        if "document" in mask_kind and norm == "softmax" and d <= 64:
            return Config(64, 128, 4, 3)
        if d <= 64:
            return Config(128, 128, 4, 3)
        if d <= 128:
            return Config(128, 128, 8, 3)  # autotuned on H100 (bf16, T = 16k): beats (128, 64, 8, 3)
        return Config(64, 32, 4, 3)
    if d <= 64:
        if window:
            return Config(64, 64, 4, 3)
        return Config(64, 128, 8, 3) if phase == "dkdv" else Config(128, 64, 8, 3)
    if d <= 128:
        return Config(64, 128, 8, 3) if phase == "dkdv" else Config(128, 64, 8, 3)
    return Config(64, 64, 4, 2)


def candidates(phase: str, D: int, Dv: int, dtype: torch.dtype, norm: str = "softmax",
               mask_kind: str = "") -> List[Config]:
    """A small search space around the default (each entry costs one compile)."""
    base = defaults(phase, D, Dv, dtype, norm, mask_kind)
    d = max(_pow2(D), _pow2(Dv))
    if d > 128 or dtype in (torch.float32, torch.float64):
        extra = [Config(64, 32, 4, 2), Config(32, 64, 4, 2), Config(64, 64, 8, 2)]
    elif norm == "differential":
        extra = {"fwd": [Config(64, 64, 4, 3), Config(128, 32, 8, 3)],
                 "dkdv": [Config(64, 64, 8, 3), Config(32, 64, 4, 3)],
                 "dq": [Config(128, 32, 8, 3), Config(64, 64, 4, 3)]}[phase]
    elif phase == "fwd":
        extra = [Config(128, 128, 8, 3), Config(128, 64, 8, 3), Config(64, 64, 4, 3)] if d > 64 else \
            [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3)]
    elif phase == "dkdv":
        extra = [Config(64, 128, 8, 3), Config(32, 128, 8, 3), Config(32, 128, 4, 3)]
    else:
        extra = [Config(128, 32, 4, 3), Config(64, 64, 4, 3)]
    return [base] + [c for c in extra if c != base]


def config(phase: str, device, D: int, Dv: int, dtype: torch.dtype, mask_kind: str, norm: str, mods: bool,
           runner: Optional[Callable[[Config], Callable[[], object]]] = None) -> Config:
    """The configuration for this shape class: cached choice, else tuned (when enabled), else default.

    ``runner(cfg)`` returns a zero-argument callable that launches the phase with ``cfg``.
    """
    if interpreting():
        return defaults(phase, D, Dv, dtype, norm, mask_kind)
    _load()
    k = key(phase, device, D, Dv, dtype, mask_kind, norm, mods)
    with _lock:
        if k in _choices:
            return _choices[k]
    if not (_state["enabled"] and runner is not None):
        return defaults(phase, D, Dv, dtype, norm, mask_kind)
    from triton.testing import do_bench  # autotuning runs on CUDA only (the interpreter takes the defaults)
    best: Tuple[float, Optional[Config]] = (float("inf"), None)
    for c in candidates(phase, D, Dv, dtype, norm, mask_kind):
        try:
            fn = runner(c)
            ms = do_bench(fn, warmup=5, rep=25, return_mode="median")
        except Exception:  # noqa: BLE001 - a candidate that does not compile (resources) is skipped
            continue
        if ms < best[0]:
            best = (ms, c)
    choice = best[1] or defaults(phase, D, Dv, dtype, norm, mask_kind)
    with _lock:
        _choices[k] = choice
        _save()
    return choice


def remember(phase: str, device, D: int, Dv: int, dtype: torch.dtype, mask_kind: str, norm: str, mods: bool,
             cfg: Config) -> None:
    """Record a working choice for this shape class (used after an out-of-resources step-down)."""
    if interpreting():
        return
    with _lock:
        _choices[key(phase, device, D, Dv, dtype, mask_kind, norm, mods)] = cfg
