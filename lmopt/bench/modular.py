"""``lmopt compare --workload modular``: grokking on modular addition (Power et al. 2022).

A tiny transformer learns ``(a + b) mod p`` from a fraction of all ``p x p`` pairs, full batch. It fits the
training pairs early; with weight decay it *groks* -- validation accuracy jumps to ~100% long after training
accuracy did -- and without weight decay it does not, or much later. This is the experiment of Power et al.
2022, "Grokking: Generalization beyond overfitting on small algorithmic datasets", in the setting of Nanda et
al. 2023, "Progress measures for grokking via mechanistic interpretability" (a one-layer transformer, full
batch, AdamW with weight decay 1.0 on every parameter, lr 1e-3, betas (0.9, 0.98)), shrunk to run on a CPU
(:class:`ModularConfig` defaults): p = 59 instead of 113, width 64 instead of 128, half of the pairs for
training instead of 30%, lr 3e-3 instead of 1e-3 -- it groks within a thousand steps, ~2 minutes a run on one
CPU thread (measured figures in docs/compare.md).

* **Data** (:func:`modular_dataset`): every pair ``(a, b)``, ``0 <= a, b < p``, as the tokens ``a b =`` (``=``
  is token ``p``) with the label ``(a + b) mod p``; a random permutation drawn from the seed puts the first
  ``round(train_fraction * p * p)`` pairs in the training set and the others in the validation set.
* **Model** (:class:`ModularTransformer`): token and position embeddings, pre-norm blocks (multi-head
  self-attention over the three positions, a ReLU MLP of 4x the width), a final LayerNorm and a linear readout
  to the ``p`` answers at the last position (``=``); fp32, initial weights from the seed.
* **Training**: every run starts from the same initial weights; each step is one full-batch forward and
  backward and :func:`lmopt.train.optimizer_step` (no clipping), after a linear LR warmup of
  ``warmup_steps``. The optimizer is built with ``lmopt.create_optimizer(name, model, lr=..., weight_decay=...,
  no_decay=False)``: weight decay on every parameter, embeddings and norms too, as in the papers.
* **Runs**: each optimizer crossed with each weight decay, named ``"adamw (wd 1)"``.
* **Measured** every ``eval_every`` steps: training loss and accuracy (from the step's own forward pass,
  before its update) and validation loss and accuracy; the first step at which each accuracy reached
  :data:`ACCURACY_THRESHOLD`; wall time.

Example:
    >>> from lmopt.bench.modular import ModularConfig, run_modular
    >>> results = run_modular(ModularConfig(steps=200))
    >>> [(r["name"], r["final_validation_accuracy"]) for r in results["runs"]]
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import create_optimizer, resolve_name
from ..schedules import LinearWarmup
from ..schedules import scheduler as lr_scheduler
from ..train.step import optimizer_step
from .compare import _accepted_arguments, _jsonable, is_schedule_free, resolve_device, resolve_optimizer_names
from .workload import count_parameters

__all__ = [
    "ACCURACY_THRESHOLD",
    "ModularCallbacks",
    "ModularConfig",
    "ModularDataset",
    "ModularTransformer",
    "build_modular_model",
    "modular_dataset",
    "resolve_modular_config",
    "run_modular",
    "run_name",
]

#: the accuracy at which a run counts as having fitted (train) or generalised (validation)
ACCURACY_THRESHOLD = 0.99
SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ModularConfig:
    """Everything that defines a grokking comparison; saved in the results.

    Attributes:
        optimizers: registry names or aliases; every one runs once per weight decay.
        weight_decays: the weight decays to run (decoupled for AdamW; on every parameter).
        modulus: ``p``; the dataset has ``p * p`` pairs.
        train_fraction: the fraction of pairs in the training set (the rest is the validation set).
        steps: full-batch optimizer steps per run.
        lr: peak learning rate (after ``warmup_steps`` of linear warmup, then constant).
        betas: ``(beta1, beta2)`` for optimizers that take ``betas``; ``None`` keeps their defaults.
        warmup_steps: linear warmup length.
        width, layers, heads: the transformer's model width, pre-norm blocks and attention heads.
        eval_every: record losses and accuracies every this many steps (and at the last step).
        seed: the split, the initial weights and each run's RNG.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        hyperparameters: per-optimizer overrides, ``{"lion": {"lr": 1e-4}}``, applied over ``lr`` and ``betas``.
        threads: CPU threads for torch during the runs (restored afterwards); ``None`` leaves torch's setting.
    """

    optimizers: list[str] = field(default_factory=lambda: ["adamw"])
    weight_decays: list[float] = field(default_factory=lambda: [1.0, 0.0])
    modulus: int = 59
    train_fraction: float = 0.5
    steps: int = 2500
    lr: float = 3e-3
    betas: tuple[float, float] | None = (0.9, 0.98)
    warmup_steps: int = 10
    width: int = 64
    layers: int = 1
    heads: int = 4
    eval_every: int = 20
    seed: int = 0
    device: str = "auto"
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("steps", "width", "layers", "heads", "eval_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("modulus", self.modulus, 2)
        _check_int("seed", self.seed, 0)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if not _is_number(self.train_fraction) or not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction!r}")
        train = round(self.train_fraction * self.modulus**2)
        if not 0 < train < self.modulus**2:
            raise ValueError(
                f"train_fraction {self.train_fraction} of {self.modulus**2} pairs leaves an empty training or "
                "validation set"
            )
        if not _is_number(self.lr) or not self.lr > 0:
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if self.betas is not None and (
            len(self.betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.optimizers, list) or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty list of names, got {self.optimizers!r}")
        if not isinstance(self.weight_decays, list) or not self.weight_decays:
            raise ValueError(f"weight_decays must be a non-empty list of numbers, got {self.weight_decays!r}")
        for wd in self.weight_decays:
            if not _is_number(wd) or not math.isfinite(wd) or wd < 0:
                raise ValueError(f"weight decays must be finite numbers >= 0, got {wd!r}")
        if len(set(self.weight_decays)) != len(self.weight_decays):
            raise ValueError(f"weight decays given more than once: {self.weight_decays}")
        if not isinstance(self.hyperparameters, dict) or not all(
            isinstance(v, dict) for v in self.hyperparameters.values()
        ):
            raise ValueError("hyperparameters must map optimizer names to {hyperparameter: value} dicts")
        resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModularConfig:
        """Build from a dict (the ``config`` of a results JSON); unknown keys raise ValueError."""
        if "config" in data and isinstance(data["config"], Mapping):
            data = data["config"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown modular config keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        config = cls(**values)
        config.validate()
        return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def run_name(optimizer: str, weight_decay: float) -> str:
    """``"adamw (wd 1)"``: a run's name."""
    return f"{optimizer} (wd {weight_decay:g})"


# ------------------------------------------------------------------------------------------------------------
# data and model
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ModularDataset:
    """The pairs as token rows ``[a, b, p]`` with labels ``(a + b) mod p``, split into train and validation."""

    modulus: int
    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    validation_inputs: torch.Tensor
    validation_labels: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.modulus + 1  # the residues and "="


def modular_dataset(modulus: int, train_fraction: float, seed: int) -> ModularDataset:
    """Every pair ``(a, b)`` of residues mod ``modulus``; a seeded permutation puts
    ``round(train_fraction * modulus**2)`` of them in the training set, the rest in the validation set."""
    a = torch.arange(modulus).repeat_interleave(modulus)
    b = torch.arange(modulus).repeat(modulus)
    inputs = torch.stack([a, b, torch.full_like(a, modulus)], dim=1)
    labels = (a + b) % modulus
    order = torch.randperm(modulus * modulus, generator=torch.Generator().manual_seed(seed))
    train, validation = order[: round(train_fraction * modulus * modulus)], order[round(train_fraction * modulus**2) :]
    return ModularDataset(modulus, inputs[train], labels[train], inputs[validation], labels[validation])


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """``last_only``: compute the last position only (its attention still reads every position)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        if last_only:
            q, x = q[:, -1:], x[:, -1:]
        # (batch, heads, positions, head width); every position sees all three tokens
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out(attended.transpose(1, 2).reshape(batch, x.shape[1], width))
        return x + self.mlp(self.mlp_norm(x))


class ModularTransformer(nn.Module):
    """A tiny transformer reading ``a b =`` and giving logits over the ``modulus`` answers at the last token.

    Args:
        modulus: ``p``; the vocabulary is the ``p`` residues and ``=``, the readout the ``p`` residues.
        width: model width; heads: attention heads (``width`` must divide by it); layers: pre-norm blocks.
        seq_len: positions (3 for ``a b =``).
    """

    def __init__(self, modulus: int, *, width: int = 128, layers: int = 1, heads: int = 4, seq_len: int = 3) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(modulus + 1, width)
        self.position_embedding = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, modulus)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (batch, seq_len) -> logits (batch, modulus) at the last position."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        # the readout is at the last position: the last block computes only that one (a third of its work)
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        return self.readout(self.norm(x[:, -1]))


def build_modular_model(config: ModularConfig) -> ModularTransformer:
    """The model of ``config``, fp32, its initial weights depending on ``config.seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ModularTransformer(config.modulus, width=config.width, layers=config.layers, heads=config.heads)


# ------------------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------------------
class ModularCallbacks(Protocol):
    """Progress hooks (the CLI draws its progress bars with them); ``on_step`` comes every ``eval_every``."""

    def on_run_start(self, name: str, steps: int) -> None: ...

    def on_step(self, name: str, step: int, loss: float, train_accuracy: float, validation_accuracy: float) -> None: ...

    def on_run_end(self, name: str, result: dict[str, Any]) -> None: ...


class _Silent:
    def on_run_start(self, name: str, steps: int) -> None:
        pass

    def on_step(self, name: str, step: int, loss: float, train_accuracy: float, validation_accuracy: float) -> None:
        pass

    def on_run_end(self, name: str, result: dict[str, Any]) -> None:
        pass


def _hyperparameters(config: ModularConfig, name: str, weight_decay: float) -> dict[str, Any]:
    spec, _ = resolve_name(name)
    hyper: dict[str, Any] = {"lr": config.lr, "weight_decay": weight_decay}
    if config.betas is not None and "betas" in _accepted_arguments(spec.cls):
        hyper["betas"] = tuple(config.betas)
    overrides = config.hyperparameters.get(name, {})
    hyper.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return hyper


@torch.no_grad()
def _accuracy_and_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    logits = model(inputs)
    return float((logits.argmax(-1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def _first_step_at(steps: list[int], accuracies: list[float], threshold: float) -> int | None:
    return next((s for s, a in zip(steps, accuracies, strict=True) if a >= threshold), None)


def _run_one(
    optimizer_name: str,
    weight_decay: float,
    template: nn.Module,
    data: ModularDataset,
    config: ModularConfig,
    device: torch.device,
    callbacks: ModularCallbacks,
) -> dict[str, Any]:
    name = run_name(optimizer_name, weight_decay)
    hyper = _hyperparameters(config, optimizer_name, weight_decay)
    history: dict[str, list[Any]] = {
        key: [] for key in ("step", "time_s", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy")
    }
    result: dict[str, Any] = {
        "name": name,
        "optimizer": resolve_name(optimizer_name)[0].name,
        "weight_decay": weight_decay,
        "hyperparameters": _jsonable(hyper),
        "status": "ok",
        "message": None,
        "steps_completed": 0,
        "train_time_s": 0.0,
        "final_train_loss": None,
        "final_train_accuracy": None,
        "final_validation_loss": None,
        "final_validation_accuracy": None,
        "step_train_accuracy_reached": None,
        "step_validation_accuracy_reached": None,
        "history": history,
    }
    callbacks.on_run_start(name, config.steps)
    train_x, train_y = data.train_inputs.to(device), data.train_labels.to(device)
    val_x, val_y = data.validation_inputs.to(device), data.validation_labels.to(device)
    try:
        torch.manual_seed(config.seed)
        model = copy.deepcopy(template).to(device)
        model.train()
        optimizer = create_optimizer(optimizer_name, model, **hyper, no_decay=False)
        schedule_free = is_schedule_free(type(optimizer))
        if schedule_free:
            optimizer.train()
        scheduler = lr_scheduler(optimizer, LinearWarmup(config.warmup_steps))
        elapsed = 0.0
        for step in range(1, config.steps + 1):
            started = time.perf_counter()
            logits = model(train_x)
            loss = F.cross_entropy(logits, train_y)
            loss.backward()
            loss_value = float(loss.detach())
            outcome = optimizer_step(optimizer, clip=None, loss=loss_value, scheduler=scheduler)
            elapsed += time.perf_counter() - started
            result["steps_completed"] = step
            if outcome.stopped:
                result["status"] = "diverged"
                result["message"] = f"non-finite loss or gradients at step {step}"
                break
            if step % config.eval_every and step != config.steps:
                continue
            if schedule_free:  # evaluate at the averaged point x
                optimizer.eval()
            val_acc, val_loss = _accuracy_and_loss(model, val_x, val_y)
            if schedule_free:
                optimizer.train()
            train_acc = float((logits.detach().argmax(-1) == train_y).float().mean())
            for key, value in zip(history, (step, elapsed, loss_value, train_acc, val_loss, val_acc), strict=True):
                history[key].append(value)
            callbacks.on_step(name, step, loss_value, train_acc, val_acc)
        result["train_time_s"] = elapsed
    except Exception as err:  # one run failing must not stop the others
        result["status"] = "error"
        result["message"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    if history["step"]:
        for key in ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy"):
            result[f"final_{key}"] = history[key][-1]
        for key in ("train", "validation"):
            result[f"step_{key}_accuracy_reached"] = _first_step_at(
                history["step"], history[f"{key}_accuracy"], ACCURACY_THRESHOLD
            )
    result = _jsonable(result)
    callbacks.on_run_end(name, result)
    return result


def resolve_modular_config(config: ModularConfig) -> ModularConfig:
    """``config`` validated, with its optimizer names resolved; raises ValueError, before any training, on an
    unknown name, hyperparameters for an optimizer that is not run, or one an optimizer does not take."""
    config.validate()
    names, _ = resolve_optimizer_names(config.optimizers)
    for key in config.hyperparameters:
        if key not in names:
            raise ValueError(f"hyperparameters given for {key!r}, which is not among the optimizers {names}")
    for name in names:
        create_optimizer(name, [nn.Parameter(torch.zeros(1))], **_hyperparameters(config, name, 0.0))
    return ModularConfig(**{**asdict(config), "optimizers": names})


def run_modular(config: ModularConfig, callbacks: ModularCallbacks | None = None) -> dict[str, Any]:
    """Train every optimizer x weight decay of ``config`` on modular addition; return the results (JSON-ready).

    The returned dict holds ``config`` (optimizer names resolved), ``environment``, ``data``, ``model``,
    ``accuracy_threshold`` and one entry per run under ``runs``, each with its ``history`` (every
    ``eval_every`` steps: ``step``, ``time_s``, ``train_loss``, ``train_accuracy``, ``validation_loss``,
    ``validation_accuracy``), its final figures and ``step_train_accuracy_reached`` /
    ``step_validation_accuracy_reached`` (the first recorded step at :data:`ACCURACY_THRESHOLD`, or None).
    """
    from .run import environment

    config = resolve_modular_config(config)
    names = config.optimizers
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        started = time.perf_counter()
        device = resolve_device(config.device)
        data = modular_dataset(config.modulus, config.train_fraction, config.seed)
        template = build_modular_model(config)
        runs = [
            _run_one(name, wd, template, data, config, device, callbacks or _Silent())
            for name in names
            for wd in config.weight_decays
        ]
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "lmopt compare --workload modular",
            "workload": "modular",
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": config.to_dict(),
            "environment": environment(device),
            "data": {
                "task": f"(a + b) mod {config.modulus}, tokens 'a b =', answer read at '='",
                "pairs": config.modulus**2,
                "train_pairs": int(data.train_labels.numel()),
                "validation_pairs": int(data.validation_labels.numel()),
            },
            "model": {
                "architecture": "pre-norm transformer, token + position embeddings, readout at the last token, fp32",
                "width": config.width,
                "layers": config.layers,
                "heads": config.heads,
                "parameters": count_parameters(template),
            },
            "accuracy_threshold": ACCURACY_THRESHOLD,
            "runs": runs,
            "total_time_s": time.perf_counter() - started,
        }
    finally:
        torch.set_num_threads(previous)
