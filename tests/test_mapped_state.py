"""Memory-mapped optimizer state (issue #16 item 3; docs/offload.md): state in files under a directory, equal to the
in-memory optimizer bit for bit, resident pages released between steps, checkpoints unchanged."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

import lmopt
from lmopt.optim.mapped import map_state, mapped_bytes, mapped_resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / smaps: Linux")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 256))  # ~263k parameters


def _step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(16, 256, generator=g), torch.randn(16, 256, generator=g)
    opt.zero_grad(set_to_none=True)
    (model(x) - y).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "came", "lion", "sgd"])
def test_mapped_state_equals_in_memory_and_is_released_between_steps(name, tmp_path):
    plain_model, mapped_model = _model(), _model()
    plain = lmopt.create_optimizer(name, plain_model, lr=1e-2, **({"momentum": 0.9} if name == "sgd" else {}))
    mapped = map_state(
        lmopt.create_optimizer(name, mapped_model, lr=1e-2, **({"momentum": 0.9} if name == "sgd" else {})),
        tmp_path / "state",
    )
    for k in range(4):
        _step(plain_model, plain, k)
        _step(mapped_model, mapped, k)
        state_bytes = mapped_bytes(mapped)
        assert state_bytes > 500_000  # the large tensors' state is in the files
        # between steps the process holds (almost) none of it: the pages were released, the data is in the files
        assert mapped_resident_bytes(mapped) <= state_bytes // 20
    for p, q in zip(mapped_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert sorted(f.name for f in (tmp_path / "state").iterdir())


def test_mapped_state_checkpoint_round_trip(tmp_path):
    straight_model = _model()
    straight = map_state(lmopt.create_optimizer("adamw", straight_model, lr=1e-2), tmp_path / "a")
    for k in range(6):
        _step(straight_model, straight, k)
    first_model = _model()
    first = map_state(lmopt.create_optimizer("adamw", first_model, lr=1e-2), tmp_path / "b")
    for k in range(3):
        _step(first_model, first, k)
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors: loads anywhere
    resumed_model = _model(seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed = map_state(lmopt.create_optimizer("adamw", resumed_model, lr=1e-2), tmp_path / "c")
    resumed.load_state_dict(saved["optimizer"])
    assert mapped_bytes(resumed) > 0  # loaded state went straight into the files
    for k in range(3, 6):
        _step(resumed_model, resumed, k)
    for p, q in zip(resumed_model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_map_state_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    opt = lmopt.create_optimizer("adamw", _model(), lr=1e-3)
    with pytest.raises(ValueError, match="holds other files"):
        map_state(opt, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        map_state(opt, tmp_path / "file")
    with pytest.raises(ValueError, match="min_numel"):
        map_state(opt, tmp_path / "new", min_numel=0)
