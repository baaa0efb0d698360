"""Every optimizer's math on FSDP2 (DTensor) parameters equals the unsharded run, and a sharded run's state
dict resumes bit-exactly (2 CPU processes, gloo); the low-bit optimizers' sharded quantized state in detail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from .optim_db import BY_NAME, OPTIM_DB, make_model
from .tolerances import moment_precision, state_tol, within

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def clean_environment() -> dict[str, str]:
    """The environment without what earlier in-process tests leave in it: Inductor's variables for its own
    worker processes (``_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR`` is a pointer into this process; workers that
    inherit it abort at exit) and another launcher's rank variables."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if not k.lstrip("_").startswith("TORCHINDUCTOR") and k not in launcher}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker_name: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    worker = Path(__file__).with_name(worker_name)
    env = {**clean_environment(), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--nnodes=1",
        f"--master-port={_free_port()}",
        "--master-addr=127.0.0.1",
        str(worker),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, worker_failure(proc.stderr)
    return json.loads(out.read_text())


def worker_failure(stderr: str) -> str:
    """The lines of a failed launch that say why: the first traceback or fatal message of a rank, then the end."""
    lines = [line for line in stderr.splitlines() if not line.startswith(("W1", "I1"))]
    start = next((i for i, line in enumerate(lines) if "Traceback" in line or "terminate" in line), 0)
    return "\n".join(lines[start : start + 40] + ["..."] + lines[-15:])


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    return _launch("fsdp_worker.py", tmp_path_factory)


@pytest.fixture(scope="module")
def lowbit_results(tmp_path_factory) -> dict:
    return _launch("fsdp_lowbit_worker.py", tmp_path_factory)


# the longest fp32 reduction an optimizer step may run in another order: a norm over all parameters
MODEL_NUMEL = sum(p.numel() for p in make_model().parameters())


def _precision(name: str) -> str:
    return moment_precision(name, BY_NAME[name].variants[0])


@pytest.mark.parametrize("spec", [s for s in OPTIM_DB if s.distributed], ids=lambda s: s.name)
def test_fsdp2_matches_unsharded(spec, fsdp_results):
    """Sharded and unsharded runs differ only by rounding: the order of fp32 reductions across shards, the
    bf16 neighbours that order selects, the blocks a shard boundary cuts (quantized state). The tolerance per
    parameter comes from that precision and the run's own update size (tests/tolerances.py), not from one
    machine's result."""
    result = fsdp_results[spec.name]
    assert "error" not in result, result.get("error")
    if spec.distributed_unsupported:  # a known gap must stay a clear error, not silent wrong numbers
        assert spec.distributed_unsupported in result.get("unsupported", ""), result
        return
    assert "unsupported" not in result, result["unsupported"]
    ok, ratio = within(result["per_param"], precision=_precision(spec.name), steps=result["steps"], n=MODEL_NUMEL)
    assert ok, f"max_rel_err {result['max_rel_err']:.3g} is {ratio:.3g} x the precision-derived tolerance"
    if spec.lmopt_engine:
        assert result["nonfinite_raised"], "a NaN in one shard must raise on every rank"
        assert result["resume"] == "bit-exact", result["resume"]


LOWBIT = ["adamw8bit", "adam8bit", "adamw4bit", "lion8bit"]


@pytest.mark.parametrize("name", LOWBIT)
def test_lowbit_sharded_state_is_exact_where_blocks_align(name, lowbit_results):
    """Shard boundaries on block boundaries (uneven split and an empty shard included): sharded and unsharded
    runs are bit-identical, through the kernel and the PyTorch path (bf16 stochastic / Kahan for AdamW8bit);
    elsewhere they differ by the blocking (within the FSDP2 tolerance of the spec)."""
    result = lowbit_results[name]
    assert "error" not in result, result.get("error")
    aligned = {k: v for k, v in result.items() if k.startswith("aligned_")}
    assert len(aligned) >= 2 and all(v == 0.0 for v in aligned.values()), aligned
    assert 0.0 < result["unaligned"] < state_tol(_precision(name), steps=4)  # 4 steps, other blocks


@pytest.mark.parametrize("name", LOWBIT)
def test_lowbit_state_reshards_between_world_sizes(name, lowbit_results):
    """2 shards -> unsharded, 2 -> 1 shard (HSDP mesh), unsharded -> 2: copied bit-exactly where the blocks
    coincide (no warning), else requantized with a warning, each value moving by at most one rounding."""
    result = lowbit_results[name]
    assert "error" not in result, result.get("error")
    aligned, unaligned = result["reshard_aligned"], result["reshard_unaligned"]
    assert aligned.pop("warned") == [False, False, False]
    assert all(v == 0.0 for v in aligned.values()), aligned
    assert unaligned.pop("warned") == [True, True, True]
    bound = result["requantization_bound"] * (1 + 1e-5)
    for key, value in unaligned.items():
        if key.startswith("loaded_"):
            assert 0.0 < value <= bound, (key, value, bound)
        else:  # the load's requantization, then 2 steps with other blocks
            assert value < state_tol(_precision(name), steps=3), (key, value)


@pytest.mark.parametrize("name", LOWBIT)
def test_lowbit_state_through_distributed_checkpoint(name, lowbit_results):
    """get_optimizer_state_dict -> DCP save/load -> set_optimizer_state_dict, and the full_state_dict flow
    (plain tensors), resume bit-exactly. Into 1 shard: the full_state_dict flow requantizes with a warning; a
    sharded DCP load stops at DCP's size check, and converting it (dcp_to_torch_save) then loading it as a full
    state dict works (docs/low-bit-state.md). A Shard(1) parameter is refused naming the fix."""
    result = lowbit_results[name]
    assert "error" not in result, result.get("error")
    dcp = result["dcp"]
    assert dcp["dcp"] == dcp["full_state_dict"] == "bit-exact" and dcp["full_state_dict_is_plain"], dcp
    # the load's requantization, then 3 steps with other blocks
    assert dcp["full_to_1_shard_warned"] and dcp["full_to_1_shard"] < state_tol(_precision(name), steps=4)
    assert "Size mismatch" in dcp["dcp_to_1_shard"] and "_scales" in dcp["dcp_to_1_shard"]
    assert dcp["dcp_converted_to_1_shard_warned"] and dcp["dcp_converted_to_1_shard"] == "same as full_to_1_shard"
    assert dcp["dcp_equal_sizes"] == "warned [True, True], same as full_state_dict"
    message = result["unsupported"]
    assert "Shard(dim=1)" in message and "Shard it on dim 0" in message and "min_quantized_numel" in message
    assert result["small_shard1"] == "ok"  # fp32 moments (a small tensor) still step on any placement


def test_quant_moment_helpers_on_dtensors_8bit_4bit(lowbit_results):
    """load_moment / store_moment on a DTensor parameter (CAME / Adafactor's future quantized first moment):
    DTensor in, DTensor out, bit-identical to the plain helpers where blocks align; a plain value is refused."""
    helpers = lowbit_results["helpers"]
    assert helpers["8bit"] == helpers["4bit"] == "bit-identical", helpers
    assert "the state is a DTensor but the value is a plain tensor" in helpers["8bit_plain_value"]
    assert "the state is a DTensor but the value is a plain tensor" in helpers["4bit_plain_value"]
