"""Data-dependent gate / β checks of the linear family: on by default, off inside ``value_checks(False)`` (attnkit.nn's
layers, whose gates are in range by construction), shapes still checked either way."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.nn import LinearAttention
from attnkit.ops.linear import functional as Fn
from attnkit.ops.linear import value_checks
from attnkit.ops.linear.common import value_checks_enabled

F64 = torch.float64


def _inputs(B=1, H=2, T=5, D=4):
    q, k, v = (torch.randn(B, H, T, D, dtype=F64) for _ in range(3))
    return q, k, v, F.logsigmoid(torch.randn(B, H, T, dtype=F64)), torch.rand(B, H, T, dtype=F64)


def test_values_checked_by_default_and_skipped_when_asked():
    q, k, v, g, beta = _inputs()
    with pytest.raises(ValueError, match="≤ 0"):
        attnkit.linear_attention(q, k, v, rule="gated_delta", gate=-g, beta=beta, qk_l2norm=True)
    with pytest.raises(ValueError, match="beta must lie in"):
        attnkit.linear_attention(q, k, v, rule="gated_delta", gate=g, beta=beta + 3, qk_l2norm=True)
    with value_checks(False):
        assert not value_checks_enabled()
        o, _ = attnkit.linear_attention(q, k, v, rule="gated_delta", gate=g, beta=beta, qk_l2norm=True)
        attnkit.linear_attention(q, k, v, rule="gated_delta", gate=-g, beta=beta, qk_l2norm=True)  # not checked
        with pytest.raises(ValueError):  # shapes are still checked
            attnkit.linear_attention(q, k, v, rule="gated_delta", gate=g[..., :-1], beta=beta, qk_l2norm=True)
    assert value_checks_enabled()
    ref, _ = attnkit.linear_attention(q, k, v, rule="gated_delta", gate=g, beta=beta, qk_l2norm=True)
    assert torch.equal(o, ref)


@pytest.mark.parametrize("rule", ["scalar_gate", "gated_delta", "gla", "hgrn2"])
def test_layers_skip_the_value_checks(rule, monkeypatch):
    """The layer calls the op inside value_checks(False): the gate / β checks run but return at once."""
    seen = []
    real_gate, real_beta = Fn.check_log_gate, Fn.check_beta

    def gate_spy(name, g):
        seen.append(value_checks_enabled())
        return real_gate(name, g)

    def beta_spy(beta, *a):
        seen.append(value_checks_enabled())
        return real_beta(beta, *a)

    monkeypatch.setattr(Fn, "check_log_gate", gate_spy)
    monkeypatch.setattr(Fn, "check_beta", beta_spy)
    layer = LinearAttention(16, 2, rule=rule).double()
    layer(torch.randn(2, 6, 16, dtype=F64))
    assert seen and not any(seen)
