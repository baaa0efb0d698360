"""Gradient release: update each parameter during backward, as soon as its gradient is complete, and free it.

A normal step keeps every gradient alive between ``backward()`` and ``optimizer.step()``: for fp32 training
that
is 4 bytes per parameter at the peak. With :class:`GradientRelease`, a post-accumulate-grad hook on each
parameter
runs the optimizer's update for that one parameter the moment autograd has finished its gradient, then sets
``param.grad = None``; the full set of gradients never exists at once (LOMO, Lv et al. 2023; optimi's gradient
release). The update is the optimizer's own (same state, same math), so any lmopt optimizer whose update of a
parameter needs only that parameter's gradient works: its registry entry has ``per_parameter=True``.

What it cannot do, by construction:

* **global-norm gradient clipping** needs the norm of all gradients before any update; it is impossible here.
  Use ``max_grad_norm_per_parameter`` (each gradient clipped to this norm on its own) or ``max_grad_value``.
* the non-finite policy acts per parameter: ``nonfinite="raise"`` raises from ``backward()`` after earlier
  parameters were already updated; ``"skip"`` skips only the parameters whose gradient is not finite (counted
  in
  ``skipped_updates``). A whole-step skip needs all gradients first.
* optimizers whose step couples parameters (Schedule-Free's per-group step counter and averaging weights,
  Lookahead's group synchronisation, Adam-mini-style shared statistics) are refused.
* a GradScaler (fp16 loss scaling) must unscale before the update: use bf16 or fp32 instead.

Gradient accumulation: with ``accumulation_steps=N`` the hooks leave gradients to accumulate on the first
``N - 1`` backward passes and update (and free) on the N-th. Call :meth:`GradientRelease.step` after every
backward pass: it counts micro-batches (the updates themselves already happened during backward).

Example:
    >>> opt = lmopt.AdamW(model.parameters(), lr=3e-4)
    >>> release = GradientRelease(opt, accumulation_steps=4, max_grad_norm_per_parameter=1.0)
    >>> for batch in loader:
    ...     (loss_fn(model, batch) / 4).backward()   # the 4th backward updates the parameters
    ...     release.step()
    >>> release.remove()                             # back to ordinary optimizer.step()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .base import LmoptOptimizer, NonFiniteGradientError, check_positive

__all__ = ["GradientRelease"]


def _spec_allows_release(optimizer: LmoptOptimizer) -> bool:
    from ..registry import list_optimizers

    specs = [s for s in list_optimizers() if s.cls is type(optimizer)]
    return all(s.per_parameter for s in specs)


class GradientRelease:
    """Update ``optimizer``'s parameters during backward and free their gradients (see the module docstring).

    Args:
        optimizer: an :class:`lmopt.LmoptOptimizer` whose registry entry has ``per_parameter=True``.
        accumulation_steps: backward passes per update (default 1).
        max_grad_norm_per_parameter: clip each parameter's gradient to this L2 norm before its update
            (the per-parameter stand-in for global-norm clipping); None (default) for no clipping.
        max_grad_value: clamp gradient entries to ``[-v, v]``; None (default) for no clamping.

    Attributes:
        micro_step: backward passes counted so far by :meth:`step`.
        skipped_updates: parameter updates skipped for non-finite gradients (``nonfinite="skip"``).
    """

    def __init__(
        self,
        optimizer: LmoptOptimizer,
        *,
        accumulation_steps: int = 1,
        max_grad_norm_per_parameter: float | None = None,
        max_grad_value: float | None = None,
    ) -> None:
        if not isinstance(optimizer, LmoptOptimizer):
            raise ValueError(f"optimizer must be an lmopt optimizer (LmoptOptimizer), got {type(optimizer).__name__}")
        if not _spec_allows_release(optimizer):
            raise ValueError(
                f"{type(optimizer).__name__} couples parameters in its step (per_parameter=False "
                f"in the registry); gradient release needs a per-parameter update"
            )
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if max_grad_norm_per_parameter is not None:
            check_positive("max_grad_norm_per_parameter", max_grad_norm_per_parameter)
        if max_grad_value is not None:
            check_positive("max_grad_value", max_grad_value)
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm_per_parameter = max_grad_norm_per_parameter
        self.max_grad_value = max_grad_value
        self.micro_step = 0
        self.skipped_updates = 0
        self._handles: list[RemovableHandle] = []
        self._where: dict[Tensor, tuple[int, int]] = {}
        for gi, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._where[p] = (gi, i)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def updating(self) -> bool:
        """True when the coming backward pass is the last of its accumulation window (it updates)."""
        return self.micro_step % self.accumulation_steps == self.accumulation_steps - 1

    def step(self) -> None:
        """Count one backward pass; call it after every ``backward()`` (it performs no update itself)."""
        self.micro_step += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients left by accumulation windows that did not finish (normally there are none)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def remove(self) -> None:
        """Remove the hooks: the optimizer goes back to ordinary ``optimizer.step()`` use."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _hook(self, param: Tensor) -> None:
        if not self.updating or param.grad is None:
            return
        opt = self.optimizer
        gi, index = self._where[param]
        group = opt.param_groups[gi]
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(f"gradient release does not support sparse gradients ({opt._param_name(gi, index)})")
        if opt.check_finite and grad.numel() and not bool(torch.isfinite(grad).all()):
            if opt.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient in {opt._param_name(gi, index)} during backward with gradient "
                    "release; "
                    f"parameters whose gradients were complete earlier are already updated"
                )
            self.skipped_updates += 1
            param.grad = None
            return
        if self.max_grad_value is not None:
            grad.clamp_(-self.max_grad_value, self.max_grad_value)
        if self.max_grad_norm_per_parameter is not None and grad.numel():
            # a reduction over the whole tensor: on DTensors it stays a (replicated) DTensor, never
            # .to_local()
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            grad.mul_((self.max_grad_norm_per_parameter / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
        state = opt.state[param]
        if len(state) == 0:
            opt._init_state(group, param, state)
        opt._step_group(group, [param], [grad])
        param.grad = None

    def __repr__(self) -> str:
        clip = self.max_grad_norm_per_parameter
        return (
            f"GradientRelease({type(self.optimizer).__name__}, {len(self._handles)} parameters, "
            f"accumulation_steps={self.accumulation_steps}, max_grad_norm_per_parameter={clip}, "
            f"micro_step={self.micro_step})"
        )

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict plus the micro-batch counter (resume mid-window exactly)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "micro_step": self.micro_step,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.micro_step = int(state_dict["micro_step"])
        self.skipped_updates = int(state_dict.get("skipped_updates", 0))
