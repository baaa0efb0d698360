"""Distributed Muon (issue 13 item 5) and the Muon upgrades under FSDP2 (issue 15 item 3), 2 CPU processes
(gloo): the owner-rank path and DTensor's implicit path both equal the unsharded run, for Muon and NorMuon, with
Polar Express, cautious masking, 3-D expert weights per matrix and flattened (tests/muon_dist_worker.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lmopt.optim._muon_distributed import assign_owners

from .muon_dist_worker import CASES
from .test_distributed import _launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

#: fp32 Newton-Schulz; the sharded runs reduce norms and means in another order (and the DTensor path's matmuls
#: sum over shards): ~1e-7 relative per step, 6 steps, amplified by the quintic's slope on small singular values
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _launch("muon_dist_worker.py", tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_muon_equals_unsharded(case, results):
    result = results[case]
    assert "error" not in result, result["error"]
    assert result["moved"] > 1e-2  # the weights did move: the comparison is not of untouched models
    assert result["max_rel_err"] < TOL, result
    assert result["state_ok"], "momentum / second-moment state differs from the unsharded run"
    if "dtensor" in case:
        assert result["bytes_sent"] == 0  # DTensor's own collectives; the owner path's counter is untouched
    else:
        assert result["bytes_sent"] > 0


def test_owner_path_sends_each_matrix_twice(results):
    """Bytes of the owner path, 2 ranks: each gathered / scattered matrix moves its other rank's rows (padded to
    the larger shard) once each way, in fp32; NorMuon adds its second moment as one more column, cautious masking
    one all-reduce of a float64 count per matrix and step. The 3-D experts (split 2 + 1) move nothing."""
    steps = 6
    # matrices gathered (rows, cols): inp, mid, tall, row, kernel; each rank's shard: ceil(rows / 2) rows
    matrices = [(16, 6), (5, 16), (20, 7), (1, 20), (4, 20)]
    plain = sum(2 * -(-r // 2) * c * 4 for r, c in matrices) * steps  # gather + scatter, one shard each, fp32
    assert results["muon_owner"]["bytes_sent"] == plain
    normuon = sum(2 * -(-r // 2) * (c + 1) * 4 for r, c in matrices) * steps
    assert results["normuon_owner"]["bytes_sent"] == normuon
    cautious = plain + 2 * 6 * 8 * steps  # 6 sharded Muon tensors (the experts too), both ranks all-reduce
    assert results["muon_owner_cautious"]["bytes_sent"] == cautious
    flattened = plain + 2 * -(-3 // 2) * 35 * 4 * steps  # the experts as one (3, 35) matrix
    assert results["muon_owner_flatten_3d"]["bytes_sent"] == flattened


def test_owners_share_the_work_largest_first():
    costs = [8.0, 1.0, 4.0, 4.0, 2.0, 1.0]
    order, owner = assign_owners(costs, 2)
    assert order == [0, 2, 3, 4, 1, 5]
    load = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert load == [10.0, 10.0]
    assert assign_owners([3.0], 4) == ([0], [0])
    _, owner = assign_owners([1.0] * 8, 4)
    assert sorted(owner) == [0, 0, 1, 1, 2, 2, 3, 3]
