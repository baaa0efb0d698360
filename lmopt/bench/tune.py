"""``lmopt tune``: the learning-rate search of a real tuning loop, on the ``lmopt compare`` workload.

Only tuned baselines compare fairly (AlgoPerf, Dahl et al. 2023; Wen et al. 2025, "Fantastic Pretraining
Optimizers and Where to Find Them"): at hand-picked learning rates a ranking follows the picks more than the
algorithms. For each optimizer, :func:`tune` searches the peak learning rate the way practitioners do:

1. **Coarse grid**: ``grid_points`` learning rates spaced by ``grid_factor`` in log space around the optimizer's
   compare recipe (:func:`lmopt.bench.compare.compare_hyperparameters`), e.g. recipe x 3^-2 ... x 3^2.
2. **Successive halving** (``rungs > 1``; Jamieson & Talwalkar 2016; Li et al. 2018, Hyperband): every trial
   trains on the same workload (same initial weights and data order, the full-length LR schedule) up to the first
   rung (``steps / eta^(rungs - 1)`` steps); only the best ``ceil(n / eta)`` by their rung score go on to the next
   rung, and so on to ``steps``. A stopped trial is resumed exactly where it paused
   (:class:`lmopt.bench.run.TrainingRun`), so the survivor's run is the run ``lmopt compare`` would make. The
   rung score (``rung_score``) is by default the validation loss of a **cooldown branch**: a copy of the trial
   decays its LR linearly to 0 over ``cooldown_fraction`` x the rung's steps, then is evaluated
   (:meth:`~lmopt.bench.run.TrainingRun.cooldown_loss`; Hägele et al. 2024 show such a cooldown matches a run
   scheduled to end there). ``rung_score="train"`` uses the mean training loss of the last
   :data:`~lmopt.bench.run.FINAL_LOSS_WINDOW` steps instead, which favours high LRs while the schedule is near its
   peak.
3. **Bracketing**: when the best learning rate is the grid's smallest or largest, the grid grows by one point on
   that side (at most ``max_extensions`` times), so the optimum is inside the searched range.
4. **Refinement**: ``refine_points`` learning rates between the best and its neighbours (log-spaced, e.g. best x
   3^(+-1/2)), each promoted past a rung only while it stays among the best ``ceil(n / eta)`` of every trial that
   reached that rung (the same rule, :func:`promoted`).

**Default: one rung at steps / 3, eta 3, the cooldown score** (``rungs=2``). Checked against the full grid of
the default set (9 optimizers, 120 steps, one run recording both scores at steps 20, 40 and 60;
docs/compare.md): the cooldown score at step 40 keeps the full grid's pick for 8 of 9 optimizers (the ninth,
Adam-mini, loses 0.0015 of validation loss) at 0.69 of the full grid's steps; the training-loss score at the same
rung keeps 6 of 9 and costs up to 0.13 nats (a high LR leads while the cosine schedule is near its peak and falls
behind only in the decay). ``rungs=1`` runs the full grid.

The best learning rate is the one with the lowest validation loss after the full run. A trial whose loss turns
inf/NaN (or that skips :data:`~lmopt.bench.run.MAX_CONSECUTIVE_SKIPS` steps in a row) is recorded as diverged --
a result (the right end of the U-curve), never a crash.

``widths`` tunes the same optimizers at several model widths, under the standard parametrization and/or muP
(:func:`lmopt.mup`): under muP the best learning rate should stay put as the width grows (Yang et al. 2022); the
result's ``transfer`` runs the narrowest width's best learning rate at the widest width and reports its loss
beside that width's own tuned loss.

Example:
    >>> from lmopt.bench.tune import TuneConfig, tune
    >>> from lmopt.bench.compare import CompareConfig
    >>> result = tune(TuneConfig(CompareConfig(optimizers=["adamw", "lion"], model="tiny", steps=30)))
    >>> result["best_lr"]
    {'adamw': 0.003, 'lion': 0.0003}
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

import torch

from .compare import CompareConfig, _jsonable, optimizer_hyperparameters, resolve_config, resolve_device
from .corpus import load_corpus, train_batch_offsets, validation_windows
from .run import FINAL_LOSS_WINDOW, TrainingRun, _warm_up, build_template, environment
from .run import _Silent as _SilentRun
from .workload import count_parameters

__all__ = [
    "TuneCallbacks",
    "TuneConfig",
    "grid",
    "promoted",
    "replay_halving",
    "rung_budgets",
    "tune",
    "tuned_learning_rates",
]

SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------------------
# the search's pieces (pure functions, unit-tested)
# ------------------------------------------------------------------------------------------------------------
def rung_budgets(steps: int, eta: int, rungs: int) -> list[int]:
    """The step counts at which successive halving compares trials: ``steps / eta^(rungs - 1)``, ...,
    ``steps / eta``, ``steps`` (rounded, at least 1, strictly increasing; fewer rungs when ``steps`` is small).

    >>> rung_budgets(120, 3, 3)
    [13, 40, 120]
    """
    budgets: list[int] = []
    for r in range(rungs - 1, -1, -1):
        b = max(1, round(steps / eta**r))
        if not budgets or b > budgets[-1]:
            budgets.append(b)
    if budgets[-1] != steps:
        budgets.append(steps)
    return budgets


def promoted(scores: Mapping[float, float], eta: int) -> list[float]:
    """Successive halving's stopping rule: the keys (learning rates) of the best ``ceil(n / eta)`` scores.

    Lower is better. Non-finite scores (diverged or failed trials) are never promoted, whatever ``eta``; ties
    go to the smaller learning rate (the safer one). At least one trial is promoted when any score is finite.

    >>> promoted({1e-3: 2.1, 3e-3: 1.9, 1e-2: 2.0, 3e-2: float("inf")}, 3)
    [0.003, 0.01]
    """
    if eta < 2:
        raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
    finite = sorted((s, lr) for lr, s in scores.items() if math.isfinite(s))
    keep = min(len(finite), max(1, math.ceil(len(scores) / eta)))
    return [lr for _, lr in finite[:keep]]


def grid(center: float, points: int, factor: float) -> list[float]:
    """``points`` learning rates ``center x factor^k`` (k centred on 0, an even count leans one step higher),
    rounded to 4 significant digits so they print and compare exactly.

    >>> grid(1e-3, 5, 3.0)
    [0.0001111, 0.0003333, 0.001, 0.003, 0.009]
    """
    low = -((points - 1) // 2)
    return [_round(center * factor**k) for k in range(low, low + points)]


def replay_halving(study: Mapping[str, Any], at_step: int, eta: int, score: str = "cooldown") -> dict[str, Any]:
    """Replay one rung of successive halving on a full-grid study recorded with ``probes``: at ``at_step``
    promote the best ``ceil(n / eta)`` trials by their probe ``score`` (``"cooldown"`` or ``"train"``) and pick
    the promoted trial with the lowest final validation loss.

    Returns ``pick`` and ``best`` (the full grid's), ``regret`` (the pick's validation loss minus the best's),
    ``promoted`` and ``cost`` (the replayed search's training and cooldown steps over the full grid's). This is
    how docs/compare.md checks a stopping rule against the full grid from one run
    (``benchmarks/tune_stopping_rule.py``).
    """
    if score not in ("cooldown", "train"):
        raise ValueError(f"score must be 'cooldown' or 'train', got {score!r}")
    trials = [t for t in study["trials"] if t["status"] in ("ok", "diverged")]
    finals = {t["lr"]: t["validation_loss"] for t in trials if t["status"] == "ok" and t["validation_loss"] is not None}
    if not finals:
        raise ValueError(f"study {study.get('label')!r} has no finished trial to replay")
    scores: dict[float, float] = {}
    for t in trials:
        probe = next((p for p in t.get("probes", []) if p["step"] == at_step), None)
        if probe is None and t["status"] == "ok":
            raise ValueError(f"trial lr {t['lr']} of {study.get('label')!r} has no probe at step {at_step}")
        value = None if probe is None else probe[score]
        scores[t["lr"]] = math.inf if value is None else float(value)
    kept = promoted(scores, eta)
    pick = min((lr for lr in kept if lr in finals), key=lambda lr: (finals[lr], lr), default=None)
    best = min(finals, key=lambda lr: (finals[lr], lr))
    steps = max(t["steps"] for t in trials)
    decay = max(1, min(round(study.get("cooldown_fraction", 0.25) * at_step), steps - at_step))
    cost = (len(trials) * (at_step + (decay if score == "cooldown" else 0)) + len(kept) * (steps - at_step)) / (
        len(trials) * steps
    )
    return {
        "at_step": at_step,
        "eta": eta,
        "score": score,
        "promoted": kept,
        "pick": pick,
        "best": best,
        "regret": math.inf if pick is None else finals[pick] - finals[best],
        "cost": cost,
    }


def _round(lr: float) -> float:
    return float(f"{lr:.4g}")


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TuneConfig:
    """A learning-rate search: the compare workload and the search's shape.

    Attributes:
        compare: the workload (model, steps, batch, data, schedule, seed, optimizers, other hyperparameters);
            every trial is this comparison's run of one optimizer at one learning rate.
        grid_points: learning rates in the coarse grid.
        grid_factor: ratio between neighbouring grid points.
        eta: successive halving keeps the best ``1 / eta`` at each rung.
        rungs: comparisons on the way (``rung_budgets(steps, eta, rungs)``); the default 2 compares at
            ``steps / eta`` (40 of 120) and finishes the best third; 1 runs every grid point to the end. With the
            cooldown score it kept the full grid's pick for 8 of the default set's 9 optimizers at 0.69 of its
            cost (docs/compare.md); the training-loss score with 3 rungs (13, 40, 120) picked LRs 5-16x too high
            for AdamW and CAME.
        refine_points: learning rates added between the best and its neighbours (even: half on each side).
        max_extensions: how many times the grid may grow past an edge whose point is the best.
        rung_score: how a rung compares trials: ``"cooldown"`` (default) -- the validation loss of a branch that
            decays the LR linearly to 0 over ``cooldown_fraction`` x the rung's steps
            (:meth:`lmopt.bench.run.TrainingRun.cooldown_loss`), i.e. what the LR reaches if the run ended
            there; ``"train"`` -- the mean training loss of the last steps, which favours high LRs while the
            schedule is still near its peak.
        cooldown_fraction: the cooldown branch's length as a fraction of the rung's step count (> 0, <= 1).
        probes: steps at which every trial also records both rung scores (``train`` and ``cooldown``) without
            stopping anything, so a stopping rule can be checked against the full grid on the user's own
            workload (``benchmarks/tune_stopping_rule.py``).
        widths: tune at these model widths (``CompareConfig.width``) instead of the compare model's own.
        parametrizations: ``["sp"]``, ``["mup"]`` or both: under which parametrizations to tune each width.
        centers: a learning rate per optimizer name to centre its grid on (default: its compare recipe's).
    """

    compare: CompareConfig = field(default_factory=CompareConfig)
    grid_points: int = 5
    grid_factor: float = 3.0
    eta: int = 3
    rungs: int = 2
    refine_points: int = 2
    max_extensions: int = 2
    rung_score: str = "cooldown"
    cooldown_fraction: float = 0.25
    probes: list[int] = field(default_factory=list)
    widths: list[int] | None = None
    parametrizations: list[str] = field(default_factory=lambda: ["sp"])
    centers: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.compare, CompareConfig):
            raise ValueError(f"compare must be a CompareConfig, got {type(self.compare).__name__}")
        self.compare.validate()
        if self.compare.seeds != 1:
            raise ValueError(
                f"lmopt tune searches at one seed (compare.seeds is {self.compare.seeds}); run the tuned "
                "comparison over seeds with lmopt compare --tuned tune.json --seeds N"
            )
        for name, low in (("grid_points", 1), ("eta", 2), ("rungs", 1), ("refine_points", 0), ("max_extensions", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if (
            isinstance(self.grid_factor, bool)
            or not isinstance(self.grid_factor, (int, float))
            or not 1.0 < self.grid_factor <= 100.0
        ):
            raise ValueError(f"grid_factor must be a number in (1, 100], got {self.grid_factor!r}")
        if self.widths is not None:
            if not isinstance(self.widths, list) or not self.widths:
                raise ValueError(f"widths must be a non-empty list of integers, got {self.widths!r}")
            for w in self.widths:
                replace(self.compare, width=w).validate()
            if sorted(set(self.widths)) != list(self.widths):
                raise ValueError(f"widths must increase strictly (each once), got {self.widths}")
        if self.rung_score not in ("cooldown", "train"):
            raise ValueError(f"rung_score must be 'cooldown' or 'train', got {self.rung_score!r}")
        if (
            isinstance(self.cooldown_fraction, bool)
            or not isinstance(self.cooldown_fraction, (int, float))
            or not 0.0 < self.cooldown_fraction <= 1.0
        ):
            raise ValueError(f"cooldown_fraction must be a number in (0, 1], got {self.cooldown_fraction!r}")
        if not isinstance(self.probes, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < self.compare.steps for p in self.probes
        ):
            raise ValueError(
                f"probes must be a list of step counts in [1, steps - 1] (steps is {self.compare.steps}), "
                f"got {self.probes!r}"
            )
        if not self.parametrizations or not all(p in ("sp", "mup") for p in self.parametrizations):
            raise ValueError(
                f"parametrizations must be a non-empty list of 'sp' / 'mup', got {self.parametrizations!r}"
            )
        for name, lr in self.centers.items():
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"centers[{name!r}] must be a learning rate > 0, got {lr!r}")

    def to_dict(self) -> dict[str, Any]:
        data = _jsonable(asdict(self))
        data["compare"] = self.compare.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuneConfig:
        """Build from a dict (the ``config`` of a ``tune.json``); unknown keys raise ValueError."""
        if "config" in data and isinstance(data["config"], Mapping):
            data = data["config"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tune config keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        values["compare"] = CompareConfig.from_dict(values.get("compare", {}))
        config = cls(**values)
        config.validate()
        return config


class TuneCallbacks(Protocol):
    """Progress hooks (the CLI draws one progress bar per optimizer with them)."""

    def on_study_start(self, label: str, planned_steps: int) -> None: ...

    def on_progress(self, label: str, steps_done: int, planned_steps: int, note: str) -> None: ...

    def on_study_end(self, label: str, study: dict[str, Any]) -> None: ...


class _Silent:
    def on_study_start(self, label: str, planned_steps: int) -> None:
        pass

    def on_progress(self, label: str, steps_done: int, planned_steps: int, note: str) -> None:
        pass

    def on_study_end(self, label: str, study: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------------------------------
# one optimizer's search
# ------------------------------------------------------------------------------------------------------------
class _Study:
    """The search for one optimizer on one workload (a width and a parametrization)."""

    def __init__(self, name: str, label: str, config: TuneConfig, workload: dict[str, Any], callbacks: TuneCallbacks):
        self.name, self.label, self.tune, self.workload, self.callbacks = name, label, config, workload, callbacks
        self.compare: CompareConfig = workload["config"]
        self.budgets = rung_budgets(self.compare.steps, config.eta, config.rungs)
        overrides = self.compare.hyperparameters.get(name, {})
        spec, hyper, _ = optimizer_hyperparameters(name, overrides, warmup_steps=self.compare.resolved_warmup_steps)
        recipe_lr = hyper.get("lr", spec.hyperparameters().get("lr"))
        if not isinstance(recipe_lr, (int, float)) or isinstance(recipe_lr, bool) or recipe_lr <= 0:
            raise ValueError(f"{name} has no positive learning rate to tune (its lr is {recipe_lr!r})")
        self.recipe_lr = float(recipe_lr)
        self.center = float(config.centers.get(name, self.recipe_lr))
        self.trials: dict[float, dict[str, Any]] = {}
        self.record: list[dict[float, float]] = [{} for _ in self.budgets]  # rung -> lr -> score
        self.steps_done = 0
        self.cooldown_done = 0
        self.probes = sorted(set(config.probes))
        self.planned = self._planned_steps(config.grid_points) + self._refine_cost()

    def _cooldown_steps(self, at_step: int) -> int:
        return max(1, min(round(self.tune.cooldown_fraction * at_step), self.compare.steps - at_step))

    def _planned_steps(self, n: int) -> int:
        total, alive, previous = 0, n, 0
        for i, b in enumerate(self.budgets):
            total += alive * (b - previous)
            if i < len(self.budgets) - 1 and self.tune.rung_score == "cooldown":
                total += alive * self._cooldown_steps(b)
            previous, alive = b, max(1, math.ceil(alive / self.tune.eta))
        return total + n * sum(self._cooldown_steps(p) for p in self.probes)

    def _refine_cost(self) -> int:
        return self.tune.refine_points * self.budgets[0] + self.budgets[-1] - self.budgets[0]

    # -- trials
    def _start(self, lr: float) -> dict[str, Any]:
        w = self.workload
        config = replace(
            self.compare,
            hyperparameters={
                **self.compare.hyperparameters,
                self.name: {**self.compare.hyperparameters.get(self.name, {}), "lr": lr},
            },
        )
        run = TrainingRun(
            self.name,
            w["template"],
            config,
            w["device"],
            w["offsets"],
            w["corpus"],
            w["val_windows"],
            None,
            _SilentRun(),
            extras=w["extras"],
        )
        trial = {"lr": lr, "run": run, "rung_scores": [], "probes": [], "stopped_at": None}
        self.trials[lr] = trial
        return trial

    def _cooldown(self, run: TrainingRun) -> float:
        """The cooldown score now (the branch's steps count toward the search's cost)."""
        decay = self._cooldown_steps(run.result["steps_completed"])
        if run.active and not run.schedule_free:
            self.steps_done += decay
            self.cooldown_done += decay
        return run.cooldown_loss(decay)

    def _train_to(self, trial: dict[str, Any], step: int) -> None:
        run: TrainingRun = trial["run"]
        before = run.result["steps_completed"]
        run.advance(step)
        self.steps_done += run.result["steps_completed"] - before

    def _advance(self, trial: dict[str, Any], rung: int) -> float:
        run: TrainingRun = trial["run"]
        target = self.budgets[rung]
        probed: dict[str, float] = {}
        for p in self.probes:
            if run.result["steps_completed"] < p <= target:
                self._train_to(trial, p)
                probed = {"train": run.recent_train_loss(), "cooldown": self._cooldown(run)}
                trial["probes"].append({"step": p, **{k: v if math.isfinite(v) else None for k, v in probed.items()}})
        self._train_to(trial, target)
        last = rung == len(self.budgets) - 1
        if not last and probed and trial["probes"][-1]["step"] == target:
            score = probed[self.tune.rung_score]
        elif not last and self.tune.rung_score == "cooldown":
            score = self._cooldown(run)
        elif last:
            result = run.finish()
            trial["result"] = result
            score = (
                result["validation_loss"]
                if result["status"] == "ok" and result["validation_loss"] is not None
                else math.inf
            )
        else:
            score = run.recent_train_loss()
        trial["rung_scores"].append(score if math.isfinite(score) else None)
        self.record[rung][trial["lr"]] = score
        self.callbacks.on_progress(
            self.label, self.steps_done, max(self.planned, self.steps_done), f"lr {trial['lr']:.3g} rung {rung + 1}"
        )
        return score

    def _stop(self, trial: dict[str, Any], rung: int) -> None:
        run: TrainingRun = trial["run"]
        if "result" in trial:
            return
        if run.result["status"] == "ok":
            run.result["status"] = "stopped"
            run.result["message"] = f"stopped by successive halving after rung {rung + 1} ({self.budgets[rung]} steps)"
        trial["result"] = run.finish()
        trial["stopped_at"] = rung

    def _race(self, lrs: Sequence[float]) -> None:
        """Synchronous successive halving of fresh trials at ``lrs``."""
        alive = [self._start(lr) for lr in lrs]
        for rung in range(len(self.budgets)):
            scores = {t["lr"]: self._advance(t, rung) for t in alive}
            if rung == len(self.budgets) - 1:
                break
            keep = set(promoted(scores, self.tune.eta))
            for t in alive:
                if t["lr"] not in keep:
                    self._stop(t, rung)
            alive = [t for t in alive if t["lr"] in keep]

    def _challenge(self, lr: float) -> None:
        """A trial added later: it passes a rung only while among the best ``ceil(n / eta)`` of all trials that
        reached that rung."""
        if lr in self.trials:
            return
        trial = self._start(lr)
        for rung in range(len(self.budgets)):
            self._advance(trial, rung)
            if rung < len(self.budgets) - 1 and lr not in promoted(self.record[rung], self.tune.eta):
                self._stop(trial, rung)
                return

    def _refinement(self, best: float) -> list[float]:
        """``refine_points`` learning rates around ``best``, ``ceil(m / 2)`` per side at ``best x
        factor^(+-i / (ceil(m / 2) + 1))``; the closest first, an odd one out on the side whose neighbour scored
        better (the gentler side of the U)."""
        m = self.tune.refine_points
        if not m:
            return []
        side = math.ceil(m / 2)
        final = self.record[-1]
        lrs = sorted(self.trials)
        i = lrs.index(best)
        below = final.get(lrs[i - 1], math.inf) if i > 0 else math.inf
        above = final.get(lrs[i + 1], math.inf) if i + 1 < len(lrs) else math.inf
        better = -1 if below <= above else 1
        candidates = [(k / (side + 1), sign) for k in range(1, side + 1) for sign in (-1, 1)]
        candidates.sort(key=lambda c: (c[0], c[1] != better))
        return [_round(best * self.tune.grid_factor ** (sign * o)) for o, sign in candidates[:m]]

    def best(self) -> float | None:
        final = {lr: s for lr, s in self.record[-1].items() if math.isfinite(s)}
        return min(final, key=lambda lr: (final[lr], lr)) if final else None

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.callbacks.on_study_start(self.label, self.planned)
        coarse = grid(self.center, self.tune.grid_points, self.tune.grid_factor)
        self._race(coarse)
        extensions = 0
        while extensions < self.tune.max_extensions and (best := self.best()) is not None:
            lrs = sorted(self.trials)
            if best == lrs[0] and self.tune.grid_points > 1:
                new = _round(best / self.tune.grid_factor)
            elif best == lrs[-1] and self.tune.grid_points > 1:
                new = _round(best * self.tune.grid_factor)
            else:
                break
            self.planned += self.budgets[-1]
            self._challenge(new)
            extensions += 1
        best = self.best()
        if best is not None:
            for lr in self._refinement(best):
                self._challenge(lr)
        best = self.best()
        study = self._describe(best, time.perf_counter() - started, extensions)
        self.callbacks.on_study_end(self.label, study)
        return study

    def _describe(self, best: float | None, elapsed: float, extensions: int) -> dict[str, Any]:
        trials = []
        for lr in sorted(self.trials):
            t = self.trials[lr]
            r = t["result"]
            trials.append(
                {
                    "lr": lr,
                    "status": r["status"],
                    "message": r["message"],
                    "steps": r["steps_completed"],
                    "rung_scores": t["rung_scores"],
                    "probes": t["probes"],
                    "final_train_loss": r["final_train_loss"] if r["status"] == "ok" else None,
                    "validation_loss": r["validation_loss"],
                    "recent_train_loss": _recent(r),
                    "history": {"step": r["history"]["step"], "loss": r["history"]["loss"]},
                }
            )
        best_trial = self.trials[best]["result"] if best is not None else None
        lrs = sorted(self.trials)
        return _jsonable(
            {
                "optimizer": self.name,
                "label": self.label,
                "width": self.compare.model_size().hidden,
                "parametrization": self.compare.parametrization,
                "recipe_lr": self.recipe_lr,
                "center_lr": self.center,
                "best_lr": best,
                "best_over_recipe": None if best is None else best / self.recipe_lr,
                "best_validation_loss": None if best_trial is None else best_trial["validation_loss"],
                "best_final_train_loss": None if best_trial is None else best_trial["final_train_loss"],
                "bracketed": best is not None and lrs[0] < best < lrs[-1],
                "extensions": extensions,
                "rung_budgets": self.budgets,
                "rung_score": self.tune.rung_score,
                "cooldown_fraction": self.tune.cooldown_fraction,
                "steps_trained": self.steps_done,
                "cooldown_steps": self.cooldown_done,
                "full_run_equivalents": self.steps_done / self.compare.steps,
                "time_s": elapsed,
                "trials": trials,
            }
        )


def _recent(result: dict[str, Any]) -> float | None:
    tail = [v for v in result["history"]["loss"][-FINAL_LOSS_WINDOW:] if v is not None]
    return sum(tail) / len(tail) if tail else None


# ------------------------------------------------------------------------------------------------------------
# the whole search
# ------------------------------------------------------------------------------------------------------------
def _workload(config: CompareConfig, corpus: Any, device: torch.device, val_windows: torch.Tensor) -> dict[str, Any]:
    offsets = train_batch_offsets(
        corpus.train, steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
    )
    template, extras, parametrization = build_template(config, corpus.vocab_size)
    return {
        "config": config,
        "template": template,
        "extras": extras,
        "parametrization": parametrization,
        "offsets": offsets,
        "corpus": corpus,
        "device": device,
        "val_windows": val_windows,
        "parameters": count_parameters(template),
    }


def tune(config: TuneConfig, callbacks: TuneCallbacks | None = None) -> dict[str, Any]:
    """Search every optimizer's learning rate (see the module docstring); return the JSON-ready results.

    The result holds ``config``, ``environment``, ``model``, one ``studies`` entry per optimizer (and per width
    and parametrization) with every trial, ``best_lr`` (name -> best learning rate, for the compare model's own
    width) and, with ``widths``, ``transfer``.
    """
    config.validate()
    callbacks = callbacks or _Silent()
    threads = config.compare.threads
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _tune(config, callbacks)
    finally:
        torch.set_num_threads(previous)


def _tune(config: TuneConfig, callbacks: TuneCallbacks) -> dict[str, Any]:
    started = time.perf_counter()
    compare, _skipped = resolve_config(config.compare)
    names = compare.optimizers or []
    device = resolve_device(compare.device)
    corpus = load_corpus(compare.data, compare.tokenizer)
    val_windows = validation_windows(corpus.validation, seq_len=compare.seq_len, max_windows=compare.eval_windows)
    widths = config.widths or [compare.width]
    studies, models = [], []
    warmed = False
    for parametrization in config.parametrizations if config.widths else [compare.parametrization]:
        for width in widths:
            workload_config = replace(compare, width=width, parametrization=parametrization)
            if config.widths and parametrization == "mup" and compare.base_width is None:
                workload_config = replace(workload_config, base_width=widths[0])
            workload = _workload(workload_config, corpus, device, val_windows)
            if not warmed:
                _warm_up(workload["template"], device, corpus, workload["offsets"][0], compare.seq_len)
                warmed = True
            models.append(
                {
                    "width": workload_config.model_size().hidden,
                    "parametrization": parametrization,
                    "size": workload_config.model_size().to_dict(),
                    "parameters": workload["parameters"],
                }
            )
            for name in names:
                label = (
                    name if not config.widths else f"{name} {parametrization} w{workload_config.model_size().hidden}"
                )
                studies.append(_Study(name, label, config, workload, callbacks).run())
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "lmopt tune",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": replace(config, compare=compare).to_dict(),
        "environment": environment(device),
        "data": corpus.describe() | {"validation_windows": int(val_windows.shape[0])},
        "model": {"name": compare.model, "widths": models},
        "studies": studies,
        "best_lr": {s["optimizer"]: s["best_lr"] for s in studies if not config.widths},
        "total_time_s": None,
    }
    if config.widths:
        result["transfer"] = _transfer(config, compare, corpus, device, val_windows, studies)
    result["total_time_s"] = time.perf_counter() - started
    return _jsonable(result)


def _transfer(
    config: TuneConfig,
    compare: CompareConfig,
    corpus: Any,
    device: torch.device,
    val_windows: torch.Tensor,
    studies: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per optimizer and parametrization: the narrowest width's best LR run at the widest width, against the
    widest width's own tuned loss; and the spread of the best LR over the widths (max / min)."""
    widths = config.widths or []
    out = []
    for parametrization in config.parametrizations:
        for name in compare.optimizers or []:
            by_width = {
                s["width"]: s for s in studies if s["optimizer"] == name and s["parametrization"] == parametrization
            }
            narrow, wide = by_width.get(widths[0]), by_width.get(widths[-1])
            if narrow is None or wide is None or narrow["best_lr"] is None or wide["best_lr"] is None:
                continue
            best_lrs = [by_width[w]["best_lr"] for w in widths if by_width.get(w, {}).get("best_lr")]
            entry = {
                "optimizer": name,
                "parametrization": parametrization,
                "best_lr_by_width": {str(w): by_width[w]["best_lr"] for w in widths if w in by_width},
                "best_lr_spread": max(best_lrs) / min(best_lrs),
                "transferred_lr": narrow["best_lr"],
                "widest_width": widths[-1],
                "widest_own_lr": wide["best_lr"],
                "widest_own_validation_loss": wide["best_validation_loss"],
            }
            own = next((t for t in wide["trials"] if t["lr"] == narrow["best_lr"] and t["status"] == "ok"), None)
            if own is not None:  # the widest width's search already ran that learning rate to the end
                entry["transferred_validation_loss"] = own["validation_loss"]
            else:
                wc = replace(compare, width=widths[-1], parametrization=parametrization)
                if parametrization == "mup" and compare.base_width is None:
                    wc = replace(wc, base_width=widths[0])
                wc = replace(
                    wc,
                    hyperparameters={
                        **wc.hyperparameters,
                        name: {**wc.hyperparameters.get(name, {}), "lr": narrow["best_lr"]},
                    },
                )
                w = _workload(wc, corpus, device, val_windows)
                run = TrainingRun(
                    name,
                    w["template"],
                    wc,
                    device,
                    w["offsets"],
                    corpus,
                    val_windows,
                    None,
                    _SilentRun(),
                    extras=w["extras"],
                )
                run.advance(wc.steps)
                res = run.finish()
                entry["transferred_validation_loss"] = res["validation_loss"]
            own_loss, moved = entry["widest_own_validation_loss"], entry["transferred_validation_loss"]
            entry["transfer_gap"] = None if own_loss is None or moved is None else moved - own_loss
            out.append(entry)
    return out


def tuned_learning_rates(tune_result: Mapping[str, Any], config: CompareConfig) -> dict[str, float]:
    """The best learning rate per optimizer from a ``tune.json`` for ``config``'s workload: the studies at
    ``config``'s width and parametrization (the plain ones when the search had no ``widths``)."""
    if tune_result.get("tool") != "lmopt tune" or not isinstance(tune_result.get("studies"), list):
        raise ValueError("not a tune.json written by lmopt tune (no 'studies')")
    width = config.model_size().hidden
    out: dict[str, float] = {}
    for s in tune_result["studies"]:
        if s.get("width") == width and s.get("parametrization", "sp") == config.parametrization and s.get("best_lr"):
            out[s["optimizer"]] = float(s["best_lr"])
    return out
