"""Outputs of ``lmopt compare``: results JSON, loss plots (PNG) and a one-page report (Markdown and HTML).

Files written under the output folder:

=================== ===============================================================================
``results.json``    every figure and the full config (``lmopt compare --config results.json`` re-runs it)
``loss_vs_step.png`` training loss against optimizer step, one line per optimizer (thin: every step;
                    bold: moving average over :data:`SMOOTHING` steps), validation losses as markers
``loss_vs_time.png`` the same losses against training wall time (seconds, evaluation excluded)
``report.md``       the table, the plots, the setup and the command that reproduces the run
``report.html``     the same page for a browser
=================== ===============================================================================

``--workload modular`` (:mod:`lmopt.bench.modular`) writes ``results.json``, ``accuracy_vs_step.png`` (train
dashed, validation solid, one colour per run), ``loss_vs_step.png`` and ``report.md`` (:data:`MODULAR_FILES`,
:func:`write_modular_outputs`).

The plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from .metrics import trailing_mean

__all__ = [
    "FILES",
    "MODULAR_COLUMNS",
    "MODULAR_FILES",
    "SMOOTHING",
    "TABLE_COLUMNS",
    "format_bytes",
    "modular_summary_rows",
    "plot_modular",
    "plot_losses",
    "summary_rows",
    "write_modular_outputs",
    "write_outputs",
]

#: file names under the output folder
FILES: dict[str, str] = {
    "results_json": "results.json",
    "loss_vs_step": "loss_vs_step.png",
    "loss_vs_time": "loss_vs_time.png",
    "report_md": "report.md",
    "report_html": "report.html",
}
#: moving-average window of the bold loss lines
SMOOTHING = 10
#: the columns of the terminal table and of the report's table
TABLE_COLUMNS: tuple[str, ...] = (
    "optimizer",
    "status",
    "lr",
    "lr from",
    "final train loss",
    "val loss",
    "steps to target",
    "speed-up",
    "tokens/s",
    "state",
    "peak mem",
    "skipped",
)


def format_bytes(value: int | float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _fmt(value: float | None, digits: int = 3, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _lr(run: dict[str, Any]) -> str:
    lr = run.get("hyperparameters", {}).get("lr")
    return f"{lr:.3g}" if isinstance(lr, (int, float)) else "-"


def _to_target(run: dict[str, Any], seeds: int) -> str:
    steps = run.get("steps_to_target")
    if steps is None:
        return "not reached" if "steps_to_target" in run else "-"
    reached = run.get("steps_to_target_reached", 1)
    return f"{steps:.0f}" + (f" ({reached}/{seeds})" if seeds > 1 else "")


def summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per optimizer with the :data:`TABLE_COLUMNS`, formatted for display."""
    rows = []
    seeds = len(results.get("seeds") or [0])
    for run in results["runs"]:
        status = run["status"]
        if status == "diverged":
            status = f"diverged at step {run['steps_completed'] + 1}"
        tokens = run.get("tokens_per_second")
        spread = seeds > 1
        speedup = run.get("speedup")
        rows.append(
            {
                "optimizer": run["name"],
                "status": status,
                "lr": _lr(run),
                "lr from": run.get("lr_source", "recipe"),
                "final train loss": _fmt(
                    run.get("final_train_loss"), std=run.get("final_train_loss_std") if spread else None
                ),
                "val loss": _fmt(run.get("validation_loss"), std=run.get("validation_loss_std") if spread else None),
                "steps to target": _to_target(run, seeds),
                "speed-up": "-" if speedup is None else f"{speedup:.2f}x",
                "tokens/s": "-" if tokens is None else f"{tokens:,.0f}",
                "state": format_bytes(run.get("optimizer_state_bytes")),
                "peak mem": format_bytes(run.get("peak_memory_bytes")),
                "skipped": str(run.get("skipped_steps", 0)),
            }
        )
    return rows


def plot_losses(results: dict[str, Any], path: str | Path, *, x: str = "step") -> Path:
    """Draw training (and validation) loss per optimizer against ``x`` (``"step"`` or ``"time"``) to a PNG."""
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    figure, axes = _new_axes()
    colors = [f"C{i}" for i in range(10)]
    low, high = math.inf, -math.inf
    for i, run in enumerate(results["runs"]):
        history = run["history"]
        losses = [v for v in history["loss"] if v is not None]
        if not losses:
            continue
        xs = history["step"] if x == "step" else history["time_s"]
        xs = xs[: len(losses)]
        color = colors[i % len(colors)]
        label = run["name"] if run["status"] == "ok" else f"{run['name']} ({run['status']})"
        axes.plot(xs, losses, color=color, alpha=0.25, linewidth=0.8)
        smooth = trailing_mean(losses, SMOOTHING)
        axes.plot(xs, smooth, color=color, linewidth=1.8, label=label)
        band = _seed_band(run, x)
        if band is not None:
            axes.fill_between(*band, color=color, alpha=0.18, linewidth=0)
        low, high = min(low, min(losses)), max(high, max(smooth[len(smooth) // 10 :] or smooth))
        if run["status"] != "ok":
            axes.plot([xs[-1]], [losses[-1]], marker="x", markersize=9, color=color)
        val = run.get("validation_history", {})
        if val.get("step"):
            val_x = (
                val["step"]
                if x == "step"
                else [history["time_s"][s - 1] if 0 < s <= len(history["time_s"]) else 0.0 for s in val["step"]]
            )
            pairs = [(a, b) for a, b in zip(val_x, val["loss"], strict=True) if b is not None]
            if pairs:
                axes.plot(
                    [a for a, _ in pairs],
                    [b for _, b in pairs],
                    linestyle="none",
                    marker="o",
                    markersize=6,
                    markeredgecolor="black",
                    color=color,
                )
    if math.isfinite(low) and math.isfinite(high) and high > low:
        margin = 0.08 * (high - low)
        axes.set_ylim(low - margin, high + margin)
    config = results["config"]
    model = results["model"]
    axes.set_xlabel("optimizer step" if x == "step" else "training wall time (s)")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(
        f"{model['name']} Llama ({model['parameters']:,} params), batch {config['batch_size']} x "
        f"{config['seq_len']} tokens, {results['environment']['device']}",
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)
    seeds = len(results.get("seeds") or [0])
    band = f"; band: range over {seeds} seeds" if seeds > 1 else ""
    axes.legend(fontsize=8, title=f"bold: mean of {SMOOTHING} steps; o: validation{band}", title_fontsize=8)
    return _save(figure, path)


def _new_axes() -> tuple[Any, Any]:
    """A figure on matplotlib's Agg canvas (no pyplot, no global backend change) and its one set of axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("lmopt compare's plots need matplotlib: pip install 'lmopt[compare]'") from err
    figure = Figure(figsize=(8.0, 5.0), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _save(figure: Any, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def _seed_band(run: dict[str, Any], x: str) -> tuple[list[float], list[float], list[float]] | None:
    """``(x, low, high)``: the smallest and largest smoothed loss over the seeds at each step (None: one seed)."""
    curves = [r["history"] for r in run.get("seed_runs", []) if r["history"]["loss"]]
    if len(curves) < 2:
        return None
    length = min(len(c["loss"]) for c in curves)
    smooth = [trailing_mean(c["loss"][:length], SMOOTHING) for c in curves]
    if x == "step":
        xs = [float(s) for s in curves[0]["step"][:length]]
    else:  # the mean wall time over the seeds at each step
        xs = [sum(c["time_s"][i] for c in curves) / len(curves) for i in range(length)]
    return xs, [min(v) for v in zip(*smooth, strict=True)], [max(v) for v in zip(*smooth, strict=True)]


def _markdown_table(rows: list[dict[str, str]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A Markdown table of ``rows``; the first two columns (the name and the status) left-aligned."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i < 2 or c == "lr from" else "---:" for i, c in enumerate(columns)) + "|",
    ]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _notes(results: dict[str, Any]) -> list[str]:
    config, data, model, env = results["config"], results["data"], results["model"], results["environment"]
    schedule = results["schedule"]
    notes = [
        f"Model: {model['architecture']}; size `{model['name']}` {model['size']}, "
        f"{model['parameters']:,} parameters, vocabulary {model['vocab_size']}.",
        f"Data: {data['source']}; tokenizer `{data['tokenizer']}`; {data['tokens_train']:,} training and "
        f"{data['tokens_validation']:,} validation tokens; split {data['split']}; "
        f"validation loss over {data['validation_windows']} windows of {config['seq_len']} tokens.",
        f"Training: {config['steps']} steps of {config['batch_size']} x {config['seq_len']} tokens, "
        f"{_seeds_text(results)}, same initial weights and data order for every optimizer; {schedule['kind']} "
        f"(warmup {schedule['warmup_steps']} steps, floor {schedule['min_lr_ratio']:g} x peak); gradient "
        f"clipping at {schedule['max_grad_norm']:g}; fp32.",
        f"Final train loss: mean of the last {results['final_train_loss_window']} steps. tokens/s: training "
        f"tokens over training wall time (evaluation excluded). state: bytes of every tensor in "
        f"`optimizer.state`. skipped: steps skipped for non-finite gradients.",
        f"Peak memory: {results['memory_method']}.",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, device "
        f"{env['device']}; Python {env['python']}, torch {env['torch']}, transformers "
        f"{env.get('transformers', '?')}, lmopt {env['lmopt']}"
        + (
            f"; load average at the end {', '.join(f'{v:.1f}' for v in env['load_average'])}"
            if env.get("load_average")
            else ""
        )
        + f". Total time {results['total_time_s']:.0f} s.",
    ]
    target = results.get("target")
    if target:
        notes.append(f"Steps to target: {target['definition']}.")
    parametrization = model.get("parametrization") or {}
    if parametrization.get("parametrization") == "mup":
        notes.append(
            f"Parametrization: muP (lmopt.mup) at width {parametrization['width']} from base width "
            f"{parametrization['base_width']}."
        )
    sources = sorted({run.get("lr_source", "recipe") for run in results["runs"]})
    notes.append(f"Learning rates from: {', '.join(sources)} (column `lr from`).")
    for skipped in results["skipped_optimizers"]:
        notes.append(f"Skipped `{skipped['name']}`: {skipped['reason']}.")
    for run in results["runs"]:
        if run["status"] != "ok":
            notes.append(f"`{run['name']}` {run['status']}: {run['message']}")
        if run.get("ignored_recipe_keys"):
            notes.append(
                f"`{run['name']}`: recipe keys its constructor does not take were left out: "
                f"{', '.join(run['ignored_recipe_keys'])}."
            )
    return notes


def _seeds_text(results: dict[str, Any]) -> str:
    seeds = results.get("seeds") or [results["config"]["seed"]]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {seeds[0]}-{seeds[-1]} (figures: mean ± sample standard deviation over {len(seeds)} seeds)"


def _hyperparameter_lines(results: dict[str, Any]) -> list[str]:
    return [
        f"`{run['name']}` ({run['class']}): {json.dumps(run['hyperparameters'])}; schedule: {run['schedule']}"
        for run in results["runs"]
    ]


def _write_markdown(results: dict[str, Any], path: Path) -> None:
    rows = summary_rows(results)
    lines = [
        "# lmopt compare",
        "",
        f"Created {results['created_utc']}. Re-run with `lmopt compare --config {FILES['results_json']}`.",
        "",
        _markdown_table(rows),
        "",
        f"![training loss against optimizer step]({FILES['loss_vs_step']})",
        "",
        f"![training loss against training wall time]({FILES['loss_vs_time']})",
        "",
        "## Setup",
        "",
        *[f"- {note}" for note in _notes(results)],
        "",
        "## Hyperparameters",
        "",
        *[f"- {line}" for line in _hyperparameter_lines(results)],
        "",
        f"Every figure is in [{FILES['results_json']}]({FILES['results_json']}).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _write_html(results: dict[str, Any], path: Path) -> None:
    rows = summary_rows(results)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(row[c])}</td>" for c in TABLE_COLUMNS) + "</tr>" for row in rows)

    def inline_code(text: str) -> str:  # `x` -> <code>x</code> on escaped text
        parts = esc(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    notes = "".join(f"<li>{inline_code(n)}</li>" for n in _notes(results))
    hypers = "".join(f"<li>{inline_code(h)}</li>" for h in _hyperparameter_lines(results))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmopt compare</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; }}
td:nth-child(n+3) {{ text-align: right; }} img {{ max-width: 100%; }} code {{ background: #f4f4f4; }}
</style></head><body>
<h1>lmopt compare</h1>
<p>Created {esc(results["created_utc"])}.
Re-run with <code>lmopt compare --config {FILES["results_json"]}</code>.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><img src="{FILES["loss_vs_step"]}" alt="training loss against optimizer step"></p>
<p><img src="{FILES["loss_vs_time"]}" alt="training loss against training wall time"></p>
<h2>Setup</h2><ul>{notes}</ul>
<h2>Hyperparameters</h2><ul>{hypers}</ul>
<p>Every figure is in <a href="{FILES["results_json"]}">{FILES["results_json"]}</a>.</p>
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the JSON, both plots and both reports under ``out_dir`` (created); return their paths."""
    paths = _output_paths(results, out_dir, FILES)
    plot_losses(results, paths["loss_vs_step"], x="step")
    plot_losses(results, paths["loss_vs_time"], x="time")
    _write_markdown(results, paths["report_md"])
    _write_html(results, paths["report_html"])
    _write_json(results, paths["results_json"])
    return paths


def _output_paths(results: dict[str, Any], out_dir: str | Path, files: dict[str, str]) -> dict[str, Path]:
    """The paths of ``files`` under ``out_dir`` (created), also named in ``results["files"]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["files"] = dict(files)
    return {key: out / name for key, name in files.items()}


def _write_json(results: dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, allow_nan=False)
        f.write("\n")


# ------------------------------------------------------------------------------------------------------------
# the grokking workload (lmopt compare --workload modular)
# ------------------------------------------------------------------------------------------------------------
#: file names under the output folder of ``lmopt compare --workload modular``
MODULAR_FILES: dict[str, str] = {
    "results_json": "results.json",
    "accuracy_vs_step": "accuracy_vs_step.png",
    "loss_vs_step": "loss_vs_step.png",
    "report_md": "report.md",
}
#: the columns of the grokking workload's terminal table and report table
MODULAR_COLUMNS: tuple[str, ...] = (
    "run",
    "status",
    "final train acc",
    "final val acc",
    "step train acc >= 99%",
    "step val acc >= 99%",
    "time",
)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def modular_summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per run of the grokking workload with the :data:`MODULAR_COLUMNS`, formatted for display."""
    return [
        {
            "run": run["name"],
            "status": run["status"],
            "final train acc": _percent(run["final_train_accuracy"]),
            "final val acc": _percent(run["final_validation_accuracy"]),
            "step train acc >= 99%": str(run["step_train_accuracy_reached"] or "never"),
            "step val acc >= 99%": str(run["step_validation_accuracy_reached"] or "never"),
            "time": f"{run['train_time_s']:.0f} s",
        }
        for run in results["runs"]
    ]


def plot_modular(results: dict[str, Any], path: str | Path, *, metric: str = "accuracy") -> Path:
    """Train (dashed) and validation (solid) ``metric`` (``"accuracy"`` or ``"loss"``) against step, one colour
    per run, to a PNG."""
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
    figure, axes = _new_axes()
    for i, run in enumerate(results["runs"]):
        history = run["history"]
        for split, style in (("train", "--"), ("validation", "-")):
            values = history[f"{split}_{metric}"]
            if metric == "accuracy":
                values = [100 * v for v in values]
            axes.plot(history["step"], values, linestyle=style, color=f"C{i % 10}", label=f"{run['name']} {split}")
    config, model = results["config"], results["model"]
    if metric == "loss":
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step (full batch)")
    axes.set_ylabel("accuracy (%)" if metric == "accuracy" else "cross-entropy loss")
    axes.set_title(
        f"(a + b) mod {config['modulus']}, {100 * config['train_fraction']:.0f}% of pairs for training; "
        f"{model['layers']}-layer transformer ({model['parameters']:,} params)",
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, title="dashed: train; solid: validation", title_fontsize=8)
    return _save(figure, path)


def _write_modular_markdown(results: dict[str, Any], path: Path) -> None:
    config, data, model, env = results["config"], results["data"], results["model"], results["environment"]
    wds = ",".join(f"{wd:g}" for wd in config["weight_decays"])
    lines = [
        "# lmopt compare --workload modular (grokking)",
        "",
        f"Created {results['created_utc']}. Re-run with `lmopt compare --workload modular --optimizers "
        f"{','.join(config['optimizers'])} --weight-decays {wds} --modulus {config['modulus']} --train-fraction "
        f"{config['train_fraction']:g} --steps {config['steps']} --seed {config['seed']}`.",
        "",
        _markdown_table(modular_summary_rows(results), MODULAR_COLUMNS),
        "",
        f"![train and validation accuracy against step]({MODULAR_FILES['accuracy_vs_step']})",
        "",
        f"![train and validation loss against step]({MODULAR_FILES['loss_vs_step']})",
        "",
        "## Setup",
        "",
        f"- Task: {data['task']}; {data['train_pairs']:,} training and {data['validation_pairs']:,} validation "
        f"pairs (seeded split, seed {config['seed']}).",
        f"- Model: {model['architecture']}; width {model['width']}, {model['layers']} layer(s), {model['heads']} "
        f"heads, {model['parameters']:,} parameters; the same initial weights for every run.",
        f"- Training: {config['steps']} full-batch steps, lr {config['lr']:g} after a linear warmup of "
        f"{config['warmup_steps']} steps, betas {config['betas']}, weight decay on every parameter; figures every "
        f"{config['eval_every']} steps (train accuracy from the step's own forward pass, before its update).",
        f"- Machine: {env['processor']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, device "
        f"{env['device']}; Python {env['python']}, torch {env['torch']}, lmopt {env['lmopt']}. Total time "
        f"{results['total_time_s']:.0f} s.",
        *[f"- `{run['name']}` {run['status']}: {run['message']}" for run in results["runs"] if run["message"]],
        "",
        f"Every figure is in [{MODULAR_FILES['results_json']}]({MODULAR_FILES['results_json']}).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_modular_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the grokking workload's JSON, accuracy and loss plots and report under ``out_dir`` (created)."""
    paths = _output_paths(results, out_dir, MODULAR_FILES)
    plot_modular(results, paths["accuracy_vs_step"], metric="accuracy")
    plot_modular(results, paths["loss_vs_step"], metric="loss")
    _write_modular_markdown(results, paths["report_md"])
    _write_json(results, paths["results_json"])
    return paths
