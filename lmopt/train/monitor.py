"""Training health monitor: loss spikes, gradient norms, clip rate, update/parameter ratios, NaN/inf.

The monitor watches what a training loop already has (the loss, the pre-clip gradient norm and clip factor
from :func:`lmopt.train.clip_grad_norm`, the optimizer) and returns :class:`HealthEvent` records -- data, each
with a plain-language suggestion drawn from known remedies. Events are also logged on the ``lmopt.train``
logger (warnings and errors); nothing is printed.

Checks:

* **loss spike** -- loss above ``running mean + spike_sigmas x running std`` of the last ``window`` losses
  (after ``min_history`` steps); a non-finite loss is an error;
* **gradient-norm spike** -- the same test on the pre-clip gradient norm; a non-finite norm is an error;
* **clip rate** -- the fraction of the last ``window`` steps that were clipped, above ``max_clip_rate``;
* **update/parameter RMS ratio** per param group, every ``ratio_every`` steps: ``rms(p_after - p_before) /
  rms(p_before)``, outside ``ratio_bounds`` (a healthy AdamW run sits near 1e-3);
* **non-finite optimizer state** every ``state_every`` steps (one inf-norm per state tensor).

Under torchrun (``distributed``; default: torch.distributed is initialised with more than one process) the
statistics are global: update/parameter ratios sum each rank's local shard (FSDP2 DTensors; a replicated tensor,
as under DDP, counted once) in one all-reduce, the non-finite state scan counts bad tensors over all ranks, and
loss / gradient-norm spikes are judged on the values the loop passes, which :func:`lmopt.train.fit` reduces
first (the global batch's loss, the global gradient norm). Every rank therefore returns the same events; only
rank 0 logs them. Every rank must call :meth:`HealthMonitor.after_step` at the same steps.

Example:
    >>> monitor = HealthMonitor()
    >>> monitor.before_step(step, optimizer)            # snapshots parameters on ratio steps only
    >>> optimizer.step()
    >>> for event in monitor.after_step(step, loss=loss, clip=clip_result, optimizer=optimizer):
    ...     handle(event)                               # or read monitor.events later
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import all_reduce_sum, is_distributed, is_main_process, local_part

__all__ = ["HealthEvent", "HealthMonitor", "SUGGESTIONS"]

logger = logging.getLogger("lmopt.train")
logger.addHandler(logging.NullHandler())  # a library logs; the application decides what is shown

Severity = Literal["info", "warning", "error"]

#: the known remedies, by event kind
SUGGESTIONS: dict[str, str] = {
    "loss_spike": (
        "Loss jumped far above its recent range. Inspect the batch at this data position (bad or repeated "
        "data), lower the peak learning rate, or lengthen the warmup; if spikes recur, check the clip "
        "threshold and consider z-loss (PaLM) or a lower beta2 (0.95)."
    ),
    "loss_nonfinite": (
        "The loss is NaN/inf. Resume from the last checkpoint with a lower peak learning rate or a longer "
        "warmup, inspect the batch at this data position, and in fp16 use a GradScaler (or train in bf16)."
    ),
    "grad_norm_spike": (
        "The gradient norm jumped far above its recent range. Inspect the batch; if it recurs, lower the "
        "peak learning rate or lengthen the warmup; clipping (max_norm 1.0) bounds the update meanwhile."
    ),
    "grad_nonfinite": (
        "A gradient holds NaN/inf; the step should be skipped. Lower the learning rate, check the batch, "
        "and with fp16 make sure the GradScaler unscales before clipping."
    ),
    "clip_rate_high": (
        "Most recent steps were clipped: the clip threshold may be too low for this model, or the learning "
        "rate too high. Check the gradient-norm history before raising the threshold."
    ),
    "update_ratio_high": (
        "Updates are large relative to the weights (update/parameter RMS ratio above the healthy ~1e-3): "
        "lower the peak learning rate or lengthen the warmup."
    ),
    "update_ratio_low": (
        "Updates are tiny relative to the weights: the learning rate may be too low for this group (or the "
        "group is effectively frozen); check the schedule and per-group learning rates."
    ),
    "state_nonfinite": (
        "The optimizer state holds NaN/inf: training cannot recover from it. Resume from the last good "
        "checkpoint with a lower learning rate; with low-precision state, try fp32 state for this run."
    ),
}


@dataclass(frozen=True)
class HealthEvent:
    """One finding: ``kind`` (a key of :data:`SUGGESTIONS`), what was seen, and what to try."""

    step: int
    kind: str
    severity: Severity
    message: str
    suggestion: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Running:
    """Mean and standard deviation of the last ``window`` values."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def stats(self) -> tuple[float, float]:
        n = len(self.values)
        mean = sum(self.values) / n
        var = sum((v - mean) ** 2 for v in self.values) / max(1, n - 1)
        return mean, math.sqrt(var)


def _squared_sums(before: Sequence[Tensor], after: Sequence[Tensor]) -> tuple[Tensor, Tensor, int]:
    """``(sum (after - before)^2, sum before^2, elements)`` of this rank's part, each element of a sharded or
    replicated tensor weighted by 1 / (ranks holding it), so that summing over ranks counts it once."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    count = 0
    for a, b in zip(after, before, strict=True):
        a_local, copies = local_part(a)
        b_local, _ = local_part(b)
        num += (a_local.float() - b_local.float()).square().sum().double().cpu() / copies
        den += b_local.float().square().sum().double().cpu() / copies
        count += b.numel()  # the global shape's elements (the same on every rank)
    return num, den, count


def _rms_ratio_from(num: float, den: float, count: int) -> float:
    if count == 0:
        return 0.0
    return math.sqrt(num / count) / max(math.sqrt(den / count), 1e-12)


class HealthMonitor:
    """Watch a training run and report problems as :class:`HealthEvent` data with suggestions.

    Args:
        window: steps in the running statistics (default 100).
        min_history: steps before spikes are judged (default 20).
        spike_sigmas: a value above ``mean + spike_sigmas * std`` is a spike (default 6).
        max_clip_rate: clip rate over the window above which an event is raised (default 0.5).
        ratio_every: measure update/parameter ratios every this many steps (0: never; default 100).
        ratio_bounds: healthy range of the update/parameter RMS ratio (default (1e-6, 1e-2)).
        state_every: scan the optimizer state for non-finite values every this many steps (0: never; 100).
        log: log events on the ``lmopt.train`` logger (default True; rank 0 only under torchrun).
        distributed: reduce the statistics over all ranks (None: when torch.distributed is initialised with
            more than one process).
    """

    def __init__(
        self,
        *,
        window: int = 100,
        min_history: int = 20,
        spike_sigmas: float = 6.0,
        max_clip_rate: float = 0.5,
        ratio_every: int = 100,
        ratio_bounds: tuple[float, float] = (1e-6, 1e-2),
        state_every: int = 100,
        log: bool = True,
        distributed: bool | None = None,
    ) -> None:
        for name, value, low in (
            ("window", window, 2),
            ("min_history", min_history, 2),
            ("ratio_every", ratio_every, 0),
            ("state_every", state_every, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if min_history > window:
            raise ValueError(f"min_history ({min_history}) must be <= window ({window})")
        if isinstance(spike_sigmas, bool) or not isinstance(spike_sigmas, (int, float)) or not spike_sigmas > 0:
            raise ValueError(f"spike_sigmas must be a number > 0, got {spike_sigmas!r}")
        if not isinstance(max_clip_rate, (int, float)) or not 0.0 <= max_clip_rate <= 1.0:
            raise ValueError(f"max_clip_rate must be in [0, 1], got {max_clip_rate!r}")
        if (
            not isinstance(ratio_bounds, (tuple, list))
            or len(ratio_bounds) != 2
            or not 0 <= ratio_bounds[0] < ratio_bounds[1]
        ):
            raise ValueError(f"ratio_bounds must be (low, high) with 0 <= low < high, got {ratio_bounds!r}")
        self.window = window
        self.min_history = min_history
        self.spike_sigmas = float(spike_sigmas)
        self.max_clip_rate = float(max_clip_rate)
        self.ratio_every = ratio_every
        self.ratio_bounds = (float(ratio_bounds[0]), float(ratio_bounds[1]))
        self.state_every = state_every
        self.log = log
        self.distributed = distributed
        self._loss = _Running(window)
        self._grad = _Running(window)
        self._clipped: deque[bool] = deque(maxlen=window)
        self._snapshot: list[list[Tensor]] | None = None
        self.events: list[HealthEvent] = []
        self.grad_norms: deque[float] = self._grad.values
        self.losses: deque[float] = self._loss.values
        self.update_ratios: dict[int, list[tuple[int, float]]] = {}
        self._clip_event_open = False

    # -- the two hooks ---------------------------------------------------------------------------------------
    def before_step(self, step: int, optimizer: Optimizer) -> None:
        """Call before ``optimizer.step()``: snapshots the parameters on steps where ratios are measured."""
        if self.ratio_every and step % self.ratio_every == 0:
            self._snapshot = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
        else:
            self._snapshot = None

    def after_step(
        self,
        step: int,
        *,
        loss: float | Tensor | None = None,
        grad_norm: float | Tensor | None = None,
        clip_factor: float | Tensor | None = None,
        clip: Any = None,
        optimizer: Optimizer | None = None,
    ) -> list[HealthEvent]:
        """Judge one finished step; return (and record) the events it raised.

        ``clip`` may be a :class:`lmopt.train.ClipResult`, giving ``grad_norm`` and ``clip_factor`` at once.
        """
        if clip is not None:
            grad_norm, clip_factor = clip.norm, clip.factor
        found: list[HealthEvent] = []
        if loss is not None:
            found += self._check_value(step, float(loss), self._loss, "loss")
        if grad_norm is not None:
            found += self._check_value(step, float(grad_norm), self._grad, "grad_norm")
        if clip_factor is not None:
            found += self._check_clip(step, float(clip_factor))
        if optimizer is not None and self._snapshot is not None:
            found += self._check_ratios(step, optimizer)
        self._snapshot = None
        if optimizer is not None and self.state_every and step % self.state_every == 0:
            found += self._check_state(step, optimizer)
        for event in found:
            self.events.append(event)
            if self.log and event.severity != "info" and is_main_process():
                level = logging.ERROR if event.severity == "error" else logging.WARNING
                logger.log(level, "step %d: %s -- %s", event.step, event.message, event.suggestion)
        return found

    # -- checks ----------------------------------------------------------------------------------------------
    def _event(self, step: int, kind: str, severity: Severity, message: str, **data: Any) -> HealthEvent:
        return HealthEvent(step, kind, severity, message, SUGGESTIONS[kind], data)

    def _check_value(self, step: int, value: float, running: _Running, name: str) -> list[HealthEvent]:
        label = "loss" if name == "loss" else "gradient norm"
        if not math.isfinite(value):
            kind = "loss_nonfinite" if name == "loss" else "grad_nonfinite"
            return [self._event(step, kind, "error", f"{label} is {value}", value=value)]
        out = []
        if len(running.values) >= self.min_history:
            mean, std = running.stats()
            limit = mean + self.spike_sigmas * max(std, 1e-8 * max(abs(mean), 1.0))
            if value > limit:
                kind = "loss_spike" if name == "loss" else "grad_norm_spike"
                sigmas = (value - mean) / max(std, 1e-12)
                out.append(
                    self._event(
                        step,
                        kind,
                        "warning",
                        f"{label} {value:.4g} is {sigmas:.1f} standard deviations above its running "
                        f"mean {mean:.4g} (last {len(running.values)} steps)",
                        value=value,
                        mean=mean,
                        std=std,
                    )
                )
        running.values.append(value)
        return out

    def _check_clip(self, step: int, factor: float) -> list[HealthEvent]:
        self._clipped.append(math.isfinite(factor) and factor < 1.0)
        if len(self._clipped) < self.min_history:
            return []
        rate = sum(self._clipped) / len(self._clipped)
        if rate > self.max_clip_rate and not self._clip_event_open:
            self._clip_event_open = True  # one event per episode, not one per step
            return [
                self._event(
                    step,
                    "clip_rate_high",
                    "warning",
                    f"{rate:.0%} of the last {len(self._clipped)} steps were clipped",
                    rate=rate,
                )
            ]
        if rate <= self.max_clip_rate:
            self._clip_event_open = False
        return []

    @property
    def clip_rate(self) -> float:
        """Fraction of the last ``window`` steps that were clipped."""
        return sum(self._clipped) / len(self._clipped) if self._clipped else 0.0

    def _reducing(self) -> bool:
        return is_distributed() if self.distributed is None else self.distributed

    @torch.no_grad()
    def _check_ratios(self, step: int, optimizer: Optimizer) -> list[HealthEvent]:
        out = []
        measured: list[tuple[int, dict[str, Any], int]] = []
        sums: list[Tensor] = []
        for gi, (group, before) in enumerate(zip(optimizer.param_groups, self._snapshot or [], strict=False)):
            after = [p.detach() for p in group["params"]]
            if len(after) != len(before) or not after:
                continue
            num, den, count = _squared_sums(before, after)
            measured.append((gi, group, count))
            sums += [num, den]
        # one all-reduce for every group's sums (each rank holds its shards; replicated tensors counted once)
        totals = all_reduce_sum(sums) if self._reducing() else [float(v) for v in sums]
        for k, (gi, group, count) in enumerate(measured):
            ratio = _rms_ratio_from(totals[2 * k], totals[2 * k + 1], count)
            self.update_ratios.setdefault(gi, []).append((step, ratio))
            name = group.get("name", f"group {gi}")
            low, high = self.ratio_bounds
            if not math.isfinite(ratio) or ratio > high:
                out.append(
                    self._event(
                        step,
                        "update_ratio_high",
                        "warning",
                        f"update/parameter RMS ratio {ratio:.3g} in {name} is above {high:g}",
                        group=gi,
                        ratio=ratio,
                    )
                )
            elif ratio < low and any(p.grad is not None for p in group["params"]):
                out.append(
                    self._event(
                        step,
                        "update_ratio_low",
                        "warning",
                        f"update/parameter RMS ratio {ratio:.3g} in {name} is below {low:g}",
                        group=gi,
                        ratio=ratio,
                    )
                )
        return out

    @torch.no_grad()
    def _check_state(self, step: int, optimizer: Optimizer) -> list[HealthEvent]:
        names = {}
        for gi, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                pn = group.get("param_names")
                names[p] = pn[i] if pn and i < len(pn) else f"param_groups[{gi}]['params'][{i}]"
        first: tuple[str, str] | None = None
        bad = 0.0  # bad tensors, a tensor held by several ranks (replicated under DDP) counted once
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if not (isinstance(value, Tensor) and value.is_floating_point() and value.numel()):
                    continue
                local, copies = local_part(value)  # this rank's shard: judged here, counted over ranks below
                if local.numel() == 0:
                    continue
                try:
                    # the max-norm propagates NaN/inf and reduces without a full-size temporary
                    finite = bool(torch.isfinite(torch.linalg.vector_norm(local, float("inf"))))
                except (NotImplementedError, RuntimeError, TypeError):
                    continue  # a tensor subclass (quantized state) without this reduction: not judged here
                if not finite:
                    bad += 1.0 / copies if self._reducing() else 1.0
                    if first is None:
                        first = (key, names.get(p, f"a parameter of shape {tuple(p.shape)}"))
            if first is not None and not self._reducing():
                break  # one process: the first bad tensor is enough
        if self._reducing():
            # every rank scans its own shards; one all-reduce tells all of them how many tensors are bad
            # (a NaN in one replica only still counts as one tensor: ceil)
            bad = math.ceil(all_reduce_sum([bad])[0] - 1e-9)
        bad = int(bad)
        if not bad:
            return []
        key, where = first if first is not None else ("?", "a parameter held by another rank")
        count = f" ({bad} state tensors over all ranks)" if self._reducing() else ""
        return [
            self._event(
                step,
                "state_nonfinite",
                "error",
                f"optimizer state '{key}' of {where} holds NaN/inf{count}",
                state=key,
                parameter=where,
                tensors=bad,
            )
        ]

    # -- persistence: a resumed run judges spikes against the same history ------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self._loss.values),
            "grad_norms": list(self._grad.values),
            "clipped": list(self._clipped),
            "clip_event_open": self._clip_event_open,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loss.values.clear()
        self._loss.values.extend(float(v) for v in state.get("losses", []))
        self._grad.values.clear()
        self._grad.values.extend(float(v) for v in state.get("grad_norms", []))
        self._clipped.clear()
        self._clipped.extend(bool(v) for v in state.get("clipped", []))
        self._clip_event_open = bool(state.get("clip_event_open", False))

    def summary(self) -> dict[str, Any]:
        """Counts of events by kind, the clip rate, the last gradient norm and loss."""
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        return {
            "events": counts,
            "clip_rate": self.clip_rate,
            "last_grad_norm": self._grad.values[-1] if self._grad.values else None,
            "last_loss": self._loss.values[-1] if self._loss.values else None,
        }
