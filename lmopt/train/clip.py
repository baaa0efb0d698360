"""Global-norm gradient clipping over every param group, returning the pre-clip norm and the clip factor.

``g <- g * min(1, max_norm / (||g|| + 1e-6))`` with ``||g||`` the norm of all gradients of all groups taken
together (torch's ``clip_grad_norm_`` rule, so results agree with it). The pre-clip norm is what a health
monitor wants, and the factor says how hard the step was clipped (1.0: not at all).

With a GradScaler the gradients are unscaled first (``scaler.unscale_(optimizer)``, once per step: a second
call is skipped), so the threshold applies to true gradients. With gradient accumulation, clip once, after the
last micro-batch, when the gradients hold the whole batch.

When the optimizer has ``record_grad_norm`` (every lmopt optimizer), the norm is handed to it: a finite norm
proves every gradient is finite, so the optimizer skips its own finiteness pass over the gradients.

Under torchrun the norm is global: with FSDP2 the gradients are DTensor shards and the norm is reduced over
every shard (each element counted once); with DDP the gradients are already all-reduced, identical on every
rank, and their norm is the global one as it stands (no second reduction, which would count them twice).

Example:
    >>> result = clip_grad_norm(optimizer, max_norm=1.0, scaler=scaler)
    >>> result.norm, result.factor          # tensors: no host sync unless you read them
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ClipResult", "clip_grad_norm", "params_with_grads", "record_grad_norm"]


@dataclass(frozen=True)
class ClipResult:
    """``norm``: global gradient norm before clipping; ``factor``: the multiplier applied (<= 1)."""

    norm: Tensor
    factor: Tensor

    @property
    def clipped(self) -> bool:
        """True when the gradients were scaled down (reads the factor: a host sync on GPU)."""
        return bool(self.factor < 1.0)


def params_with_grads(optimizer_or_params: Optimizer | Iterable[Tensor]) -> list[Tensor]:
    """Every parameter of every group (or of the given parameters) that has a gradient. An offloaded optimizer
    (:func:`lmopt.offload`) first makes its host gradients, the ones its step uses, current."""
    if isinstance(optimizer_or_params, Optimizer):
        synchronize = getattr(type(optimizer_or_params), "synchronize", None)
        if synchronize is not None:
            synchronize(optimizer_or_params)
        params = [p for group in optimizer_or_params.param_groups for p in group["params"]]
    else:
        params = list(optimizer_or_params)
    return [p for p in params if p.grad is not None]


def _unscale_once(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
    if not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]  # GradScaler's own record of this step's stage
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def clip_grad_norm(
    optimizer_or_params: Optimizer | Iterable[Tensor],
    max_norm: float | None,
    *,
    norm_type: float = 2.0,
    scaler: torch.amp.GradScaler | None = None,
    foreach: bool | None = None,
) -> ClipResult:
    """Clip all gradients to a global norm of ``max_norm``; return the pre-clip norm and the factor.

    Args:
        optimizer_or_params: an optimizer (all its groups) or parameters.
        max_norm: threshold (> 0); None or ``inf`` only measures the norm (factor 1).
        norm_type: the p of the p-norm (default 2; ``inf`` for the max-norm).
        scaler: a GradScaler whose gradients must be unscaled first (needs the optimizer).
        foreach: torch's multi-tensor kernels (None: torch decides).

    Returns:
        :class:`ClipResult` with fp32 scalar tensors on the gradients' device. A non-finite norm leaves the
        factor non-finite too; the optimizer (told through ``record_grad_norm``) or the scaler skips the step.
    """
    if max_norm is not None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a number > 0 (or None to only measure), got {max_norm!r}")
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"norm_type must be a number > 0 (2.0 or inf), got {norm_type!r}")
    if scaler is not None:
        if not isinstance(optimizer_or_params, Optimizer):
            raise ValueError("scaler needs the optimizer (GradScaler unscales per optimizer), not parameters")
        _unscale_once(scaler, optimizer_or_params)
    params = params_with_grads(optimizer_or_params)
    if not params:
        zero = torch.zeros((), dtype=torch.float32)
        return ClipResult(zero, torch.ones((), dtype=torch.float32))
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type, foreach=foreach).float()
    if hasattr(norm, "full_tensor"):
        # FSDP2: the norm of DTensor gradients is reduced over every shard (a replicated DTensor scalar); its
        # plain value is the global norm, the same on every rank
        norm = norm.full_tensor()
    if max_norm is None or max_norm == float("inf"):
        factor = torch.ones_like(norm)
    else:
        # torch's rule: coefficient max_norm / (norm + 1e-6), clamped to 1; applied without a host sync
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=foreach)
    if isinstance(optimizer_or_params, Optimizer):
        record_grad_norm(optimizer_or_params, norm)
    return ClipResult(norm, factor)


def record_grad_norm(optimizer: Optimizer, norm: Tensor) -> None:
    """Hand ``norm`` to an lmopt optimizer (``record_grad_norm``), also inside ZeroRedundancyOptimizer (whose
    local optimizer steps this rank's partition: the global norm speaks for all of it)."""
    zero = type(optimizer).__name__ == "ZeroRedundancyOptimizer"
    target = getattr(optimizer, "optim", optimizer) if zero else optimizer
    if hasattr(target, "record_grad_norm"):
        target.record_grad_norm(norm)
