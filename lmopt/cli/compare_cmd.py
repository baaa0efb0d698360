"""``lmopt compare``: train a small Llama with several optimizers; table, plots, JSON and report.

Examples::

    lmopt compare                                    # the default set, ~5 minutes on a 2-core CPU
    lmopt compare --optimizers adamw,lion --steps 300 --model base
    lmopt compare --set lion.lr=1e-4 --set adamw.betas=[0.9,0.99]
    lmopt compare --data ~/corpus/ --tokenizer ~/models/my-tokenizer
    lmopt compare --config lmopt-compare/20260101-120000/results.json   # re-run a comparison
    lmopt compare --workload modular                 # grokking: AdamW with and without weight decay
    lmopt compare --workload modular --optimizers adamw,lion --weight-decays 1,0.1,0 --modulus 47

Options given with ``--config`` override the file's values. ``--workload modular`` (:mod:`lmopt.bench.modular`)
takes ``--optimizers``, ``--steps``, ``--seed``, ``--device``, ``--out``, ``--set``, ``--warmup-steps``,
``--eval-every``, ``--threads`` and its own ``--modulus``, ``--train-fraction``, ``--weight-decays``, ``--lr``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._args import integer, number

NAME = "compare"
HELP = "train a small Llama with several optimizers on a real corpus; compare loss, speed and memory"

#: options of the Llama workload only, and of the grokking workload only (argparse dest: option)
_LLM_ONLY = {
    "model": "--model",
    "batch_size": "--batch-size",
    "seq_len": "--seq-len",
    "data": "--data",
    "tokenizer": "--tokenizer",
    "config": "--config",
    "eval_windows": "--eval-windows",
    "max_grad_norm": "--max-grad-norm",
}
_MODULAR_ONLY = {
    "modulus": "--modulus",
    "train_fraction": "--train-fraction",
    "weight_decays": "--weight-decays",
    "lr": "--lr",
}
_MODULAR_FIELDS = (
    "steps",
    "seed",
    "device",
    "warmup_steps",
    "eval_every",
    "threads",
    "modulus",
    "train_fraction",
    "lr",
)

_FIELDS = (
    "steps",
    "model",
    "batch_size",
    "seq_len",
    "seed",
    "device",
    "data",
    "tokenizer",
    "warmup_steps",
    "eval_windows",
    "eval_every",
    "max_grad_norm",
    "threads",
    "seeds",
    "schedule",
    "warmup_fraction",
    "decay_fraction",
    "width",
    "base_width",
    "baseline",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.compare import DEFAULT_OPTIMIZERS
    from ..bench.modular import ModularConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"default optimizers (those registered): {', '.join(DEFAULT_OPTIMIZERS)}\n"
        "outputs: results.json, loss_vs_step.png, loss_vs_time.png, report.md, report.html\n"
        "--workload modular outputs: results.json, accuracy_vs_step.png, loss_vs_step.png, report.md"
    )
    parser.add_argument(
        "--workload",
        choices=("llm", "modular"),
        default="llm",
        help="llm (default): a small Llama on a corpus; modular: grokking on (a + b) mod p with a tiny "
        "transformer, each optimizer with each --weight-decays (default adamw with 1 and 0)",
    )
    add_workload_arguments(parser)
    parser.add_argument(
        "--parametrization",
        choices=["sp", "mup"],
        help="sp: the standard parametrization (default); mup: lmopt.mup from --base-width",
    )
    parser.add_argument(
        "--tuned",
        nargs="?",
        const="",
        metavar="TUNE_JSON",
        help="each optimizer at its tuned learning rate: from a tune.json of lmopt tune, or, without a file, "
        "from an lmopt tune search run first on this workload (written under OUT/tune)",
    )
    m = ModularConfig()
    modular = parser.add_argument_group("--workload modular")
    modular.add_argument("--modulus", type=integer(2), help=f"p of (a + b) mod p (default {m.modulus})")
    modular.add_argument(
        "--train-fraction",
        type=number(above=0, maximum=1),
        help=f"fraction of the p*p pairs used for training (default {m.train_fraction:g})",
    )
    modular.add_argument(
        "--weight-decays",
        metavar="WD[,WD...]",
        help=f"weight decays to run each optimizer with (default {','.join(f'{w:g}' for w in m.weight_decays)})",
    )
    modular.add_argument("--lr", type=number(above=0), help=f"peak learning rate (default {m.lr:g})")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that define the compare workload (``lmopt compare`` and ``lmopt tune`` share them)."""
    from ..bench.compare import SCHEDULES, CompareConfig
    from ..bench.workload import MODEL_SIZES

    d = CompareConfig()
    parser.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help="registry names or aliases, comma- or space-separated; 'all' for every registered "
        "one (default: the documented default set that is registered)",
    )
    parser.add_argument("--steps", type=integer(1), help=f"optimizer steps per optimizer (default {d.steps})")
    parser.add_argument("--model", choices=list(MODEL_SIZES), help=f"model size (default {d.model})")
    parser.add_argument("--batch-size", type=integer(1), help=f"sequences per step (default {d.batch_size})")
    parser.add_argument("--seq-len", type=integer(2), help=f"tokens per sequence (default {d.seq_len})")
    parser.add_argument("--seed", type=integer(0), help=f"initial weights and data order (default {d.seed})")
    parser.add_argument("--device", help="auto (default: CUDA when available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--out", help="output folder (default ./lmopt-compare/<UTC timestamp>)")
    parser.add_argument("--data", help="a text file or a folder of text files (default: Python's stdlib sources)")
    parser.add_argument("--tokenizer", help="a local tokenizer folder for AutoTokenizer (default: bytes)")
    parser.add_argument("--config", help="a results.json (or a config JSON) to re-run; other options override it")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        dest="overrides",
        help="hyperparameter override, VALUE in JSON (e.g. lion.lr=1e-4, adamw.betas=[0.9,0.99]); repeatable",
    )
    parser.add_argument("--warmup-steps", type=integer(0), help="warmup length (default 10%% of --steps)")
    parser.add_argument("--eval-windows", type=integer(1), help=f"validation windows (default {d.eval_windows})")
    parser.add_argument("--eval-every", type=integer(1), help="also evaluate every N steps (default: at the end only)")
    parser.add_argument(
        "--threads",
        type=integer(1),
        help="torch CPU threads during the run (default: torch's setting; "
        "on a busy shared machine 1 can be much faster)",
    )
    parser.add_argument(
        "--max-grad-norm", type=number(0), help=f"clipping threshold, 0 = off (default {d.max_grad_norm})"
    )
    parser.add_argument(
        "--seeds",
        type=integer(1),
        help="run every optimizer over N seeds (weights and data order: --seed, --seed + 1, ...); "
        "figures as mean ± std (default 1)",
    )
    parser.add_argument("--schedule", choices=list(SCHEDULES), help=f"LR schedule shape (default {d.schedule})")
    parser.add_argument(
        "--warmup-fraction",
        type=number(0, above=None, maximum=0.99),
        help=f"warmup as a fraction of --steps when --warmup-steps is not given (default {d.warmup_fraction})",
    )
    parser.add_argument(
        "--decay-fraction",
        type=number(0, maximum=0.99),
        help=f"WSD: the decay's fraction of the steps (default {d.decay_fraction})",
    )
    parser.add_argument("--width", type=integer(1), help="the model's hidden size (default: the named size's)")
    parser.add_argument(
        "--base-width", type=integer(1), help="muP's base width (default: the named size's hidden size)"
    )
    parser.add_argument(
        "--baseline",
        help=f"the optimizer whose final train loss is the steps-to-target target (default {d.baseline})",
    )


def _parse_override(text: str) -> tuple[str, str, Any]:
    name_key, sep, raw = text.partition("=")
    name, dot, key = name_key.partition(".")
    if not sep or not dot or not name or not key:
        raise ValueError(f"--set takes NAME.KEY=VALUE (e.g. lion.lr=1e-4), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as implementation=foreach
    return name.strip(), key.strip(), value


def build_config(args: argparse.Namespace):
    """The :class:`CompareConfig` of the parsed arguments (``--config`` file, then explicit options)."""
    from ..bench.compare import CompareConfig

    values: dict[str, Any] = {}
    if args.config:
        values = dict(CompareConfig.from_dict(_read_json(args.config, "--config")).__dict__)
    _set_options(args, values, _FIELDS)
    if getattr(args, "parametrization", None) in ("sp", "mup"):
        values["parametrization"] = args.parametrization
    config = CompareConfig(**values)
    config.validate()
    return config


def _set_options(args: argparse.Namespace, values: dict[str, Any], names: tuple[str, ...]) -> None:
    """Put the given options ``names``, ``--optimizers`` and the ``--set`` overrides into ``values``."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.optimizers:
        values["optimizers"] = [n for item in args.optimizers for n in item.split(",") if n.strip()]
    hyper = {k: dict(v) for k, v in values.get("hyperparameters", {}).items()}
    if args.optimizers and args.config:  # a new optimizer list drops the file's overrides for the others
        hyper = {k: v for k, v in hyper.items() if k in values["optimizers"]}
    for text in args.overrides:
        name, key, value = _parse_override(text)
        hyper.setdefault(name, {})[key] = value
    values["hyperparameters"] = hyper


def build_modular_config(args: argparse.Namespace):
    """The :class:`~lmopt.bench.modular.ModularConfig` of the parsed arguments (``--workload modular``)."""
    from ..bench.modular import ModularConfig, resolve_modular_config

    given = [option for dest, option in _LLM_ONLY.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} applies to --workload llm only")
    values: dict[str, Any] = {}
    _set_options(args, values, _MODULAR_FIELDS)
    if args.weight_decays is not None:
        try:
            values["weight_decays"] = [float(w) for w in args.weight_decays.split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"--weight-decays takes numbers separated by commas, got {args.weight_decays!r}") from None
    return resolve_modular_config(ModularConfig(**values))


class _ProgressCallbacks:
    """One rich progress bar per optimizer, with the live loss and tokens/s."""

    #: the bar's live fields before the first step
    blank: dict[str, str] = {"loss": "-", "tps": "-"}

    def __init__(self, progress: Progress, tasks: dict[str, Any]) -> None:
        self.progress = progress
        self.tasks = tasks

    def on_run_start(self, name: str, steps: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=steps, **self.blank)
        self.progress.reset(self.tasks[name], total=steps, **self.blank)
        self.progress.start_task(self.tasks[name])

    def on_step(self, name: str, step: int, loss: float, tokens_per_second: float) -> None:
        self.progress.update(self.tasks[name], completed=step, loss=f"{loss:.3f}", tps=f"{tokens_per_second:,.0f}")

    def on_run_end(self, name: str, result: dict[str, Any]) -> None:
        task = self.tasks[name]
        final = result.get("validation_loss")
        note = f"val {final:.3f}" if final is not None else result["status"]
        self.progress.update(task, loss=note)
        self.progress.stop_task(task)


class _ModularProgressCallbacks(_ProgressCallbacks):
    """One rich progress bar per run of the grokking workload, with the live loss and accuracies."""

    blank = {"loss": "-", "accuracy": "-"}

    def on_step(self, name: str, step: int, loss: float, train_accuracy: float, validation_accuracy: float) -> None:
        accuracy = f"train {100 * train_accuracy:5.1f}% val {100 * validation_accuracy:5.1f}%"
        self.progress.update(self.tasks[name], completed=step, loss=f"{loss:.4f}", accuracy=accuracy)

    def on_run_end(self, name: str, result: dict[str, Any]) -> None:
        self.progress.stop_task(self.tasks[name])


def _table(results: dict[str, Any]) -> Table:
    from ..bench.report import TABLE_COLUMNS, summary_rows

    model, config = results["model"], results["config"]
    table = Table(
        title=f"lmopt compare: {model['name']} Llama, {model['parameters']:,} parameters, "
        f"{config['steps']} steps of {config['batch_size']}x{config['seq_len']} tokens on "
        f"{results['environment']['device']}",
        caption=f"final train loss: mean of the last {results['final_train_loss_window']} steps; state: "
        f"optimizer.state bytes; peak mem: {results['memory_label']}",
    )
    for column in TABLE_COLUMNS:
        table.add_column(
            column,
            justify="left" if column in ("optimizer", "status") else "right",
            style="bold cyan" if column == "optimizer" else None,
            overflow="fold",
        )
    for row in summary_rows(results):
        style = None if row["status"] == "ok" else "red"
        table.add_row(*(row[c] for c in TABLE_COLUMNS), style=style)
    return table


def apply_tuned(config: Any, tune_result: dict[str, Any], source: str) -> tuple[Any, list[str]]:
    """``config`` with every optimizer's learning rate from ``tune_result`` (a ``--set NAME.lr`` still wins), its
    ``lr_sources`` saying where each came from, and warnings where the search's workload differs."""
    from dataclasses import replace

    from ..bench.compare import resolve_optimizer_names
    from ..bench.tune import tuned_learning_rates

    tuned = tuned_learning_rates(tune_result, config)
    names, _ = resolve_optimizer_names(config.optimizers)
    hyper = {k: dict(v) for k, v in config.hyperparameters.items()}
    sources = dict(config.lr_sources)
    for name in names:
        if "lr" in hyper.get(name, {}):
            sources[name] = "--set"
        elif name in tuned:
            hyper.setdefault(name, {})["lr"] = tuned[name]
            sources[name] = f"tuned ({source})"
        else:
            sources[name] = f"recipe (not in {source})"
    searched = tune_result.get("config", {}).get("compare", {})
    mine = config.to_dict()
    warnings = [
        f"{source} was tuned with {key}={searched[key]!r}, this comparison uses {mine[key]!r}"
        for key in ("model", "steps", "batch_size", "seq_len", "schedule", "data", "tokenizer", "min_lr_ratio")
        if key in searched and searched[key] != mine[key]
    ]
    return replace(config, hyperparameters=hyper, lr_sources=sources), warnings


def _read_json(path: str, option: str) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {option} {path!r}: {err}") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"{option} {path!r} must hold a JSON object")
    return loaded


def _out_and_console(args: argparse.Namespace) -> tuple[Path, Console]:
    out = Path(args.out) if args.out else Path("lmopt-compare") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return out, Console(width=None if sys.stdout.isatty() else 200)


def _print_failures(console: Console, results: dict[str, Any]) -> None:
    for r in results["runs"]:
        if r["status"] != "ok":
            console.print(f"[red]{r['name']} {r['status']}:[/red] {r['message']}")


def _run_modular(args: argparse.Namespace) -> int:
    from ..bench.modular import run_modular, run_name
    from ..bench.report import MODULAR_COLUMNS, modular_summary_rows, write_modular_outputs

    config = build_modular_config(args)
    out, console = _out_and_console(args)
    console.print(
        f"lmopt compare --workload modular: (a + b) mod {config.modulus}, {', '.join(config.optimizers)} with "
        f"weight decay {', '.join(f'{w:g}' for w in config.weight_decays)}, {config.steps} full-batch steps each"
    )
    progress = Progress(
        TextColumn("[bold cyan]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>9}"),
        TextColumn("{task.fields[accuracy]}"),
        TimeElapsedColumn(),
        console=console,
    )
    names = [run_name(n, wd) for n in config.optimizers for wd in config.weight_decays]
    with progress:
        tasks = {n: progress.add_task(n, total=config.steps, loss="-", accuracy="-", start=False) for n in names}
        results = run_modular(config, _ModularProgressCallbacks(progress, tasks))
    paths = write_modular_outputs(results, out)
    table = Table(title=f"grokking: (a + b) mod {config.modulus}, {results['model']['parameters']:,} parameters")
    for i, column in enumerate(MODULAR_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right", style="bold cyan" if i == 0 else None)
    for row in modular_summary_rows(results):
        table.add_row(*(row[c] for c in MODULAR_COLUMNS), style=None if row["status"] == "ok" else "red")
    console.print(table)
    _print_failures(console, results)
    console.print(
        f"report: {paths['report_md']}; plots: {paths['accuracy_vs_step'].name}, {paths['loss_vs_step'].name}; "
        f"every figure: {paths['results_json']}"
    )
    return 0 if any(r["status"] == "ok" for r in results["runs"]) else 1


def run(args: argparse.Namespace) -> int:
    from ..bench.compare import resolve_optimizer_names, run_compare
    from ..bench.report import write_outputs

    if args.workload == "modular":
        return _run_modular(args)
    given = [option for dest, option in _MODULAR_ONLY.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} applies to --workload modular only")
    config = build_config(args)
    out, console = _out_and_console(args)
    names, skipped = resolve_optimizer_names(config.optimizers)
    for item in skipped:
        console.print(f"[yellow]skipping {item['name']}: {item['reason']}[/yellow]")
    if args.tuned is not None:
        if args.tuned:
            tune_result, source = _read_json(args.tuned, "--tuned"), Path(args.tuned).name
        else:
            from .tune_cmd import search

            tune_result = search(config, out / "tune", console)
            source = "tune/tune.json"
        config, warnings = apply_tuned(config, tune_result, source)
        for warning in warnings:
            console.print(f"[yellow]warning: {warning}[/yellow]")
    console.print(f"lmopt compare: {', '.join(names)} on the {config.model} model, {config.steps} steps each")
    progress = Progress(
        TextColumn("[bold cyan]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>9}"),
        TextColumn("{task.fields[tps]:>8} tok/s"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        tasks = {n: progress.add_task(n, total=config.steps, loss="-", tps="-", start=False) for n in names}
        results = run_compare(config, _ProgressCallbacks(progress, tasks))
    paths = write_outputs(results, out)
    console.print(_table(results))
    _print_failures(console, results)
    console.print(
        f"report: {paths['report_md']} (and {paths['report_html'].name}); plots: "
        f"{paths['loss_vs_step'].name}, {paths['loss_vs_time'].name}; every figure: {paths['results_json']}"
    )
    console.print(f"re-run: lmopt compare --config {paths['results_json']}")
    return 0 if any(r["status"] == "ok" for r in results["runs"]) else 1
