"""The README's Python example runs as written."""

from __future__ import annotations

import re

from conftest import ROOT


def test_readme_python_example_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "no python example in the README"
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'p3': (1, 256, 40, 40)" in out or "'p3': (1, 128, 40, 40)" in out
