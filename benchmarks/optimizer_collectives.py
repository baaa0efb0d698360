"""Collectives each optimizer's step issues on FSDP2 (DTensor) parameters, counted by torch's CommDebugMode.

Usage (2 CPU processes over gloo; the table goes to benchmarks/results/optimizer_collectives.md):
    torchrun --nproc-per-node 2 benchmarks/optimizer_collectives.py

Two bias-free matrices (256 x 512 and 512 x 256), sharded by FSDP2's ``fully_shard``; the second step is counted
(state exists), after ``record_grad_norm`` as ``lmopt.train.fit``'s clipping does (so the optimizer's own
finiteness pass, one scalar all-reduce per tensor otherwise, is skipped). Counts per step for the 2 matrices;
docs/scaling.md turns them into bytes at 7B / 70B.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import machine_description  # noqa: E402

import lmopt  # noqa: E402

OPTIMIZERS = {"adamw": {}, "adamw8bit": {"min_quantized_numel": 0}, "adafactor": {}, "came": {}, "muon": {}}


def count(name: str, hyperparameters: dict) -> dict[str, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 256, bias=False))
    fully_shard(model)
    target = model if lmopt.registry.get_spec(name).accepts_model else list(model.parameters())
    optimizer = lmopt.create_optimizer(name, target, lr=1e-3, **hyperparameters)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 256)).sum().backward()
        optimizer.record_grad_norm(torch.tensor(1.0))
        mode = CommDebugMode()
        with mode:
            optimizer.step()
    return {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}


def main() -> None:
    dist.init_process_group("gloo")
    rows = [(name, count(name, kw)) for name, kw in OPTIMIZERS.items()]
    if dist.get_rank() == 0:
        lines = [
            "# Collectives per optimizer step on FSDP2 parameters",
            "",
            f"Machine: {machine_description()}; 2 processes (gloo).",
            "Command: `torchrun --nproc-per-node 2 benchmarks/optimizer_collectives.py` (counts, not times).",
            "",
            "| optimizer | all_reduce | all_gather | total (2 matrices, one step) |",
            "|---|---:|---:|---:|",
        ]
        for name, counts in rows:
            reduce, gather = counts.get("all_reduce", 0), counts.get("all_gather_into_tensor", 0)
            lines.append(f"| {name} | {reduce} | {gather} | {sum(counts.values())} |")
        text = "\n".join(lines) + "\n"
        print(text)
        (HERE / "results" / "optimizer_collectives.md").write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
