"""Block and HybridLM: the block written out, pattern strings, the papers' initialization, next-token loss,
generate() through the caches == the argmax of full forwards, packed documents, torch.compile graph breaks,
and the README's "build a model" example (executed as written)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.nn import Attention, Block, DiffAttention, HybridConfig, HybridLM, LinearAttention
from conftest import one_thread
from test_nn_layers import perturb, ref_rms

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

#: pasted into the README as the "build a model" example
README_BUILD_A_MODEL = '''
import torch
from attnkit.nn import HybridConfig, HybridLM

cfg = HybridConfig(vocab_size=1000, d_model=64, n_heads=4, n_kv_heads=2, layers="LLLA", n_layers=8,
                   linear_rule="gated_delta", attention={"qk_norm": True, "variant": "softcap"})
model = HybridLM(cfg)                                  # 3 Gated DeltaNet : 1 softmax attention, twice
ids = torch.randint(0, 1000, (2, 32))
logits, loss = model(ids, labels=ids)                  # next-token cross entropy
loss.backward()
out = model.generate(ids[:, :8], max_new_tokens=8)     # prefill, then decode with KV cache + recurrent states
'''


def test_readme_build_a_model_example_runs():
    ns: dict = {}
    exec(compile(README_BUILD_A_MODEL, "README", "exec"), ns)
    model, out, loss = ns["model"], ns["out"], ns["loss"]
    assert [type(b.mixer).__name__ for b in model.blocks] == ["LinearAttention"] * 3 + ["Attention"] + \
        ["LinearAttention"] * 3 + ["Attention"]
    assert out.shape == (2, 16) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_block_written_out():
    mixer = perturb(Attention(16, 2).double())
    blk = perturb(Block(16, mixer, mlp_hidden=24).double())
    x = torch.randn(2, 5, 16, dtype=F64)
    h = x + mixer(ref_rms(x, blk.attn_norm.weight, blk.attn_norm.eps))
    u = ref_rms(h, blk.mlp_norm.weight, blk.mlp_norm.eps)
    mlp = F.silu(u @ blk.mlp.gate_proj.weight.T) * (u @ blk.mlp.up_proj.weight.T) @ blk.mlp.down_proj.weight.T
    torch.testing.assert_close(blk(x), h + mlp)
    assert blk.mlp.gate_proj.out_features == 24


def test_pattern_mixers_and_errors():
    cfg = HybridConfig(vocab_size=32, d_model=16, n_heads=2, layers="LAD", n_layers=7,
                       mixers={"D": lambda c, i: DiffAttention(c.d_model, c.n_heads, layer_idx=i)})
    m = HybridLM(cfg)
    assert cfg.pattern() == "LADLADL"
    kinds = [type(b.mixer) for b in m.blocks]
    assert kinds[:3] == [LinearAttention, Attention, DiffAttention]
    assert [b.mixer.layer_idx for b in m.blocks] == list(range(7))
    assert m.blocks[2].mixer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.6))
    with pytest.raises(ValueError, match="unknown layer letters"):
        HybridLM(HybridConfig(vocab_size=32, d_model=16, n_heads=2, layers="LAX"))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.randn(1, 4))


def test_initialization_follows_the_papers():
    cfg = HybridConfig(vocab_size=256, d_model=128, n_heads=4, layers="LA", n_layers=6, init_std=0.02)
    m = HybridLM(cfg)
    assert m.lm_head.weight is m.embed.weight  # tied
    res = 0.02 / math.sqrt(2 * 6)
    for b in m.blocks:
        assert b.mixer.o_proj.weight.std().item() == pytest.approx(res, rel=0.1)
        assert b.mlp.down_proj.weight.std().item() == pytest.approx(res, rel=0.1)
        assert b.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert b.mixer.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    lin = m.blocks[0].mixer  # Mamba-2 gate parameters keep their own initialization
    A = torch.exp(lin.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(lin.dt_bias)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
    assert (m.blocks[0].attn_norm.weight == 1).all()
    untied = HybridLM(HybridConfig(vocab_size=256, d_model=32, n_heads=2, layers="A", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight


def test_loss_is_next_token_cross_entropy():
    m = HybridLM(HybridConfig(vocab_size=40, d_model=16, n_heads=2, layers="LA")).double()
    ids = torch.randint(0, 40, (2, 9))
    labels = ids.clone()
    labels[0, 3] = -100
    logits, loss = m(ids, labels=labels)
    lp = torch.log_softmax(logits, -1)
    terms = [-lp[b, t, labels[b, t + 1]] for b in range(2) for t in range(8) if labels[b, t + 1] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean())


@pytest.mark.parametrize("rule", ["gated_delta", "kda", "gla"])
def test_generate_greedy_equals_argmax_of_full_forwards(rule):
    m = HybridLM(HybridConfig(vocab_size=50, d_model=16, n_heads=2, layers="LA", linear_rule=rule,
                              linear={"chunk_size": 4}, init_std=0.3)).double()
    ids = torch.randint(0, 50, (2, 6))
    out = m.generate(ids, 7)
    seq = ids
    for _ in range(7):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert len(set(out[:, 6:].flatten().tolist())) > 1  # not one repeated token


def test_generate_sampling_topk_and_eos():
    m = HybridLM(HybridConfig(vocab_size=30, d_model=16, n_heads=2, layers="LA", init_std=0.3)).double()
    ids = torch.randint(0, 30, (3, 4))
    a = m.generate(ids, 6, temperature=0.8, generator=torch.Generator().manual_seed(5))
    b = m.generate(ids, 6, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(m.generate(ids, 6, temperature=1.0, top_k=1), m.generate(ids, 6))
    greedy = m.generate(ids, 6)
    eos = int(greedy[0, 5])  # the first row emits it at the second new token
    out = m.generate(ids, 6, eos_token_id=eos)
    assert (out[0, 5:] == eos).all()
    with pytest.raises(ValueError, match="temperature"):
        m.generate(ids, 3, temperature=-1.0)


def test_hybrid_packed_equals_separate():
    m = HybridLM(HybridConfig(vocab_size=40, d_model=16, n_heads=2, layers="LA", linear={"chunk_size": 4},
                              init_std=0.2)).double()
    docs = [torch.randint(0, 40, (1, n)) for n in (5, 3, 7)]
    cu = torch.tensor([0, 5, 8, 15])
    torch.testing.assert_close(m(torch.cat(docs, 1), cu_seqlens=cu), torch.cat([m(d) for d in docs], 1))


@pytest.mark.parametrize("rule", ["linear", "scalar_gate", "gated_delta"])
def test_hybrid_model_traces_without_graph_breaks(rule):
    """torch._dynamo.explain on a tiny hybrid "LA" model (reference backend): one graph, no break anywhere in
    attnkit.nn, the softmax layer (its non-finite check is skipped while tracing: the exact path always) or the
    linear layer (the gate / beta value checks are skipped while tracing)."""
    torch._dynamo.reset()
    hyb = HybridLM(HybridConfig(vocab_size=16, d_model=8, n_heads=2, layers="LA", linear_rule=rule,
                                attention={"backend": "reference"}))
    ex = torch._dynamo.explain(hyb)(torch.randint(0, 16, (1, 4)))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason)[:300] for r in ex.break_reasons]
    torch._dynamo.reset()
