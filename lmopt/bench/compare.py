"""``lmopt compare``: train the same small LLM with several optimizers and measure loss, speed and memory.

For each chosen optimizer the run is the same except for the optimizer:

* the same initial weights (one randomly initialised Llama from :mod:`lmopt.bench.workload`, copied),
* the same data in the same order (window offsets drawn once from the seed, :mod:`lmopt.bench.corpus`),
* the optimizer's registry entry with this workload's recipe (:data:`COMPARE_RECIPES`) and the user's
  overrides, through :func:`lmopt.create_optimizer` (so weight decay skips norms, biases and embeddings),
* a linear warmup then cosine decay to ``min_lr_ratio`` of the peak (Schedule-Free optimizers, which replace
  the schedule by iterate averaging, get none; they get the warmup through their own ``warmup_steps``),
* gradient clipping to a global norm of ``max_grad_norm`` each step,
* fp32 weights and math, on the GPU when one is there (``device="auto"``), else on the CPU.

A step whose gradients are not finite is skipped and counted (lmopt optimizers are built with
``nonfinite="skip"``; for others the loop skips the step itself). A run whose training loss becomes inf/NaN,
or whose steps are all skipped :data:`MAX_CONSECUTIVE_SKIPS` times in a row, is reported as diverged and
stopped; a run that raises is reported as an error; the other optimizers go on either way.

What is measured per optimizer: the loss at every step, wall time, learning rate and gradient norm, the final
training loss (mean of the last :data:`FINAL_LOSS_WINDOW` steps), the validation loss (mean over the same
validation windows for every optimizer; Schedule-Free evaluated at its averaged point ``x``), tokens per
second of training, the optimizer state in bytes (:func:`lmopt.memory.measure.optimizer_state_bytes`: every
tensor in ``optimizer.state`` and in that of a wrapped optimizer such as Lookahead's inner one, inner tensors
of tensor subclasses included, shared storage once), and peak memory (see :class:`MemoryMeter`).

This module holds the configuration: :class:`CompareConfig`, the default set and the recipes, and their
resolution into optimizer names, constructor arguments and the LR schedule (:func:`resolve_config`,
:func:`optimizer_hyperparameters`, :func:`lr_schedule`). The run loop, the training step and the
measurements are in :mod:`lmopt.bench.run`; every public name there is importable from here too.

Example:
    >>> from lmopt.bench.compare import CompareConfig, run_compare
    >>> results = run_compare(CompareConfig(optimizers=["adamw", "lion"], model="tiny", steps=20))
    >>> [(r["name"], r["validation_loss"]) for r in results["runs"]]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ..registry import OptimizerSpec, get_spec, list_optimizers, resolve_name
from ..schedules import Constant, LinearWarmup, Schedule, ShapedDecay, join
from .workload import MODEL_SIZES, ModelSize

if TYPE_CHECKING:  # defined in the run loop, re-exported here on first use (see __getattr__ at the end)
    from .run import (
        FINAL_LOSS_WINDOW,
        MAX_CONSECUTIVE_SKIPS,
        CompareCallbacks,
        MemoryMeter,
        StepResult,
        TrainingRun,
        optimizer_state_bytes,
        run_compare,
        train_step,
    )

__all__ = [
    "COMPARE_RECIPES",
    "CompareCallbacks",
    "CompareConfig",
    "DEFAULT_OPTIMIZERS",
    "compare_hyperparameters",
    "FINAL_LOSS_WINDOW",
    "MAX_CONSECUTIVE_SKIPS",
    "MemoryMeter",
    "PARAMETRIZATIONS",
    "SCHEDULES",
    "StepResult",
    "TrainingRun",
    "default_optimizer_names",
    "lr_schedule",
    "lr_source",
    "optimizer_state_bytes",
    "resolve_config",
    "run_compare",
    "train_step",
    "warmup_cosine",
]


def compare_hyperparameters(spec: OptimizerSpec) -> dict[str, Any]:
    """This workload's hyperparameters for an optimizer, read from its spec: ``spec.compare`` when declared;
    else AdamW's, through the spec's recipe translation (Lion: lr / 3, weight decay x 3, its betas -- the same
    translation :func:`lmopt.recipe` applies, so there is one source); else none (the registry defaults)."""
    if spec.compare is not None:
        return dict(spec.compare)
    t = spec.translation
    if t is None:
        return {}
    base = dict(get_spec("adamw").compare or {})
    out = {k: float(f"{base[k] * f:.12g}") for k, f in (("lr", t.lr_factor), ("weight_decay", t.weight_decay_factor))}
    if isinstance(t.betas, tuple):
        out["betas"] = t.betas
    elif t.betas is None:
        out["betas"] = base["betas"]
    return out


def _default_set() -> tuple[str, ...]:
    chosen = [s for s in list_optimizers() if s.compare_default is not None]
    return tuple(s.name for s in sorted(chosen, key=lambda s: s.compare_default))


#: The default set, in this order (each spec's ``compare_default``), filtered at run time by what the registry
#: holds (a name that is not registered is skipped with a note): AdamW (the baseline), its 8-bit-state version,
#: then the memory-efficient and sign/orthogonal optimizers built for LLMs. Others (``sophia``, ``adamw4bit``,
#: ``lion8bit``, ``adabound``, torch's classics, ...) run with ``--optimizers``; ``--optimizers all`` runs
#: every entry.
DEFAULT_OPTIMIZERS: tuple[str, ...] = _default_set()

#: This workload's hyperparameters per registry name (:func:`compare_hyperparameters`, declared on each spec:
#: a ~1M-parameter model trained for a few hundred steps tolerates a larger peak learning rate than the
#: published 100M+ recipes). Keys an optimizer's constructor does not take are left out and listed in the
#: results (``ignored_recipe_keys``); names without an entry use their registry defaults. ``--set
#: NAME.KEY=VALUE`` overrides any of them.
#: the LR schedule shapes (``CompareConfig.schedule``)
SCHEDULES: tuple[str, ...] = ("cosine", "wsd")
#: the parametrizations (``CompareConfig.parametrization``)
PARAMETRIZATIONS: tuple[str, ...] = ("sp", "mup")

COMPARE_RECIPES: dict[str, dict[str, Any]] = {s.name: h for s in list_optimizers() if (h := compare_hyperparameters(s))}


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------
@dataclass
class CompareConfig:
    """Everything that defines a comparison; saved in the results and read back by ``--config``.

    Attributes:
        optimizers: registry names or aliases; ``None`` is :func:`default_optimizer_names`; ``["all"]`` is
            every registered optimizer. The results store the resolved list, so a re-run trains the same set.
        steps: optimizer steps per optimizer.
        model: a size from :data:`lmopt.bench.workload.MODEL_SIZES`.
        batch_size, seq_len: windows per step and tokens per window.
        seed: initial weights, data order and each run's RNG.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        data: ``None`` (the Python standard library's sources) or a text file / folder.
        tokenizer: ``None`` (bytes) or a local tokenizer folder.
        warmup_steps: linear warmup length; ``None`` is 10% of ``steps`` (at least 1).
        min_lr_ratio: the cosine decays to this fraction of the peak learning rate.
        max_grad_norm: global gradient-norm clipping threshold (``0`` disables clipping, the norm is still
            computed and recorded).
        eval_windows: validation windows (of ``seq_len`` tokens) for the validation loss.
        eval_every: also evaluate every this many steps (``0``: only at the end).
        hyperparameters: per-optimizer overrides, ``{"lion": {"lr": 1e-4}}``, applied over the recipe.
        threads: CPU threads for torch during the comparison (restored afterwards); ``None`` leaves torch's
            setting. On a machine shared with other jobs, fewer threads than cores avoids OpenMP threads
            waiting on each other (measured here: 2 threads on 2 busy cores ran 3x slower than 1).
        seeds: run every optimizer with seeds ``seed, seed + 1, ...`` (initial weights and data order); the
            results report the mean and standard deviation over seeds.
        schedule: ``"cosine"`` (warmup, cosine decay to ``min_lr_ratio``) or ``"wsd"`` (warmup, a constant peak,
            then a ``1-sqrt`` decay to ``min_lr_ratio`` over the last ``decay_fraction`` of the steps; Hägele et
            al. 2024).
        warmup_fraction: warmup length as a fraction of ``steps`` when ``warmup_steps`` is ``None``.
        decay_fraction: WSD's decay share of the steps.
        width: the model's hidden size instead of the named size's (the intermediate size scales with it, the
            head count stays); ``lmopt tune --widths`` sets it.
        parametrization: ``"sp"`` (the standard parametrization: transformers' init, one learning rate) or
            ``"mup"`` (:func:`lmopt.mup` from ``base_width``: per-role learning-rate multipliers, init scales and
            1/d attention).
        base_width: muP's base width (default: the named size's hidden size).
        baseline: the optimizer whose final training loss is the target of the "steps to target" column.
        lr_sources: where each optimizer's learning rate came from, for the report (``lmopt compare --tuned``
            fills it; others read "recipe" or "--set").
    """

    optimizers: list[str] | None = None
    steps: int = 120
    model: str = "small"
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    data: str | None = None
    tokenizer: str | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_windows: int = 64
    eval_every: int = 0
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None
    seeds: int = 1
    schedule: str = "cosine"
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2
    width: int | None = None
    parametrization: str = "sp"
    base_width: int | None = None
    baseline: str = "adamw"
    lr_sources: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("steps", "batch_size", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {self.seeds!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        for name in ("warmup_fraction", "decay_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.schedule == "wsd" and self.resolved_warmup_steps + self.decay_steps > self.steps:
            raise ValueError(
                f"the warmup ({self.resolved_warmup_steps} steps) and the WSD decay ({self.decay_steps} steps) "
                f"do not fit in steps={self.steps}: lower warmup_fraction or decay_fraction"
            )
        for name in ("width", "base_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.width is not None and self.width % MODEL_SIZES.get(self.model, MODEL_SIZES["tiny"]).heads:
            heads = MODEL_SIZES.get(self.model, MODEL_SIZES["tiny"]).heads
            raise ValueError(f"width must be a multiple of the {self.model} model's {heads} heads, got {self.width}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {list(PARAMETRIZATIONS)}, got {self.parametrization!r}")
        if not isinstance(self.baseline, str) or not self.baseline:
            raise ValueError(f"baseline must be an optimizer name, got {self.baseline!r}")
        if not isinstance(self.lr_sources, dict) or not all(isinstance(v, str) for v in self.lr_sources.values()):
            raise ValueError("lr_sources must map optimizer names to strings")
        if self.model not in MODEL_SIZES:
            raise ValueError(f"model must be one of {list(MODEL_SIZES)}, got {self.model!r}")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or not 0 <= self.warmup_steps < self.steps
        ):
            raise ValueError(f"warmup_steps must be an integer in [0, steps={self.steps}), got {self.warmup_steps!r}")
        if not isinstance(self.min_lr_ratio, (int, float)) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.max_grad_norm, (int, float)) or not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be a number >= 0, got {self.max_grad_norm!r}")
        if self.optimizers is not None:
            if not isinstance(self.optimizers, list) or not all(isinstance(n, str) for n in self.optimizers):
                raise ValueError(f"optimizers must be a list of names, got {self.optimizers!r}")
            if not self.optimizers:
                raise ValueError("optimizers must name at least one optimizer")
        if not isinstance(self.hyperparameters, dict) or not all(
            isinstance(v, dict) for v in self.hyperparameters.values()
        ):
            raise ValueError("hyperparameters must map optimizer names to {hyperparameter: value} dicts")
        resolve_device(self.device)

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.steps <= 1 or self.warmup_fraction == 0:
            return 0
        return min(self.steps - 1, max(1, round(self.warmup_fraction * self.steps)))

    @property
    def decay_steps(self) -> int:
        """WSD's decay length (at least one step)."""
        return max(1, round(self.decay_fraction * self.steps))

    def model_size(self) -> ModelSize:
        """The named size, at ``width`` when one is given (intermediate size scaled, head count kept)."""
        size = MODEL_SIZES[self.model]
        if self.width is None or self.width == size.hidden:
            return size
        intermediate = max(8, round(size.intermediate * self.width / size.hidden / 8) * 8)
        return ModelSize(hidden=self.width, layers=size.layers, heads=size.heads, intermediate=intermediate)

    def lr_schedule(self) -> Schedule:
        """The LR multiplier schedule of this configuration (:func:`lr_schedule`)."""
        return lr_schedule(
            self.steps,
            self.resolved_warmup_steps,
            self.min_lr_ratio,
            shape=self.schedule,
            decay_steps=self.decay_steps,
        )

    def schedule_description(self) -> str:
        warmup = self.resolved_warmup_steps
        if self.schedule == "wsd":
            return (
                f"linear warmup {warmup} steps, constant, 1-sqrt decay over the last {self.decay_steps} steps to "
                f"{self.min_lr_ratio:g} x peak"
            )
        return f"linear warmup {warmup} steps, cosine to {self.min_lr_ratio:g} x peak at step {self.steps}"

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompareConfig:
        """Build from a dict (the ``config`` of a results JSON); unknown keys raise ValueError."""
        if "config" in data and isinstance(data["config"], Mapping):  # a whole results file
            data = data["config"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compare config keys {unknown}; known: {sorted(known)}")
        config = cls(**dict(data))
        config.validate()
        return config


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must be a device torch knows."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return resolved


# ------------------------------------------------------------------------------------------------------------
# optimizers
# ------------------------------------------------------------------------------------------------------------
def default_optimizer_names() -> tuple[list[str], list[dict[str, str]]]:
    """:data:`DEFAULT_OPTIMIZERS` that are registered, and a note for each one that is not."""
    registered = {spec.name for spec in list_optimizers()}
    names, skipped = [], []
    for name in DEFAULT_OPTIMIZERS:
        if name in registered:
            names.append(name)
        else:
            try:  # registered under an alias of another entry?
                resolve_name(name)
                names.append(name)
            except ValueError:
                skipped.append({"name": name, "reason": "not registered in this lmopt build"})
    return names, skipped


def resolve_optimizer_names(requested: Sequence[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """The names to run and the skipped default names; unknown explicit names raise ValueError."""
    if requested is None:
        return default_optimizer_names()
    if list(requested) == ["all"]:
        return [spec.name for spec in list_optimizers()], []
    names = [n.strip() for n in requested if n.strip()]
    for name in names:
        resolve_name(name)  # ValueError with close matches
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"optimizers named more than once: {duplicates}")
    return names, []


def _accepted_arguments(cls: type) -> set[str]:
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")}


def is_schedule_free(cls: type) -> bool:
    """Schedule-Free optimizers have ``train()`` / ``eval()`` modes (torch optimizers do not)."""
    return callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))


def _to_argument(value: Any) -> Any:
    # JSON has no tuples: betas and the like come back as lists
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return tuple(value)
    return value


def optimizer_hyperparameters(
    name: str, overrides: Mapping[str, Any], *, warmup_steps: int
) -> tuple[OptimizerSpec, dict[str, Any], list[str]]:
    """The spec, the keyword arguments :func:`lmopt.create_optimizer` gets, and the recipe keys left out."""
    spec, _implied = resolve_name(name)
    accepted = _accepted_arguments(spec.cls)
    recipe = compare_hyperparameters(spec)
    hyper = {k: v for k, v in recipe.items() if k in accepted}
    ignored = sorted(k for k in recipe if k not in accepted)
    if is_schedule_free(spec.cls) and "warmup_steps" in accepted:
        hyper["warmup_steps"] = warmup_steps
    if "nonfinite" in accepted:
        hyper["nonfinite"] = "skip"
    hyper.update({k: _to_argument(v) for k, v in overrides.items()})
    return spec, hyper, ignored


def resolve_config(config: CompareConfig) -> tuple[CompareConfig, list[dict[str, str]]]:
    """``config`` with its optimizer list resolved, and the default names skipped (not registered).

    Raises ValueError, before any training, when no optimizer is left, when hyperparameters name an optimizer
    that is not run, or when an optimizer does not take a hyperparameter given for it.
    """
    names, skipped = resolve_optimizer_names(config.optimizers)
    if not names:
        raise ValueError("none of the requested optimizers is registered")
    resolved = CompareConfig(**{**asdict(config), "optimizers": names})
    for key in resolved.hyperparameters:
        if key not in names:
            raise ValueError(f"hyperparameters given for {key!r}, which is not among the optimizers {names}")
    for name in names:  # fail early on hyperparameter typos, before any training
        spec, hyper, _ = optimizer_hyperparameters(
            name, resolved.hyperparameters.get(name, {}), warmup_steps=resolved.resolved_warmup_steps
        )
        unknown = sorted(set(hyper) - _accepted_arguments(spec.cls) - {"no_decay", "lr_multipliers"})
        if unknown:
            raise ValueError(f"{name} does not take {unknown}; it takes {sorted(_accepted_arguments(spec.cls))}")
    return resolved, skipped


# ------------------------------------------------------------------------------------------------------------
# the LR schedule
# ------------------------------------------------------------------------------------------------------------
def lr_schedule(
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    *,
    shape: str = "cosine",
    decay_steps: int | None = None,
) -> Schedule:
    """This workload's schedule, built from :mod:`lmopt.schedules` pieces: linear warmup, then cosine to a floor.

    Step ``s`` (0-based) gets ``(s + 1) / warmup_steps`` during the warmup (the last warmup step already uses
    the peak: :class:`~lmopt.schedules.LinearWarmup` of ``warmup_steps - 1`` steps), then the cosine
    :class:`~lmopt.schedules.ShapedDecay` from the peak at step ``warmup_steps`` to ``min_lr_ratio`` x peak at
    the last step (``total_steps - 1``; a one-step decay stays at the peak). Unlike
    :func:`lmopt.schedules.warmup_cosine`, whose warmup reaches the peak one step later, this keeps the numbers
    ``lmopt compare`` has always used, so results stay comparable.

    ``shape="wsd"``: the same warmup, then the peak held until the last ``decay_steps`` steps (default 20% of
    the run), which decay with the ``1-sqrt`` shape (Hägele et al. 2024) to ``min_lr_ratio`` x peak at the last
    step.
    """
    if shape not in SCHEDULES:
        raise ValueError(f"shape must be one of {list(SCHEDULES)}, got {shape!r}")
    if shape == "wsd":
        decay_steps = max(1, round(0.2 * total_steps)) if decay_steps is None else decay_steps
        stable_end = max(warmup_steps, total_steps - decay_steps)
        pieces: list[Schedule] = []
        boundaries: list[int] = []
        for start, piece in (
            (0, LinearWarmup(warmup_steps - 1) if warmup_steps else None),
            (warmup_steps, Constant(1.0) if stable_end > warmup_steps else None),
            (stable_end, ShapedDecay(max(2, decay_steps), "1-sqrt", min_lr_ratio)),
        ):
            if piece is not None:
                if pieces:
                    boundaries.append(start)
                pieces.append(piece)
        return join(pieces, boundaries) if boundaries else pieces[-1]
    decay = ShapedDecay(max(2, total_steps - warmup_steps), "cosine", min_lr_ratio)
    if warmup_steps == 0:
        return decay
    return join([LinearWarmup(warmup_steps - 1), decay], [warmup_steps])


def lr_source(config: CompareConfig, name: str) -> str:
    """Where ``name``'s learning rate comes from: ``config.lr_sources``, else ``"--set"`` when overridden,
    else ``"recipe"`` (the spec's compare hyperparameters)."""
    if name in config.lr_sources:
        return config.lr_sources[name]
    return "--set" if "lr" in config.hyperparameters.get(name, {}) else "recipe"


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier of :func:`lr_schedule` at ``step`` (0-based): linear warmup to 1 over ``warmup_steps``
    (the first step already gets ``1 / warmup_steps``), then a cosine decay reaching ``min_ratio`` at the last
    step."""
    return lr_schedule(total_steps, warmup_steps, min_ratio)(step)


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples as lists, non-finite floats as None, dtypes and other objects as strings."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    return str(value)


def __getattr__(name: str) -> Any:
    # the run loop (lmopt.bench.run) imports the configuration from here, so its public names are re-exported
    # on first use rather than imported at the top (which would be an import cycle)
    from . import run

    if name in run.__all__:
        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    from . import run

    return sorted(set(globals()) | set(run.__all__))
