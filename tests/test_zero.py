"""DDP + ``ZeroRedundancyOptimizer`` (ZeRO-1) through ``lmopt.train.zero_optimizer`` with every optimizer of the
test database (2 CPU processes, gloo; tests/zero_worker.py): each trains equal to the plain DDP run with its state
partitioned across the ranks, or is refused with an error naming why."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lmopt

from .optim_db import OPTIM_DB
from .test_distributed import _launch
from .tolerances import trajectory_tol

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory) -> dict:
    return _launch("zero_worker.py", tmp_path_factory)


def _refusal(name: str) -> str | None:
    spec = lmopt.registry.get_spec(name)
    if spec.accepts_model:
        return "model's structure"
    if not spec.per_parameter:
        return "not per parameter"
    if spec.family == "second_order":
        return "closure"
    return None


@pytest.mark.parametrize("spec", OPTIM_DB, ids=lambda s: s.name)
def test_zero_redundancy_equals_ddp_or_names_why(spec, zero_results):
    result = zero_results[spec.name]
    assert "error" not in result, result["error"]
    why = _refusal(spec.name)
    if why is not None:
        assert why in result.get("refused", ""), result
        assert "shard it with FSDP2" in result["refused"]
        return
    assert "refused" not in result, result["refused"]
    # ZeRO steps whole parameters with the same optimizer: only the order of fp32 reductions may differ
    for abs_err, scale, update, numel in result["per_param"]:
        tol = trajectory_tol(precision="fp32", steps=4, max_update=update, scale=max(scale, 1e-12), n=numel)
        assert abs_err / max(scale, 1e-12) <= tol, (abs_err, scale, update, tol)
    held = result["held"]
    if sum(held):  # stateless optimizers (plain SGD) hold nothing anywhere
        assert sum(held) <= result["params"] and all(0 < h < result["params"] for h in held), held


def test_zero_optimizer_refuses_lookahead_keyword():
    with pytest.raises(ValueError, match="lookahead cannot run inside ZeroRedundancyOptimizer"):
        lmopt.train.zero_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], lookahead=True)
