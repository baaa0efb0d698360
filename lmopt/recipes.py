"""Published hyperparameter recipes by model size and phase, translated for each optimizer.

:func:`recipe` returns a typed :class:`Recipe` (every value with its source) that builds the optimizer and the
LR scheduler for a model::

    r = lmopt.recipe("7B", phase="pretrain", optimizer="adamw")
    optimizer, scheduler = r.build(model)

Pre-training values come from the papers of models of that size (GPT-3 Table 2.1 for 125M-2.7B and 175B,
LLaMA 2 for 7B/13B/70B, LLaMA 1 for 30B/65B), fine-tuning values from Stanford Alpaca and Llama 2-Chat.
:data:`PUBLISHED` lists what GPT-3, LLaMA 1/2, Mistral 7B and Falcon used, with sources. All recipes were
published for AdamW; each optimizer's spec declares how they translate to it
(:attr:`lmopt.spec.OptimizerSpec.translation`; :data:`TRANSLATIONS` collects them: Lion, Adafactor, Adam-mini,
CAME, Muon, Schedule-Free AdamW, 8-bit AdamW). The optimizer is only looked up in the registry when
:meth:`Recipe.build_optimizer` runs, so a recipe can be made for an optimizer another module registers later.

Batch-size scaling (:func:`scale_lr`) is a heuristic: the square-root rule for Adam-type optimizers (Malladi
et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022) and the linear rule
for SGD (Goyal et al., "Accurate, Large Minibatch SGD", 2017); both hold only up to a critical batch size.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from . import schedules as _schedules
from .spec import Translation

__all__ = [
    "PUBLISHED",
    "PRETRAIN_TABLE",
    "REFERENCES",
    "TRANSLATIONS",  # noqa: F822 (read from the specs on access)
    "Recipe",
    "SizeRow",
    "Sourced",
    "Translation",
    "parse_size",
    "recipe",
    "scale_lr",
]

Phase = Literal["pretrain", "finetune"]

#: full citations of the short labels used in sources
REFERENCES: dict[str, str] = {
    "GPT-3 paper": "Brown et al., Language Models are Few-Shot Learners, NeurIPS 2020",
    "LLaMA paper": "Touvron et al., LLaMA: Open and Efficient Foundation Language Models, 2023",
    "Llama 2 paper": "Touvron et al., Llama 2: Open Foundation and Fine-Tuned Chat Models, 2023",
    "Stanford Alpaca": "Taori et al., Stanford Alpaca, github.com/tatsu-lab/stanford_alpaca, 2023 (README)",
    "HF TrainingArguments": "Hugging Face transformers TrainingArguments defaults "
    "(adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0)",
    "Falcon-7B card": "TII, Falcon-7B model card, huggingface.co/tiiuae/falcon-7b (Training Hyperparams)",
    "Falcon-40B card": "TII, Falcon-40B model card, huggingface.co/tiiuae/falcon-40b (Training Hyperparams)",
    "Mistral paper": "Jiang et al., Mistral 7B, 2023",
    "Lion paper": "Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023",
    "Adafactor paper": "Shazeer & Stern, Adafactor (Adaptive Learning Rates, Sublinear Memory), ICML 2018",
    "Adam-mini paper": "Zhang et al., Adam-mini: Use Fewer Learning Rates To Gain More, 2024",
    "CAME paper": "Luo et al., CAME: Confidence-guided Adaptive Memory Efficient Optimization, ACL 2023",
    "Moonlight paper": "Liu et al., Muon is Scalable for LLM Training, 2025",
    "Schedule-Free paper": "Defazio et al., The Road Less Scheduled, NeurIPS 2024",
    "8-bit Adam paper": "Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022",
    "sqrt scaling": "Malladi et al., On the SDEs and Scaling Rules for Adaptive Gradient Algorithms, 2022",
    "linear scaling": "Goyal et al., Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, 2017",
}

GPT3_T21 = "GPT-3 paper, Table 2.1"
GPT3_APPB = "GPT-3 paper, App. B"
LLAMA1_T2 = "LLaMA paper, Table 2, Sec. 2.3"
LLAMA2_PT = "Llama 2 paper, Sec. 2.2, Table 1"
LLAMA2_SFT = "Llama 2 paper, Sec. 3.1"
ALPACA = "Stanford Alpaca"
HF_TRAINER = "HF TrainingArguments"
FALCON7B = "Falcon-7B card"
FALCON40B = "Falcon-40B card"
MISTRAL = "Mistral paper"


@dataclass(frozen=True)
class Sourced:
    """A value and where it comes from."""

    value: Any
    source: str


# ------------------------------------------------------------------------------------------------------------
# pre-training table
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeRow:
    """One published pre-training configuration of a model size (AdamW)."""

    size: str
    params: float
    lr: Sourced
    batch_tokens: Sourced
    warmup_steps: Sourced
    decay_tokens: Sourced
    eps: Sourced
    model: str


def _gpt3(size: str, params: float, lr: float, batch_m: float, name: str) -> SizeRow:
    batch = int(batch_m * 1e6)
    # GPT-3 warms up over 375M tokens and decays (cosine to 10%) over 260B tokens, at every size
    return SizeRow(
        size=size,
        params=params,
        lr=Sourced(lr, GPT3_T21),
        batch_tokens=Sourced(batch, GPT3_T21),
        warmup_steps=Sourced(round(375e6 / batch), f"{GPT3_APPB}: warmup over 375M tokens / {batch_m}M per batch"),
        decay_tokens=Sourced(260e9, f"{GPT3_APPB}: cosine decay over 260B tokens (training ran to 300B at 10%)"),
        eps=Sourced(1e-8, GPT3_APPB),
        model=name,
    )


def _llama(size: str, params: float, lr: float, tokens: float, name: str, version: int) -> SizeRow:
    source = LLAMA2_PT if version == 2 else LLAMA1_T2
    return SizeRow(
        size=size,
        params=params,
        lr=Sourced(lr, source),
        batch_tokens=Sourced(4_000_000, f"{source}: 4M tokens per batch"),
        warmup_steps=Sourced(2000, source),
        decay_tokens=Sourced(tokens, f"{source}: {tokens / 1e12:g}T training tokens"),
        eps=Sourced(1e-5, LLAMA2_PT) if version == 2 else Sourced(1e-8, "not stated in the LLaMA paper; AdamW default"),
        model=name,
    )


#: published pre-training configurations, smallest first
PRETRAIN_TABLE: tuple[SizeRow, ...] = (
    _gpt3("125M", 125e6, 6.0e-4, 0.5, "GPT-3 Small"),
    _gpt3("350M", 350e6, 3.0e-4, 0.5, "GPT-3 Medium"),
    _gpt3("760M", 760e6, 2.5e-4, 0.5, "GPT-3 Large"),
    _gpt3("1.3B", 1.3e9, 2.0e-4, 1.0, "GPT-3 XL"),
    _gpt3("2.7B", 2.7e9, 1.6e-4, 1.0, "GPT-3 2.7B"),
    _llama("7B", 7e9, 3.0e-4, 2e12, "Llama 2 7B", 2),
    _llama("13B", 13e9, 3.0e-4, 2e12, "Llama 2 13B", 2),
    _llama("30B", 32.5e9, 1.5e-4, 1.4e12, "LLaMA 33B", 1),
    _llama("65B", 65.2e9, 1.5e-4, 1.4e12, "LLaMA 65B", 1),
    _llama("70B", 70e9, 1.5e-4, 2e12, "Llama 2 70B", 2),
    _gpt3("175B", 175e9, 0.6e-4, 3.2, "GPT-3 175B"),
)

#: values shared by every pre-training row
PRETRAIN_COMMON: dict[str, Sourced] = {
    "betas": Sourced((0.9, 0.95), f"{GPT3_APPB}; {LLAMA1_T2}; {LLAMA2_PT}"),
    "weight_decay": Sourced(0.1, f"{GPT3_APPB}; {LLAMA1_T2}; {LLAMA2_PT}"),
    "min_lr_ratio": Sourced(0.1, f"{GPT3_APPB} (cosine to 10%); {LLAMA2_PT} (final lr 10% of peak)"),
    "grad_clip": Sourced(1.0, f"{GPT3_APPB}; {LLAMA1_T2}; {LLAMA2_PT}"),
    "schedule": Sourced("cosine", f"{GPT3_APPB}; {LLAMA1_T2}; {LLAMA2_PT}"),
}

#: values for full fine-tuning (instruction tuning) of a pre-trained decoder
FINETUNE_COMMON: dict[str, Sourced] = {
    "betas": Sourced((0.9, 0.999), f"{HF_TRAINER}, as used by {ALPACA}"),
    "eps": Sourced(1e-8, HF_TRAINER),
    "weight_decay": Sourced(0.0, f"{ALPACA} (--weight_decay 0.); Llama 2-Chat used 0.1 ({LLAMA2_SFT})"),
    "warmup_ratio": Sourced(0.03, f"{ALPACA} (--warmup_ratio 0.03)"),
    "min_lr_ratio": Sourced(0.0, f"{ALPACA} (--lr_scheduler_type cosine, which decays to 0)"),
    "grad_clip": Sourced(1.0, HF_TRAINER),
    "schedule": Sourced("cosine", f"{ALPACA}; {LLAMA2_SFT}"),
}


def _finetune_lr(params: float) -> Sourced:
    if params <= 7.5e9:
        return Sourced(2e-5, f"{ALPACA} (LLaMA-7B: 2e-5); {LLAMA2_SFT} (2e-5)")
    return Sourced(1e-5, f"{ALPACA} (LLaMA-13B: 1e-5)")


def _llama_published(source: str, lr: float, *, eps: float | None = None) -> dict[str, Sourced]:
    # LLaMA's Table 2 trains every size the same way but for the peak lr; Llama 2 keeps that recipe and
    # states its eps
    fields = {"lr": Sourced(lr, source), "betas": Sourced((0.9, 0.95), source)}
    if eps is not None:
        fields["eps"] = Sourced(eps, source)
    fields |= {
        "weight_decay": Sourced(0.1, source),
        "warmup": Sourced("2000 steps", source),
        "schedule": Sourced("cosine to 10% of the peak", source),
        "grad_clip": Sourced(1.0, source),
        "batch_tokens": Sourced("4M", source),
    }
    return fields


def _falcon_published(card: str, lr: float, min_lr: str, batch: str) -> dict[str, Sourced]:
    # the Falcon model cards share the warmup, weight decay and z-loss; ``min_lr`` as the card writes it
    return {
        "lr": Sourced(lr, card),
        "min_lr": Sourced(float(min_lr), f"{card}: cosine decay to {min_lr}"),
        "warmup": Sourced("4B tokens", card),
        "weight_decay": Sourced(0.1, card),
        "z_loss": Sourced(1e-4, card),
        "batch": Sourced(batch, card),
    }


#: what published models used, field by field
PUBLISHED: dict[str, dict[str, Sourced]] = {
    "GPT-3 175B": {
        "lr": Sourced(0.6e-4, GPT3_T21),
        "min_lr": Sourced(0.6e-5, f"{GPT3_APPB}: cosine to 10% of the peak"),
        "betas": Sourced((0.9, 0.95), GPT3_APPB),
        "eps": Sourced(1e-8, GPT3_APPB),
        "weight_decay": Sourced(0.1, GPT3_APPB),
        "warmup": Sourced("375M tokens", GPT3_APPB),
        "schedule": Sourced("cosine over 260B tokens, then 10% to 300B", GPT3_APPB),
        "grad_clip": Sourced(1.0, GPT3_APPB),
        "batch_tokens": Sourced("3.2M (ramped from 32k over the first 4-12B tokens)", f"{GPT3_T21}; {GPT3_APPB}"),
    },
    "LLaMA 7B/13B": _llama_published(LLAMA1_T2, 3.0e-4),
    "LLaMA 33B/65B": _llama_published(LLAMA1_T2, 1.5e-4),
    "Llama 2 7B/13B (70B: lr 1.5e-4)": _llama_published(LLAMA2_PT, 3.0e-4, eps=1e-5),
    "Llama 2-Chat SFT": {
        "lr": Sourced(2e-5, LLAMA2_SFT),
        "weight_decay": Sourced(0.1, LLAMA2_SFT),
        "schedule": Sourced("cosine", LLAMA2_SFT),
        "batch": Sourced("64 sequences of 4096 tokens, 2 epochs", LLAMA2_SFT),
    },
    "Falcon-7B": _falcon_published(FALCON7B, 6e-4, "1.2e-5", "2304 sequences (30B-token ramp-up)"),
    "Falcon-40B": _falcon_published(FALCON40B, 1.85e-4, "1.85e-5", "1152 sequences (100B-token ramp-up)"),
    "Mistral 7B": {
        "optimizer hyperparameters": Sourced("not published", f"{MISTRAL} (describes architecture only)"),
    },
}


# ------------------------------------------------------------------------------------------------------------
# optimizer translations
# ------------------------------------------------------------------------------------------------------------
def __getattr__(name: str) -> Any:
    # TRANSLATIONS: registry name -> Translation, read from the specs (each optimizer declares its own beside
    # its algorithm, :attr:`lmopt.spec.OptimizerSpec.translation`), so there is one source
    if name == "TRANSLATIONS":
        from .registry import list_optimizers

        return {s.name: s.translation for s in list_optimizers() if s.translation is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(optimizer: str) -> tuple[str | None, Mapping[str, Any]]:
    """The registry name an optimizer name or alias refers to and the hyperparameters the alias implies
    (None, {} for an unregistered name)."""
    from .registry import resolve_name

    try:
        spec, implied = resolve_name(optimizer)
    except ValueError:
        return None, {}
    return spec.name, implied


def _translation(optimizer: str) -> Translation:
    """The translation the optimizer's spec declares (an alias shares its entry's: ``"came8bit"`` is CAME's);
    AdamW's lr and weight decay for a name that is not registered or declares none."""
    from .registry import get_spec

    try:
        declared = get_spec(optimizer).translation
    except ValueError:
        declared = None
    if declared is not None:
        return declared
    return Translation(
        betas="optional",
        source="no published translation: AdamW's lr and weight decay",
        label="no published translation: as AdamW",
    )


# ------------------------------------------------------------------------------------------------------------
# batch-size scaling
# ------------------------------------------------------------------------------------------------------------
def scale_lr(lr: float, from_batch: float, to_batch: float, rule: Literal["sqrt", "linear"] = "sqrt") -> float:
    """The learning rate for batch ``to_batch`` given a tuned ``lr`` at ``from_batch`` (a heuristic).

    ``sqrt``: ``lr * sqrt(to / from)`` for Adam-type optimizers (Malladi et al. 2022); ``linear``:
    ``lr * to / from`` for SGD (Goyal et al. 2017). Both break down past the critical batch
    size; re-tune there.

    Example:
        >>> scale_lr(3e-4, 4_000_000, 1_000_000)   # a quarter of the batch: half the lr
        0.00015
    """
    for name, value in (("lr", lr), ("from_batch", from_batch), ("to_batch", to_batch)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if rule == "sqrt":
        return float(lr) * math.sqrt(to_batch / from_batch)
    if rule == "linear":
        return float(lr) * to_batch / from_batch
    raise ValueError(f"rule must be 'sqrt' or 'linear', got {rule!r}")


def _default_rule(optimizer: str) -> Literal["sqrt", "linear"]:
    return "linear" if optimizer.lower().startswith("sgd") else "sqrt"


# ------------------------------------------------------------------------------------------------------------
# the typed recipe
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A complete, sourced training configuration for one optimizer, model size and phase.

    Attributes:
        size: the published size the values come from (e.g. ``"7B"``).
        phase: ``"pretrain"`` or ``"finetune"``.
        optimizer: registry name (looked up only when the optimizer is built).
        lr: peak learning rate.
        min_lr_ratio: floor of the decay as a fraction of the peak.
        weight_decay: decoupled weight decay (applied to matrices only by :func:`lmopt.param_groups`).
        betas: momentum coefficients, or None when the optimizer takes none.
        eps: denominator epsilon, or None when not passed.
        warmup_steps: linear warmup length.
        total_steps: steps until the end of the decay.
        schedule: ``"cosine"``, ``"linear"``, ``"constant"`` (warmup only) or ``"inverse_sqrt"``.
        grad_clip: global gradient-norm clip threshold (None: no clipping).
        batch_tokens: tokens per optimizer step the lr was tuned for (None when not published).
        extra: further constructor arguments the optimizer must accept.
        optional: constructor arguments passed only when the optimizer has them.
        sources: field name -> where its value comes from.
        notes: anything a user should know (nearest size used, scaling applied, ...).
    """

    size: str
    phase: str
    optimizer: str
    lr: float
    min_lr_ratio: float
    weight_decay: float
    betas: tuple[float, ...] | None
    eps: float | None
    warmup_steps: int
    total_steps: int
    schedule: str
    grad_clip: float | None
    batch_tokens: int | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    optional: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    # -- what gets built -------------------------------------------------------------------------------------
    def optimizer_kwargs(self) -> dict[str, Any]:
        """Constructor arguments every optimizer of this recipe must accept (lr, weight decay, betas, ...)."""
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.betas is not None:
            kwargs["betas"] = tuple(self.betas)
        if self.eps is not None:
            kwargs["eps"] = self.eps
        kwargs.update(self.extra)
        return kwargs

    def make_schedule(self) -> _schedules.Schedule:
        """The learning-rate schedule as an ``f(step)`` multiplier."""
        if self.schedule == "cosine":
            return _schedules.warmup_cosine(self.warmup_steps, self.total_steps, min_lr_ratio=self.min_lr_ratio)
        if self.schedule == "linear":
            return _schedules.warmup_linear(self.warmup_steps, self.total_steps, min_lr_ratio=self.min_lr_ratio)
        if self.schedule == "constant":
            return _schedules.warmup_constant(self.warmup_steps)
        if self.schedule == "inverse_sqrt":
            # Adafactor's relative step: the peak until step 10 000, then 1/sqrt(step)
            return _schedules.inverse_sqrt(self.warmup_steps, timescale=max(10_000, self.warmup_steps))
        raise ValueError(f"schedule must be cosine, linear, constant or inverse_sqrt, got {self.schedule!r}")

    def build_optimizer(self, model: nn.Module | Any) -> Optimizer:
        """The optimizer for ``model`` (weight decay on matrices only, via :func:`lmopt.param_groups`).

        Raises:
            ValueError: the optimizer is not registered, or does not take one of the recipe's arguments.
        """
        from .registry import create_optimizer, resolve_name

        spec, _implied = resolve_name(self.optimizer)
        accepted = set(inspect.signature(spec.cls.__init__).parameters)
        kwargs = self.optimizer_kwargs()
        kwargs.update({k: v for k, v in self.optional.items() if k in accepted})
        if self.schedule == "constant" and "warmup_steps" in accepted:
            kwargs["warmup_steps"] = self.warmup_steps  # Schedule-Free warms up inside the optimizer
        return create_optimizer(self.optimizer, model, **kwargs)

    def build_scheduler(self, optimizer: Optimizer) -> _schedules.ScheduleLR:
        """A :class:`lmopt.schedules.ScheduleLR` for ``optimizer`` following this recipe."""
        schedule = self.make_schedule()
        groups = optimizer.param_groups
        if self.schedule == "constant" and groups and "warmup_steps" in groups[0]:
            schedule = _schedules.Constant(1.0)  # the optimizer warms up itself: don't warm up twice
        return _schedules.scheduler(optimizer, schedule)

    def build(self, model: nn.Module | Any) -> tuple[Optimizer, _schedules.ScheduleLR]:
        """``(optimizer, scheduler)`` for ``model``."""
        optimizer = self.build_optimizer(model)
        return optimizer, self.build_scheduler(optimizer)

    # -- variations ------------------------------------------------------------------------------------------
    def with_batch_tokens(self, batch_tokens: int, rule: Literal["auto", "sqrt", "linear"] = "auto") -> Recipe:
        """The recipe rescaled to another batch size (lr by the sqrt or linear rule; warmup and total steps
        keep the same token counts)."""
        if self.batch_tokens is None:
            raise ValueError("this recipe has no reference batch size to scale from")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be an integer > 0, got {batch_tokens!r}")
        if rule == "auto":
            rule = _default_rule(self.optimizer)
        lr = scale_lr(self.lr, self.batch_tokens, batch_tokens, rule)
        ratio = self.batch_tokens / batch_tokens
        warmup = max(0, round(self.warmup_steps * ratio))
        total = max(warmup + 1, round(self.total_steps * ratio))
        note = (
            f"lr scaled from {self.lr:.3g} at {self.batch_tokens:,} tokens/step to {lr:.3g} at "
            f"{batch_tokens:,} by the {rule} rule (a heuristic); warmup/total steps keep their token counts"
        )
        sources = {**self.sources, "lr": f"{self.sources.get('lr', '')}; {rule} scaling to this batch"}
        return replace(
            self,
            lr=lr,
            batch_tokens=batch_tokens,
            warmup_steps=warmup,
            total_steps=total,
            sources=sources,
            notes=(*self.notes, note),
        )

    def with_total_steps(self, total_steps: int, warmup_steps: int | None = None) -> Recipe:
        """The recipe for a run of ``total_steps``.

        The warmup keeps its published length in pre-training and its fraction of the run in fine-tuning,
        unless ``warmup_steps`` is given (short experiments: 2-5% of the run is usual).
        """
        _schedules._check_int("total_steps", total_steps, 1)
        warmup = self.warmup_steps
        sources = dict(self.sources)
        if warmup_steps is not None:
            warmup = _schedules._check_int("warmup_steps", warmup_steps, 0)
            sources["warmup_steps"] = "set for this run"
        elif self.phase == "finetune":
            warmup = round(self.warmup_steps / self.total_steps * total_steps)
        if warmup >= total_steps:
            raise ValueError(
                f"warmup_steps ({warmup}) must be < total_steps ({total_steps}); for a run this short pass "
                f"warmup_steps=... (2-5% of the run is usual)"
            )
        sources["total_steps"] = "set for this run"
        return replace(self, total_steps=total_steps, warmup_steps=warmup, sources=sources)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON, logs and checkpoints' run config)."""
        out = asdict(self)
        out["extra"] = dict(self.extra)
        out["optional"] = dict(self.optional)
        out["sources"] = dict(self.sources)
        out["notes"] = list(self.notes)
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """``(field, value, source)`` rows for display."""
        values = {
            "optimizer": self.optimizer,
            "lr": f"{self.lr:.3g}",
            "min_lr_ratio": f"{self.min_lr_ratio:g}",
            "weight_decay": f"{self.weight_decay:g}",
            "betas": str(self.betas),
            "eps": str(self.eps),
            "warmup_steps": f"{self.warmup_steps:,}",
            "total_steps": f"{self.total_steps:,}",
            "schedule": self.schedule,
            "grad_clip": str(self.grad_clip),
            "batch_tokens": "-" if self.batch_tokens is None else f"{self.batch_tokens:,}",
        }
        for k, v in {**self.extra, **self.optional}.items():
            values[k] = repr(v)
        return [(k, v, self.sources.get(k, "")) for k, v in values.items()]


# ------------------------------------------------------------------------------------------------------------
# lookup
# ------------------------------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT])?\s*$")
_UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12, None: 1.0}


def parse_size(size: str | float | int) -> float:
    """Parameter count of ``"125M"``, ``"7B"``, ``"1.3b"`` or a number."""
    if isinstance(size, bool):
        raise ValueError(f"size must be like '7B' or '125M', got {size!r}")
    if isinstance(size, (int, float)):
        if not size > 0:
            raise ValueError(f"size must be > 0, got {size!r}")
        return float(size)
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"size must be like '7B', '1.3B' or '125M', got {size!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None]
    if value <= 0:
        raise ValueError(f"size must be > 0, got {size!r}")
    return value


def _nearest_row(params: float) -> SizeRow:
    return min(PRETRAIN_TABLE, key=lambda row: abs(math.log(row.params / params)))


def recipe(
    size: str | float,
    phase: Phase = "pretrain",
    optimizer: str = "adamw",
    *,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    batch_tokens: int | None = None,
    batch_scaling: Literal["auto", "sqrt", "linear"] = "auto",
) -> Recipe:
    """The published recipe for a model of ``size``, for ``phase``, translated for ``optimizer``.

    Args:
        size: ``"125M"`` ... ``"175B"`` (the nearest published size is used and noted) or a parameter count.
        phase: ``"pretrain"`` or ``"finetune"`` (full fine-tuning).
        optimizer: registry name; it need not be registered until :meth:`Recipe.build_optimizer`.
        total_steps: steps of the run (default: the published token budget for pre-training, 1000 for
            fine-tuning, with the warmup a fixed 3% of it).
        warmup_steps: override the warmup (needed when the run is shorter than a published warmup).
        batch_tokens: tokens per optimizer step, when it differs from the published batch: the lr is rescaled
            with ``batch_scaling`` (``"auto"``: linear for SGD, square root otherwise).

    Example:
        >>> r = lmopt.recipe("7B", phase="pretrain", optimizer="adamw")
        >>> r.lr, r.betas, r.warmup_steps
        (0.0003, (0.9, 0.95), 2000)
        >>> optimizer, scheduler = lmopt.recipe("125M", optimizer="lion", total_steps=5000).build(model)
    """
    if phase not in ("pretrain", "finetune"):
        raise ValueError(f"phase must be 'pretrain' or 'finetune', got {phase!r}")
    if not isinstance(optimizer, str) or not optimizer.strip():
        raise ValueError(f"optimizer must be a registry name, got {optimizer!r}")
    if batch_scaling not in ("auto", "sqrt", "linear"):
        raise ValueError(f"batch_scaling must be 'auto', 'sqrt' or 'linear', got {batch_scaling!r}")
    params = parse_size(size)
    row = _nearest_row(params)
    notes: list[str] = []
    if not math.isclose(row.params, params, rel_tol=0.1):
        notes.append(f"no published recipe for {size}; using the nearest published size, {row.size} ({row.model})")
    optimizer = optimizer.strip().lower().replace("-", "_")

    if phase == "pretrain":
        common = PRETRAIN_COMMON
        lr, eps = row.lr, row.eps
        batch = row.batch_tokens
        warmup = row.warmup_steps
        published_total = max(warmup.value + 1, round(row.decay_tokens.value / batch.value))
        total = Sourced(published_total, f"{row.decay_tokens.source}, / {batch.value:,} tokens per step")
    else:
        common = FINETUNE_COMMON
        lr, eps = _finetune_lr(row.params), common["eps"]
        batch = Sourced(None, "fine-tuning batches vary; not scaled")
        total = Sourced(1000, "lmopt default for fine-tuning; pass total_steps")
        warmup = Sourced(round(common["warmup_ratio"].value * 1000), common["warmup_ratio"].source)
    sources = {
        "lr": lr.source,
        "eps": eps.source,
        "betas": common["betas"].source,
        "weight_decay": common["weight_decay"].source,
        "min_lr_ratio": common["min_lr_ratio"].source,
        "warmup_steps": warmup.source,
        "total_steps": total.source,
        "schedule": common["schedule"].source,
        "grad_clip": common["grad_clip"].source,
        "batch_tokens": batch.source,
    }
    base = Recipe(
        size=row.size,
        phase=phase,
        optimizer="adamw",
        lr=lr.value,
        min_lr_ratio=common["min_lr_ratio"].value,
        weight_decay=common["weight_decay"].value,
        betas=tuple(common["betas"].value),
        eps=eps.value,
        warmup_steps=int(warmup.value),
        total_steps=int(total.value),
        schedule=common["schedule"].value,
        grad_clip=common["grad_clip"].value,
        batch_tokens=batch.value,
        sources=sources,
        notes=tuple(notes),
    )
    out = _translate(base, optimizer)
    if batch_tokens is not None:  # first: steps then count at the new batch size
        if out.batch_tokens is None:
            raise ValueError("batch_tokens scaling needs a published batch size; fine-tuning recipes have none")
        out = out.with_batch_tokens(batch_tokens, batch_scaling)
    if total_steps is not None or warmup_steps is not None:
        out = out.with_total_steps(out.total_steps if total_steps is None else total_steps, warmup_steps)
    return out


def _translate(base: Recipe, optimizer: str) -> Recipe:
    t = _translation(optimizer)
    phase = base.phase
    # 4 significant digits: lr / 3 reads 1e-4, not 9.999999999999999e-05
    lr = t.lr.get(phase, float(f"{base.lr * t.lr_factor:.4g}"))
    weight_decay = t.weight_decay.get(phase, float(f"{base.weight_decay * t.weight_decay_factor:.4g}"))
    sources = dict(base.sources)
    notes = list(base.notes)
    betas: tuple[float, ...] | None = base.betas
    if t.betas == "drop":
        betas = None
    elif t.betas == "came":
        betas = (base.betas[0], 0.999, 0.9999)
    elif t.betas == "optional":
        betas = None  # passed through ``optional`` below, only if the optimizer takes them
    elif t.betas is not None:
        betas = tuple(t.betas)
    if optimizer not in ("adamw", "adam", "amsgrad", "adamw_bf16"):
        for name, value, before in (("lr", lr, base.lr), ("weight_decay", weight_decay, base.weight_decay)):
            if value != before:
                sources[name] = f"{sources[name]}; for {optimizer}: {t.label}"
        if betas != base.betas:
            sources["betas"] = t.label
        notes.append(f"{optimizer}: {t.source}")
    wanted = t.schedule.get(phase, "recipe") if isinstance(t.schedule, Mapping) else t.schedule
    schedule = base.schedule if wanted == "recipe" else wanted
    if schedule != base.schedule:
        sources["schedule"] = t.label
    eps = base.eps if t.pass_eps and t.betas != "optional" else None
    optional = dict(t.optional.get(phase, {}))
    if t.betas == "optional":
        optional.update(betas=base.betas, eps=base.eps)
    # what an alias implies is the user's choice ("adafactor8bit": beta1=0.9 with an 8-bit first moment), not a
    # default for the translation to override
    _canonical, implied = _resolve(optimizer)
    overridden = sorted(k for k in implied if k in optional)
    for key in overridden:
        del optional[key]
    if overridden:
        notes.append(f"{optimizer}: keeps {', '.join(f'{k}={implied[k]!r}' for k in overridden)} (set by the alias)")
    for key in optional:
        sources[key] = f"{t.label} (passed only if {optimizer} takes {key})"
    for key in t.required.get(phase, {}):
        sources[key] = t.label
    if eps is None and "eps" not in optional:
        sources["eps"] = f"not passed ({t.label})"
    if betas is None and "betas" not in optional:
        sources["betas"] = f"not passed ({t.label})"
    return replace(
        base,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        schedule=schedule,
        extra=dict(t.required.get(phase, {})),
        optional=optional,
        sources=sources,
        notes=tuple(notes),
    )
