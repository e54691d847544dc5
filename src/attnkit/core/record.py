"""What ran: the backend and form of the most recent call, per thread, and a ``record()`` context.

    out = attnkit.attention(q, k, v, mask="causal")
    attnkit.last_backend()            # "triton/fused", "sdpa-cudnn/fused", "reference/streaming", ...

    with attnkit.record() as r:       # every call inside, in order
        model(x)
    r.calls                           # ["triton/fused", "triton/fused-linear", ...]

The state is thread-local (threads, devices and distributed ranks each see their own), so it never crosses
between concurrent callers.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional

_local = threading.local()


class Record:
    """The ``"<backend>/<form>"`` strings of the calls made inside a :func:`record` block, in order."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def __repr__(self) -> str:
        return f"Record({self.calls})"


def record_backend(backend: str, form: str) -> None:
    """Note that a call ran ``backend`` in ``form`` (what :func:`last_backend` and :func:`record` report)."""
    name = f"{backend}/{form}"
    _local.last = name
    for r in getattr(_local, "records", ()):
        r.calls.append(name)


def last_backend() -> Optional[str]:
    """``"<backend>/<form>"`` of the most recent attnkit call in this thread (None before any)."""
    return getattr(_local, "last", None)


@contextlib.contextmanager
def record() -> Iterator[Record]:
    """Collect what every attnkit call inside the block ran (this thread only; blocks may nest)."""
    r = Record()
    stack = getattr(_local, "records", None)
    if stack is None:
        stack = _local.records = []
    stack.append(r)
    try:
        yield r
    finally:
        stack.remove(r)
