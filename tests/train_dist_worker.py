"""Worker for test_train_distributed.py, launched with torchrun (2 CPU processes, gloo).

``lmopt.train.fit`` on each rank's half of every global batch, with the model under DDP and under FSDP2
(``fully_shard``), against ``fit`` in one process on the whole global batch (``distributed=False``, on each
rank: no collective): parameters, losses, gradient norms and clip factors, and the monitor's update/parameter
ratios. Then the non-finite agreement: a NaN put into rank 1's all-reduced gradient only (a DDP comm hook),
into rank 1's loss only, and into rank 1's optimizer-state shard only. Rank 0 writes the JSON file named on the
command line, with every rank's findings.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmopt  # noqa: E402
from lmopt.train import HealthMonitor, fit  # noqa: E402

VOCAB, WIDTH, SEQ = 32, 16, 8
STEPS, ACCUMULATION, MICRO = 4, 2, 3  # per rank: 2 micro-batches of 3 sequences; global batch 12 sequences


def make_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.LayerNorm(WIDTH), nn.Tanh(), nn.Linear(WIDTH, VOCAB))


def global_micro_batches(step: int, masked: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of one step as ``world * ACCUMULATION`` micro-batches (rank r takes r*k ... r*k+k-1).
    ``masked``: targets ignored (-100) at random, so micro-batches hold different numbers of tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(2 * ACCUMULATION):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        if masked:
            keep = torch.rand(targets.shape, generator=g) < torch.rand((), generator=g) * 0.8 + 0.2
            targets[~keep] = -100
        out.append((inputs, targets))
    return out


def rank_batches(rank: int, masked: bool):
    return [
        b
        for s in range(STEPS)
        for b in global_micro_batches(s, masked)[rank * ACCUMULATION : (rank + 1) * ACCUMULATION]
    ]


def all_batches(masked: bool):
    return [b for s in range(STEPS) for b in global_micro_batches(s, masked)]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_fit(wrap: str, weighting: str, distributed: bool) -> dict:
    """One fit; ``wrap`` is "ddp", "fsdp2" or "single" (one process, the whole global batch)."""
    rank = dist.get_rank()
    masked = weighting == "tokens"
    model = make_lm()
    if wrap == "fsdp2":
        fully_shard(model)
        trained = model
    elif wrap == "ddp":
        trained = DistributedDataParallel(model)
    else:
        trained = model
    optimizer = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2, weight_decay=0.1)
    # bounds no healthy ratio meets: every ratio step raises an event, logged once (rank 0)
    monitor = HealthMonitor(ratio_every=1, state_every=1, ratio_bounds=(1e-9, 2e-9), distributed=distributed)
    norms, factors = [], []
    batches = all_batches(masked) if wrap == "single" else rank_batches(rank, masked)
    handler = Collect()
    logger = logging.getLogger("lmopt.train")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        result = fit(
            trained,
            optimizer,
            batches,
            steps=STEPS,
            accumulation_steps=ACCUMULATION * (2 if wrap == "single" else 1),
            accumulation_weighting=weighting,
            clip=0.05,  # below the gradient norm of these steps: clipping acts
            z_loss=1e-4,
            monitor=monitor,
            handle_signals=False,
            callbacks=[lambda info: norms.append(info.grad_norm) or factors.append(info.clip_factor)],
            distributed=distributed,
        )
    finally:
        logger.removeHandler(handler)
    return {
        "params": [full(p) for p in model.parameters()],
        "losses": result.losses,
        "tokens": result.tokens,
        "norms": norms,
        "factors": factors,
        "ratios": [r for _, r in monitor.update_ratios[0]],
        "events": [e.kind for e in monitor.events],
        "logged": len(handler.messages),
    }


def compare_fits() -> dict:
    out = {}
    for weighting in ("mean", "tokens"):
        single = run_fit("single", weighting, distributed=False)
        for wrap in ("ddp", "fsdp2"):
            run = run_fit(wrap, weighting, distributed=True)
            out[f"{wrap}_{weighting}"] = {
                "params": max_rel(run["params"], single["params"]),
                "losses": rel(run["losses"], single["losses"]),
                "norms": rel(run["norms"], single["norms"]),
                "factors": rel(run["factors"], single["factors"]),
                "ratios": rel(run["ratios"], single["ratios"]),
                "tokens": [run["tokens"], single["tokens"]],
                "clipped": all(f < 1.0 for f in single["factors"]),
                "events_equal": run["events"] == single["events"],
                "events": len(run["events"]),
                "logged": run["logged"],
            }
    return out


def poisoning_hook(state: dict, bucket):
    """DDP's all-reduce, then a NaN in rank 1's reduced gradient at the poisoned step: only rank 1 sees it."""
    future = default_hooks.allreduce_hook(None, bucket)

    def poison(fut):
        tensor = fut.value()[0]
        if dist.get_rank() == 1 and state["calls"] == state["poison_at"]:
            tensor.view(-1)[0] = float("nan")
        state["calls"] += 1
        return tensor

    return future.then(poison)


def nonfinite_agreement() -> dict:
    out = {}
    for policy in ("skip", "stop", "raise"):
        model = make_lm()
        ddp = DistributedDataParallel(model)
        # one bucket per backward on this small model: the second step's all-reduce is poisoned
        state = {"calls": 0, "poison_at": 1}
        ddp.register_comm_hook(state, poisoning_hook)
        optimizer = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
        try:
            result = fit(
                ddp,
                optimizer,
                rank_batches(dist.get_rank(), False),
                steps=STEPS,
                accumulation_steps=ACCUMULATION,
                monitor=False,
                handle_signals=False,
                on_nonfinite=policy,
            )
            outcome = {"stopped_by": result.stopped_by, "skipped": result.skipped_steps, "step": result.step}
        except lmopt.NonFiniteGradientError as err:
            outcome = {"raised": type(err).__name__}
        outcome["buckets"] = state["calls"]
        outcome["params"] = [full(p).tolist() for p in model.parameters()]
        out[f"ddp_grad_{policy}"] = outcome
    # FSDP2: a NaN in rank 1's loss only (a constant: its gradients stay finite) -> every rank skips
    model = make_lm()
    fully_shard(model)
    optimizer = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
    calls = {"n": 0}

    def loss_fn(m, batch):
        loss, tokens = lmopt.train.lm_loss(m, batch)
        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] == 3:  # step 2's first micro-batch
            loss = loss + torch.tensor(float("nan"))
        return loss, tokens

    result = fit(
        model,
        optimizer,
        rank_batches(dist.get_rank(), False),
        steps=STEPS,
        accumulation_steps=ACCUMULATION,
        loss_fn=loss_fn,
        monitor=False,
        handle_signals=False,
        on_nonfinite="skip",
    )
    out["fsdp2_loss_skip"] = {"skipped": result.skipped_steps, "step": result.step, "losses": result.losses}
    # GradScaler: an inf in rank 1's gradient only -> both ranks' scalers skip and back off alike
    out["fsdp2_scaler"] = scaler_agreement("fsdp2")
    out["ddp_scaler"] = scaler_agreement("ddp")
    # FSDP2: a NaN in rank 1's shard of the optimizer state -> every rank's monitor reports one bad tensor
    weight = next(iter(optimizer.state.values()))["exp_avg"]
    if dist.get_rank() == 1:
        weight.to_local().view(-1)[0] = float("nan")
    events = HealthMonitor(state_every=1, distributed=True)._check_state(0, optimizer)
    out["fsdp2_state"] = [(e.kind, e.data.get("tensors")) for e in events]
    return out


def scaler_agreement(wrap: str) -> dict:
    """One GradScaler step with an inf in rank 1's gradient only: its shard (FSDP2), or its all-reduced copy
    (DDP, a comm hook)."""
    model = make_lm()
    trained = model
    if wrap == "fsdp2":
        fully_shard(model)
    else:
        trained = DistributedDataParallel(model)
        trained.register_comm_hook({"calls": 0, "poison_at": 0}, poisoning_hook)
    optimizer = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [full(p).clone() for p in model.parameters()]
    inputs, targets = rank_batches(dist.get_rank(), False)[0]
    loss, _ = lmopt.train.lm_loss(trained, (inputs, targets))
    scaler.scale(loss).backward()
    if dist.get_rank() == 1 and wrap == "fsdp2":
        next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("inf")
    try:
        outcome = lmopt.train.optimizer_step(optimizer, clip=1.0, loss=float(loss), scaler=scaler)
        result = {"applied": outcome.applied, "scale": scaler.get_scale()}
    except Exception as err:  # reported, so that the test names it
        result = {"error": f"{type(err).__name__}: {err}"}
    result["unchanged"] = all(torch.equal(full(p), b) for p, b in zip(model.parameters(), before))
    return result


def counting_hook(state: dict, bucket):
    state["calls"] += bucket.buffer().numel()  # elements all-reduced (buckets may be regrouped)
    return default_hooks.allreduce_hook(None, bucket)


def sync_counts() -> dict:
    """Gradient elements DDP all-reduces in fit (accumulation 2: ``no_sync`` for the first micro-batch) and in the same
    backward passes without ``no_sync``."""
    counts = {}
    for name, use_no_sync in (("fit", True), ("every_backward", False)):
        model = make_lm()
        ddp = DistributedDataParallel(model)
        state = {"calls": 0}
        ddp.register_comm_hook(state, counting_hook)
        optimizer = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
        if use_no_sync:
            fit(
                ddp,
                optimizer,
                rank_batches(dist.get_rank(), False),
                steps=STEPS,
                accumulation_steps=ACCUMULATION,
                monitor=False,
                handle_signals=False,
            )
        else:
            for batch in rank_batches(dist.get_rank(), False):
                lmopt.train.lm_loss(ddp, batch)[0].backward()
        counts[name] = state["calls"]
    return counts


def main(out_path: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hang fails the test, not the suite
    torch.set_num_threads(1)
    mine = {"fits": compare_fits(), "nonfinite": nonfinite_agreement(), "sync": sync_counts()}
    everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)
    gc.collect()  # DDP reducers freed while the process group still exists (else gloo may abort at exit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
