"""``lmopt list``: the registry as a table."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..registry import REFERENCE_SHAPE, list_optimizers

NAME = "list"
HELP = "list the registered optimizers: state bytes per parameter, paper, aliases"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="only this family (adam, sgd, ...)")


def run(args: argparse.Namespace) -> int:
    shape = "x".join(map(str, REFERENCE_SHAPE))
    table = Table(title="lmopt optimizers", caption=f"state bytes per parameter for one fp32 {shape} matrix")
    table.add_column("name", style="bold cyan")
    table.add_column("state B/param", justify="right")
    table.add_column("what", overflow="fold")
    table.add_column("paper", overflow="fold")
    table.add_column("aliases", overflow="fold")
    for spec in list_optimizers():
        if args.family and spec.family != args.family:
            continue
        table.add_row(spec.name, f"{spec.bytes_per_parameter():.3f}", spec.summary, spec.paper,
                      ", ".join(spec.aliases))
    Console().print(table)
    return 0
