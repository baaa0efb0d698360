"""Learning-rate schedules as pure ``f(step) -> multiplier`` functions, joined, fed to a torch LR scheduler.

A schedule is a small frozen dataclass whose ``__call__(step)`` returns the multiplier of the peak learning
rate for the update that follows ``step`` optimizer steps (``step`` is torch's ``last_epoch``: 0 before the
first ``optimizer.step()``). Schedules are data, not closures, so they print, compare and pickle; they join
like optax's ``join_schedules``: :func:`join` runs piece ``i`` from boundary ``i`` on, counting its own steps
from zero, and :func:`with_warmup` puts a linear warmup in front of any schedule.

Conventions (the same for every piece, so edges are predictable):

* warmup of ``W`` steps: ``(step + 1) / (W + 1)`` -- the first update already moves (no wasted step at lr 0),
  and the ramp rises strictly until the peak, which the first step after warmup uses;
* a decay over ``n`` steps, at local step ``t``: progress ``p = t / (n - 1)`` (``p = 1`` when ``n == 1``), so
  the first decay step uses the peak and the last training step uses the floor exactly; beyond the end the
  floor holds.

================================= ============================================================================
builder                           multiplier after warmup (``p`` = decay progress in [0, 1])
================================= ============================================================================
:func:`warmup_cosine`             ``r + (1 - r) (1 + cos(pi p)) / 2``, floor ``r = min_lr_ratio`` (0.1)
:func:`warmup_linear`             ``r + (1 - r) (1 - p)`` (floor 0 by default)
:func:`warmup_stable_decay`       WSD: 1 in the stable phase, then linear / cosine / ``1 - sqrt(p)`` decay
:func:`sgdr`                      cosine restarts, cycle ``i`` lasts ``T_0 T_mult^i`` steps (torch's formula)
:func:`inverse_sqrt`              ``sqrt(timescale / max(step + 1, timescale))`` (Adafactor's relative step)
:func:`warmup_constant`           1
================================= ============================================================================

:func:`scheduler` wraps a schedule in :class:`ScheduleLR`, a :class:`torch.optim.lr_scheduler.LambdaLR`, so
plain loops, Hugging Face ``Trainer(optimizers=(opt, sched))`` and Lightning accept it; its ``state_dict``
holds only the step and the base learning rates (the schedule itself is code, rebuilt by the caller), so a
resume is exact and a WSD run checkpointed in its stable phase can resume with a decay decided later
(:meth:`WarmupStableDecay.decay_from`).

Example:
    >>> sched = lmopt.schedules.scheduler(opt, lmopt.schedules.warmup_cosine(2000, 100_000, min_lr_ratio=0.1))
    >>> for batch in batches:
    ...     loss = model(batch).loss; loss.backward(); opt.step(); opt.zero_grad(); sched.step()

References: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017; Hu et
al., "MiniCPM", 2024 (WSD); Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", NeurIPS 2024 (1-sqrt cooldown); Shazeer & Stern, "Adafactor", ICML 2018 (relative step);
Vaswani et al., "Attention Is All You Need", 2017 (inverse square root).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "Constant",
    "CosineDecay",
    "DecayShape",
    "InverseSqrt",
    "Join",
    "LinearWarmup",
    "Schedule",
    "ScheduleLR",
    "SGDR",
    "ShapedDecay",
    "WarmupStableDecay",
    "describe",
    "inverse_sqrt",
    "join",
    "key_steps",
    "scheduler",
    "sgdr",
    "warmup_constant",
    "warmup_cosine",
    "warmup_linear",
    "warmup_stable_decay",
    "with_warmup",
]

DecayShape = Literal["linear", "cosine", "1-sqrt"]
_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt")


@runtime_checkable
class Schedule(Protocol):
    """Anything callable as ``f(step: int) -> float`` (a multiplier of the peak learning rate)."""

    def __call__(self, step: int) -> float: ...


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_shape(shape: Any) -> None:
    if shape not in _SHAPES:
        raise ValueError(f"shape must be one of {list(_SHAPES)}, got {shape!r}")


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            step = int(step)  # numpy / tensor integers
        except (TypeError, ValueError):
            raise ValueError(f"step must be an integer >= 0, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _shape_value(shape: str, progress: float) -> float:
    """The decay shape at ``progress`` in [0, 1]: 1 at the start, 0 at the end."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # "1-sqrt"


# ------------------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Constant:
    """``f(step) = value`` for every step."""

    value: float = 1.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, (int, float))
            or not (math.isfinite(self.value) and self.value >= 0)
        ):
            raise ValueError(f"value must be a finite number >= 0, got {self.value!r}")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)


@dataclass(frozen=True)
class LinearWarmup:
    """Linear ramp over ``steps`` steps: ``f(t) = (t + 1) / (steps + 1)``, then 1 from ``t = steps`` on.

    The first update uses ``1 / (steps + 1)`` of the peak (never 0, so no step is wasted) and the peak is
    reached by the first step after the warmup.
    """

    steps: int

    def __post_init__(self) -> None:
        _check_int("warmup_steps", self.steps, 0)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step >= self.steps:
            return 1.0
        return (step + 1) / (self.steps + 1)


@dataclass(frozen=True)
class ShapedDecay:
    """Decay from 1 to ``final`` over ``steps`` steps with a linear, cosine or ``1-sqrt`` shape.

    ``f(t) = final + (1 - final) * shape(p)``, ``p = min(t / (steps - 1), 1)`` (``p = 1`` when
    ``steps == 1``): the first step uses the peak, step ``steps - 1`` the floor, and the floor holds after.
    """

    steps: int
    shape: DecayShape = "cosine"
    final: float = 0.0

    def __post_init__(self) -> None:
        _check_int("decay_steps", self.steps, 1)
        _check_shape(self.shape)
        _check_ratio("min_lr_ratio", self.final)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        progress = 1.0 if self.steps == 1 else min(step / (self.steps - 1), 1.0)
        return self.final + (1.0 - self.final) * _shape_value(self.shape, progress)


def CosineDecay(steps: int, final: float = 0.0) -> ShapedDecay:  # noqa: N802 (reads as a type)
    """A cosine :class:`ShapedDecay`."""
    return ShapedDecay(steps, "cosine", final)


@dataclass(frozen=True)
class SGDR:
    """Cosine annealing with warm restarts (Loshchilov & Hutter 2017): torch's CosineAnnealingWarmRestarts.

    Cycle ``i`` lasts ``T_0 * T_mult**i`` steps; inside a cycle of length ``T_i`` at local step ``t``:
    ``f = r + (1 - r) (1 + cos(pi t / T_i)) / 2`` with ``r = min_lr_ratio`` (torch's ``eta_min / base_lr``).
    Each restart jumps back to the peak.
    """

    T_0: int  # noqa: N815 (the paper's and torch's name)
    T_mult: int = 1  # noqa: N815
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_int("T_0", self.T_0, 1)
        _check_int("T_mult", self.T_mult, 1)
        _check_ratio("min_lr_ratio", self.min_lr_ratio)

    def cycle(self, step: int) -> tuple[int, int, int]:
        """``(cycle index, step inside the cycle, cycle length)`` for ``step``."""
        step = _check_step(step)
        if self.T_mult == 1:
            return step // self.T_0, step % self.T_0, self.T_0
        # closed form, as in torch: the cycle holding `step` starts at T_0 (T_mult^n - 1) / (T_mult - 1)
        n = int(math.log(step / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
        start = self.T_0 * (self.T_mult**n - 1) // (self.T_mult - 1)
        while start > step:  # guard the float logarithm at exact boundaries
            n -= 1
            start = self.T_0 * (self.T_mult**n - 1) // (self.T_mult - 1)
        while start + self.T_0 * self.T_mult**n <= step:
            start += self.T_0 * self.T_mult**n
            n += 1
        return n, step - start, self.T_0 * self.T_mult**n

    def __call__(self, step: int) -> float:
        _, t, length = self.cycle(step)
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t / length))


@dataclass(frozen=True)
class InverseSqrt:
    """Inverse square root decay: ``f(step) = sqrt(timescale / max(step + 1, timescale))``.

    Constant at the peak for the first ``timescale`` steps, then ``1/sqrt`` of the (1-based) step. With a
    peak of 1e-2 and ``timescale = 10_000`` this is exactly Adafactor's relative step
    ``min(1e-2, 1/sqrt(t))``, ``t = step + 1`` (Shazeer & Stern 2018; T5 uses the same).
    """

    timescale: int = 10_000

    def __post_init__(self) -> None:
        _check_int("timescale", self.timescale, 1)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        return math.sqrt(self.timescale / max(step + 1, self.timescale))


@dataclass(frozen=True)
class Join:
    """Piece ``i`` from ``boundaries[i - 1]`` on, each piece counting its own steps from 0 (optax's join).

    ``boundaries`` are strictly increasing step numbers, one fewer than the pieces.
    """

    pieces: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.pieces) == 0:
            raise ValueError("pieces must hold at least one schedule")
        for i, piece in enumerate(self.pieces):
            if not callable(piece):
                raise ValueError(f"pieces[{i}] must be callable as f(step), got {type(piece).__name__}")
        if len(self.boundaries) != len(self.pieces) - 1:
            raise ValueError(
                f"boundaries must hold {len(self.pieces) - 1} steps (one fewer than the pieces), got "
                f"{len(self.boundaries)}"
            )
        previous = 0
        for i, b in enumerate(self.boundaries):
            _check_int(f"boundaries[{i}]", b, 0)
            if i and b <= previous:
                raise ValueError(f"boundaries must increase strictly, got {list(self.boundaries)}")
            previous = b

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        start = 0
        index = 0
        for i, b in enumerate(self.boundaries):
            if step >= b:
                index, start = i + 1, b
        return float(self.pieces[index](step - start))


@dataclass(frozen=True)
class WarmupStableDecay:
    """Warmup-stable-decay (WSD): linear warmup, a constant peak, then a decay to ``min_lr_ratio``.

    ``decay_start=None`` keeps the stable phase forever: train, checkpoint during the stable phase, and decide
    the end later with :meth:`decay_from` (the multiplier is 1 at every stable step, so a run resumed through
    :class:`ScheduleLR` is identical up to the checkpoint and decays from there).

    Args:
        warmup_steps: linear warmup length (``(step + 1) / (warmup_steps + 1)``).
        decay_start: first step of the decay (>= warmup_steps), or None for no decay yet.
        decay_steps: decay length; the floor is used at step ``decay_start + decay_steps - 1``.
        shape: ``"linear"``, ``"cosine"`` or ``"1-sqrt"`` (Hägele et al. 2024 found 1-sqrt best).
        min_lr_ratio: the floor, as a fraction of the peak (default 0).
    """

    warmup_steps: int
    decay_start: int | None = None
    decay_steps: int = 0
    shape: DecayShape = "1-sqrt"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_shape(self.shape)
        _check_ratio("min_lr_ratio", self.min_lr_ratio)
        if self.decay_start is not None:
            _check_int("decay_start", self.decay_start, 0)
            if self.decay_start < self.warmup_steps:
                raise ValueError(
                    f"decay_start ({self.decay_start}) must be >= warmup_steps ({self.warmup_steps}):"
                    f" the decay cannot begin during the warmup"
                )
            _check_int("decay_steps", self.decay_steps, 1)

    @property
    def total_steps(self) -> int | None:
        """The step after which the floor holds (None while the end is undecided)."""
        return None if self.decay_start is None else self.decay_start + self.decay_steps

    def decay_from(self, step: int, decay_steps: int) -> WarmupStableDecay:
        """The same schedule with its decay starting at ``step`` and lasting ``decay_steps`` steps.

        Use it to finish a run from a checkpoint taken in the stable phase: build the scheduler with the
        returned schedule, load the checkpoint's scheduler state, train ``decay_steps`` more steps.
        """
        _check_int("step", step, 0)
        if self.decay_start is not None and step > self.decay_start:
            raise ValueError(
                f"this schedule already decays from step {self.decay_start}; a checkpoint at step "
                f"{step} is not in the stable phase"
            )
        return replace(self, decay_start=step, decay_steps=decay_steps)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay_start is None or step < self.decay_start:
            return 1.0
        return ShapedDecay(self.decay_steps, self.shape, self.min_lr_ratio)(step - self.decay_start)


# ------------------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------------------
def join(pieces: Sequence[Schedule], boundaries: Sequence[int]) -> Join:
    """Run ``pieces[i]`` from ``boundaries[i - 1]`` on, each counting its steps from 0.

    Example:
        >>> f = join([LinearWarmup(100), ShapedDecay(900, "linear")], [100])
    """
    return Join(tuple(pieces), tuple(boundaries))


def with_warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """``schedule`` delayed by a linear warmup of ``warmup_steps`` steps (``schedule`` itself when 0)."""
    _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps == 0:
        return schedule
    return Join((LinearWarmup(warmup_steps), schedule), (warmup_steps,))


def _check_warmup_total(warmup_steps: int, total_steps: int) -> None:
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("total_steps", total_steps, 1)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps}): the warmup would "
            f"last the whole run; shorten the warmup (1-5% of training is usual) or train longer"
        )


def warmup_cosine(warmup_steps: int, total_steps: int, *, min_lr_ratio: float = 0.1) -> Schedule:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` x peak at the last step (``total_steps - 1``).

    The LLM pre-training default (GPT-3, LLaMA: floor 10% of the peak).

    Example:
        >>> f = warmup_cosine(2000, 100_000)   # f(1999) = 2000/2001, f(2000) = 1.0, f(99_999) = 0.1
    """
    _check_warmup_total(warmup_steps, total_steps)
    return with_warmup(ShapedDecay(total_steps - warmup_steps, "cosine", min_lr_ratio), warmup_steps)


def warmup_linear(warmup_steps: int, total_steps: int, *, min_lr_ratio: float = 0.0) -> Schedule:
    """Linear warmup, then linear decay to ``min_lr_ratio`` x peak at the last step (BERT, HF's default)."""
    _check_warmup_total(warmup_steps, total_steps)
    return with_warmup(ShapedDecay(total_steps - warmup_steps, "linear", min_lr_ratio), warmup_steps)


def warmup_constant(warmup_steps: int) -> Schedule:
    """Linear warmup, then the peak forever."""
    return with_warmup(Constant(1.0), warmup_steps)


def warmup_stable_decay(
    warmup_steps: int,
    total_steps: int | None = None,
    *,
    decay_steps: int | None = None,
    decay_fraction: float = 0.2,
    shape: DecayShape = "1-sqrt",
    min_lr_ratio: float = 0.0,
) -> WarmupStableDecay:
    """WSD: warmup, constant peak, decay over the last ``decay_steps`` (default: ``decay_fraction`` of it).

    ``total_steps=None`` gives the stable phase without an end; :meth:`WarmupStableDecay.decay_from` sets it.
    The 20% default cooldown with the 1-sqrt shape follows Hägele et al. 2024.

    Example:
        >>> f = warmup_stable_decay(1000, 50_000, decay_fraction=0.2, shape="1-sqrt")
        >>> g = warmup_stable_decay(1000).decay_from(30_000, decay_steps=6_000)  # end decided at step 30k
    """
    if total_steps is None:
        if decay_steps is not None:
            raise ValueError("decay_steps needs total_steps (or use .decay_from(step, decay_steps) later)")
        return WarmupStableDecay(warmup_steps, None, 0, shape, min_lr_ratio)
    _check_warmup_total(warmup_steps, total_steps)
    if decay_steps is None:
        _check_ratio("decay_fraction", decay_fraction)
        decay_steps = max(1, round(decay_fraction * total_steps))
    _check_int("decay_steps", decay_steps, 1)
    if decay_steps > total_steps - warmup_steps:
        raise ValueError(
            f"decay_steps ({decay_steps}) must be <= total_steps - warmup_steps ({total_steps - warmup_steps})"
        )
    return WarmupStableDecay(warmup_steps, total_steps - decay_steps, decay_steps, shape, min_lr_ratio)


def sgdr(T_0: int, T_mult: int = 1, *, min_lr_ratio: float = 0.0, warmup_steps: int = 0) -> Schedule:  # noqa: N803
    """Cosine annealing with warm restarts (SGDR), optionally after a linear warmup.

    Example:
        >>> f = sgdr(T_0=1000, T_mult=2, min_lr_ratio=0.1)   # restarts at 1000, 3000, 7000, ...
    """
    return with_warmup(SGDR(T_0, T_mult, min_lr_ratio), warmup_steps)


def inverse_sqrt(warmup_steps: int = 0, *, timescale: int | None = None) -> Schedule:
    """Inverse square root decay, optionally after a linear warmup.

    ``timescale`` defaults to ``warmup_steps`` (the Transformer paper's ``min(step^-0.5, step warmup^-1.5)``
    shape, continuous at the end of warmup) or 10 000 without warmup (Adafactor's relative step and T5).
    """
    _check_int("warmup_steps", warmup_steps, 0)
    if timescale is None:
        timescale = warmup_steps if warmup_steps > 0 else 10_000
    decay = InverseSqrt(timescale)
    if warmup_steps == 0:
        return decay
    # the decay sees the absolute step minus one, so it equals sqrt(timescale / max(step, timescale)) and is
    # exactly 1 at step == warmup_steps, where the warmup hands over
    return Join((LinearWarmup(warmup_steps), _Shifted(decay, warmup_steps - 1)), (warmup_steps,))


@dataclass(frozen=True)
class _Shifted:
    """``f(step + offset)``: lets a piece of a join see the absolute step."""

    schedule: Schedule
    offset: int

    def __call__(self, step: int) -> float:
        return float(self.schedule(_check_step(step) + self.offset))


# ------------------------------------------------------------------------------------------------------------
# the torch scheduler
# ------------------------------------------------------------------------------------------------------------
class ScheduleLR(LambdaLR):
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` driven by an lmopt schedule, with a minimal state.

    ``lr`` of group ``g`` after ``k`` calls of :meth:`step` is ``base_lr[g] * schedule(k)``, where
    ``base_lr`` is the group's ``lr`` when the scheduler was built (torch keeps it as ``initial_lr``).
    ``state_dict()`` holds only ``{"format": 1, "step": k, "base_lrs": [...]}``; ``load_state_dict`` restores
    them and sets every group's ``lr`` from the schedule, so the next update uses exactly the learning rate an
    uninterrupted run would. The schedule is not saved (it is code): rebuild it, or build a different one to
    change the end of a WSD run.

    Example:
        >>> sched = ScheduleLR(opt, warmup_cosine(100, 1000))
        >>> torch.save(sched.state_dict(), "s.pt")
        >>> ScheduleLR(opt2, warmup_cosine(100, 1000)).load_state_dict(torch.load("s.pt", weights_only=True))
    """

    STATE_FORMAT = 1

    def __init__(self, optimizer: Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        if not callable(schedule):
            raise ValueError(f"schedule must be callable as f(step), got {type(schedule).__name__}")
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, Tensor) and lr.numel() == 1:
                continue  # a tensor lr (no recompiles under torch.compile) is filled in place by torch
            if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)):
                raise ValueError(
                    f"param_groups[{i}]['lr'] must be a number for a schedule to scale it, got "
                    f"{lr!r} (an optimizer in relative-step mode has no lr to schedule)"
                )
        self.schedule = schedule
        super().__init__(optimizer, schedule, last_epoch)

    @property
    def current_step(self) -> int:
        """Optimizer steps taken so far (torch's ``last_epoch``)."""
        return int(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": self.STATE_FORMAT,
            "step": int(self.last_epoch),
            "base_lrs": [float(b) for b in self.base_lrs],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "step" not in state_dict:
            raise ValueError("not an lmopt ScheduleLR state (expected a dict with 'step' and 'base_lrs')")
        if int(state_dict.get("format", 1)) > self.STATE_FORMAT:
            raise ValueError(
                f"scheduler state format {state_dict['format']} is newer than this lmopt reads "
                f"({self.STATE_FORMAT}); upgrade lmopt"
            )
        base_lrs = list(state_dict["base_lrs"])
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"scheduler state has {len(base_lrs)} param groups, the optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        self.last_epoch = int(state_dict["step"])
        self._step_count = self.last_epoch + 1
        self.base_lrs = [float(b) for b in base_lrs]
        factor = float(self.schedule(self.last_epoch))
        values = [b * factor for b in self.base_lrs]
        for group, base, value in zip(self.optimizer.param_groups, self.base_lrs, values, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value
            if isinstance(group.get("initial_lr"), Tensor):
                group["initial_lr"].fill_(base)
            else:
                group["initial_lr"] = base
        self._last_lr = values


def scheduler(optimizer: Optimizer, schedule: Schedule) -> ScheduleLR:
    """A torch LR scheduler (a LambdaLR) scaling every group's learning rate by ``schedule(step)``."""
    return ScheduleLR(optimizer, schedule)


# ------------------------------------------------------------------------------------------------------------
# inspection
# ------------------------------------------------------------------------------------------------------------
def key_steps(warmup_steps: int, total_steps: int, extra: Sequence[int] = ()) -> list[int]:
    """The steps worth printing: 0, the warmup edges, quarters of the decay, the last step and one beyond."""
    steps = {0, total_steps - 1, total_steps}
    if warmup_steps > 0:
        steps |= {warmup_steps // 2, warmup_steps - 1, warmup_steps}
    decay = total_steps - warmup_steps
    steps |= {warmup_steps + decay * q // 4 for q in (1, 2, 3)}
    steps |= {int(s) for s in extra}
    return sorted(s for s in steps if s >= 0)


def describe(schedule: Schedule, steps: Sequence[int], peak: float = 1.0) -> list[tuple[int, float, float]]:
    """``(step, multiplier, learning rate)`` rows for ``steps``."""
    return [(int(s), float(schedule(int(s))), float(schedule(int(s))) * peak) for s in steps]
