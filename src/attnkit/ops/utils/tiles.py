"""Tile sizes of the plain-PyTorch reference forms (softmax streaming blocks, linear chunks in the catalog).

They are a context-local setting, not a module global: ``with streaming_blocks(16, 24): ...`` changes them
for the code inside the block in this thread / task only (``attnkit check`` uses small odd tiles so every
check crosses block boundaries).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Tuple

#: (query rows, key columns) of a streaming tile; the linear catalog's chunk follows the key-column size
DEFAULT_TILES: Tuple[int, int] = (512, 512)
_TILES: contextvars.ContextVar = contextvars.ContextVar("attnkit_reference_tiles", default=DEFAULT_TILES)


def reference_tiles() -> Tuple[int, int]:
    """The current ``(block_q, block_k)`` of the reference forms."""
    return _TILES.get()


@contextlib.contextmanager
def streaming_blocks(block_q: int, block_k: int) -> Iterator[None]:
    """Use ``block_q × block_k`` tiles in the reference forms inside the ``with`` block (this context only)."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    token = _TILES.set((block_q, block_k))
    try:
        yield
    finally:
        _TILES.reset(token)
