"""The public entry points of the linear / recurrent family: :func:`linear_attention` and :func:`linear_step`.

They pick the backend: the fused Triton kernels (:mod:`attnkit.ops.linear.triton`: ``chunk`` for the chunk form,
``fused_recurrent`` for the recurrent form and decode steps) where they compute exactly the requested function,
else the reference forms (:mod:`attnkit.ops.linear.functional`), and record what ran (:func:`attnkit.last_backend`).
``backend="auto"`` takes the kernels on CUDA (on CPU the reference; Triton's interpreter only with
``backend="triton"``) and warns once when a CUDA call falls back to the reference;
``backend="triton"`` raises ValueError naming what the kernels support.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..core.record import record_backend
from ..core.validation import check_choice
from ..ops.linear import functional as Fn
from ..ops.linear.feature_maps import FeatureMap, as_feature_map
from ..ops.utils import tuning

__all__ = ["linear_attention", "linear_step", "KERNEL_RULES", "KERNEL_SUPPORTED"]

#: rules the fused kernels compute (log_linear and aaren run on the reference forms)
KERNEL_RULES = ("linear", "retention", "lightning", "scalar_gate", "gla", "hgrn2", "delta", "gated_delta", "kda")
KERNEL_SUPPORTED = (f"rules {', '.join(KERNEL_RULES)}; forms 'chunk' and 'recurrent' (and linear_step); causal; "
                    "feature dims up to 256; float16 / bfloat16 / float32 on CUDA (float64, float32, float16 under "
                    "TRITON_INTERPRET=1); no return_weights")
#: chunk sizes the kernels take (any other chunk size computes the same function: the kernel default is used)
KERNEL_CHUNKS = (16, 32, 64)

_warned: set = set()


def _why_not_fused(rule: str, form: str, causal: bool, return_weights: bool, q: Optional[Tensor],
                   feature_map) -> str:
    """Why the fused kernels cannot compute this call ("" when they can); cheap checks only."""
    if rule not in KERNEL_RULES:
        return f"rule {rule!r} has no fused kernel"
    if form not in ("chunk", "recurrent"):
        return f"form {form!r} (the kernels run 'chunk' and 'recurrent')"
    if not causal:
        return "causal=False (bidirectional)"
    if return_weights:
        return "return_weights=True (the parallel form builds the matrix)"
    if q is None or not isinstance(q, Tensor):
        return "q is not a tensor"
    interp = tuning.interpreting()
    if q.device.type != "cuda" and not interp:
        return f"device {q.device} (CUDA tensors, or TRITON_INTERPRET=1 on CPU)"
    if q.dtype == torch.float64 and not interp:
        return "float64 on CUDA"
    if q.dtype == torch.bfloat16 and interp:
        return "bfloat16 under Triton's interpreter"
    fm = as_feature_map(feature_map)
    if fm.dim(q.shape[-1]) > 256:
        return f"feature dim {fm.dim(q.shape[-1])} > 256 (feature map {fm.name!r})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return ""


def linear_attention(
    q: Optional[Tensor],
    k: Optional[Tensor],
    v: Tensor,
    *,
    rule: str,
    form: str = "chunk",
    gate: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    feature_map: Union[None, str, FeatureMap] = None,
    normalize: bool = False,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    initial_state: Fn.State = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    layout: str = "bhtd",
    qk_l2norm: bool = False,
    causal: bool = True,
    level_weights: Optional[Tensor] = None,
    base: Optional[str] = None,
    query: Optional[Tensor] = None,
    layer_idx: int = 0,
    num_layers: int = 1,
    return_weights: Optional[bool] = None,
    backend: str = "auto",
    return_attention: Optional[bool] = None,
):
    """Linear / recurrent attention with a named state rule: ``S_t = A_t S_{t−1} + B_t``, ``o_t = q_tᵀ S_t``.

    Every argument as in :func:`attnkit.ops.linear.functional.linear_attention` (the rules, shapes and forms are
    documented there), plus ``backend``: ``'auto'`` (the fused kernels on CUDA where they apply, else the
    reference), ``'triton'`` (the kernels or a ValueError), ``'reference'`` (plain PyTorch, any device and dtype).
    Returns ``(o, final_state)`` (plus the implicit attention matrix when ``return_weights``). ``rule`` may be a
    deprecated name of ``Fn.RULE_ALIASES`` and ``return_attention`` is the deprecated name of ``return_weights``
    (DeprecationWarning each; giving both flags is a TypeError).
    """
    return_weights = Fn.weights_flag(return_weights, return_attention)
    rule, base = Fn.rule_name(rule), Fn.rule_name(base, "base")
    check_choice("backend", backend, ("auto", "reference", "triton"))
    kw = dict(rule=rule, form=form, gate=gate, beta=beta, feature_map=feature_map, normalize=normalize, scale=scale,
              chunk_size=chunk_size, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, layout=layout, qk_l2norm=qk_l2norm, causal=causal, level_weights=level_weights,
              base=base, query=query, layer_idx=layer_idx, num_layers=num_layers, return_weights=return_weights)
    cpu_auto = backend == "auto" and not (isinstance(q, Tensor) and q.device.type == "cuda")
    if backend != "reference" and not cpu_auto:  # off CUDA, the interpreter runs only when asked for by name
        why = _why_not_fused(rule, form, causal, return_weights, q, feature_map)
        if not why:
            return _fused(q, k, v, **kw)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this linear_attention call: {why}. "
                             f"Supported: {KERNEL_SUPPORTED}")
        if isinstance(q, Tensor) and q.device.type == "cuda" and why not in _warned:
            _warned.add(why)
            warnings.warn(f"attnkit: no fused linear kernel for this call ({why}); running the plain-PyTorch "
                          "reference (slow path)", RuntimeWarning, stacklevel=2)
    out = Fn.linear_attention(q, k, v, **kw, backend="reference")
    record_backend("reference", form)
    return out


def _fused(q, k, v, *, rule, form, gate, beta, feature_map, normalize, scale, chunk_size, initial_state,
           output_final_state, cu_seqlens, layout, qk_l2norm, causal, level_weights, base, query, layer_idx,
           num_layers, return_weights) -> Tuple[Tensor, Optional[Tensor]]:
    """One call through the kernels, validated as the reference validates it."""
    from ..ops.linear.triton import chunk, fused_recurrent

    if form not in Fn.FORMS:
        raise ValueError(f"form must be one of {Fn.FORMS} for rule {rule!r}, got {form!r}")
    Fn._check_chunk_size(chunk_size)
    if query is not None or base is not None or level_weights is not None:
        raise ValueError(f"query=, base= and level_weights= belong to rules 'aaren' / 'log_linear', not {rule!r}")
    spec = Fn.RULES[rule]
    x = Fn.validate(spec, q, k, v, gate=gate, beta=beta, feature_map=feature_map, normalize=normalize, scale=scale,
                    layout=layout, qk_l2norm=qk_l2norm, layer_idx=layer_idx, num_layers=num_layers)
    n_states = x.B
    if cu_seqlens is not None:
        n_states = len(Fn._check_cu_seqlens(cu_seqlens, x.B, x.T)) - 1
        cu_seqlens = cu_seqlens.to(device=x.q.device)
    init = None
    if initial_state is not None:
        init = Fn._check_state(initial_state, n_states, x.H, x.Dk, x.Dv + int(x.normalize), torch.float32
                               if x.q.dtype != torch.float64 else torch.float64, x.q.device, x.normalize)
    qq, kk, gate_t = x.q, x.k, x.gate
    if spec.name == "hgrn2":  # keys from the gate, queries on the state's heads
        kk = -torch.expm1(gate_t.to(torch.float32 if qq.dtype != torch.float64 else torch.float64)).to(qq.dtype)
        qq = Fn.expand_heads(qq, x.H)
    elif x.fm.name != "identity":
        qq, kk = x.fm(qq), x.fm(kk)
    common = dict(gate=gate_t, beta=x.beta, delta=spec.delta, scale=x.scale, initial_state=init,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, qk_l2norm=x.qk_l2norm,
                  normalize=x.normalize)
    if form == "chunk":
        o, final = chunk(qq, kk, x.v, chunk_size=chunk_size if chunk_size in KERNEL_CHUNKS else None, **common)
    else:
        o, final = fused_recurrent(qq, kk, x.v, **common)
    record_backend("triton", f"fused-{form}")
    if layout == "bthd":
        o = o.transpose(1, 2)
    return o, (final if output_final_state else None)


def linear_step(state: Fn.State, q: Optional[Tensor], k: Optional[Tensor], v: Tensor, *, rule: str,
                gate: Optional[Tensor] = None, beta: Optional[Tensor] = None, level_weights: Optional[Tensor] = None,
                base: Optional[str] = None, backend: str = "auto", **kwargs) -> Tuple[Tensor, Fn.State]:
    """Decode one token: ``(o_t, new_state)`` (see :func:`attnkit.ops.linear.functional.step`); the fused recurrent
    kernel reads and writes the state once on CUDA."""
    return Fn.step(state, q, k, v, rule=rule, gate=gate, beta=beta, level_weights=level_weights, base=base,
                   attention=lambda *a, **kw: linear_attention(*a, **kw, backend=backend), **kwargs)
