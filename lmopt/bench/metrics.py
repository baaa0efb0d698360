"""Metrics that decide between optimizers: the spread over seeds and the steps each one needs to reach a target.

* :func:`aggregate_seeds` folds one optimizer's runs over several seeds (initial weights and data order) into one
  entry: the mean and the sample standard deviation of every figure, the first seed's full history, and each
  seed's loss curve (for the plot's shaded spread).
* :func:`steps_to_target` adds, to every optimizer, the first step at which its smoothed training loss (the mean of
  the last :data:`lmopt.bench.run.FINAL_LOSS_WINDOW` steps, the "final train loss" measured at every step) reaches
  the baseline's final training loss -- tuned AdamW's in ``lmopt compare --tuned`` -- with the tokens and wall
  time it took, and the speed-up over the baseline (its own steps to the same loss divided by this one's). This is
  the "steps to target" metric of AlgoPerf (Dahl et al. 2023) and of the modded-nanogpt speedruns, measured on
  the compare workload.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["SEED_METRICS", "aggregate_seeds", "first_step_below", "steps_to_target", "trailing_mean"]

#: the figures averaged over seeds (each gets a ``<name>_std`` beside it)
SEED_METRICS: tuple[str, ...] = ("final_train_loss", "validation_loss", "tokens_per_second", "train_time_s")


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_step_below(steps: Sequence[int], losses: Sequence[float], target: float, window: int) -> int | None:
    """The first step whose trailing mean loss over ``window`` steps is <= ``target`` (None: never)."""
    for step, value in zip(steps, trailing_mean(losses, window), strict=False):
        if value <= target:
            return int(step)
    return None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer's runs (one per seed, same optimizer and config otherwise) as one entry.

    The entry is the first seed's run with: ``seeds`` (the seeds), ``seeds_ok`` (how many finished), each of
    :data:`SEED_METRICS` replaced by its mean over the seeds that finished and ``<metric>_std`` (sample standard
    deviation; 0 for one seed), and ``seed_runs``: per seed its status, figures and loss curve. A seed that
    diverged or failed makes the entry's ``status`` that seed's, with a message naming it.
    """
    if not runs:
        raise ValueError("runs must hold at least one run")
    entry = dict(runs[0])
    ok = [r for r in runs if r["status"] == "ok"]
    entry["seeds"] = [r.get("seed") for r in runs]
    entry["seeds_ok"] = len(ok)
    for metric in SEED_METRICS:
        values = [float(r[metric]) for r in ok if r.get(metric) is not None]
        if len(runs) == 1:
            values = [float(runs[0][metric])] if runs[0].get(metric) is not None else []
        entry[metric], entry[f"{metric}_std"] = _mean_std(values)
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        first = failed[0]
        entry["status"] = first["status"]
        entry["message"] = (f"seed {first.get('seed')}: {first['message']}" if len(runs) > 1 else first["message"]) + (
            f" ({len(failed)} of {len(runs)} seeds)" if len(runs) > 1 else ""
        )
        entry["steps_completed"] = first["steps_completed"]
    entry["seed_runs"] = [
        {
            "seed": r.get("seed"),
            "status": r["status"],
            "message": r["message"],
            "steps_completed": r["steps_completed"],
            **{m: r.get(m) for m in SEED_METRICS},
            "history": {"step": r["history"]["step"], "loss": r["history"]["loss"], "time_s": r["history"]["time_s"]},
        }
        for r in runs
    ]
    return entry


def steps_to_target(
    runs: list[dict[str, Any]], baseline: str, *, window: int, tokens_per_step: int
) -> dict[str, Any] | None:
    """Add the steps-to-target figures to every entry of ``runs`` (as :func:`aggregate_seeds` makes them);
    return the target's description, or None when the baseline is not among the runs or did not finish.

    The target is the baseline's final training loss (its mean over seeds). Per seed, the first step whose
    trailing mean loss reaches it (:func:`first_step_below`); per optimizer: ``steps_to_target`` (mean over the
    seeds that reached it, None if none did), ``steps_to_target_reached`` (how many seeds did),
    ``tokens_to_target``, ``time_to_target_s`` and ``speedup`` = the baseline's steps to target / this one's.
    """
    base = next((r for r in runs if r["name"] == baseline), None)
    if base is None or base.get("final_train_loss") is None or base["status"] != "ok":
        for run in runs:
            run.update(steps_to_target=None, steps_to_target_reached=0, tokens_to_target=None)
            run.update(time_to_target_s=None, speedup=None)
        return None
    target = float(base["final_train_loss"])
    for run in runs:
        steps, times = [], []
        for seed_run in run["seed_runs"]:
            history = seed_run["history"]
            step = first_step_below(history["step"], history["loss"], target, window)
            if step is not None:
                steps.append(step)
                times.append(history["time_s"][history["step"].index(step)])
        run["steps_to_target_reached"] = len(steps)
        run["steps_to_target"] = statistics.fmean(steps) if steps else None
        run["tokens_to_target"] = None if not steps else run["steps_to_target"] * tokens_per_step
        run["time_to_target_s"] = statistics.fmean(times) if times else None
    base_steps = base["steps_to_target"]
    for run in runs:
        s = run["steps_to_target"]
        run["speedup"] = base_steps / s if s and base_steps and math.isfinite(base_steps) else None
    return {
        "baseline": baseline,
        "loss": target,
        "window": window,
        "definition": (
            f"the first step at which the mean training loss of the last {window} steps reaches {baseline}'s "
            f"final training loss ({target:.4f}, its mean over seeds); speed-up = {baseline}'s steps / this one's"
        ),
    }
