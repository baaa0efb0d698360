"""What the multi-process agreement costs ``lmopt.train.fit``: step time with ``distributed=True`` (loss and token
all-reduce, agreed non-finite / data / stop flags) beside ``distributed=False`` (the same DDP or FSDP2 training,
no agreement), interleaved in the same processes, medians and their ratio.

Usage (2 CPU processes over gloo; the table goes to benchmarks/results/train_distributed_overhead.md):
    torchrun --nproc-per-node 2 benchmarks/train_distributed_overhead.py
    torchrun --nproc-per-node 2 benchmarks/train_distributed_overhead.py --repeats 3 --steps 3   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import machine_description  # noqa: E402

import lmopt  # noqa: E402

VOCAB, WIDTH, SEQ, MICRO = 1024, 256, 128, 4


def make_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, WIDTH),
        nn.Linear(WIDTH, 4 * WIDTH),
        nn.GELU(),
        nn.Linear(4 * WIDTH, WIDTH),
        nn.LayerNorm(WIDTH),
        nn.Linear(WIDTH, VOCAB),
    )


def batches(n: int, rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]


def time_fit(wrap: str, distributed: bool, steps: int, accumulation: int) -> float:
    model = make_lm()
    trained = DistributedDataParallel(model) if wrap == "ddp" else model
    if wrap == "fsdp2":
        fully_shard(model)
    optimizer = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-3)
    # one untimed step first (lazy state, DDP's bucket rebuild), then the timed ones
    lmopt.train.fit(
        trained,
        optimizer,
        list(batches(accumulation, dist.get_rank())),
        steps=1,
        accumulation_steps=accumulation,
        handle_signals=False,
        distributed=distributed,
    )
    data = list(batches(steps * accumulation, dist.get_rank()))
    dist.barrier()
    result = lmopt.train.fit(
        trained,
        optimizer,
        data,
        steps=steps,
        accumulation_steps=accumulation,
        handle_signals=False,
        distributed=distributed,
        resume=False,
    )
    return result.elapsed_s / steps  # the whole loop per step: every collective of the step included


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accumulation", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    rows = []
    for wrap in ("ddp", "fsdp2"):
        samples: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):  # interleaved: machine load drifts affect both alike
            for mode in (True, False):
                samples[mode].append(time_fit(wrap, mode, args.steps, args.accumulation))
        agreed, plain = statistics.median(samples[True]), statistics.median(samples[False])
        rows.append((wrap, agreed * 1e3, plain * 1e3, agreed / plain))
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in make_lm().parameters())
        lines = [
            "# `fit` under torchrun: cost of the agreement collectives",
            "",
            f"Machine: {machine_description()}. 2 processes (gloo), 1 thread each; shared with other jobs, so",
            "only the ratio is meaningful.",
            f"Model: {params / 1e6:.1f}M parameters; micro-batch {MICRO} x {SEQ} tokens per rank, accumulation "
            f"{args.accumulation}; AdamW. Median step time over {args.repeats} interleaved repeats of "
            f"{args.steps} steps.",
            "",
            "Command: `torchrun --nproc-per-node 2 benchmarks/train_distributed_overhead.py`",
            "",
            "| wrap | distributed=True (ms) | distributed=False (ms) | ratio |",
            "|---|---:|---:|---:|",
            *[f"| {w} | {a:.1f} | {p:.1f} | {r:.3f} |" for w, a, p, r in rows],
            "",
        ]
        text = "\n".join(lines)
        print(text)
        (HERE / "results" / "train_distributed_overhead.md").write_text(text)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
