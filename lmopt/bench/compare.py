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
second of training, the optimizer state in bytes (every tensor in ``optimizer.state``, inner tensors of tensor
subclasses included, shared storage once), and peak memory (see :class:`MemoryMeter`).

Example:
    >>> from lmopt.bench.compare import CompareConfig, run_compare
    >>> results = run_compare(CompareConfig(optimizers=["adamw", "lion"], model="tiny", steps=20))
    >>> [(r["name"], r["validation_loss"]) for r in results["runs"]]
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import inspect
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from ..registry import OptimizerSpec, create_optimizer, list_optimizers, resolve_name
from ..train.clip import clip_grad_norm
from .corpus import Corpus, gather_windows, load_corpus, train_batch_offsets, validation_windows
from .workload import MODEL_SIZES, build_model, count_parameters

__all__ = [
    "COMPARE_RECIPES",
    "CompareCallbacks",
    "CompareConfig",
    "DEFAULT_OPTIMIZERS",
    "FINAL_LOSS_WINDOW",
    "MAX_CONSECUTIVE_SKIPS",
    "MemoryMeter",
    "StepResult",
    "default_optimizer_names",
    "optimizer_state_bytes",
    "run_compare",
    "train_step",
    "warmup_cosine",
]

#: The default set, in this order, filtered at run time by what the registry holds (a name that is not
#: registered is skipped with a note): AdamW (the baseline), its 8-bit-state version, then the
#: memory-efficient and sign/orthogonal optimizers built for LLMs. Others (``sophia``, ``adamw4bit``,
#: ``lion8bit``, ``adabound``, torch's classics, ...) run with ``--optimizers``; ``--optimizers all`` runs
#: every entry.
DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "adamw",
    "adamw8bit",
    "adafactor",
    "lion",
    "came",
    "adam_mini",
    "schedule_free_adamw",
    "muon",
)

_ADAMW_RECIPE: dict[str, Any] = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}

#: This workload's hyperparameters per registry name (a ~1M-parameter model trained for a few hundred
#: steps tolerates a larger peak learning rate than the published 100M+ recipes). Keys an optimizer's
#: constructor does not take are left out and listed in the results (``ignored_recipe_keys``); names without
#: an entry use their registry defaults. ``--set NAME.KEY=VALUE`` overrides any of them.
COMPARE_RECIPES: dict[str, dict[str, Any]] = {
    "adamw": dict(_ADAMW_RECIPE),
    "amsgrad": dict(_ADAMW_RECIPE),
    "adam": {"lr": 3e-3, "betas": (0.9, 0.95)},
    # 8-bit / 4-bit state: AdamW's hyperparameters (Dettmers et al. 2022 keep the 32-bit optimizer's recipe)
    "adamw8bit": dict(_ADAMW_RECIPE),
    "adam8bit": {"lr": 3e-3, "betas": (0.9, 0.95)},
    "adamw4bit": dict(_ADAMW_RECIPE),
    # Lion: lr 3-10x smaller and weight decay 3-10x larger than AdamW's, betas (0.95, 0.98) for language
    # models (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", section 5)
    "lion": {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 1.0},
    "lion8bit": {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 1.0},
    # Adafactor with an explicit learning rate (no relative step, no parameter scaling), so it follows the
    # same warmup + cosine schedule as the others (Shazeer & Stern 2018 section 8; HF's fine-tuning advice)
    "adafactor": {"lr": 3e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False},
    # CAME: its confidence-scaled update takes larger steps than AdamW's at the same lr; on this workload lr 3e-4
    # matched AdamW at 3e-3 after 40 steps while 1e-3 and 3e-3 trailed (small model, 4 x 128 tokens)
    "came": {"lr": 3e-4, "weight_decay": 0.1},
    # Adam-mini reuses AdamW's hyperparameters (Zhang et al. 2024)
    "adam_mini": dict(_ADAMW_RECIPE),
    # Muon with Moonlight's RMS matching (update scaled to AdamW's RMS) reuses AdamW's lr and weight decay
    # (Liu et al. 2025, "Muon is Scalable for LLM Training"); its non-matrix parameters use AdamW
    "muon": {"lr": 3e-3, "weight_decay": 0.1},
    # Schedule-Free AdamW wants a larger lr than a scheduled AdamW (schedulefree README: 1x-10x)
    "schedule_free_adamw": {"lr": 6e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
}

#: steps whose loss is averaged into the "final train loss"
FINAL_LOSS_WINDOW = 10
#: a run is declared diverged after this many skipped (non-finite) steps in a row
MAX_CONSECUTIVE_SKIPS = 20
SCHEMA_VERSION = 1


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
        return max(1, round(0.1 * self.steps)) if self.steps > 1 else 0

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
    recipe = COMPARE_RECIPES.get(spec.name, {})
    hyper = {k: v for k, v in recipe.items() if k in accepted}
    ignored = sorted(k for k in recipe if k not in accepted)
    if is_schedule_free(spec.cls) and "warmup_steps" in accepted:
        hyper["warmup_steps"] = warmup_steps
    if "nonfinite" in accepted:
        hyper["nonfinite"] = "skip"
    hyper.update({k: _to_argument(v) for k, v in overrides.items()})
    return spec, hyper, ignored


# ------------------------------------------------------------------------------------------------------------
# schedule, measurement
# ------------------------------------------------------------------------------------------------------------
def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at ``step`` (0-based): linear warmup to 1 over ``warmup_steps`` (the first step already
    gets ``1 / warmup_steps``), then a cosine decay reaching ``min_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested containers and inner tensors of tensor subclasses
    included, each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            flatten = getattr(type(obj), "__tensor_flatten__", None)
            if flatten is not None and type(obj) is not torch.Tensor and type(obj).__name__ != "DTensor":
                names, _ctx = obj.__tensor_flatten__()
                for inner in names:
                    visit(getattr(obj, inner))
                return
            if type(obj).__name__ == "DTensor":
                obj = obj.to_local()
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen or storage.data_ptr() == 0:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    for state in optimizer.state.values():
        visit(state)
    return total


def _read_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory of one run.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only).
    * CPU on Linux: the process's resident-set high-water mark (``VmHWM``), reset before each run by writing
      ``5`` to ``/proc/self/clear_refs``, after ``gc.collect()`` and glibc's ``malloc_trim(0)`` returned freed
      memory to the system. The figure is the peak minus the resident size just before the run's model copy
      and optimizer were made: the run's own parameters, gradients, optimizer state, activations and
      temporaries (plus allocator slack).
    * CPU elsewhere: ``getrusage`` maximum RSS, which cannot be reset: a lifetime maximum, comparable only
      for the first run (said so in :attr:`method`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self._libc = None
        if device.type == "cuda":
            self.method = "CUDA: torch.cuda.max_memory_allocated during the run (tensors only)"
            self.label = "peak CUDA memory allocated"
            self.kind = "cuda"
        elif self._can_reset_rss():
            self.method = (
                "CPU: peak resident set size (VmHWM, reset per run through /proc/self/clear_refs after "
                "gc + malloc_trim) minus the resident size before the run's model copy and optimizer"
            )
            self.label = "peak RSS growth of the run (VmHWM reset per run)"
            self.kind = "rss"
            name = ctypes.util.find_library("c")
            try:
                self._libc = ctypes.CDLL(name) if name else None
                if self._libc is not None and not hasattr(self._libc, "malloc_trim"):
                    self._libc = None
            except OSError:
                self._libc = None
        else:
            self.method = "CPU: lifetime maximum RSS from getrusage (cannot be reset; only the first run is exact)"
            self.label = "lifetime peak RSS (getrusage)"
            self.kind = "rusage"

    @staticmethod
    def _can_reset_rss() -> bool:
        if _read_status_kb("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.kind == "rss":
            if self._libc is not None:
                self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.baseline = _read_status_kb("VmRSS") or 0
        else:
            self.baseline = 0

    def peak(self) -> tuple[int, int]:
        """``(peak during the run minus the baseline, absolute peak)`` in bytes."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "rss":
            peak = _read_status_kb("VmHWM") or 0
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return max(0, peak - self.baseline), peak


# ------------------------------------------------------------------------------------------------------------
# the training step and the loop
# ------------------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """One training step: the loss before the update, the gradient norm, whether the update was skipped."""

    loss: float
    grad_norm: float
    skipped: bool


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, *, max_grad_norm: float
) -> StepResult:
    """Forward, backward, clip, step (the one place the loop touches the optimizer).

    The gradient norm from clipping is handed to lmopt optimizers (``record_grad_norm``), whose own check
    then does not read the gradients again and whose ``nonfinite="skip"`` policy skips and counts a
    non-finite step; other optimizers' non-finite steps are skipped here. A non-finite *loss* is returned
    without a backward pass (the caller stops the run as diverged).
    """
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, float("nan"), False)
    loss.backward()
    # lmopt.train's clipping: global norm over the optimizer's parameters, handed to record_grad_norm
    norm_value = float(clip_grad_norm(optimizer, max_grad_norm if max_grad_norm > 0 else None).norm)
    if hasattr(optimizer, "record_grad_norm") and hasattr(optimizer, "skipped_steps"):
        before = optimizer.skipped_steps
        optimizer.step()
        skipped = optimizer.skipped_steps > before
    elif math.isfinite(norm_value):
        optimizer.step()
        skipped = False
    else:
        skipped = True
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, skipped)


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss over the validation windows (each window weighs the same)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size].to(device)
        total += float(model(input_ids=chunk, labels=chunk).loss) * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return total / max(1, count)


class CompareCallbacks(Protocol):
    """Progress hooks (the CLI draws its progress bars with them)."""

    def on_run_start(self, name: str, steps: int) -> None: ...

    def on_step(self, name: str, step: int, loss: float, tokens_per_second: float) -> None: ...

    def on_run_end(self, name: str, result: dict[str, Any]) -> None: ...


class _Silent:
    def on_run_start(self, name: str, steps: int) -> None:
        pass

    def on_step(self, name: str, step: int, loss: float, tokens_per_second: float) -> None:
        pass

    def on_run_end(self, name: str, result: dict[str, Any]) -> None:
        pass


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


def _run_one(
    name: str,
    template: nn.Module,
    config: CompareConfig,
    device: torch.device,
    offsets: torch.Tensor,
    corpus: Corpus,
    val_windows: torch.Tensor,
    meter: MemoryMeter,
    callbacks: CompareCallbacks,
) -> dict[str, Any]:
    warmup = config.resolved_warmup_steps
    spec, hyper, ignored = optimizer_hyperparameters(name, config.hyperparameters.get(name, {}), warmup_steps=warmup)
    schedule_free = is_schedule_free(spec.cls)
    result: dict[str, Any] = {
        "name": name,
        "optimizer": spec.name,
        "class": f"{spec.cls.__module__}.{spec.cls.__qualname__}",
        "hyperparameters": _jsonable(hyper),
        "ignored_recipe_keys": ignored,
        "schedule": None,
        "status": "ok",
        "message": None,
        "steps_completed": 0,
        "final_train_loss": None,
        "validation_loss": None,
        "tokens_per_second": None,
        "train_time_s": 0.0,
        "optimizer_state_bytes": None,
        "peak_memory_bytes": None,
        "peak_memory_absolute_bytes": None,
        "skipped_steps": 0,
        "history": {"step": [], "loss": [], "time_s": [], "lr": [], "grad_norm": []},
        "validation_history": {"step": [], "loss": []},
    }
    callbacks.on_run_start(name, config.steps)
    tokens_per_step = config.batch_size * config.seq_len
    history = result["history"]
    model = optimizer = None
    try:
        meter.start()
        torch.manual_seed(config.seed)
        model = copy.deepcopy(template).to(device)
        model.train()
        optimizer = create_optimizer(name, model, **hyper)
        lrs_ok = all(
            isinstance(g.get("lr"), (int, float)) and not isinstance(g.get("lr"), bool) and g["lr"] > 0
            for g in optimizer.param_groups
        )
        scheduler = None
        if schedule_free:
            result["schedule"] = f"none (Schedule-Free; its own warmup of {warmup} steps where it takes one)"
            optimizer.train()
        elif not lrs_ok:
            result["schedule"] = "none (the optimizer sets its own step size)"
        else:
            result["schedule"] = (
                f"linear warmup {warmup} steps, cosine to {config.min_lr_ratio:g} x peak at step {config.steps}"
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: warmup_cosine(
                    s, total_steps=config.steps, warmup_steps=warmup, min_ratio=config.min_lr_ratio
                ),
            )
        elapsed = 0.0
        consecutive_skips = 0
        for step in range(config.steps):
            batch = gather_windows(corpus.train, offsets[step], config.seq_len)
            lr = optimizer.param_groups[0].get("lr")
            started = time.perf_counter()
            outcome = train_step(model, optimizer, batch.to(device), max_grad_norm=config.max_grad_norm)
            if scheduler is not None:
                scheduler.step()
            elapsed += time.perf_counter() - started
            if not math.isfinite(outcome.loss):
                result["status"] = "diverged"
                result["message"] = f"training loss became {outcome.loss} at step {step + 1}"
                break
            history["step"].append(step + 1)
            history["loss"].append(outcome.loss)
            history["time_s"].append(elapsed)
            history["lr"].append(float(lr) if isinstance(lr, (int, float)) else None)
            history["grad_norm"].append(outcome.grad_norm)
            result["steps_completed"] = step + 1
            consecutive_skips = consecutive_skips + 1 if outcome.skipped else 0
            result["skipped_steps"] += int(outcome.skipped)
            callbacks.on_step(name, step + 1, outcome.loss, tokens_per_step * (step + 1) / max(elapsed, 1e-9))
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                result["status"] = "diverged"
                result["message"] = (
                    f"{MAX_CONSECUTIVE_SKIPS} steps in a row had non-finite gradients (last at step {step + 1})"
                )
                break
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                val = _evaluate_run(model, optimizer, schedule_free, val_windows, config.batch_size, device)
                result["validation_history"]["step"].append(step + 1)
                result["validation_history"]["loss"].append(val)
        result["train_time_s"] = elapsed
        done = result["steps_completed"]
        if done:
            result["tokens_per_second"] = tokens_per_step * done / max(elapsed, 1e-9)
            tail = history["loss"][-FINAL_LOSS_WINDOW:]
            result["final_train_loss"] = sum(tail) / len(tail)
        if result["status"] == "ok":
            val = _evaluate_run(model, optimizer, schedule_free, val_windows, config.batch_size, device)
            result["validation_history"]["step"].append(done)
            result["validation_history"]["loss"].append(val)
            if math.isfinite(val):
                result["validation_loss"] = val
            else:
                result["status"] = "diverged"
                result["message"] = f"validation loss is {val} after training"
        result["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    except Exception as err:  # one optimizer failing must not stop the comparison
        result["status"] = "error"
        result["message"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
        if optimizer is not None:
            result["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    finally:
        if optimizer is not None and hasattr(optimizer, "skipped_steps"):
            result["skipped_steps"] = max(result["skipped_steps"], int(optimizer.skipped_steps))
        result["peak_memory_bytes"], result["peak_memory_absolute_bytes"] = meter.peak()
        del model, optimizer
    result = _jsonable(result)
    callbacks.on_run_end(name, result)
    return result


def _evaluate_run(
    model: nn.Module,
    optimizer: Any,
    schedule_free: bool,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> float:
    if schedule_free:  # evaluate at the averaged point x, then go back to training at y
        optimizer.eval()
    try:
        return evaluate(model, windows, batch_size, device)
    finally:
        if schedule_free:
            optimizer.train()


def _warm_up(template: nn.Module, device: torch.device, corpus: Corpus, offsets: torch.Tensor, seq_len: int) -> None:
    """One throwaway forward + backward + evaluation, so that one-time costs (thread pools, kernel selection,
    lazily allocated buffers) are not charged to the first optimizer's time and memory."""
    model = copy.deepcopy(template).to(device)
    batch = gather_windows(corpus.train, offsets, seq_len).to(device)
    model(input_ids=batch, labels=batch).loss.backward()
    clip_grad_norm(list(model.parameters()), 1.0)
    evaluate(model, batch, batch.shape[0], device)
    del model, batch
    gc.collect()


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and library versions, for the results."""
    from .._version import __version__

    env: dict[str, Any] = {
        "lmopt": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["load_average"] = list(os.getloadavg())
    except (OSError, AttributeError):  # pragma: no cover - not on every platform
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_compare(config: CompareConfig, callbacks: CompareCallbacks | None = None) -> dict[str, Any]:
    """Run the comparison described by ``config`` and return the results (a JSON-ready dict).

    The returned dict holds ``config`` (with the optimizer list resolved, so ``CompareConfig.from_dict``
    re-runs the same comparison), ``environment``, ``data``, ``model``, ``schedule``, ``memory_method``,
    ``skipped_optimizers`` and one entry per optimizer under ``runs``.
    """
    config.validate()
    if config.threads is None:
        return _run_compare(config, callbacks or _Silent())
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run_compare(config, callbacks or _Silent())
    finally:
        torch.set_num_threads(previous)


def _run_compare(config: CompareConfig, callbacks: CompareCallbacks) -> dict[str, Any]:
    started = time.perf_counter()
    device = resolve_device(config.device)
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

    corpus = load_corpus(config.data, config.tokenizer)
    offsets = train_batch_offsets(
        corpus.train,
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
    )
    val_windows = validation_windows(corpus.validation, seq_len=config.seq_len, max_windows=config.eval_windows)
    template = build_model(config.model, vocab_size=corpus.vocab_size, seq_len=config.seq_len, seed=config.seed)
    meter = MemoryMeter(device)
    _warm_up(template, device, corpus, offsets[0], config.seq_len)
    runs = [
        _run_one(name, template, resolved, device, offsets, corpus, val_windows, meter, callbacks) for name in names
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "lmopt compare",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": resolved.to_dict(),
        "environment": environment(device),
        "data": corpus.describe() | {"validation_windows": int(val_windows.shape[0])},
        "model": {
            "architecture": "LlamaForCausalLM (RMSNorm, rotary embeddings, SwiGLU), random init, fp32",
            "name": config.model,
            "size": MODEL_SIZES[config.model].to_dict(),
            "vocab_size": corpus.vocab_size,
            "parameters": count_parameters(template),
        },
        "schedule": {
            "kind": "linear warmup then cosine decay (none for Schedule-Free)",
            "warmup_steps": resolved.resolved_warmup_steps,
            "min_lr_ratio": config.min_lr_ratio,
            "max_grad_norm": config.max_grad_norm,
        },
        "final_train_loss_window": FINAL_LOSS_WINDOW,
        "memory_method": meter.method,
        "memory_label": meter.label,
        "skipped_optimizers": skipped,
        "runs": runs,
        "total_time_s": time.perf_counter() - started,
    }
