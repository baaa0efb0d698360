"""The training-loop example in docs/training-loop.md runs (shortened), and runs again as a resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared machine (50x faster under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DOC = Path(__file__).resolve().parents[1] / "docs" / "training-loop.md"


def test_training_loop_example_runs_and_resumes(tmp_path, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    short = (
        code.replace(" steps=2000,", " steps=3,")
        .replace("checkpoint_every=200", "checkpoint_every=2")
        .replace('"runs/tiny"', repr(str(tmp_path)))
        .replace("accumulation_steps=4", "accumulation_steps=2")
    )
    assert short.count(" steps=3,") == 1 and str(tmp_path) in short
    namespace: dict = {}
    exec(compile(short, str(DOC), "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["result"].step == 3 and namespace["result"].stopped_by is None
    out = capsys.readouterr().out
    assert "3 loss" in out and "tok/s" in out
    again: dict = {}
    exec(compile(short.replace(" steps=3,", " steps=5,"), str(DOC), "exec"), again)  # noqa: S102
    assert again["result"].resumed_from.endswith("step-00000003.pt") and again["result"].step == 5
