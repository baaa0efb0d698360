"""A minimal reference training loop that uses all of lmopt's training practice.

:func:`fit` runs ``steps`` optimizer steps: gradient accumulation over ``accumulation_steps`` micro-batches
(by 1/k or by tokens), an optional GradScaler (unscaled before clipping), global-norm clipping (the norm is
handed to the optimizer so it skips its own finiteness pass), z-loss, the LR scheduler, the health monitor,
complete checkpoints every ``checkpoint_every`` steps and on SIGTERM/SIGINT, and resumption from the newest
checkpoint in ``checkpoint_dir``. Progress goes to callbacks; nothing is printed.

Under torchrun (``distributed``; default: torch.distributed is initialised with more than one process) every
rank runs ``fit`` on its own part of the global batch, with a DDP model (``DistributedDataParallel``) or an
FSDP2 one (``fully_shard``). The gradient norm is global (FSDP2: over every shard; DDP: of the all-reduced
gradients, counted once), the reported loss and tokens are the global batch's, the health monitor's
statistics are reduced and logged by rank 0 only, and every decision that ends or skips a step (a non-finite
loss or gradient on any rank, the data running out on any rank, a callback's stop, a preemption signal) is
agreed by an all-reduce before any rank acts on it, so that no rank waits in a collective the others left.

Example:
    >>> model = MyLM()
    >>> r = lmopt.recipe("125M", optimizer="adamw", total_steps=1000)
    >>> optimizer, scheduler = r.build(model)
    >>> result = lmopt.train.fit(model, optimizer, batches, steps=1000, scheduler=scheduler,
    ...                          accumulation_steps=4, clip=r.grad_clip, z_loss=1e-4,
    ...                          checkpoint_dir="ckpt", checkpoint_every=200,
    ...                          callbacks=[lambda info: print(info.step, info.loss, info.tokens_per_s)])

A batch is ``(inputs, targets)`` (token ids, already shifted for next-token prediction; ``-100`` ignored), or
a dict with ``input_ids`` and ``labels`` (labels are shifted here, as Hugging Face models do), or anything a
custom ``loss_fn(model, batch)`` understands.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .accumulate import GradientAccumulator
from .checkpoint import CheckpointManager, PreemptionHandler
from .distributed import agree, all_reduce_sum, is_distributed
from .monitor import HealthEvent, HealthMonitor
from .step import NonFinitePolicy, optimizer_step
from .zloss import cross_entropy_with_z_loss

__all__ = ["FitResult", "StepInfo", "fit", "lm_loss"]


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback receives after each optimizer step."""

    step: int
    loss: float
    tokens: int
    tokens_per_s: float
    lr: float
    grad_norm: float | None
    clip_factor: float | None
    elapsed_s: float
    events: tuple[HealthEvent, ...] = ()


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        step: optimizer steps taken in total (including those before a resume).
        losses: mean loss of each step run in this call.
        stopped_by: None (all steps ran), ``"SIGTERM"``/``"SIGINT"`` (preempted, checkpoint saved),
            ``"callback"`` (a callback returned True), ``"data"`` (the batches ran out) or ``"nonfinite"``
            (the loss or gradients became NaN/inf: diverged; the last update was not applied).
        resumed_from: the checkpoint this call resumed from, if any.
        last_checkpoint: the last checkpoint written, if any.
        events: health events raised in this call.
        tokens: tokens processed in this call.
        elapsed_s: wall time of this call.
        skipped_steps: updates skipped for a non-finite loss or gradient norm (``on_nonfinite="skip"``).
    """

    step: int
    losses: list[float] = field(default_factory=list)
    stopped_by: str | None = None
    resumed_from: str | None = None
    last_checkpoint: str | None = None
    events: list[HealthEvent] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise ValueError("the model's output has no logits; pass loss_fn=... for this model")
    return logits


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError("a dict batch needs 'input_ids' (and 'labels'); or pass loss_fn=...")
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        # Hugging Face convention: labels align with inputs; predict token t+1 from tokens <= t
        return ids, torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("a batch must be (inputs, targets) or a dict with input_ids/labels; or pass loss_fn=...")


def lm_loss(model: nn.Module, batch: Any, *, z_loss: float = 0.0) -> tuple[Tensor, int]:
    """Next-token cross-entropy (+ PaLM z-loss) of ``model`` on ``batch``; returns ``(mean loss, tokens)``."""
    inputs, targets = _split_batch(batch)
    logits = _logits_of(model(inputs))
    loss, _ = cross_entropy_with_z_loss(logits, targets, z_loss_weight=z_loss)
    return loss, int((targets != -100).sum())


def _batch_iterator(batches: Iterable[Any] | Callable[[int], Iterable[Any]], position: int) -> Iterator[Any]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return iter(batches(position))  # the source starts at the position itself (e.g. a seekable dataset)
    iterator = iter(batches)
    if position:
        # a plain iterable restarts from its beginning: skip what the checkpointed run consumed
        for _ in itertools.islice(iterator, position):
            pass
    return iterator


def fit(
    model: nn.Module,
    optimizer: Optimizer,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    *,
    steps: int,
    scheduler: Any = None,
    loss_fn: Callable[[nn.Module, Any], Tensor | tuple[Tensor, int]] | None = None,
    accumulation_steps: int = 1,
    accumulation_weighting: Literal["mean", "tokens"] = "mean",
    clip: float | None = 1.0,
    z_loss: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    monitor: HealthMonitor | bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_last: int = 3,
    resume: bool = True,
    config: dict[str, Any] | None = None,
    callbacks: Sequence[Callable[[StepInfo], bool | None]] = (),
    handle_signals: bool = True,
    on_nonfinite: NonFinitePolicy = "stop",
    distributed: bool | None = None,
) -> FitResult:
    """Train ``model`` for ``steps`` optimizer steps (in total, counting steps before a resume).

    Args:
        model: the model (in train mode while fitting).
        optimizer: any torch optimizer (lmopt's get the clip norm through ``record_grad_norm``).
        batches: an iterable of micro-batches, or a callable ``batches(position)`` returning an iterator that
            starts at micro-batch ``position`` (fast resume). A plain iterable is skipped forward on resume,
            so it must yield the same sequence each time it is iterated.
        steps: total optimizer steps.
        scheduler: an LR scheduler stepped once per optimizer step (e.g. ``Recipe.build_scheduler``).
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, tokens)``; default :func:`lm_loss`.
        accumulation_steps: micro-batches per optimizer step.
        accumulation_weighting: ``"mean"`` (1/k) or ``"tokens"`` (by each micro-batch's token count).
        clip: global gradient-norm threshold; None measures the norm without clipping.
        z_loss: PaLM z-loss weight for the default loss (PaLM and Falcon: 1e-4; default 0).
        scaler: a GradScaler (fp16); losses are scaled, gradients unscaled before clipping.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype.
        monitor: a :class:`HealthMonitor`, True for a default one, False for none.
        checkpoint_dir: where checkpoints go; the newest one there is resumed from when ``resume``.
        checkpoint_every: save every this many steps (and always at the end and on preemption).
        keep_last: checkpoints kept.
        resume: resume from the newest checkpoint in ``checkpoint_dir`` if there is one.
        config: the run's configuration, stored in checkpoints.
        callbacks: called with a :class:`StepInfo` after each step; returning True stops the run (a
            checkpoint is saved when ``checkpoint_dir`` is set).
        handle_signals: on SIGTERM/SIGINT finish the current step, save a checkpoint (when
            ``checkpoint_dir`` is set) and return.
        on_nonfinite: a NaN/inf loss or gradient norm (the latter without a GradScaler, which handles its
            own) ``"stop"``s the run before the update (``stopped_by="nonfinite"``: diverged), ``"skip"``s the
            update (counted in ``skipped_steps``), or ``"raise"``: the optimizer's own policy decides (lmopt
            optimizers raise :class:`lmopt.NonFiniteGradientError` by default). Under torchrun every rank takes
            the same decision (the judgement is all-reduced first).
        distributed: run as one rank of a torchrun job (None: when torch.distributed is initialised with more
            than one process): reduce the loss, tokens and monitor statistics, agree on every decision that
            ends or skips a step. ``batches`` is then this rank's share of each global batch.

    Returns:
        :class:`FitResult`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an integer >= 1 or None, got {checkpoint_every!r}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")
    if loss_fn is not None and z_loss:
        raise ValueError(
            "z_loss applies to the default loss; with a custom loss_fn add z_loss there (lmopt.train.z_loss)"
        )
    if on_nonfinite not in ("stop", "skip", "raise"):
        raise ValueError(f"on_nonfinite must be 'stop', 'skip' or 'raise', got {on_nonfinite!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"z_loss must be a number >= 0, got {z_loss!r}")
    reducing = is_distributed() if distributed is None else bool(distributed)
    accumulator = GradientAccumulator(
        optimizer,
        accumulation_steps,
        weighting=accumulation_weighting,
        scaler=scaler,
        model=model,
        distributed=reducing,
    )
    health = HealthMonitor(distributed=reducing) if monitor is True else (monitor or None)
    manager = CheckpointManager(checkpoint_dir, keep_last=keep_last) if checkpoint_dir is not None else None

    step = 0
    result = FitResult(step=0)
    if manager is not None and resume:
        state = manager.load_latest(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if state is not None:
            step = state.step
            position = int(state.data_position or 0)
            result.resumed_from = str(state.path)
            if health is not None and "monitor" in state.extra:
                health.load_state_dict(state.extra["monitor"])
        else:
            position = 0
    else:
        position = 0
    result.step = step

    def save() -> None:
        if manager is None:
            return
        extra = {"monitor": health.state_dict()} if health is not None else {}
        path = manager.save(
            step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            data_position=position,
            config=config,
            extra=extra,
        )
        result.last_checkpoint = str(path)

    compute = loss_fn if loss_fn is not None else (lambda m, b: lm_loss(m, b, z_loss=z_loss))
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    iterator = _batch_iterator(batches, position)
    model.train()
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # optimizers with modes (Schedule-Free) train in train mode
    start = time.perf_counter()
    last_saved = step
    handler = PreemptionHandler() if handle_signals else None
    with handler if handler is not None else contextlib.nullcontext():
        while step < steps:
            t0 = time.perf_counter()
            # the step's micro-batches first: a rank whose data ran out must not leave the others in a backward
            micro_batches = list(itertools.islice(iterator, accumulation_steps))
            short = len(micro_batches) < accumulation_steps
            if agree(short) if reducing else short:
                result.stopped_by = "data"  # an incomplete step is dropped, not trained on
                break
            for batch in micro_batches:
                position += 1
                with accumulator.micro_batch():  # DDP: no_sync() around forward and backward but the last
                    if autocast_dtype is not None:
                        with torch.autocast(device_type, dtype=autocast_dtype):
                            out = compute(model, batch)
                    else:
                        out = compute(model, batch)
                    loss, tokens = out if isinstance(out, tuple) else (out, None)
                    accumulator.backward(loss, tokens=tokens)
            loss_value = float(accumulator.finish())  # under torchrun: the global batch's mean loss
            micro_tokens = accumulator.global_tokens
            if health is not None:
                health.before_step(step, optimizer)  # snapshots the parameters (not the gradients)
            lr = float(optimizer.param_groups[0]["lr"])
            outcome = optimizer_step(
                optimizer,
                clip=clip,
                loss=loss_value,
                scaler=scaler,
                scheduler=scheduler,
                on_nonfinite=on_nonfinite,
                distributed=reducing,
            )
            clipped = outcome.clip
            if outcome.stopped:
                if health is not None:
                    result.events.extend(health.after_step(step, loss=loss_value, clip=clipped))
                result.stopped_by = "nonfinite"
                break
            if not outcome.applied:
                result.skipped_steps += 1
            events: list[HealthEvent] = []
            if health is not None:
                events = health.after_step(step, loss=loss_value, clip=clipped, optimizer=optimizer)
                result.events.extend(events)
            step += 1
            result.step = step
            result.losses.append(loss_value)
            result.tokens += micro_tokens
            now = time.perf_counter()
            info = StepInfo(
                step=step,
                loss=loss_value,
                tokens=micro_tokens,
                tokens_per_s=micro_tokens / max(now - t0, 1e-9),
                lr=lr,
                grad_norm=float(clipped.norm),
                clip_factor=float(clipped.factor),
                elapsed_s=now - start,
                events=tuple(events),
            )
            stop = False
            for callback in callbacks:
                stop = bool(callback(info)) or stop
            if checkpoint_every is not None and step % checkpoint_every == 0:
                save()
                last_saved = step
            requested = handler.requested if handler is not None else None
            if reducing:  # a signal or a callback's stop on one rank stops every rank at this step
                stop_sum, signal_sum = all_reduce_sum([float(stop), float(requested is not None)])
                stop, requested = stop_sum > 0, (requested or "SIGTERM") if signal_sum > 0 else None
            if requested:
                result.stopped_by = requested
                break
            if stop:
                result.stopped_by = "callback"
                break
        if manager is not None and step != last_saved:
            save()
    result.elapsed_s = time.perf_counter() - start
    return result
