"""Generation end to end: ``HybridLM.generate`` through every cache (greedy tokens identical to the no-cache path),
the Hugging Face plug-in with an attnkit cache (``model.generate(..., cache=HFCache(...))``), and long generations
(thousands of steps) that lose nothing and hold their memory."""
from __future__ import annotations

import gc
import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from attnkit.cache import (ContiguousKVCache, DynamicCache, ModelCache, PagedKVCache, PolicyCache,
                           RecurrentStateCache, StreamingLLM)
from attnkit.nn import HybridLM
from attnkit.nn.model import HybridConfig

from conftest import one_thread

F64 = torch.float64
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny(layers="LA", n_layers=2, backend="reference", **kw):
    cfg = HybridConfig(vocab_size=48, d_model=32, n_heads=4, n_kv_heads=2, layers=layers, n_layers=n_layers,
                       attention={"backend": backend, **kw}, linear={"backend": "reference"})
    return HybridLM(cfg).double().eval()


def greedy_no_cache(m, ids, n):
    x = ids
    for _ in range(n):
        x = torch.cat([x, m(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x


CACHES = {
    "dynamic": lambda: "dynamic",
    "contiguous": lambda: "contiguous",
    "paged": lambda: "paged",
    "paged-4": lambda: ModelCache(PagedKVCache(num_pages=16, page_size=4), RecurrentStateCache()),
    "streaming-llm (no eviction)": lambda: PolicyCache(StreamingLLM(4, 64)),
}


@pytest.mark.parametrize("layers", ["A", "LA"])
def test_generate_greedy_equals_no_cache(layers):
    m = tiny(layers)
    ids = torch.randint(0, 48, (2, 6))
    want = greedy_no_cache(m, ids, 8)
    for name, make in CACHES.items():
        got = m.generate(ids, 8, cache=make())
        assert torch.equal(got, want), name


def test_generate_with_the_decode_kernel():
    """The attention layers' decode steps through the split-KV kernel (interpreter) and a paged cache."""
    m = tiny("A", 1, backend="triton", mask=None)
    ids = torch.randint(0, 48, (2, 5))
    want = greedy_no_cache(m, ids, 4)
    import attnkit
    with attnkit.record() as r:
        got = m.generate(ids, 4, cache="paged")
    assert torch.equal(got, want)
    assert "triton/decode" in r.calls


def test_generate_rejects_unknown_cache_names():
    m = tiny("A", 1)
    with pytest.raises(ValueError, match="'dynamic', 'contiguous', 'paged'"):
        m.generate(torch.randint(0, 48, (1, 3)), 2, cache="static")


def test_long_generation_loses_nothing_and_holds_memory():
    """2000 greedy steps through a contiguous cache (attention K/V) and fixed state buffers (linear layer): every
    token is kept and each generated token is the argmax of one full no-cache forward over the whole sequence; from
    step 500 on neither the live tensors nor the caches' bytes grow."""
    torch.manual_seed(0)
    m = tiny("LA", 2)
    ids = torch.randint(0, 48, (1, 4))
    steps = 2000
    cache = ModelCache(ContiguousKVCache(4 + steps), RecurrentStateCache())
    toks = ids[0].tolist()  # python ints: the test holds no tensor per step
    counts = {}
    with torch.no_grad():
        x = m(ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
        for t in range(steps):
            toks.append(int(x))
            x = m(x, cache=cache)[:, -1].argmax(-1, keepdim=True)
            if t in (500, 1000, steps - 1):
                gc.collect()
                counts[t] = (_live_tensors(), cache.kv.memory()["allocated"], cache.state.memory()["total"])
        seq = torch.tensor([toks])
        full = m(seq)
    assert cache.seq_len(1) == 4 + steps
    assert torch.equal(full[:, 3:-1].argmax(-1), seq[:, 4:]), "a generated token differs from the no-cache argmax"
    assert counts[steps - 1] == counts[1000] == counts[500], counts


def test_long_streaming_generation_holds_memory():
    """A StreamingLLM cache through 1500 decode steps of a model: kept tokens and bytes constant after the window
    fills (tensor count too)."""
    torch.manual_seed(1)
    m = tiny("A", 2)
    cache = PolicyCache(StreamingLLM(4, 28))
    x = torch.randint(0, 48, (2, 10))
    with torch.no_grad():
        x = m(x, cache=cache)[:, -1].argmax(-1, keepdim=True)
        seen = {}
        for t in range(1500):
            x = m(x, cache=cache)[:, -1].argmax(-1, keepdim=True)
            if t in (200, 1499):
                gc.collect()
                seen[t] = (_live_tensors(), cache.memory())
    assert seen[200] == seen[1499] and cache.cached(0) == 32


def _live_tensors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


# ------------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    import attnkit.integrations.hf as akhf
    akhf.register(variants=False)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return akhf, LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "attnkit"])
def test_hf_generate_with_attnkit_caches(llama, impl):
    """``model.generate(..., cache=HFCache(...))`` (and the deprecated ``past_key_values=``): the same greedy tokens as
    transformers' own cache, with the attnkit cache holding every token."""
    akhf, model = llama
    model.set_attn_implementation(impl)
    ids = torch.randint(1, 96, (2, 7))
    want = model.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=0)
    for kv in (ContiguousKVCache(32), PagedKVCache(num_pages=12, page_size=4)):
        cache = akhf.cache(kv)
        got = model.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=0, cache=cache)
        assert torch.equal(got, want), type(kv).__name__
        assert kv.seq_len(0) == 7 + 8 and len(cache.layers) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        got = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             past_key_values=akhf.cache(ContiguousKVCache(16)))
    assert torch.equal(got, want[:, :11])


def test_hf_cache_refuses_beam_search_and_wrong_inner_cache(llama):
    akhf, model = llama
    model.set_attn_implementation("sdpa")
    ids = torch.randint(1, 96, (1, 5))
    with pytest.raises(NotImplementedError, match="attnkit caches"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0,
                       cache=akhf.cache(ContiguousKVCache(16)))
    with pytest.raises(TypeError, match="ContiguousKVCache or PagedKVCache"):
        akhf.cache(DynamicCache())


def test_hf_cache_crop_rolls_back(llama):
    akhf, model = llama
    model.set_attn_implementation("sdpa")
    kv = ContiguousKVCache(32)
    cache = akhf.cache(kv)
    ids = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        model(ids, cache=cache)
        cache.crop(-3)
        assert cache.get_seq_length() == 6 == kv.seq_len(1)
        a = model(ids[:, 6:], cache=cache).logits
    b = model(ids).logits[:, 6:]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
