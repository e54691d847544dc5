"""Timing with spread, warm-up until stable, and peak memory: the measurement layer of ``attnkit bench``.

:func:`measure` runs ``fn`` until its call times settle (warm-up), then samples it with
``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed between calls, every sample kept) or
``torch.utils.benchmark.Timer.blocked_autorange`` elsewhere (blocks of calls lasting :data:`BLOCK_MS`, the block
size taken from the warm-up; all threads, accelerator synchronized), and
returns a :class:`Timing`: every sample in milliseconds, min / quartiles / median / max and flags.

:func:`peak_memory` is the peak *extra* memory of one call over what was allocated before it: on CUDA
``max_memory_allocated`` minus the allocation at entry (the caching allocator's own count); on CPU the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set at entry, after
``malloc_trim`` hands freed heap back to the OS (Linux; None where /proc cannot be used).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["sync", "Timing", "warm_up", "measure", "time_ms", "peak_memory", "cpu_peak_supported",
           "NOISY_RATIO", "BLOCK_MS"]

#: a cell whose slowest sample exceeds this multiple of its median is flagged ``noisy``
NOISY_RATIO = 2.0


def sync(device) -> None:
    """Wait for the device (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: List[float], q: float) -> float:
    """Linear-interpolated quantile of sorted ``xs``."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Samples of one measurement (ms per call) and how they were taken.

    ``samples`` are per-call times (CUDA: one call each; CPU: the mean call time of each block of
    up to ``per_sample`` calls that ``blocked_autorange`` chose). ``warmup_calls`` untimed calls ran first;
    ``stable`` says whether their times settled within the warm-up budget.
    """

    samples: List[float]
    warmup_calls: int = 0
    stable: bool = True
    method: str = ""
    per_sample: int = 1
    flags: List[str] = field(default_factory=list)
    peak_bytes: Optional[int] = None  #: peak extra memory of one call (see :func:`measure`'s ``memory``)

    def __post_init__(self):
        if not self.samples:
            raise ValueError("a Timing needs at least one sample")
        s = sorted(self.samples)
        self.min, self.max = s[0], s[-1]
        self.median = statistics.median(s)
        self.q1, self.q3 = _quantile(s, 0.25), _quantile(s, 0.75)
        if not self.stable and "unstable" not in self.flags:
            self.flags.append("unstable")
        if self.max > NOISY_RATIO * self.median and "noisy" not in self.flags:
            self.flags.append("noisy")

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(min=self.min, median=self.median, max=self.max, q1=self.q1, q3=self.q3, n=self.n)
        return d


def _settle(timed: Callable[[], float], *, min_calls: int, max_calls: int, max_s: float, rel_tol: float,
            primed: bool) -> Tuple[int, bool, List[float]]:
    """The warm-up loop of :func:`warm_up` over ``timed()`` (one call, returns its ms): ``(calls, stable, times of
    the counted calls)``; when stable, the last two times are the calls that showed it."""
    times: List[float] = []  # the counted calls
    t_start = time.perf_counter()
    calls = 1 if primed else 0
    settled = []  # per counted call: no faster than (1 - rel_tol) x the fastest counted call before it
    while True:
        ms = timed()
        calls += 1
        if calls == 1:  # the uncounted first call
            continue
        settled.append(bool(times) and ms >= (1 - rel_tol) * min(times))
        times.append(ms)
        if calls >= min_calls and settled[-1] and (len(settled) == 2 or settled[-2]):
            return calls, True, times
        if calls >= max_calls or time.perf_counter() - t_start > max_s:
            return calls, False, times


def _host_timed(fn: Callable[[], Any], dev: torch.device) -> Callable[[], float]:
    def timed() -> float:
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        return (time.perf_counter() - t0) * 1e3
    return timed


def warm_up(fn: Callable[[], Any], device="cpu", *, min_calls: int = 2, max_calls: int = 50, max_s: float = 2.0,
            rel_tol: float = 0.15, primed: bool = False) -> tuple:
    """Call ``fn`` until its call time stops falling: the newest call is no faster than ``1 - rel_tol`` times the
    fastest call before it, and neither was the call before it (unless it was the first timed one). The first call,
    which compiles and fills caches, never counts (``primed``: the caller has made it already). At least
    ``min_calls`` calls in all (a primed call included), at most ``max_calls`` or ``max_s`` seconds. Noise does not
    prolong the warm-up (it shows in the samples' spread); a trend does. Returns ``(calls, stable, last_ms)``."""
    calls, stable, times = _settle(_host_timed(fn, torch.device(device)), min_calls=min_calls, max_calls=max_calls,
                                   max_s=max_s, rel_tol=rel_tol, primed=primed)
    return calls, stable, statistics.median(times[-2:]) if stable else times[-1]


#: on a CPU a sample is the mean of enough calls to last this long (one call when a call takes longer): the timer's
#: own ~1 us per sample is then at most 0.1% of it
BLOCK_MS = 1.0


def _timer(fn: Callable[[], Any], number: int):
    """``torch.utils.benchmark.Timer`` for ``fn()`` on all of torch's threads whose ``blocked_autorange`` runs blocks
    of ``number`` calls: the block size comes from the warm-up's call time instead of Timer's own estimate (1, 10,
    100, ... untimed calls until a block is 10^4 x the timer's overhead, run again on every call)."""
    from torch.utils.benchmark import Timer

    class BlockTimer(Timer):
        def _estimate_block_size(self, min_run_time: float) -> int:
            return number
    return BlockTimer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def measure(fn: Callable[[], Any], device="cpu", *, min_rep: int = 5, min_time_s: float = 0.1,
            warmup_max_s: float = 2.0, warmup_min_calls: int = 2, primed: bool = False,
            memory: bool = False) -> Timing:
    """Warm ``fn`` up until stable (:func:`warm_up`; ``primed``: its first call was made already), then sample it at
    least ``min_rep`` times and for at least ``min_time_s`` seconds: ``triton.testing.do_bench`` on CUDA (every call
    timed with CUDA events), ``torch.utils.benchmark.Timer.blocked_autorange`` elsewhere (all of torch's threads,
    accelerator synchronized; one block of :data:`BLOCK_MS` per run, as many runs as the sample count needs). On a
    CPU the warm-up times its calls through the same Timer, and where a sample is one call, the two calls that showed
    the times settled are the first two samples (the calls before them, still getting faster, are dropped).
    ``memory``: the second call of all is made through :func:`peak_memory` (``Timing.peak_bytes``), uncounted by
    the warm-up (it hands freed memory back to the OS first, so it runs slower)."""
    dev = torch.device(device)
    peak_bytes = None
    if memory:  # the second call (caches filled by the first) measures the peak memory; the warm-up starts after it
        if not primed:
            sync(dev)
            fn()
        peak_bytes, primed = peak_memory(fn, dev), True
    min_rep = max(1, int(min_rep))
    if dev.type == "cuda":
        calls, stable, last_ms = warm_up(fn, dev, min_calls=warmup_min_calls, max_s=warmup_max_s, primed=primed)
        calls += int(memory)  # every untimed call: the first, the memory call, the warm-up's
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            rep_ms = max(min_time_s * 1e3, 1.2 * min_rep * max(last_ms, 1e-3))
            samples = list(do_bench(fn, warmup=1, rep=rep_ms, return_mode="all"))
            while len(samples) < min_rep:  # do_bench's estimate ran long: top up with single calls
                samples += list(do_bench(fn, warmup=1, rep=1, return_mode="all"))
            return Timing([float(s) for s in samples], calls, stable, "triton.testing.do_bench",
                          peak_bytes=peak_bytes)
        samples, number = [], 1
        timer = _timer(fn, number)
    else:
        # the warm-up times single calls exactly as the samples do (Timer's loop, garbage collection off)
        one = _timer(fn, 1)
        calls, stable, times = _settle(lambda: one.blocked_autorange(min_run_time=0.0).times[0] * 1e3,
                                       min_calls=warmup_min_calls, max_calls=50, max_s=warmup_max_s, rel_tol=0.15,
                                       primed=primed)
        last_ms = statistics.median(times[-2:]) if stable else times[-1]
        number = max(1, math.ceil(BLOCK_MS / max(last_ms, 1e-6)))
        samples, calls = [], calls + int(memory)  # every untimed call: the first, the memory call, the warm-up's
        if stable and number == 1 and calls - 2 >= warmup_min_calls:
            samples, calls = times[-2:], calls - 2  # the two calls that showed the times settled are samples
        timer = one if number == 1 else _timer(fn, number)
    while len(samples) < min_rep or sum(samples) * number < min_time_s * 1e3:
        samples += [t * 1e3 for t in timer.blocked_autorange(min_run_time=0.0).times]  # one block per run
    return Timing(samples, calls, stable, "torch.utils.benchmark.blocked_autorange", number,
                  peak_bytes=peak_bytes)


def time_ms(fn: Callable[[], Any], device="cpu", warmup: int = 2, rep: int = 5, min_time_s: float = 0.0) -> float:
    """Median milliseconds per call of ``fn`` (:func:`measure` with at least ``warmup`` warm-up calls and ``rep``
    samples)."""
    return measure(fn, device, min_rep=rep, min_time_s=min_time_s, warmup_min_calls=warmup).median


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_supported() -> bool:
    """Whether the peak resident set can be reset and read (Linux /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def peak_memory(fn: Callable[[], Any], device="cpu") -> Optional[int]:
    """Peak extra bytes allocated while running ``fn()`` once (None where it cannot be measured)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    if not cpu_peak_supported():
        return None
    import gc
    gc.collect(1)  # the young generations (a full collection of a large heap costs ~0.3 s per call)
    _malloc_trim()  # hand freed heap back to the OS so the baseline is what is really live
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _status_kib("VmHWM") - base) * 1024
