"""Outputs of ``lmopt tune``: ``tune.json``, the loss-vs-learning-rate plot (PNG) and ``tune.md``.

=================== ===============================================================================
``tune.json``       every trial of every study and the config (``lmopt compare --tuned tune.json`` reads it)
``loss_vs_lr.png``  one U-curve per optimizer: the validation loss of the trials that ran to the end (bold),
                    every trial's training loss at the first rung (thin, dashed: the whole curve, early),
                    diverged trials as x at the top, the best learning rate as a star
``lr_vs_width.png`` with ``--widths``: the validation loss against the learning rate per width, one panel per
                    parametrization (standard, muP), the best of each width as a star
``tune.md``         the table, the plots, the setup and the command that reproduces the search
=================== ===============================================================================
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .report import _markdown_table, _save

__all__ = ["TUNE_COLUMNS", "TUNE_FILES", "plot_loss_vs_lr", "plot_lr_vs_width", "tune_rows", "write_tune_outputs"]

TUNE_FILES: dict[str, str] = {
    "tune_json": "tune.json",
    "loss_vs_lr": "loss_vs_lr.png",
    "lr_vs_width": "lr_vs_width.png",
    "tune_md": "tune.md",
}
TUNE_COLUMNS: tuple[str, ...] = (
    "optimizer",
    "recipe lr",
    "best lr",
    "best / recipe",
    "val loss",
    "train loss",
    "trials (full / stopped / diverged)",
    "steps (runs)",
    "time",
)


def _figure(panels: int = 1) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("lmopt tune's plots need matplotlib: pip install 'lmopt[compare]'") from err
    figure = Figure(figsize=(7.0 * panels, 5.0), dpi=110)
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def tune_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """One row per study with the :data:`TUNE_COLUMNS`, formatted."""
    rows = []
    for s in result["studies"]:
        trials = s["trials"]
        full = sum(t["status"] == "ok" for t in trials)
        stopped = sum(t["status"] == "stopped" for t in trials)
        bad = len(trials) - full - stopped
        best = s["best_lr"]
        edge = "" if s["bracketed"] or best is None else " (edge)"
        rows.append(
            {
                "optimizer": s["label"],
                "recipe lr": f"{s['recipe_lr']:.3g}",
                "best lr": "-" if best is None else f"{best:.3g}{edge}",
                "best / recipe": "-" if s["best_over_recipe"] is None else f"{s['best_over_recipe']:.2f}x",
                "val loss": "-" if s["best_validation_loss"] is None else f"{s['best_validation_loss']:.3f}",
                "train loss": "-" if s["best_final_train_loss"] is None else f"{s['best_final_train_loss']:.3f}",
                "trials (full / stopped / diverged)": f"{full} / {stopped} / {bad}",
                "steps (runs)": f"{s['steps_trained']} ({s['full_run_equivalents']:.1f})",
                "time": f"{s['time_s']:.0f} s",
            }
        )
    return rows


def plot_loss_vs_lr(result: dict[str, Any], path: str | Path) -> Path:
    """The U-curves of every study (see the module docstring) to a PNG."""
    figure, (axes,) = _figure()
    top = -math.inf
    diverged: list[tuple[float, str]] = []
    for i, s in enumerate(result["studies"]):
        color = f"C{i % 10}"
        trials = s["trials"]
        early = [(t["lr"], t["rung_scores"][0]) for t in trials if t["rung_scores"] and t["rung_scores"][0] is not None]
        if early:
            axes.plot(
                *zip(*early, strict=True),
                color=color,
                linestyle="--",
                linewidth=0.8,
                marker="o",
                markerfacecolor="none",
                markersize=5,
                alpha=0.6,
            )
            top = max(top, max(v for _, v in early))
        full = [(t["lr"], t["validation_loss"]) for t in trials if t["status"] == "ok" and t["validation_loss"]]
        if full:
            axes.plot(*zip(*full, strict=True), color=color, linewidth=1.8, marker="o", label=s["label"])
            top = max(top, max(v for _, v in full))
        if s["best_lr"] is not None:
            axes.plot(
                [s["best_lr"]],
                [s["best_validation_loss"]],
                marker="*",
                markersize=15,
                color=color,
                markeredgecolor="black",
            )
        diverged += [(t["lr"], color) for t in trials if t["status"] in ("diverged", "error")]
    if diverged and math.isfinite(top):
        for lr, color in diverged:
            axes.plot([lr], [top], marker="x", markersize=10, color=color, linestyle="none")
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("loss (nats per token)")
    budgets = result["studies"][0]["rung_budgets"] if result["studies"] else []
    axes.set_title(
        f"lmopt tune: {result['model']['name']} model, {result['config']['compare']['steps']} steps per full trial",
        fontsize=10,
    )
    legend_title = (
        f"bold: validation loss, full run; dashed: train loss at step {budgets[0] if budgets else '?'}\n"
        "x: diverged; star: best learning rate"
    )
    axes.grid(True, alpha=0.3, which="both")
    axes.legend(fontsize=8, title=legend_title, title_fontsize=7)
    return _save(figure, path)


def plot_lr_vs_width(result: dict[str, Any], path: str | Path) -> Path:
    """With ``widths``: validation loss against LR per width, one panel per parametrization, to a PNG."""
    parametrizations = result["config"]["parametrizations"]
    figure, panels = _figure(len(parametrizations))
    for axes, parametrization in zip(panels, parametrizations, strict=True):
        studies = [s for s in result["studies"] if s["parametrization"] == parametrization]
        for i, s in enumerate(studies):
            color = f"C{i % 10}"
            full = [
                (t["lr"], t["validation_loss"]) for t in s["trials"] if t["status"] == "ok" and t["validation_loss"]
            ]
            if full:
                axes.plot(*zip(*full, strict=True), color=color, marker="o", linewidth=1.6, label=s["label"])
            if s["best_lr"] is not None:
                axes.plot(
                    [s["best_lr"]],
                    [s["best_validation_loss"]],
                    marker="*",
                    markersize=15,
                    color=color,
                    markeredgecolor="black",
                )
        spread = [t for t in result.get("transfer", []) if t["parametrization"] == parametrization]
        note = "; ".join(f"{t['optimizer']}: best LR spread {t['best_lr_spread']:.2f}x" for t in spread)
        axes.set_title(f"{'muP' if parametrization == 'mup' else 'standard parametrization'}. {note}", fontsize=9)
        axes.set_xscale("log")
        axes.set_xlabel("peak learning rate")
        axes.set_ylabel("validation loss after the full run")
        axes.grid(True, alpha=0.3, which="both")
        axes.legend(fontsize=8)
    return _save(figure, path)


def _transfer_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for t in result.get("transfer", []):
        gap = t.get("transfer_gap")
        lines.append(
            f"`{t['optimizer']}` ({t['parametrization']}): best LR by width {t['best_lr_by_width']} (spread "
            f"{t['best_lr_spread']:.2f}x); the narrowest width's best LR {t['transferred_lr']:.3g} at width "
            f"{t['widest_width']}: validation loss {t['transferred_validation_loss']:.4f} against its own tuned "
            f"LR {t['widest_own_lr']:.3g}: {t['widest_own_validation_loss']:.4f}"
            + ("" if gap is None else f" (gap {gap:+.4f})")
        )
    return lines


def write_tune_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``tune.json``, the plot(s) and ``tune.md`` under ``out_dir`` (created); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in TUNE_FILES.items()}
    plot_loss_vs_lr(result, paths["loss_vs_lr"])
    if result.get("transfer") is not None:
        plot_lr_vs_width(result, paths["lr_vs_width"])
    else:
        paths.pop("lr_vs_width")
    config, env = result["config"], result["environment"]
    c = config["compare"]
    rows = tune_rows(result)
    budgets = result["studies"][0]["rung_budgets"] if result["studies"] else []
    lines = [
        "# lmopt tune",
        "",
        f"Created {result['created_utc']}. Use it: `lmopt compare --tuned {TUNE_FILES['tune_json']}`.",
        "",
        _markdown_table(rows, TUNE_COLUMNS),
        "",
        f"![loss against learning rate]({TUNE_FILES['loss_vs_lr']})",
        "",
    ]
    if "lr_vs_width" in paths:
        lines += [f"![learning rate against width]({TUNE_FILES['lr_vs_width']})", "", "## Width transfer", ""]
        lines += [f"- {line}" for line in _transfer_lines(result)] + [""]
    lines += [
        "## Setup",
        "",
        f"- Workload: the `lmopt compare` one: {c['model']} model, {c['steps']} steps of {c['batch_size']} x "
        f"{c['seq_len']} tokens, seed {c['seed']}, schedule {c['schedule']} (warmup fraction {c['warmup_fraction']}),"
        f" clipping {c['max_grad_norm']}.",
        f"- Search: {config['grid_points']} learning rates {config['grid_factor']:g}x apart around each recipe, "
        f"successive halving with eta {config['eta']} over rungs {budgets} "
        f"(rung score: mean train loss of the last 10 steps; final: validation loss), up to "
        f"{config['max_extensions']} extensions past an edge, {config['refine_points']} refinement points.",
        f"- Machine: {env['processor']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, device "
        f"{env['device']}; torch {env['torch']}, lmopt {env['lmopt']}. Total time {result['total_time_s']:.0f} s.",
        "",
        f"Every trial is in [{TUNE_FILES['tune_json']}]({TUNE_FILES['tune_json']}).",
        "",
    ]
    paths["tune_md"].write_text("\n".join(lines), encoding="utf-8")
    result["files"] = {k: p.name for k, p in paths.items()}
    with open(paths["tune_json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")
    return paths
