"""Every optimizer's math on FSDP2 (DTensor) parameters equals the unsharded run (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from .optim_db import OPTIM_DB

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
           f"--master-port={_free_port()}", "--master-addr=127.0.0.1", str(worker), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("spec", [s for s in OPTIM_DB if s.distributed], ids=lambda s: s.name)
def test_fsdp2_matches_unsharded(spec, fsdp_results):
    result = fsdp_results[spec.name]
    assert "error" not in result, result.get("error")
    if spec.distributed_unsupported:  # a known gap must stay a clear error, not silent wrong numbers
        assert spec.distributed_unsupported in result.get("unsupported", ""), result
        return
    assert "unsupported" not in result, result["unsupported"]
    assert result["max_rel_err"] < spec.distributed_tol
    if spec.lmopt_engine:
        assert result["nonfinite_raised"], "a NaN in one shard must raise on every rank"
