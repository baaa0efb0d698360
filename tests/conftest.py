"""Test-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: one thread avoids OpenMP start-up and contention (up to 50x faster on a busy
    2-core machine). Subprocess tests (FSDP2, kill-during-save) set their own thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
