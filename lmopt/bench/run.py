"""The ``lmopt compare`` run loop: train each optimizer on the same data, measure, evaluate, collect results.

The configuration and its resolution (optimizer names, recipes, hyperparameters, the LR schedule) are in
:mod:`lmopt.bench.compare`, which also re-exports everything public here; this module runs a resolved
comparison. The update itself is lmopt.train's (:func:`lmopt.train.optimizer_step`, the one :func:`lmopt.train.fit`
runs), the optimizer-state bytes :func:`lmopt.memory.measure.optimizer_state_bytes` and the LR scheduler
:func:`lmopt.schedules.scheduler`.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from ..memory.measure import optimizer_state_bytes
from ..registry import create_optimizer
from ..schedules import scheduler as lr_scheduler
from ..train.clip import clip_grad_norm
from ..train.step import optimizer_step
from .compare import (
    CompareConfig,
    _jsonable,
    is_schedule_free,
    lr_source,
    optimizer_hyperparameters,
    resolve_config,
    resolve_device,
)
from .corpus import Corpus, gather_windows, load_corpus, train_batch_offsets, validation_windows
from .metrics import aggregate_seeds, steps_to_target
from .workload import MODEL_SIZES, build_model, count_parameters

__all__ = [
    "CompareCallbacks",
    "FINAL_LOSS_WINDOW",
    "MAX_CONSECUTIVE_SKIPS",
    "SCHEMA_VERSION",
    "MemoryMeter",
    "StepResult",
    "TrainingRun",
    "build_template",
    "environment",
    "evaluate",
    "optimizer_state_bytes",
    "run_compare",
    "train_step",
]

#: steps whose loss is averaged into the "final train loss"
FINAL_LOSS_WINDOW = 10
#: a run is declared diverged after this many skipped (non-finite) steps in a row
MAX_CONSECUTIVE_SKIPS = 20
SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------
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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    *,
    max_grad_norm: float,
    scheduler: Any = None,
) -> StepResult:
    """Forward, backward, then lmopt.train's update (the one place the loop touches the optimizer).

    The update is :func:`lmopt.train.optimizer_step`, the one :func:`lmopt.train.fit` runs: clipping with
    :func:`lmopt.train.clip_grad_norm` (``max_grad_norm`` 0: measure only), whose norm is handed to lmopt
    optimizers (``record_grad_norm``), so their own check does not read the gradients again and their
    ``nonfinite="skip"`` policy skips and counts a non-finite step; other optimizers' non-finite steps are
    skipped by the loop. Then the gradients are zeroed and ``scheduler`` (if any) is stepped. A non-finite
    *loss* is returned without a backward pass (the caller stops the run as diverged).
    """
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, float("nan"), False)
    loss.backward()
    # an optimizer with its own non-finite policy (lmopt's, told the norm) decides; for others the loop skips
    own_policy = hasattr(optimizer, "record_grad_norm") and hasattr(optimizer, "skipped_steps")
    outcome = optimizer_step(
        optimizer,
        clip=max_grad_norm if max_grad_norm > 0 else None,
        loss=loss_value,
        scheduler=scheduler,
        on_nonfinite="raise" if own_policy else "skip",
    )
    return StepResult(loss_value, float(outcome.clip.norm), outcome.skipped)


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


class TrainingRun:
    """One optimizer's training run on the compare workload, advanced in pieces (:meth:`advance`) and closed once
    (:meth:`finish`): ``lmopt compare`` runs it to the end in one go; ``lmopt tune``'s successive halving stops
    it at a rung and resumes it later, bit-identical to an uninterrupted run (the model, the optimizer, the
    scheduler and the step counter stay in memory; nothing is re-seeded between pieces).

    A run that raises, diverges or skips :data:`MAX_CONSECUTIVE_SKIPS` steps in a row stops; its ``result``
    says why (``status`` ``"error"`` / ``"diverged"``) and :meth:`advance` does nothing more.
    """

    def __init__(
        self,
        name: str,
        template: nn.Module,
        config: CompareConfig,
        device: torch.device,
        offsets: torch.Tensor,
        corpus: Corpus,
        val_windows: torch.Tensor,
        meter: MemoryMeter | None,
        callbacks: CompareCallbacks,
        *,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.config, self.device = name, config, device
        self.offsets, self.corpus, self.val_windows = offsets, corpus, val_windows
        self.meter, self.callbacks = meter, callbacks
        warmup = config.resolved_warmup_steps
        spec, hyper, ignored = optimizer_hyperparameters(
            name, config.hyperparameters.get(name, {}), warmup_steps=warmup
        )
        self.schedule_free = is_schedule_free(spec.cls)
        self.result: dict[str, Any] = {
            "name": name,
            "optimizer": spec.name,
            "class": f"{spec.cls.__module__}.{spec.cls.__qualname__}",
            "hyperparameters": _jsonable(hyper),
            "lr_source": lr_source(config, name),
            "seed": config.seed,
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
        self.model: nn.Module | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.elapsed = 0.0
        self.consecutive_skips = 0
        callbacks.on_run_start(name, config.steps)
        try:
            if meter is not None:
                meter.start()
            torch.manual_seed(config.seed)
            self.model = copy.deepcopy(template).to(device)
            self.model.train()
            self.optimizer = create_optimizer(name, self.model, **hyper, **(extras or {}))
            base_lr = self.optimizer.defaults.get("lr") if isinstance(self.optimizer.defaults, dict) else None
            if isinstance(base_lr, (int, float)) and not isinstance(base_lr, bool):
                self.result["hyperparameters"].setdefault("lr", float(base_lr))  # the constructor's default
            lrs_ok = all(
                isinstance(g.get("lr"), (int, float)) and not isinstance(g.get("lr"), bool) and g["lr"] > 0
                for g in self.optimizer.param_groups
            )
            if self.schedule_free:
                self.result["schedule"] = f"none (Schedule-Free; its own warmup of {warmup} steps where it takes one)"
                self.optimizer.train()
            elif not lrs_ok:
                self.result["schedule"] = "none (the optimizer sets its own step size)"
            else:
                self.result["schedule"] = config.schedule_description()
                self.scheduler = lr_scheduler(self.optimizer, config.lr_schedule())
        except Exception as err:  # one optimizer failing must not stop the comparison
            self._fail(err)

    @property
    def active(self) -> bool:
        """Still training (neither stopped by a failure or divergence nor finished)."""
        return self.result["status"] == "ok" and self.result["steps_completed"] < self.config.steps

    def _fail(self, err: Exception) -> None:
        self.result["status"] = "error"
        self.result["message"] = f"{type(err).__name__}: {err}"
        self.result["traceback"] = traceback.format_exc()

    def advance(self, until_step: int) -> None:
        """Train up to step ``until_step`` (1-based, at most ``config.steps``); stops early on failure."""
        config, result, history = self.config, self.result, self.result["history"]
        tokens_per_step = config.batch_size * config.seq_len
        try:
            for step in range(result["steps_completed"], min(until_step, config.steps)):
                if result["status"] != "ok":
                    break
                batch = gather_windows(self.corpus.train, self.offsets[step], config.seq_len)
                lr = self.optimizer.param_groups[0].get("lr")
                started = time.perf_counter()
                outcome = train_step(
                    self.model,
                    self.optimizer,
                    batch.to(self.device),
                    max_grad_norm=config.max_grad_norm,
                    scheduler=self.scheduler,
                )
                self.elapsed += time.perf_counter() - started
                result["train_time_s"] = self.elapsed
                if not math.isfinite(outcome.loss):
                    result["status"] = "diverged"
                    result["message"] = f"training loss became {outcome.loss} at step {step + 1}"
                    break
                history["step"].append(step + 1)
                history["loss"].append(outcome.loss)
                history["time_s"].append(self.elapsed)
                history["lr"].append(float(lr) if isinstance(lr, (int, float)) else None)
                history["grad_norm"].append(outcome.grad_norm)
                result["steps_completed"] = step + 1
                self.consecutive_skips = self.consecutive_skips + 1 if outcome.skipped else 0
                result["skipped_steps"] += int(outcome.skipped)
                self.callbacks.on_step(
                    self.name, step + 1, outcome.loss, tokens_per_step * (step + 1) / max(self.elapsed, 1e-9)
                )
                if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    result["status"] = "diverged"
                    result["message"] = (
                        f"{MAX_CONSECUTIVE_SKIPS} steps in a row had non-finite gradients (last at step {step + 1})"
                    )
                    break
                if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                    val = self.evaluate()
                    result["validation_history"]["step"].append(step + 1)
                    result["validation_history"]["loss"].append(val)
        except Exception as err:  # one optimizer failing must not stop the comparison
            self._fail(err)

    def recent_train_loss(self) -> float:
        """Mean training loss of the last :data:`FINAL_LOSS_WINDOW` steps (inf when stopped or none yet)."""
        tail = self.result["history"]["loss"][-FINAL_LOSS_WINDOW:]
        if self.result["status"] != "ok" or not tail:
            return math.inf
        return sum(tail) / len(tail)

    def cooldown_loss(self, decay_steps: int) -> float:
        """Validation loss of a *branch* that decays the learning rate linearly from its current value to 0 over
        the next ``decay_steps`` training batches, then evaluates; the run itself is left untouched.

        This is the cooldown of a WSD schedule (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
        Beyond Fixed Training Durations": a short linear cooldown from any point of the run matches the loss of
        a run scheduled to end there), so it scores a learning rate by what it reaches if training stopped
        now, not by where its still-high learning rate holds it. The branch trains a deep copy of the model and
        optimizer (the run's scheduler is not stepped) and restores torch's RNG state, so the run continues
        bit-identical to one that never branched. Schedule-Free evaluates a copy at its averaged point instead
        (its ``x`` already is the annealed iterate). Returns inf when the run has stopped, or the branch
        diverges.
        """
        done = self.result["steps_completed"]
        if self.result["status"] != "ok" or not done:
            return math.inf
        decay_steps = max(0, min(int(decay_steps), self.config.steps - done))
        if not decay_steps and not self.schedule_free:
            return self.evaluate()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        try:
            model, optimizer = copy.deepcopy((self.model, self.optimizer))
        except Exception as err:  # an optimizer that cannot be copied cannot be scored this way: say so
            self._fail(err)
            self.result["message"] = f"cannot branch a cooldown (deepcopy failed): {self.result['message']}"
            return math.inf
        try:
            if self.schedule_free:  # on the copy: swapping to x and back to y is not bit-exact in floating point
                val = _evaluate_run(model, optimizer, True, self.val_windows, self.config.batch_size, self.device)
                return val if math.isfinite(val) else math.inf
            peaks = [g["lr"] for g in optimizer.param_groups]
            for k in range(decay_steps):
                for group, peak in zip(optimizer.param_groups, peaks):
                    group["lr"] = peak * (1.0 - k / decay_steps)
                batch = gather_windows(self.corpus.train, self.offsets[done + k], self.config.seq_len)
                outcome = train_step(model, optimizer, batch.to(self.device), max_grad_norm=self.config.max_grad_norm)
                if not math.isfinite(outcome.loss):
                    return math.inf
            val = evaluate(model, self.val_windows, self.config.batch_size, self.device)
            return val if math.isfinite(val) else math.inf
        except Exception:  # the branch diverged (a non-finite step raised): the score says so, the run goes on
            return math.inf
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def evaluate(self) -> float:
        """Validation loss now (Schedule-Free at its averaged point)."""
        return _evaluate_run(
            self.model, self.optimizer, self.schedule_free, self.val_windows, self.config.batch_size, self.device
        )

    def finish(self) -> dict[str, Any]:
        """Final measurements (validation loss when the run is ok, state bytes, peak memory); the JSON-ready
        result. The model and optimizer are released."""
        result = self.result
        try:
            done = result["steps_completed"]
            if done:
                result["tokens_per_second"] = (
                    self.config.batch_size * self.config.seq_len * done / max(self.elapsed, 1e-9)
                )
                if result["status"] != "error":
                    tail = result["history"]["loss"][-FINAL_LOSS_WINDOW:]
                    result["final_train_loss"] = sum(tail) / len(tail)
            if result["status"] == "ok":
                val = self.evaluate()
                result["validation_history"]["step"].append(done)
                result["validation_history"]["loss"].append(val)
                if math.isfinite(val):
                    result["validation_loss"] = val
                else:
                    result["status"] = "diverged"
                    result["message"] = f"validation loss is {val} after training"
        except Exception as err:
            self._fail(err)
        finally:
            if self.optimizer is not None:
                result["optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)
                if hasattr(self.optimizer, "skipped_steps"):
                    result["skipped_steps"] = max(result["skipped_steps"], int(self.optimizer.skipped_steps))
            if self.meter is not None:
                result["peak_memory_bytes"], result["peak_memory_absolute_bytes"] = self.meter.peak()
            self.model = self.optimizer = self.scheduler = None
        self.result = _jsonable(result)
        self.callbacks.on_run_end(self.name, self.result)
        return self.result


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


def build_template(config: CompareConfig, vocab_size: int) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The initial model of ``config`` (its size at ``config.width``, seeded by ``config.seed``), the keyword
    arguments every optimizer gets on top of its hyperparameters (muP's per-parameter LR multipliers), and a
    description of the parametrization (None for the standard one)."""
    template = build_model(config.model_size(), vocab_size=vocab_size, seq_len=config.seq_len, seed=config.seed)
    if config.parametrization != "mup":
        return template, {}, None
    from ..mup import mup

    base_width = config.base_width or MODEL_SIZES[config.model].hidden
    plan = mup(template, base_width=base_width)
    by_role = {role: plan.lr_multipliers[name] for name, role in plan.roles.items() if name in plan.lr_multipliers}
    described = {"parametrization": "mup", "base_width": base_width, "width": plan.width, "lr_multipliers": by_role}
    return template, {"lr_multipliers": dict(plan.lr_multipliers)}, described


def _run_compare(config: CompareConfig, callbacks: CompareCallbacks) -> dict[str, Any]:
    started = time.perf_counter()
    device = resolve_device(config.device)
    resolved, skipped = resolve_config(config)
    names = resolved.optimizers or []

    corpus = load_corpus(config.data, config.tokenizer)
    val_windows = validation_windows(corpus.validation, seq_len=config.seq_len, max_windows=config.eval_windows)
    meter = MemoryMeter(device)
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for seed in range(config.seed, config.seed + config.seeds):
        seeded = replace(resolved, seed=seed)
        offsets = train_batch_offsets(
            corpus.train, steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, seed=seed
        )
        template, extras, parametrization = build_template(seeded, corpus.vocab_size)
        if seed == config.seed:
            _warm_up(template, device, corpus, offsets[0], config.seq_len)
            first_template = template
        for name in names:
            run = TrainingRun(
                name, template, seeded, device, offsets, corpus, val_windows, meter, callbacks, extras=extras
            )
            run.advance(config.steps)
            per_seed[name].append(run.finish())
    runs = [aggregate_seeds(per_seed[name]) for name in names]
    target = steps_to_target(
        runs, resolved.baseline, window=FINAL_LOSS_WINDOW, tokens_per_step=config.batch_size * config.seq_len
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "lmopt compare",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": resolved.to_dict(),
        "environment": environment(device),
        "data": corpus.describe() | {"validation_windows": int(val_windows.shape[0])},
        "model": {
            "architecture": "LlamaForCausalLM (RMSNorm, rotary embeddings, SwiGLU), random init, fp32",
            "name": config.model if config.width is None else f"{config.model} at width {config.width}",
            "size": config.model_size().to_dict(),
            "vocab_size": corpus.vocab_size,
            "parameters": count_parameters(first_template),
            "parametrization": parametrization or {"parametrization": "sp"},
        },
        "schedule": {
            "kind": f"{config.schedule_description()} (none for Schedule-Free)",
            "shape": config.schedule,
            "warmup_steps": resolved.resolved_warmup_steps,
            "min_lr_ratio": config.min_lr_ratio,
            "max_grad_norm": config.max_grad_norm,
        },
        "final_train_loss_window": FINAL_LOSS_WINDOW,
        "seeds": list(range(config.seed, config.seed + config.seeds)),
        "target": target,
        "memory_method": meter.method,
        "memory_label": meter.label,
        "skipped_optimizers": skipped,
        "runs": runs,
        "total_time_s": time.perf_counter() - started,
    }
