"""The snippets in docs/integrations.md run as they are, in order (each framework skipped when not installed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def test_integration_snippets_run(tmp_path, monkeypatch):
    for package in ("transformers", "accelerate", "pytorch_lightning", "peft"):
        pytest.importorskip(package)
    import torch

    torch.set_num_threads(2)
    snippets = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(snippets) == 7
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(snippets):
        exec(compile(code, f"{DOC}:snippet{i}", "exec"), namespace)  # noqa: S102 (our own documentation)
    assert (tmp_path / "out" / "final").is_dir() and (tmp_path / "out" / "accelerate").is_dir()
