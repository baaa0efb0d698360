"""``lmopt recommend``: training configurations that fit a model on N devices, best first."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..memory import recommend
from ..memory.units import format_bytes
from ._args import integer
from .plan_cmd import load_model

NAME = "recommend"
HELP = "rank the training configurations (optimizer, precision, sharding, offload, ...) that fit your devices"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a named model, 'NB' (e.g. 13B), or a transformers config.json / folder")
    parser.add_argument("--devices", type=integer(1), default=1, help="data-parallel devices (default 1)")
    parser.add_argument("--device-memory", default="80GB", help="memory per device (default 80GB)")
    parser.add_argument("--task", default="pretrain", choices=["pretrain", "finetune", "lora"])
    parser.add_argument("--micro-batch", type=integer(1), default=8, help="largest micro-batch to try (default 8)")
    parser.add_argument("--seq-len", type=integer(1), default=None, help="default: the model's context, at most 4096")
    parser.add_argument("--lora-rank", type=integer(1), default=16)
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated registry names to consider (default: the recommender's ladder)",
    )
    parser.add_argument(
        "--host-memory", default=None, help="host memory per device for offloading (default: not limited)"
    )
    parser.add_argument("--top", type=integer(1), default=10, help="how many configurations to show")


def run(args: argparse.Namespace) -> int:
    optimizers = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else None
    report = recommend(
        load_model(args.model),
        devices=args.devices,
        device_memory=args.device_memory,
        task=args.task,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        lora_rank=args.lora_rank,
        optimizers=optimizers,
        host_memory=args.host_memory,
        max_results=args.top,
    )
    console = Console()
    if report.fits:
        table = Table(
            title=f"{report.model}, {args.task}: {report.devices} x {format_bytes(report.device_memory)}",
            title_justify="left",
        )
        columns = ("#", "optimizer", "precision", "shard", "offload", "ckpt", "mb", "peak", "why")
        for col in columns:
            kw = {"overflow": "fold", "ratio": 1} if col == "why" else {"no_wrap": True}
            table.add_column(col, justify="right" if col in ("#", "mb", "peak") else "left", **kw)
        short = {
            "none": "-",
            "lmopt": "lmopt",
            "optimizer": "optimizer",
            "optimizer+params": "opt+params",
            "full": "full",
        }
        for r in report:
            table.add_row(
                str(r.rank),
                r.optimizer,
                r.precision,
                short.get(r.sharding, r.sharding),
                short[r.offload],
                short[r.checkpointing],
                str(r.micro_batch),
                format_bytes(r.peak),
                r.reason,
            )
        console.print(table)
        console.print(report.message)
    else:
        console.print(f"[bold red]{report.message}[/bold red]")
        if report.closest is not None:
            console.print("closest plan:\n" + report.closest.summary())
    return 0
