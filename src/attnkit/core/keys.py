"""Cache keys of parameter values: what a cached kernel plan may assume about a tensor it was built from."""
from __future__ import annotations

from typing import Hashable

from torch import Tensor

#: CPU tensors without gradient up to this many entries are keyed by value (re-read on every call)
SMALL = 256


def value_key(t) -> Hashable:
    """Numbers and small CPU tensors without gradient by value: a plan built from them stays valid (and is rebuilt
    when they change in place). Other tensors by identity, storage and version counter: an in-place update
    (``copy_``, ``load_state_dict``, an optimizer step) or a new ``.data`` gives a new key; a plan keyed this way
    re-reads their values on every call where they may change (see :func:`changes`)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        return ("f", float(t))
    if t.device.type == "cpu" and not t.requires_grad and t.numel() <= SMALL:
        return ("v", t.dtype, tuple(t.shape), tuple(t.reshape(-1).tolist()))
    return ("t", id(t), t.data_ptr(), t._version, t.requires_grad, tuple(t.shape))


def changes(t) -> bool:
    """Whether a parameter value may change between calls without changing its :func:`value_key` (values of such
    tensors are re-read on every call; everything else is copied to the device once)."""
    return isinstance(t, Tensor) and (t.requires_grad or t.device.type != "cpu" or t.numel() > SMALL)
