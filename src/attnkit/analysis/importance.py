"""Head importance: by gradient (Michel, Levy, Neubig 2019, "Are Sixteen Heads Really Better than One?") and by
ablation, for attnkit layers and Hugging Face models using the attnkit plug-in.

Every attention layer's per-head output ``o_h`` (before the output projection) is multiplied by a gate ``ξ_h``
(:func:`head_gates`, through :func:`attnkit.analysis.hooks.intercept`). With all gates at 1 the model is
unchanged, and

* gradient importance ``I_h = E_batches |∂L/∂ξ_h|`` at ξ = 1 (Michel et al.; pass one example per batch for their
  per-example expectation), optionally divided by the layer's ℓ2 norm (their layer-wise normalization);
* ablation importance ``ΔL_h = L(ξ_h = 0) − L(ξ = 1)`` (head h of that layer off, all else on), averaged over batches.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .hooks import intercept

__all__ = ["head_gates", "gradient_importance", "ablation_importance"]


@contextlib.contextmanager
def head_gates(model: nn.Module, values: Optional[Dict[str, Tensor]] = None) -> Iterator[Dict[str, Tensor]]:
    """Gate every attention layer's heads inside the block. ``values``: ``{layer name: [H] gates}`` to use; layers
    not given get ones that require grad, created at their first call. Yields the dict of gates in use."""
    gates: Dict[str, Tensor] = dict(values or {})

    def gate(name, rec, out, head_dim):
        H = out.shape[head_dim]
        if name not in gates:
            gates[name] = torch.ones(H, dtype=out.dtype, device=out.device, requires_grad=True)
        xi = gates[name]
        if xi.shape != (H,):
            raise ValueError(f"gates of layer {name!r} must have shape ({H},), got {tuple(xi.shape)}")
        shape = [1] * out.dim()
        shape[head_dim] = H
        return out * xi.to(out.dtype).view(shape)

    with intercept(model, gate):
        yield gates


def gradient_importance(model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor], batches: Iterable,
                        normalize: bool = False) -> Dict[str, Tensor]:
    """``{layer: [H]}`` mean over ``batches`` of ``|∂ loss_fn(model, batch) / ∂ξ_h|`` at ξ = 1 (ℓ2-normalized per
    layer when ``normalize``). Parameter gradients are not kept."""
    total: Dict[str, Tensor] = {}
    n = 0
    for batch in batches:
        with head_gates(model) as gates:
            loss = loss_fn(model, batch)
            names = list(gates)
            grads = torch.autograd.grad(loss, [gates[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            g = torch.zeros_like(gates[k]) if g is None else g.detach().abs()
            total[k] = total.get(k, 0) + g
        n += 1
    if n == 0:
        raise ValueError("batches is empty")
    out = {k: v / n for k, v in total.items()}
    if normalize:
        out = {k: v / v.norm().clamp(min=torch.finfo(v.dtype).tiny) for k, v in out.items()}
    return out


@torch.no_grad()
def ablation_importance(model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor],
                        batches: Iterable) -> Dict[str, Tensor]:
    """``{layer: [H]}`` mean over ``batches`` of ``L(head h of the layer off) − L(all heads on)``."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    with head_gates(model) as gates:
        base = [float(loss_fn(model, b)) for b in batches]
        shapes = {k: v.shape[0] for k, v in gates.items()}
    out: Dict[str, Tensor] = {}
    for name, H in shapes.items():
        delta = torch.zeros(H, dtype=torch.float64)
        for h in range(H):
            xi = torch.ones(H)
            xi[h] = 0.0
            with head_gates(model, {name: xi}):
                delta[h] = sum(float(loss_fn(model, b)) - l0 for b, l0 in zip(batches, base)) / len(batches)
        out[name] = delta
    return out
