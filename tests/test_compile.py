"""The fused kernels as torch custom ops: ``torch.compile`` of a model calling ``attnkit.attention(...,
backend="triton")`` traces one graph with no break, computes what eager mode computes (outputs and gradients,
learnable score-mod parameters included), and ``torch.export`` works. CPU, Triton's interpreter, float64."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the kernels below are decorated as interpreted functions

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import attnkit  # noqa: E402
from attnkit import masks, normalizers, scores  # noqa: E402

F64 = torch.float64


class Tiny(torch.nn.Module):
    """Projections around one fused attention call; the mask, score mod and normalizer are built once."""

    def __init__(self, d=32, H=2, norm="softmax"):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d, dtype=F64)
        self.o = torch.nn.Linear(d, d, dtype=F64)
        self.H = H
        self.mod = scores.compose(scores.alibi(torch.rand(H, dtype=F64).requires_grad_()), scores.softcap(4.0))
        self.mask = masks.causal & (masks.sliding_window(5) | masks.sinks(2))
        self.norm = {"softmax": normalizers.softmax_sink(torch.randn(H, dtype=F64).requires_grad_()),
                     "sigmoid": normalizers.sigmoid(torch.randn(H, dtype=F64).requires_grad_())}[norm]

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, d // self.H).unbind(2)
        o = attnkit.attention(q, k, v, mask=self.mask, score_mod=self.mod, normalizer=self.norm, layout="bthd",
                              backend="triton")
        return self.o(o.reshape(B, T, d))


def _grads(m, x):
    m.zero_grad(set_to_none=True)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in m.parameters()] + [m.mod.items[0].slopes.grad.clone()]


@pytest.mark.parametrize("norm", ["softmax", "sigmoid"])
def test_compiled_model_has_no_graph_break_and_matches_eager(norm):
    m = Tiny(norm=norm)
    x = torch.randn(2, 11, 32, dtype=F64)
    ex = torch._dynamo.explain(m)(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [b.reason for b in ex.break_reasons]
    y0, g0 = _grads(m, x)
    m.mod.items[0].slopes.grad = None
    cm = torch.compile(m, backend="eager", fullgraph=True)
    with attnkit.record() as r:
        y1, g1 = _grads(cm, x)
    assert r.calls == ["triton/fused"]
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_export():
    m = Tiny()
    x = torch.randn(2, 9, 32, dtype=F64)
    ep = torch.export.export(m, (x,))
    assert any("attnkit.attention_fwd" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), m(x), atol=1e-12, rtol=1e-12)


def test_pieces_built_inside_the_compiled_region_get_a_clear_error():
    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=masks.causal & masks.sliding_window(3), backend="triton")
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=F64) for _ in range(3))
    with pytest.raises(Exception, match="outside the compiled function"):
        torch.compile(f, backend="eager", fullgraph=True)(q, k, v)


def test_double_backward_is_refused_clearly():
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=F64, requires_grad=True) for _ in range(3))
    out = attnkit.attention(q, k, v, mask="causal", backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), [q], create_graph=True)


@pytest.mark.parametrize("case", ["alibi+softcap+temperature", "relbias+ssmax", "none+sink", "alibi+sigmoid_bias",
                                  "frozen"])
def test_custom_op_params_are_the_kernels_learnable_tensors(case):
    """The custom op passes ``plan.learnable_tensors`` as its parameter list; the fused kernels return gradients in
    the order of their Problem's ModPlan + NormPlan. Both lists must be the same tensors in the same order."""
    from attnkit.ops.softmax import fused, plan
    H, L = 4, 9
    req = dict(dtype=F64, requires_grad=case != "frozen")
    if case in ("alibi+softcap+temperature", "frozen"):
        sm = scores.compose(scores.alibi(torch.rand(H, **req)), scores.softcap(5.0),
                            scores.temperature(1.0 + torch.rand(H, **req)))
        norm = normalizers.as_normalizer("softmax")
    elif case == "relbias+ssmax":
        rb = scores.relative_bias(H, num_buckets=8, max_distance=16)
        rb.table.data = rb.table.data.double()
        sm = scores.compose(rb, scores.ssmax(torch.rand(H, **req)))
        norm = normalizers.as_normalizer("softmax")
    elif case == "none+sink":
        sm, norm = None, normalizers.softmax_sink(torch.randn(H, **req))
    else:
        sm, norm = scores.alibi(torch.rand(H, **req)), normalizers.sigmoid(torch.randn(H, **req))
    q, k, v = (torch.randn(1, H, L, 8, dtype=F64) for _ in range(3))
    pb = fused.problem(q, k, v, masks.causal, sm, norm, 8 ** -0.5, need_grad=True)
    want = plan.learnable_tensors(sm, norm, L)
    assert [id(t) for t in pb.learnable_tensors] == [id(t) for t in want]
    assert (len(want) == 0) == (case == "frozen")
