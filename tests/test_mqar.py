"""MQAR (attnkit.tools.mqar): the task generator against Zoology's definition, state sizes against real decoding
caches, determinism, resuming, the learning pipeline on a small vocabulary, and ``attnkit mqar --smoke``."""
import contextlib
import json
import math
import random
from dataclasses import replace

import pytest
import torch

from attnkit.cache import DynamicCache
from attnkit.tools import mqar as Q
from attnkit.tools.cli import main
from conftest import one_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)  # one intra-op thread per xdist worker


def fresh_gen():
    return torch.Generator().manual_seed(random.randrange(2 ** 31))


@pytest.mark.parametrize("T,pairs,vocab,rnq", [(64, 4, 8192, True), (64, 16, 8192, False), (1024, 256, 8192, True),
                                               (30, 7, 40, False)])
def test_batch_follows_the_definition(T, pairs, vocab, rnq):
    """Context k1 v1 ... kN vN (distinct keys in [1, V/2), distinct values in [V/2, V)), then every key asked once at
    an even offset of the query region, labelled with its value; -100 elsewhere; zeros or random tokens between."""
    ids, labels = Q.mqar_batch(5, T, pairs, vocab, generator=fresh_gen(), random_non_queries=rnq)
    assert ids.shape == labels.shape == (5, T) and ids.dtype == labels.dtype == torch.long
    ctx = 2 * pairs
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:ctx:2], row[1:ctx:2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == pairs and all(vocab // 2 <= v < vocab for v in values)
        answer = dict(zip(keys, values))
        asked = [p for p, y in enumerate(lab) if y != -100]
        assert len(asked) == pairs
        assert sorted(row[p] for p in asked) == sorted(keys)  # every key asked exactly once
        for p in asked:
            assert p >= ctx and (p - ctx) % 2 == 0
            assert lab[p] == answer[row[p]]
        others = [row[p] for p in range(ctx, T) if p not in asked]
        if not rnq:
            assert all(x == 0 for x in others)
        else:
            assert all(0 <= x < vocab for x in others) and len(set(others)) > 1


def test_query_gaps_follow_the_power_law():
    """With one pair the query slot g is drawn with p(g) ∝ a·g^(a−1), a = 0.01, over (T − 2)/2 slots."""
    T, n = 22, 40000
    ids, labels = Q.mqar_batch(n, T, 1, 64, generator=fresh_gen())
    slot = ((labels != -100).nonzero()[:, 1] - 2) // 2
    space = (T - 2) // 2
    p = [0.01 * g ** (0.01 - 1) for g in range(1, space + 1)]
    p = [x / sum(p) for x in p]
    freq = torch.bincount(slot, minlength=space).double() / n
    for g in range(space):
        sd = math.sqrt(p[g] * (1 - p[g]) / n)
        assert abs(freq[g].item() - p[g]) < 5 * sd + 1e-4, (g, freq[g].item(), p[g])


def test_batch_rejects_impossible_cells():
    g = fresh_gen()
    with pytest.raises(ValueError, match="even T"):
        Q.mqar_batch(2, 63, 4, generator=g)
    with pytest.raises(ValueError, match="4 \\* pairs"):
        Q.mqar_batch(2, 64, 17, generator=g)
    with pytest.raises(ValueError, match="vocab > T"):
        Q.mqar_batch(2, 64, 4, 64, generator=g)


def test_same_seed_same_batch_and_same_training():
    s = random.randrange(2 ** 31)
    a = Q.mqar_batch(3, 64, 8, generator=torch.Generator().manual_seed(s))
    b = Q.mqar_batch(3, 64, 8, generator=torch.Generator().manual_seed(s))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = replace(Q.SMOKE, steps=3, batch=4, vocab=64, train_grid=((32, 4),), test_grid=((32, 4),), n_test=8,
                eval_every=2)
    spec = Q.ModelSpec("gated_delta", 32)
    r1, r2 = (Q.train_cell(spec, 1e-2, c, s, "cpu") for _ in range(2))
    assert r1["final_loss"] == r2["final_loss"] and r1["by_test"] == r2["by_test"]
    r3 = Q.train_cell(spec, 1e-2, c, s + 1, "cpu")
    assert r3["final_loss"] != r1["final_loss"]


def _tensor_bytes(x, seen=None) -> int:
    """Bytes of every tensor reachable from ``x`` (objects, dicts, sequences)."""
    seen = set() if seen is None else seen
    if isinstance(x, torch.Tensor):
        if id(x) in seen:
            return 0
        seen.add(id(x))
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_tensor_bytes(v, seen) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in x)
    if hasattr(x, "__dict__"):
        return _tensor_bytes(vars(x), seen)
    return 0


@pytest.mark.parametrize("name", ["gated_delta", "gla", "retention", "linear_taylor2", "aaren", "kda", "softmax"])
def test_state_bytes_equal_a_real_decoding_cache(name):
    """The analytic state of a layer equals the bytes a DynamicCache holds after T tokens through that layer
    (linear rules: the recurrent state and the convolution tails; softmax: K and V of every token)."""
    T, d = 37, 32
    spec = Q.ModelSpec(name, d, conv=False)
    model = Q.build_model(spec, vocab=64, backend="reference")
    layer = model.blocks[0].mixer
    cache = DynamicCache()
    with torch.no_grad():
        layer(torch.randn(1, T, d), cache=cache)
    one = Q.RecallLM(64, d, [layer], conv=False)
    assert Q.state_bytes(one, T) == _tensor_bytes(cache) > 0


def test_state_bytes_of_windows_levels_and_convolutions():
    """Sliding window: the last w keys only; log-linear: levels_needed(T−1) states; BaseConv: (k−1)·d values."""
    d, T, w = 32, 1024, Q.WINDOW
    sw = Q.build_model(Q.ModelSpec("sliding_window", d, conv=False), vocab=2048)
    assert Q.state_bytes(sw, T) == 2 * (2 * d * w * 4)  # two layers, K and V of d channels, w tokens, fp32
    full = Q.build_model(Q.ModelSpec("softmax", d, conv=False), vocab=2048)
    assert Q.state_bytes(full, T) == 2 * (2 * d * T * 4)
    assert Q.state_bytes(Q.build_model(Q.ModelSpec("softmax", d), vocab=2048), T) == \
        Q.state_bytes(full, T) + 2 * (3 - 1) * d * 4
    ll = Q.build_model(Q.ModelSpec("log_linear_gated_delta", d, conv=False), vocab=2048)
    gdn = Q.build_model(Q.ModelSpec("gated_delta", d, conv=False), vocab=2048)
    H, dh = 2, d // 2
    conv_tail = 3 * (4 - 1) * d * 4
    assert Q.state_bytes(gdn, T) == 2 * (H * dh * dh * 4 + conv_tail)
    assert Q.state_bytes(ll, T) == 2 * (11 * H * dh * dh * 4 + conv_tail)  # positions < 1024: 11 levels


def test_models_for_every_variant_and_hybrids_run_and_train_a_step():
    for name in Q.VARIANTS:
        spec = Q.ModelSpec(name, 32, feature_dim=4)
        m = Q.build_model(spec, vocab=64, backend="reference")
        ids, labels = Q.mqar_batch(2, 16, 2, 64, generator=fresh_gen())
        loss, ok = m.loss_and_correct(ids, labels)
        loss.backward()
        assert torch.isfinite(loss) and ok.shape == (4,)
        assert all(p.grad is not None for n, p in m.named_parameters() if "embed" in n)
    with pytest.raises(ValueError, match="names 3 layers"):
        Q.ModelSpec("softmax+gla+kda", 32).layer_names()
    with pytest.raises(ValueError, match="unknown variant"):
        Q.build_model(Q.ModelSpec("softmx", 32))
    with pytest.raises(ValueError, match="use 'softmax'"):
        Q.build_model(Q.ModelSpec("aaren_causal", 32))


@pytest.mark.parametrize("old,new", [("sliding-window", "sliding_window"), ("multi-token", "multi_token"),
                                     ("gated-deltanet", "gated_delta"),
                                     ("gated-deltanet+scalar-gate", "gated_delta+scalar_gate")])
def test_earlier_variant_names_build_the_same_model(old, new):
    """An earlier name warns, is stored under the current one and builds the same model (same parameters, same
    outputs) as the current name; a sliding window keeps MQAR's fixed window under either spelling."""
    with pytest.warns(DeprecationWarning, match="is now called"):
        spec_old = Q.ModelSpec(old, 32, n_layers=len(new.split("+")), window=3, conv=False)
    spec_new = Q.ModelSpec(new, 32, n_layers=len(new.split("+")), window=3, conv=False)
    assert spec_old == spec_new and spec_old.name == new
    seed = random.randrange(2 ** 31)
    models = []
    for n in (old, new):
        torch.manual_seed(seed)
        with pytest.warns(DeprecationWarning) if n == old else contextlib.nullcontext():
            layers = [Q.mixer(part, spec_new, i, "reference") for i, part in enumerate(n.split("+"))]
        models.append(Q.RecallLM(64, 32, layers, conv=False))
    a, b = models
    assert [type(x.mixer) for x in a.blocks] == [type(x.mixer) for x in b.blocks]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(a.hidden(ids), b.hidden(ids), rtol=0, atol=0)
    if new == "sliding_window":
        # one layer, no convolution: position t sees tokens t-3..t only (the catalog's window at T=32 would be 8)
        m = Q.build_model(replace(spec_old, n_layers=1), vocab=64, backend="reference")
        ids2 = ids.clone()
        ids2[:, 0] = (ids[:, 0] + 1) % 64
        with torch.no_grad():
            changed = (m.hidden(ids) - m.hidden(ids2)).abs().amax(dim=(0, 2)) > 0
        assert changed.tolist() == [t <= 3 for t in range(32)]


def test_results_with_earlier_names_read_as_current_names(tmp_path):
    """A results file written before the renaming: its cells read under the current names (keys included), so a
    rerun with the current names skips them. `attnkit mqar` names an unknown variant and exits before training."""
    c = replace(Q.SMOKE, variants=("gated_delta+softmax",), d_models=(32,), lrs=(1e-2,))
    (spec, lr), = c.cells()
    key = Q.cell_key(spec, lr, c, 5)
    old_key = key.replace("gated_delta+softmax", "gated-deltanet+softmax", 1)
    assert old_key != key
    rec = {"schema": Q.SCHEMA, "kind": "cell", "key": old_key, "variant": "gated-deltanet+softmax", "status": "ok"}
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps(rec) + "\n")
    (cell,) = Q.read_results(str(out))["cells"]
    assert cell["key"] == key and cell["variant"] == "gated_delta+softmax"
    with pytest.raises(SystemExit, match="unknown variant 'softmx'"):
        main(["mqar", "--variants", "softmax,softmx", "--out", str(tmp_path / "x.jsonl")])


def test_softmax_learns_recall_and_the_task_is_not_trivial():
    """A 2-layer softmax model learns MQAR on a small vocabulary (the whole pipeline works); Aaren, whose one
    learned query per head cannot ask for a key, stays near chance (1 / #values) on the same budget."""
    c = replace(Q.SMOKE, steps=300, batch=32, vocab=64, train_grid=((32, 4),), test_grid=((32, 4),), n_test=128,
                eval_every=50)
    seed = random.randrange(2 ** 31)
    good = Q.train_cell(Q.ModelSpec("softmax", 64), 1e-2, c, seed, "cpu")
    assert good["accuracy"] >= 0.9, good
    bad = Q.train_cell(Q.ModelSpec("aaren", 64), 1e-2, c, seed, "cpu")
    assert bad["accuracy"] < 0.5, bad


def test_run_records_seed_and_resumes(tmp_path):
    out = tmp_path / "m.jsonl"
    c = replace(Q.SMOKE, variants=("softmax",), lrs=(1e-2, 3e-3), steps=2, batch=4, vocab=64, d_models=(32,),
                train_grid=((32, 4),), test_grid=((32, 4),), n_test=8, eval_every=1)
    logs = []
    first = Q.run(c, str(out), log=logs.append)
    assert len(first) == 2 and all(r["status"] == "ok" for r in first)
    seed = Q.read_results(str(out))["runs"][0]["seed"]
    assert any(f"seed {seed}" in m for m in logs)
    logs.clear()
    again = Q.run(replace(c, lrs=(1e-2, 3e-3, 1e-3)), str(out), log=logs.append)
    assert any("resuming" in m for m in logs) and any("2 of 3 cells already" in m for m in logs)
    data = Q.read_results(str(out))
    assert len(again) == 3 and len(data["cells"]) == 3 and {r["seed"] for r in data["cells"]} == {seed}
    assert [r["seed"] for r in data["runs"]] == [seed, seed]
    with open(out, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        Q.read_results(str(out))


def test_summary_and_orderings():
    cells = [{"status": "ok", "variant": v, "d_model": d, "feature_dim": None, "seed": 1, "lr": lr, "accuracy": a,
              "state_bytes": d * 100, "by_test": {"64x4": a}}
             for v, d, lr, a in [("softmax", 64, 1e-3, 0.5), ("softmax", 64, 1e-2, 0.99), ("softmax", 128, 1e-2, 1.0),
                                 ("gated_delta", 64, 1e-2, 0.6), ("gated_delta", 128, 1e-2, 0.9),
                                 ("gla", 64, 1e-2, 0.3), ("gla", 128, 1e-2, 0.95)]]
    s = Q.summarize(cells)
    assert [(x["variant"], x["d_model"], x["accuracy"]) for x in s][:1] == [("softmax", 64, 0.99)]
    assert s[0]["lrs_tried"] == [1e-3, 1e-2]
    claims = {c: held for c, held, _ in Q.check_orderings(s)}
    assert claims["softmax attention solves MQAR at every width (accuracy >= 0.9)"] is True
    assert claims["gated_delta approaches softmax as its state grows"] is True
    assert claims["gla trails Gated DeltaNet at equal width"] is False


def test_mqar_smoke_cli(tmp_path, capsys):
    """The CI configuration end to end: `attnkit mqar --smoke` trains, tests, writes, and prints a table."""
    out = tmp_path / "smoke.jsonl"
    assert main(["mqar", "--smoke", "--quiet", "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    cells = [json.loads(x) for x in out.read_text().splitlines() if '"kind": "cell"' in x]
    assert {c["variant"] for c in cells} == set(Q.SMOKE.variants)
    assert all(c["status"] == "ok" and 0 <= c["accuracy"] <= 1 and c["state_bytes"] > 0 for c in cells)
    assert "MQAR accuracy" in text and "gated_delta" in text
    assert all(len(line) <= 120 for line in text.splitlines())
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
