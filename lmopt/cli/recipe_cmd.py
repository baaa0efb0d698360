"""``lmopt recipe``: the published hyperparameters for a model size, phase and optimizer, with sources."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from .. import recipes as R
from ._args import integer

NAME = "recipe"
HELP = "published hyperparameters for a model size and phase, translated for an optimizer, with sources"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("size", nargs="?", help="model size: 125M, 350M, 1.3B, 7B, 13B, 30B, 65B, 70B, 175B, ...")
    parser.add_argument("--phase", choices=("pretrain", "finetune"), default="pretrain")
    parser.add_argument("--optimizer", default="adamw", help="registry name (default adamw)")
    parser.add_argument("--total-steps", type=integer(1), default=None, help="steps of your run")
    parser.add_argument("--warmup-steps", type=integer(0), default=None, help="override the warmup (short runs)")
    parser.add_argument(
        "--batch-tokens",
        type=integer(1),
        default=None,
        help="your tokens per optimizer step (rescales the lr; pre-training only)",
    )
    parser.add_argument(
        "--scaling",
        choices=("auto", "sqrt", "linear"),
        default="auto",
        help="batch-size lr rule (auto: linear for SGD, square root otherwise)",
    )
    parser.add_argument("--json", action="store_true", help="print the recipe as JSON")
    parser.add_argument("--table", action="store_true", help="print the published pre-training table")
    parser.add_argument("--published", action="store_true", help="print what published models used")


def _print_table(console: Console) -> None:
    table = Table(title="published pre-training configurations (AdamW)")
    for col in ("size", "model", "peak lr", "tokens/step", "warmup steps", "decay steps", "source"):
        table.add_column(col, overflow="fold")
    for row in R.PRETRAIN_TABLE:
        table.add_row(
            row.size,
            row.model,
            f"{row.lr.value:.3g}",
            f"{row.batch_tokens.value:,}",
            f"{row.warmup_steps.value:,}",
            f"{round(row.decay_tokens.value / row.batch_tokens.value):,}",
            row.lr.source,
        )
    console.print(table)
    common = Table(title="shared by every row")
    for col in ("field", "value", "source"):
        common.add_column(col, overflow="fold")
    for name, value in R.PRETRAIN_COMMON.items():
        common.add_row(name, str(value.value), value.source)
    console.print(common)


def _print_published(console: Console) -> None:
    for model, fields in R.PUBLISHED.items():
        table = Table(title=model)
        for col in ("field", "value", "source"):
            table.add_column(col, overflow="fold")
        for name, value in fields.items():
            table.add_row(name, str(value.value), value.source)
        console.print(table)


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.table or args.published:
        if args.table:
            _print_table(console)
        if args.published:
            _print_published(console)
        if not args.size:
            return 0
    if not args.size:
        raise ValueError("give a model size (e.g. 7B), or --table / --published")
    r = R.recipe(
        args.size,
        phase=args.phase,
        optimizer=args.optimizer,
        total_steps=args.total_steps,
        warmup_steps=args.warmup_steps,
        batch_tokens=args.batch_tokens,
        batch_scaling=args.scaling,
    )
    if args.json:
        print(json.dumps(r.to_dict(), indent=2, default=str))
        return 0
    table = Table(title=f"{r.size} {r.phase} recipe for {r.optimizer}")
    table.add_column("field", style="bold")
    table.add_column("value", style="cyan")
    table.add_column("source", overflow="fold")
    for name, value, source in r.rows():
        table.add_row(name, value, source)
    console.print(table)
    for note in r.notes:
        console.print(f"note: {note}")
    used = [label for label in R.REFERENCES if any(label in src for _, _, src in r.rows())]
    if used:
        console.print("references:")
        for label in used:
            console.print(f"  {label}: {R.REFERENCES[label]}")
    console.print(f"build it: lmopt.recipe({r.size!r}, phase={r.phase!r}, optimizer={r.optimizer!r}).build(model)")
    return 0
