"""Gradient accumulation: k micro-batches give the gradient of one large batch.

Two weightings:

* ``"mean"`` -- each micro-batch loss (a mean over its tokens) is scaled by ``1/k`` before ``backward``: exact
  when every micro-batch holds the same number of tokens;
* ``"tokens"`` -- micro-batches differ in size (padding, packing): the loss of micro-batch ``i`` (a mean over
  its ``n_i`` tokens) is scaled by ``n_i`` before ``backward`` and, after the last one, the gradients are
  divided by ``sum(n_i)``. The result is the gradient of the mean over all tokens of the large batch, without
  knowing the total in advance.

The optimizer steps once, after the last micro-batch (:attr:`GradientAccumulator.is_last` says when). With a
GradScaler, pass it: losses are scaled with it. With DistributedDataParallel, pass the model and run each
micro-batch's forward *and* backward inside :meth:`GradientAccumulator.micro_batch`: gradients are synchronised
only on the last micro-batch (``no_sync`` for the others; DDP decides in the forward pass, so a ``no_sync``
around the backward alone would not stop the all-reduce). With FSDP2 (``fully_shard``) likewise
(``set_requires_gradient_sync(False)`` for the others, so gradients are reduce-scattered once per step; FSDP2
reads it in the backward pass, so :meth:`backward` alone suffices).

Under torchrun (``distributed``; default: torch.distributed is initialised with more than one process)
:meth:`GradientAccumulator.finish` reduces the loss and the token count over all ranks (one all-reduce): it
returns the global batch's mean loss on every rank, and ``"tokens"`` weighting divides by the global token
count (DDP and FSDP2 average gradients over the ``W`` ranks, so the local sums are divided by
``total_tokens / W``): the gradient is that of the mean over every token of the global batch, as in one process.

Example:
    >>> acc = GradientAccumulator(optimizer, steps=4, weighting="tokens")
    >>> for micro in micro_batches:                       # 4 of them
    ...     with acc.micro_batch():                       # DDP: no_sync() for all but the last
    ...         loss = lm_loss(model, micro)              # mean over the micro-batch's tokens
    ...         acc.backward(loss, tokens=int((micro["labels"] != -100).sum()))
    >>> mean_loss = acc.finish()                          # gradients now hold the large batch's
    >>> clip_grad_norm(optimizer, 1.0); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .distributed import all_reduce_sum, is_distributed

__all__ = ["GradientAccumulator"]


class GradientAccumulator:
    """Scale micro-batch losses so that accumulated gradients equal those of one large batch.

    Args:
        optimizer: the optimizer whose parameters receive the gradients.
        steps: micro-batches per optimizer step (k >= 1).
        weighting: ``"mean"`` (scale by 1/k) or ``"tokens"`` (scale by each micro-batch's token count, then
            divide by the total in :meth:`finish`).
        scaler: an optional GradScaler; losses are scaled with it.
        model: an optional model; when it has ``no_sync`` (DDP), all micro-batches but the last run inside it
            (forward and backward: use :meth:`micro_batch`); when it has ``set_requires_gradient_sync`` (FSDP2),
            gradient sync is off for all but the last.
        distributed: reduce the loss and tokens over all ranks in :meth:`finish` (None: when torch.distributed
            is initialised with more than one process). Every rank must then call :meth:`finish`.

    Attributes:
        global_tokens: tokens of the last finished step over all ranks (this rank's alone in one process).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps: int,
        *,
        weighting: Literal["mean", "tokens"] = "mean",
        scaler: torch.amp.GradScaler | None = None,
        model: nn.Module | None = None,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if weighting not in ("mean", "tokens"):
            raise ValueError(f"weighting must be 'mean' or 'tokens', got {weighting!r}")
        self.optimizer = optimizer
        self.steps = steps
        self.weighting = weighting
        self.scaler = scaler
        self.model = model
        self.distributed = distributed
        self.global_tokens = 0
        self._in_micro_batch = False
        self.reset()

    def reset(self) -> None:
        """Forget the micro-batches of the current step (the gradients are left as they are)."""
        self.micro_step = 0
        self.tokens = 0
        self._loss_sum: Tensor | None = None

    @property
    def is_last(self) -> bool:
        """True when the next :meth:`backward` is the last micro-batch of the step."""
        return self.micro_step == self.steps - 1

    def backward(self, loss: Tensor, *, tokens: int | None = None) -> bool:
        """Backpropagate one micro-batch's mean ``loss``; return True when it was the last one of the step."""
        if self.micro_step >= self.steps:
            raise RuntimeError(f"all {self.steps} micro-batches of this step are done; call finish() first")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss must be a scalar tensor (the mean over the micro-batch)")
        if self.weighting == "tokens":
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ValueError(f"tokens must be the micro-batch's token count (an integer >= 0), got {tokens!r}")
            weight = float(tokens)
            self.tokens += tokens
        else:
            weight = 1.0 / self.steps
            if tokens is not None:
                self.tokens += int(tokens)
        scaled = loss * weight
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        last = self.is_last
        with contextlib.nullcontext() if self._in_micro_batch else self._sync_context():
            scaled.backward()
        detached = loss.detach().float() * weight
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self.micro_step += 1
        return last

    def _sync_context(self) -> contextlib.AbstractContextManager:
        """Gradient sync off unless the next micro-batch is the step's last (DDP: ``no_sync``; FSDP2: the flag)."""
        last = self.is_last
        fsdp_sync = getattr(self.model, "set_requires_gradient_sync", None)
        if fsdp_sync is not None:
            if self.steps > 1:
                fsdp_sync(last)  # FSDP2: reduce-scatter once, after the last micro-batch's backward
            return contextlib.nullcontext()
        sync_off = getattr(self.model, "no_sync", None)
        return sync_off() if (sync_off is not None and not last) else contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_batch(self) -> Iterator[None]:
        """Run one micro-batch's forward pass and :meth:`backward` inside this: for all but the step's last
        micro-batch, DDP's ``no_sync()`` (which must cover the forward pass) or FSDP2's gradient sync off."""
        with self._sync_context():
            self._in_micro_batch = True
            try:
                yield
            finally:
                self._in_micro_batch = False

    @torch.no_grad()
    def finish(self) -> Tensor:
        """End the step: normalise token-weighted gradients; return the large batch's mean loss (a tensor)."""
        if self.micro_step != self.steps:
            raise RuntimeError(f"finish() after {self.micro_step} of {self.steps} micro-batches")
        loss = self._loss_sum if self._loss_sum is not None else torch.zeros(())
        tokens, world = float(self.tokens), 1
        if is_distributed() if self.distributed is None else self.distributed:
            # one all-reduce: every rank reports the global batch's loss and divides by the global token count
            world = torch.distributed.get_world_size()
            loss_sum, tokens = all_reduce_sum([loss, tokens])
            loss = torch.tensor(loss_sum, dtype=loss.dtype, device=loss.device)
            if self.weighting == "mean":
                loss = loss / world
        self.global_tokens = int(tokens)
        if self.weighting == "tokens":
            if tokens == 0:
                raise ValueError("no tokens in any micro-batch of this step: the mean loss is undefined")
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                # DDP / FSDP2 averaged the gradients over the ranks: undo the 1/W with the division
                torch._foreach_div_(grads, tokens / world)
            loss = loss / tokens
        self.reset()
        return loss
