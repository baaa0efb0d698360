"""``lmopt list``: the registry as a table."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..registry import REFERENCE_SHAPE, OptimizerSpec, list_optimizers

NAME = "list"
HELP = "list the registered optimizers: state bytes per parameter, paper, aliases"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="only this family (adam, sgd, ...)")


def alias_labels(spec: OptimizerSpec) -> list[str]:
    """The entry's aliases; one that changes the state says its own bytes per parameter (``came8bit (1.020)``)."""
    base = spec.bytes_per_parameter()
    labels = []
    for alias, implied in spec.aliases.items():
        try:
            own = spec.bytes_per_parameter(**implied)
        except (TypeError, ValueError):  # an alias whose hyperparameters the state rule does not read
            own = base
        labels.append(alias if abs(own - base) < 5e-4 else f"{alias} ({own:.3f})")
    return labels


def run(args: argparse.Namespace) -> int:
    shape = "x".join(map(str, REFERENCE_SHAPE))
    table = Table(
        title="lmopt optimizers",
        caption=f"state bytes per parameter for one fp32 {shape} matrix (aliases that change it: in brackets)",
    )
    table.add_column("name", style="bold cyan")
    table.add_column("state B/param", justify="right")
    table.add_column("what", overflow="fold")
    table.add_column("paper", overflow="fold")
    table.add_column("aliases", overflow="fold")
    for spec in list_optimizers():
        if args.family and spec.family != args.family:
            continue
        table.add_row(
            spec.name, f"{spec.bytes_per_parameter():.3f}", spec.summary, spec.paper, ", ".join(alias_labels(spec))
        )
    Console().print(table)
    return 0
