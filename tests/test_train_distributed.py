"""``lmopt.train.fit`` under torchrun (2 CPU processes, gloo), with DDP and with FSDP2: equal to one process on
the same global batch; a NaN on one rank only makes both ranks take the same decision; the monitor's statistics
are reduced and logged once (tests/train_dist_worker.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from .test_distributed import _launch
from .tolerances import trajectory_tol

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# 4 steps of AdamW (lr 1e-2: at most ~1e-2 per element and step after clipping) on parameters of scale ~1;
# the longest reduction whose order differs is a gradient sum over the global batch's 96 tokens x 32 logits
FP32_TOL = trajectory_tol(precision="fp32", steps=4, max_update=1e-2, scale=1.0, n=96 * 32)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _launch("train_dist_worker.py", tmp_path_factory)


@pytest.mark.parametrize("case", ["ddp_mean", "fsdp2_mean", "ddp_tokens", "fsdp2_tokens"])
def test_fit_equals_single_process_on_the_global_batch(case, ranks):
    """Accumulation (1/k and by tokens, micro-batches of unequal token counts), z-loss, clipping (active on
    every step), the global gradient norm and the monitor's update ratios: the same on every rank, and equal
    to one process's fit on the whole global batch within fp32 reduction-order tolerance."""
    for rank in ranks:
        found = rank["fits"][case]
        assert found["clipped"], "the clip threshold must act for the norm to matter"
        assert found["tokens"][0] == found["tokens"][1], found["tokens"]
        for key in ("params", "losses", "norms", "factors", "ratios"):
            assert found[key] < FP32_TOL, (case, key, found[key], FP32_TOL)
        assert found["events_equal"] and found["events"] == 4, found


@pytest.mark.parametrize("case", ["ddp_mean", "fsdp2_mean", "ddp_tokens", "fsdp2_tokens"])
def test_monitor_logs_once_on_rank_0(case, ranks):
    """Every rank returns the same (reduced) events; only rank 0 writes them to the log."""
    assert ranks[0]["fits"][case]["logged"] == ranks[0]["fits"][case]["events"] > 0
    assert ranks[1]["fits"][case]["logged"] == 0


def test_nan_on_one_rank_skips_on_every_rank(ranks):
    """A NaN in rank 1's all-reduced gradient only (DDP comm hook): with on_nonfinite="skip" both ranks skip
    the same one step and keep identical parameters; "stop" stops both at the same step; "raise" raises
    NonFiniteGradientError on both -- and nothing hangs (the worker's process group times out after 120 s)."""
    skip = [r["nonfinite"]["ddp_grad_skip"] for r in ranks]
    assert [s["skipped"] for s in skip] == [1, 1] and [s["step"] for s in skip] == [4, 4], skip
    assert skip[0]["params"] == skip[1]["params"]
    stop = [r["nonfinite"]["ddp_grad_stop"] for r in ranks]
    assert [s["stopped_by"] for s in stop] == ["nonfinite", "nonfinite"] and stop[0]["step"] == stop[1]["step"]
    raised = [r["nonfinite"]["ddp_grad_raise"] for r in ranks]
    assert [s.get("raised") for s in raised] == ["NonFiniteGradientError"] * 2, raised


def test_nan_loss_on_one_rank_and_nan_state_shard(ranks):
    """FSDP2: a NaN in rank 1's loss only (its gradients finite) -> the global loss is NaN and both skip that
    step; a NaN in rank 1's shard of the optimizer state -> both monitors report one bad tensor."""
    for rank in ranks:
        found = rank["nonfinite"]["fsdp2_loss_skip"]
        assert found["skipped"] == 1 and found["step"] == 4, found
        assert found["losses"][1] != found["losses"][1]  # NaN: the global loss of the poisoned step
        assert rank["nonfinite"]["fsdp2_state"] == [["state_nonfinite", 1]]


def test_ddp_accumulation_synchronises_once_per_step(ranks):
    """With accumulation, DDP all-reduces on the last micro-batch only (``no_sync`` for the others)."""
    for rank in ranks:
        sync = rank["sync"]
        assert sync["fit"] > 0 and sync["every_backward"] == 2 * sync["fit"], sync


@pytest.mark.parametrize("wrap", ["fsdp2", "ddp"])
def test_gradscaler_overflow_on_one_rank_skips_on_every_rank(wrap, ranks):
    """GradScaler with an inf in rank 1's gradient only (its FSDP2 shard: torch's DTensor unscale already
    reduces the flag; its DDP all-reduced copy: optimizer_step all-reduces the scalers' found-inf flags): both
    ranks skip the step (parameters unchanged) and halve the scale alike -- no rank steps alone."""
    found = [r["nonfinite"][f"{wrap}_scaler"] for r in ranks]
    assert all("error" not in f for f in found), found
    assert [f["scale"] for f in found] == [2.0**7, 2.0**7] and all(f["unchanged"] for f in found), found
