"""Registers, spills and shared memory of the fused kernels for a Hopper GPU, compiled on this CPU machine.

No GPU needed: every launch of a forward+backward call on CPU tensors is intercepted and compiled for
``sm_90`` with Triton's own ptxas; ``cuobjdump`` (shipped with Triton) reads the resources back.

    python benchmarks/kernel_resources.py [--mask causal] [--dim 128] [--mods softcap] [--sass DIR]

Prints one line per kernel phase: registers per thread, spill stores/loads (bytes of stack), shared memory.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as tcompile, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import attnkit  # noqa: E402
from attnkit.ops.softmax import fused as A  # noqa: E402
from attnkit.ops.utils import tuning  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(kernel, args, cx: dict, warps: int, stages: int):
    """Compile ``kernel`` for sm_90 with the specializations Triton would pick for ``args``."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(cx, num_warps=warps, num_stages=stages, debug=False)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return tcompile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def resources(cubin: bytes, path: str) -> dict:
    """Registers and stack bytes per thread from ``cuobjdump --dump-resource-usage``."""
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                         text=True).stdout
    get = lambda name: int(m.group(1)) if (m := re.search(name + r"[:=]\s*(\d+)", out)) else -1  # noqa: E731
    return dict(regs=get("REG"), stack=get("STACK"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", default="causal", help="full | causal | window | document | prefix")
    ap.add_argument("--mods", default="", help="softcap | alibi | ''")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--config", nargs="*", default=[], metavar="PHASE=BM,BN,WARPS,STAGES",
                    help="force a phase's configuration, e.g. dkdv=32,128,8,3")
    ap.add_argument("--sass", default=None, help="write each phase's SASS into this folder")
    ap.add_argument("--diff", action="store_true", help="differential attention (two maps of head dim --dim/2)")
    a = ap.parse_args(argv)
    T, D, H = a.length, a.dim, 2
    mask = {"full": attnkit.masks.full, "causal": attnkit.masks.causal,
            "window": attnkit.masks.sliding_window(256), "prefix": attnkit.masks.prefix_lm(T // 4),
            "document": attnkit.masks.document(torch.arange(T) // (T // 8)) & attnkit.masks.causal}[a.mask]
    mod = {"": None, "softcap": attnkit.scores.softcap(30.0), "alibi": attnkit.scores.alibi()}[a.mods]
    forced = {c.split("=")[0]: tuning.Config(*(int(x) for x in c.split("=")[1].split(","))) for c in a.config}
    base = tuning.defaults
    tuning.defaults = lambda phase, *args: forced.get(phase) or base(phase, *args)
    work = a.sass or "/tmp/attnkit_sm90"
    os.makedirs(work, exist_ok=True)
    rows = []

    def launch(self, sig, args):
        k = compile_sm90(self.kernel, args + (self.tail or ()), self.cx, self.cfg.warps, self.cfg.stages)
        name = f"{self.kernel.fn.__name__}-{self.cx.get('PHASE', 'fwd')}"
        r = resources(k.asm["cubin"], os.path.join(work, name + ".cubin"))
        r["shared"] = k.metadata.shared
        if a.sass:
            with open(os.path.join(work, name + ".sass"), "w") as f:
                f.write(k.asm.get("sass", "") or "")
        rows.append((name, self.cfg, r))

    A.Phase.launch = launch
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    pb = A.problem(q, k, v, mask, mod, attnkit.normalizers.softmax(), D ** -0.5, True, diff=a.diff)
    lam = torch.full((H,), 0.5) if a.diff else pb.dummy_f
    A.forward(pb, pb.buffers(), q, k, v, lam)
    out = torch.zeros(1, H, T, D, dtype=torch.bfloat16)
    lse = torch.zeros(1 + a.diff, 1, H, T, dtype=torch.float32)
    lse = lse if a.diff else lse[0]
    osoft = torch.zeros_like(out) if a.diff else None
    A.backward(pb, pb.buffers(), q, k, v, lam, out, lse, osoft, torch.randn_like(out), None, False)
    print(f"sm_90, {'differential ' if a.diff else ''}{a.mask}{'+' + a.mods if a.mods else ''}, D={D}, bf16 "
          f"(triton {triton.__version__})")
    for name, cfg, r in rows:
        print(f"  {name:18s} BM={cfg.BM:3d} BN={cfg.BN:3d} warps={cfg.warps} stages={cfg.stages}: "
              f"{r['regs']} regs, stack {r['stack']} B, shared {r['shared']} B")


if __name__ == "__main__":
    sys.exit(main())
