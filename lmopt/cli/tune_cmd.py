"""``lmopt tune``: the learning-rate search of a real tuning loop on the ``lmopt compare`` workload.

Examples::

    lmopt tune                                          # the compare default set, ~10 minutes on 2 CPU cores
    lmopt tune --optimizers adamw,lion --grid-points 7
    lmopt tune --optimizers adamw --widths 64,128,256   # best LR per width, standard parametrization and muP
    lmopt compare --tuned lmopt-tune/<stamp>/tune.json --seeds 3

Every workload option of ``lmopt compare`` applies (model, steps, batch, schedule, data, seed, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._args import integer, number
from .compare_cmd import add_workload_arguments, build_config

NAME = "tune"
HELP = "search each optimizer's learning rate on the compare workload (log grid, successive halving, refinement)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.tune import TuneConfig

    d = TuneConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "outputs: tune.json, loss_vs_lr.png (lr_vs_width.png with --widths), tune.md"
    add_workload_arguments(parser)
    parser.add_argument("--grid-points", type=integer(1), help=f"coarse grid size (default {d.grid_points})")
    parser.add_argument(
        "--grid-factor", type=number(above=1.0, maximum=100.0), help=f"grid spacing (default {d.grid_factor:g}x)"
    )
    parser.add_argument("--eta", type=integer(2), help=f"successive halving keeps 1/eta per rung (default {d.eta})")
    parser.add_argument("--rungs", type=integer(1), help=f"successive-halving rungs (default {d.rungs})")
    parser.add_argument(
        "--refine-points",
        type=integer(0),
        help=f"points between the best and its neighbours (default {d.refine_points})",
    )
    parser.add_argument(
        "--max-extensions", type=integer(0), help=f"grid growth past an edge (default {d.max_extensions})"
    )
    parser.add_argument(
        "--rung-score",
        choices=["cooldown", "train"],
        help=f"how a rung compares trials: the validation loss after a short linear LR cooldown branch, or the "
        f"recent training loss (default {d.rung_score})",
    )
    parser.add_argument(
        "--cooldown-fraction",
        type=number(above=0.0, maximum=1.0),
        help=f"the cooldown branch's length as a fraction of the rung's steps (default {d.cooldown_fraction:g})",
    )
    parser.add_argument(
        "--probes",
        help="comma-separated steps at which every trial records both rung scores without stopping anything "
        "(to check the stopping rule: benchmarks/tune_stopping_rule.py)",
    )
    parser.add_argument(
        "--widths", help="comma-separated model widths: tune at each (the best LR per width, and its transfer)"
    )
    parser.add_argument(
        "--parametrization",
        choices=["sp", "mup", "both"],
        help="sp (standard), mup (lmopt.mup from --base-width, default the first width) or both (the default "
        "with --widths)",
    )
    parser.add_argument(
        "--center",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="centre NAME's grid on LR instead of its recipe; repeatable",
    )


def _integers(text: str | None, option: str, example: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option} takes comma-separated integers (e.g. {example}), got {text!r}")
    return values


def _centers(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--center takes NAME=LR (e.g. lion=1e-4), got {item!r}")
    return out


def build_tune_config(args: argparse.Namespace):
    from dataclasses import replace

    from ..bench.tune import TuneConfig

    compare = build_config(args)
    widths = _integers(args.widths, "--widths", "64,128,256")
    probes = _integers(args.probes, "--probes", "20,40,60")
    parametrization = args.parametrization or ("both" if widths else "sp")
    if parametrization != "both" and not widths:
        compare = replace(compare, parametrization=parametrization)
    values: dict[str, Any] = {
        "compare": compare,
        "widths": widths,
        "parametrizations": ["sp", "mup"] if parametrization == "both" else [parametrization],
        "centers": _centers(args.center),
        "probes": probes or [],
    }
    for name in (
        "grid_points",
        "grid_factor",
        "eta",
        "rungs",
        "refine_points",
        "max_extensions",
        "rung_score",
        "cooldown_fraction",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    config = TuneConfig(**values)
    config.validate()
    return config


class _Bars:
    """One progress bar per study: steps trained against the planned budget, and the trial in progress."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def on_study_start(self, label: str, planned_steps: int) -> None:
        self.tasks[label] = self.progress.add_task(label, total=planned_steps, note="")

    def on_progress(self, label: str, steps_done: int, planned_steps: int, note: str) -> None:
        self.progress.update(self.tasks[label], completed=steps_done, total=planned_steps, note=note)

    def on_study_end(self, label: str, study: dict[str, Any]) -> None:
        best = study["best_lr"]
        note = "no finished trial" if best is None else f"best lr {best:.3g}, val {study['best_validation_loss']:.3f}"
        self.progress.update(
            self.tasks[label], total=study["steps_trained"], completed=study["steps_trained"], note=note
        )


def _run_search(config: Any, out: Path, console: Console) -> tuple[dict[str, Any], dict[str, Path]]:
    from ..bench.tune import tune
    from ..bench.tune_report import TUNE_COLUMNS, tune_rows, write_tune_outputs

    names = config.compare.optimizers or []
    console.print(
        f"lmopt tune: {', '.join(names) if names else 'the default set'} on the {config.compare.model} model, "
        f"{config.compare.steps} steps per full trial"
    )
    progress = Progress(
        TextColumn("[bold cyan]{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.completed:>5.0f}/{task.total:<5.0f} steps"),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        result = tune(config, _Bars(progress))
    paths = write_tune_outputs(result, out)
    table = Table(title="lmopt tune: best learning rate per optimizer (validation loss after the full run)")
    for column in TUNE_COLUMNS:
        table.add_column(column, justify="left" if column == "optimizer" else "right", overflow="fold")
    for row in tune_rows(result):
        table.add_row(*(row[c] for c in TUNE_COLUMNS))
    console.print(table)
    for t in result.get("transfer", []):
        console.print(
            f"{t['optimizer']} {t['parametrization']}: best LR by width {t['best_lr_by_width']} (spread "
            f"{t['best_lr_spread']:.2f}x); width {t['widest_width']} at the narrowest width's LR: "
            f"{t['transferred_validation_loss']:.4f} vs its own tuned {t['widest_own_validation_loss']:.4f}"
        )
    console.print(f"report: {paths['tune_md']}; plot: {paths['loss_vs_lr'].name}; every trial: {paths['tune_json']}")
    return result, paths


def search(compare: Any, out: Path, console: Console) -> dict[str, Any]:
    """``lmopt compare --tuned`` without a file: the default search on ``compare``'s workload (one seed)."""
    from dataclasses import replace

    from ..bench.tune import TuneConfig

    config = TuneConfig(compare=replace(compare, seeds=1))
    config.validate()
    result, _ = _run_search(config, out, console)
    return result


def run(args: argparse.Namespace) -> int:
    config = build_tune_config(args)
    out = Path(args.out) if args.out else Path("lmopt-tune") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    console = Console(width=None if sys.stdout.isatty() else 200)
    result, paths = _run_search(config, out, console)
    console.print(f"use it: lmopt compare --tuned {paths['tune_json']}")
    return 0 if any(s["best_lr"] is not None for s in result["studies"]) else 1


__all__ = ["add_arguments", "build_tune_config", "run", "search"]
