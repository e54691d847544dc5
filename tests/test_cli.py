"""The command line, the registry and the README catalog."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import masks, scores
from attnkit.catalog import registry
from attnkit.tools.bench import peak_memory
from attnkit.tools.cli import main
from attnkit.catalog import Variant

ROOT = Path(__file__).resolve().parents[1]


def test_list_shows_at_least_12_softmax_variants(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows if r["family"] == "softmax"]
    assert len(names) >= 12 and len(set(names)) == len(names)
    for r in rows:
        assert r["forms"] and r["paper"] and r["summary"]


def test_list_text_and_markdown(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "softmax" in text and "alibi" in text
    assert main(["list", "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| variant |") and md[1].startswith("|---|")


def test_readme_catalog_is_generated():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme_catalog.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_passes_for_every_registered_variant(capsys):
    rc = main(["check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert " 0 failed" in out


def _broken_variant(wrong_form: str) -> Variant:
    """softmax whose `wrong_form` silently uses a shifted causal mask: check must catch it."""
    base = registry.get_variant("softmax")

    def fn(q, k, v, *, mask=None, form="auto", backend="auto", **kw):
        if form == wrong_form:
            mask = masks.predicate(lambda b, h, qi, kv: kv < qi, "strictly-causal")
        return attnkit.attention(q, k, v, mask=mask, form=form, backend="reference", **kw)

    return Variant(name="broken", family="test", summary="", paper="", forms=base.forms, fn=fn,
                   make_inputs=base.make_inputs, unsupported=base.unsupported)


@pytest.mark.parametrize("wrong_form", ["streaming", "recurrent"])
def test_check_fails_on_a_wrong_form(wrong_form, monkeypatch, capsys):
    bad = _broken_variant(wrong_form)
    monkeypatch.setitem(registry._REGISTRY, "broken", bad)
    assert main(["check", "broken", "--patterns", "causal-self"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--variants", "softmax,sigmoid", "--lengths", "32,48", "--rep", "1", "--quiet",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["pattern"] for r in rows} == set(registry.PATTERNS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["ms"] > 0 and r["tflops"] > 0 for r in ok)
    assert {r["mode"] for r in ok} == {"fwd", "fwd+bwd"}
    assert all(r["backend"].startswith("reference/") for r in ok)
    na = [r for r in rows if r["status"] == "n/a"]
    assert na and all(r["form"] == "recurrent" and not registry.PATTERNS[r["pattern"]][0] for r in na)
    assert data["environment"]["torch"] == torch.__version__
    assert "causal-cross" in text


def test_default_bench_variants_exist():
    from attnkit.tools.cli import DEFAULT_BENCH_VARIANTS
    for name in DEFAULT_BENCH_VARIANTS:
        registry.get_variant(name)


def test_readme_quickstart_runs():
    """The README's quickstart block is real code: run it (at a smaller T)."""
    text = (ROOT / "README.md").read_text()
    code = text.split("## Quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(code.replace("B, H, T, D = 2, 8, 1024, 64", "B, H, T, D = 1, 8, 96, 16"), "README", "exec"), {})


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--lengths", "abc"])
    with pytest.raises(SystemExit, match="unknown variant"):
        main(["bench", "--variants", "softmx"])


def test_get_variant_unknown_suggests():
    with pytest.raises(ValueError, match="did you mean softmax"):
        registry.get_variant("softmx")


def test_variant_is_callable_and_equals_its_pieces():
    q, k, v = (torch.randn(2, 4, 19, 8, dtype=torch.float64) for _ in range(3))
    got = registry.get_variant("alibi")(q, k, v, mask=masks.causal)
    want = attnkit.attention(q, k, v, mask=masks.causal, score_mod=scores.alibi())
    torch.testing.assert_close(got, want)
    sw = registry.get_variant("sliding-window")
    got = sw(q, k, v, mask=masks.causal)
    want = attnkit.attention(q, k, v, mask=masks.causal & masks.sliding_window(max(2, 19 // 4)))
    torch.testing.assert_close(got, want)


def test_streaming_memory_is_linear_in_T():
    """Causal T=16384, H=1, D=64 float32: materialized would need ≥ 1 GiB of scores; streaming stays small."""
    T = 16384
    q, k, v = (torch.randn(1, 1, T, 64) for _ in range(3))
    mem = peak_memory(lambda: attnkit.attention(q, k, v, mask=masks.causal, form="streaming"))
    if mem is None:
        pytest.skip("peak RSS cannot be measured on this OS")
    assert mem < 96 * 2 ** 20, f"streaming used {mem / 2 ** 20:.0f} MiB"
