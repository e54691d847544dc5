"""Cross-form checks behind ``attnkit check``: every form of a variant against its float64 reference form
(run on the inputs as rounded to the dtype checked, so errors measure the computation, not the inputs),
on fresh random inputs, outputs and gradients (w.r.t. every floating input and learnable parameter)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..catalog.registry import PATTERNS, Spec, Variant
from ..ops.utils.tiles import streaming_blocks
from .calls import TOLERANCE, first, leaves, rel_err

__all__ = ["CheckRow", "check_variant", "TOLERANCE", "rel_err"]

@dataclass
class CheckRow:
    variant: str
    pattern: str
    form: str
    backend: str
    dtype: str
    out_err: Optional[float] = None
    grad_err: Optional[float] = None
    tol: float = 0.0
    status: str = "pass"  # pass / FAIL / n/a
    note: str = ""


def _cast(inputs: Dict[str, Any], dtype) -> Dict[str, Any]:
    """Copy of the inputs in ``dtype``: floating tensors become fresh leaves requiring grad; modules
    (score mods, normalizers) are deep-copied with their parameters in ``dtype`` (float32 at least)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype).requires_grad_(True)
        elif isinstance(v, torch.nn.Module):
            v = copy.deepcopy(v).to(torch.float64 if dtype == torch.float64 else torch.float32)
        out[k] = v
    return out


def _run(variant: Variant, inputs: Dict[str, Any], form: str, backend: str, cot: torch.Tensor):
    out = first(variant.fn(**inputs, form=form, backend=backend))
    wrt = [t for t in leaves(inputs) if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, cot.to(out.dtype), allow_unused=True)
    return out, grads


def check_variant(variant: Variant, *, device="cpu", dtype=torch.float32, patterns: Optional[Sequence[str]] = None,
                  backends: Sequence[str] = ("reference",), T: int = 37, B: int = 2, Hq: int = 4, Hkv: int = 2,
                  D: int = 16) -> List[CheckRow]:
    """Compare every form (and backend) of ``variant`` with its float64 ``reference_form`` on each pattern.

    Sizes are deliberately awkward: T not a multiple of any block, GQA (Hq/Hkv = 2), Lq = T // 4 for cross.
    """
    rows: List[CheckRow] = []
    for pat in patterns or PATTERNS:
        spec = Spec.for_pattern(pat, T, B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=D + 3, dtype=torch.float64, device=str(device))
        if variant.unsupported(spec, variant.reference_form):
            rows.append(CheckRow(variant.name, pat, "*", "-", "-", status="n/a",
                                 note=variant.unsupported(spec, variant.reference_form)))
            continue
        base = variant.make_inputs(spec)
        refs: Dict[torch.dtype, Any] = {}  # float64 reference of the inputs as rounded to each dtype
        cot = None
        for form in variant.forms:
            reason = variant.unsupported(spec, form)
            if reason:
                rows.append(CheckRow(variant.name, pat, form, "-", "-", status="n/a", note=reason))
                continue
            for backend in backends:
                if backend != "reference" and (form not in ("streaming", "chunk") or backend not in variant.backends):
                    continue
                for dt in dict.fromkeys([torch.float64, dtype]):
                    if backend != "reference" and dt == torch.float64:
                        continue
                    row = CheckRow(variant.name, pat, form, backend, str(dt).replace("torch.", ""),
                                   tol=TOLERANCE[dt])
                    try:
                        if dt not in refs:
                            # the reference sees the inputs after rounding to dt: errors measure the computation,
                            # not the rounding of the inputs every implementation shares (ReLU's kink at 0, ...)
                            ref_inputs = _cast(_cast(base, dt), torch.float64)
                            if cot is None:
                                cot = torch.randn_like(first(variant.fn(**ref_inputs, form=variant.reference_form,
                                                                        backend="reference")))
                            refs[dt] = _run(variant, ref_inputs, variant.reference_form, "reference", cot)
                        ref_out, ref_grads = refs[dt]
                        with streaming_blocks(8, 16):  # several tiles, none dividing T
                            out, grads = _run(variant, _cast(base, dt), form, backend, cot)
                        row.out_err = rel_err(out, ref_out)
                        pairs = [(g, r) for g, r in zip(grads, ref_grads) if r is not None]
                        if any(g is None for g, _ in pairs):
                            raise RuntimeError("a gradient the reference has is missing")
                        row.grad_err = max((rel_err(g, r) for g, r in pairs), default=0.0)
                        ok = row.out_err <= row.tol and row.grad_err <= row.tol
                        row.status = "pass" if ok else "FAIL"
                    except (RuntimeError, ValueError, TypeError) as e:
                        row.status, row.note = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    rows.append(row)
    return rows
