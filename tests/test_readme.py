"""Every Python block of the README runs as written (the quickstart, at a smaller T, is run by test_cli)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_its_blocks():
    assert len(BLOCKS) >= 2 and "B, H, T, D = 2, 8, 1024, 64" in BLOCKS[0]


@pytest.mark.parametrize("i", range(1, len(BLOCKS)))
def test_readme_block_runs(i):
    exec(compile(BLOCKS[i], f"README block {i}", "exec"), {})
