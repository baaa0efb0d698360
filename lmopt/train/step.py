"""One optimizer update once the gradients are in: clip, judge non-finite values, step, zero, schedule.

:func:`optimizer_step` is the update both :func:`lmopt.train.fit` and ``lmopt compare``
(:func:`lmopt.bench.compare.train_step`) run after their backward passes:

1. :func:`lmopt.train.clip_grad_norm` (unscaling a GradScaler's gradients first; the norm is handed to lmopt
   optimizers through ``record_grad_norm``);
2. a non-finite loss or gradient norm (the norm only without a GradScaler, which skips overflowing fp16 steps
   itself) is handled by ``on_nonfinite``: ``"stop"`` zeroes the gradients and returns before the update
   (and before the scheduler), ``"skip"`` leaves the update out, ``"raise"`` steps anyway so that the
   optimizer's own policy decides (lmopt optimizers raise :class:`lmopt.NonFiniteGradientError`, or skip and
   count the step in ``skipped_steps`` when built with ``nonfinite="skip"``);
3. ``optimizer.step()`` (``scaler.step`` + ``scaler.update`` with a GradScaler);
4. ``optimizer.zero_grad(set_to_none=True)``;
5. ``scheduler.step()``: a skipped update still advances the schedule, as a GradScaler's skipped steps do.

Under torchrun (``distributed``, default: torch.distributed is initialised with more than one process) the
non-finite judgement is agreed before anyone acts on it: one all-reduce of a flag, so a NaN seen on one rank
only (its loss, its gradient shard) makes every rank stop, skip or raise at the same step -- never one rank
stepping into a collective the others skip. With ``"raise"`` every rank then hands its optimizer a non-finite
recorded norm, so that the optimizer's own policy decides the same on every rank. A GradScaler's overflow flags
(set per rank while unscaling) are all-reduced too, so every rank skips the same fp16 steps and keeps the same
scale.

Example:
    >>> loss = model(input_ids=x, labels=x).loss
    >>> loss.backward()
    >>> outcome = optimizer_step(optimizer, clip=1.0, loss=float(loss), scheduler=scheduler)
    >>> outcome.clip.norm, outcome.skipped
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from .clip import ClipResult, clip_grad_norm, record_grad_norm
from .distributed import agree, is_distributed

__all__ = ["NonFinitePolicy", "StepOutcome", "optimizer_step"]

NonFinitePolicy = Literal["stop", "skip", "raise"]


@dataclass(frozen=True)
class StepOutcome:
    """What :func:`optimizer_step` did.

    Attributes:
        clip: the pre-clip global gradient norm and the clip factor.
        nonfinite: the loss or (without a GradScaler) the gradient norm was not finite.
        applied: ``optimizer.step()`` (or ``scaler.step``) was called.
        skipped: the update was left out: by ``on_nonfinite="skip"``, or by the optimizer's own policy (its
            ``skipped_steps`` counter rose during the step). A GradScaler's own skips are not seen here.
        stopped: ``on_nonfinite="stop"`` returned before the update and the scheduler.
    """

    clip: ClipResult
    nonfinite: bool
    applied: bool
    skipped: bool
    stopped: bool


def _agree_found_inf(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
    """Make a GradScaler's overflow verdict global: its ``found_inf`` flags (one per device, set while unscaling
    this rank's gradients) are all-reduced with MAX, so every rank skips the same steps and keeps the same scale.
    FSDP2's DTensor unscale already reduces them; DDP ranks whose gradients differ after the all-reduce (a
    corrupted copy) would not agree without this."""
    import torch.distributed as dist

    state = scaler._per_optimizer_states[id(optimizer)]  # filled by unscale_ (clip_grad_norm ran it)
    for found_inf in state.get("found_inf_per_device", {}).values():
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)


def optimizer_step(
    optimizer: Optimizer,
    *,
    clip: float | None,
    loss: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: Any = None,
    on_nonfinite: NonFinitePolicy = "stop",
    distributed: bool | None = None,
) -> StepOutcome:
    """Clip, step (or skip / stop on non-finite values), zero the gradients and step the scheduler.

    Args:
        optimizer: the optimizer whose parameters hold this step's gradients.
        clip: global gradient-norm threshold; None measures the norm without clipping.
        loss: the step's loss (a non-finite one counts like a non-finite gradient norm).
        scaler: a GradScaler (fp16): gradients are unscaled before clipping, the step goes through it.
        scheduler: an LR scheduler stepped once per update (also after a skipped one; not after a stop).
        on_nonfinite: ``"stop"``, ``"skip"`` or ``"raise"`` (see the module docstring).
        distributed: agree on the non-finite judgement across ranks (None: when torch.distributed is
            initialised with more than one process). Every rank of the default group must call this.

    Returns:
        :class:`StepOutcome`.
    """
    if on_nonfinite not in ("stop", "skip", "raise"):
        raise ValueError(f"on_nonfinite must be 'stop', 'skip' or 'raise', got {on_nonfinite!r}")
    clipped = clip_grad_norm(optimizer, clip, scaler=scaler)
    agreeing = is_distributed() if distributed is None else distributed
    if agreeing and scaler is not None and scaler.is_enabled():
        _agree_found_inf(scaler, optimizer)
    # with a GradScaler, overflowing fp16 gradients are routine: the scaler skips those steps itself
    local = not math.isfinite(loss) or (scaler is None and not bool(torch.isfinite(clipped.norm)))
    nonfinite = agree(local) if agreeing else local
    if nonfinite and agreeing:
        # some rank saw a NaN: every rank's optimizer (its own policy, under "raise") must see the same record,
        # and run the same (collective, for DTensor gradients) search for the culprit
        record_grad_norm(optimizer, torch.tensor(float("nan")))
    if nonfinite and on_nonfinite == "stop":
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(clipped, nonfinite=True, applied=False, skipped=False, stopped=True)
    applied = not (nonfinite and on_nonfinite == "skip")
    skipped = not applied
    if applied and scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif applied:
        before = getattr(optimizer, "skipped_steps", None)
        optimizer.step()
        skipped = before is not None and optimizer.skipped_steps > before
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        with warnings.catch_warnings():
            # a skipped update still advances the schedule (as with a GradScaler's skipped steps)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            scheduler.step()
    return StepOutcome(clipped, nonfinite=nonfinite, applied=applied, skipped=skipped, stopped=False)
