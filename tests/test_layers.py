"""attnkit's layers import one way: the import-linter contracts of pyproject.toml hold, and the checker really
reads the code (a contract that reverses two layers must break)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("importlinter")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint(config: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", config, "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_import_one_way():
    r = _lint(os.path.join(ROOT, "pyproject.toml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_reversed_layer_contract_breaks(tmp_path):
    cfg = tmp_path / "reversed.ini"
    cfg.write_text("[importlinter]\nroot_package = attnkit\n\n[importlinter:contract:reversed]\nname = reversed\n"
                   "type = layers\nlayers =\n    attnkit.core\n    attnkit.ops\n")
    r = _lint(str(cfg))
    assert r.returncode != 0 and "BROKEN" in r.stdout.upper(), r.stdout + r.stderr


def test_import_graph_has_no_cycles():
    r = subprocess.run([sys.executable, "-m", "attnkit.tools.imports"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "module import cycles: 0" in r.stdout
