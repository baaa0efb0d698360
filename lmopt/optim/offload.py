"""Optimizer offload: the state and the step on the host, the model on the accelerator.

:func:`offload` builds any registry optimizer (or re-homes an existing one) on host copies of the parameters:

.. code-block:: text

    backward:  each gradient, as autograd finishes it, is copied to a host buffer (a post-accumulate-grad hook;
               on CUDA asynchronous, on a side stream, into pinned memory)
    step:      wait for the copies; the inner optimizer steps the host copies with its CPU path (fp32, bf16,
               8-bit, 4-bit state: the C low-bit kernel moves a quarter of fp32's bytes); the updated host copies are
               copied back into the device parameters (asynchronously on CUDA: the next forward queues behind them)

The device keeps parameters and gradients only: no optimizer state, no step temporaries (ZeRO-Offload, Ren et al.
2021; torchao's ``CPUOffloadOptimizer``; QLoRA's paged optimizers, Dettmers et al. 2023, page state out under
memory pressure: this keeps it out). The host holds a copy of every trainable parameter (in its dtype), a gradient
buffer per trainable parameter and the state. The PCIe traffic per step is one gradient and one parameter copy per
trainable parameter. Parameters frozen when the optimizer is built (``requires_grad=False``: LoRA's base weights)
stay on the device only: the host holds a shape-only (``meta``) placeholder for them, and a step refuses, with the
fix, a gradient that appears on one later.

Without an accelerator the same code runs with the host as the device (the copies are plain CPU copies): the
result equals the inner optimizer run on the parameters directly, bit for bit (tested), which is what CI checks.

Gradient accumulation works unchanged: the first gradient after ``zero_grad`` is copied, later ones are added on
the host in the order autograd adds them on the device (bit-identical), and with ``overlap`` each device gradient is
released once moved, so the device holds only the gradients autograd is producing (ZeRO-Offload's streaming).

Clip the gradients the step uses, the host ones, with
:meth:`OffloadOptimizer.clip_grad_norm_` or :func:`lmopt.train.clip_grad_norm` given the optimizer (it reads the
optimizer's parameters): after backward ``model.parameters()`` hold no gradients with ``overlap`` (moved and
released), and without it only the device copies, which the step does not read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["OffloadOptimizer", "offload"]


def _host_copy(p: Tensor, pin: bool) -> nn.Parameter:
    if not p.requires_grad:  # frozen (LoRA's base weights): never stepped, so a shape-only placeholder, no copy
        return nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
    host.copy_(p.detach())
    return nn.Parameter(host, requires_grad=p.requires_grad)


def _resolve_pin(pin_memory: bool | None, params: Iterable[Tensor]) -> bool:
    on_accelerator = any(p.device.type != "cpu" for p in params)
    if pin_memory is None:
        return on_accelerator and torch.cuda.is_available()
    if not isinstance(pin_memory, bool):
        raise ValueError(f"pin_memory must be True, False or None (automatic), got {pin_memory!r}")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (pinned memory is page-locked for DMA); pass None or False")
    return pin_memory


def _host_copies(device_params: list[Tensor], pin_memory: bool | None) -> dict[int, nn.Parameter]:
    """id(device parameter) -> its host copy (pinned as :func:`offload`'s ``pin_memory`` resolves)."""
    pin = _resolve_pin(pin_memory, device_params)
    return {id(p): _host_copy(p, pin) for p in device_params}


class OffloadOptimizer(Optimizer):
    """A torch Optimizer whose state and step live on the host (see the module docstring); build it with
    :func:`offload`.

    ``param_groups``, ``state`` and ``defaults`` are the inner (host) optimizer's objects, so LR schedulers,
    ``state_dict`` / ``load_state_dict`` (the host state; it loads with ``weights_only=True``), HF Trainer and
    :mod:`lmopt.train` work as with the inner optimizer. ``device_params`` are the model's parameters, which
    :meth:`step` updates.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        device_params: list[Tensor],
        host_params: list[nn.Parameter],
        *,
        overlap: bool = True,
    ) -> None:
        if len(device_params) != len(host_params):
            raise ValueError("device_params and host_params must pair up one to one")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        self.optimizer = optimizer
        pairs = list(zip(device_params, host_params, strict=True))
        # parameters frozen when the optimizer was built have a meta placeholder on the host: never copied
        self.frozen_params = [d for d, h in pairs if h.is_meta]
        self.device_params = [d for d, h in pairs if not h.is_meta]
        self.host_params = [h for _, h in pairs if not h.is_meta]
        self.overlap = overlap
        super().__init__(optimizer.param_groups, dict(optimizer.defaults))
        self._link()
        cuda = any(p.is_cuda for p in self.device_params)
        self._stream = torch.cuda.Stream() if cuda else None
        self._copied: set[int] = set()  # device params with a gradient on the host since zero_grad
        self._staging: dict[int, Tensor] = {}  # CUDA accumulation: the copy in flight, added at synchronize
        self._pending: list[int] = []
        self._moved: dict[int, tuple[int, int]] = {}  # overlap=False: the device gradient last moved, and its version
        self._hooks = []
        if overlap:
            for index, p in enumerate(self.device_params):
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(index)))

    def _link(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    # -- gradients to the host -------------------------------------------------------------------------------
    def _hook_for(self, index: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            self._copy_grad(index)

        return hook

    def _copy_grad(self, index: int) -> None:
        """Move ``p.grad`` to the host: the first gradient since ``zero_grad`` is copied, later ones (accumulation)
        are added, in the order autograd would add them on the device (bit-identical). With ``overlap`` the device
        gradient is then released (``p.grad = None``): the device holds only the gradients autograd is producing."""
        p, host = self.device_params[index], self.host_params[index]
        grad = p.grad
        if grad is None:
            return
        # with overlap the device gradient was released after its last move: a new one is a further contribution;
        # without, the device gradient is the whole of it
        accumulate = self.overlap and index in self._copied and host.grad is not None
        if not accumulate:
            if host.grad is None or host.grad.shape != grad.shape or host.grad.dtype != grad.dtype:
                host.grad = torch.empty(grad.shape, dtype=grad.dtype, device="cpu", pin_memory=host.is_pinned())
        if self._stream is not None:
            target = host.grad
            if accumulate:  # staged, added on the host once the copy landed (synchronize)
                target = self._staging.get(index)
                if target is None:
                    target = self._staging[index] = torch.empty_like(host.grad, pin_memory=host.is_pinned())
                self._pending.append(index)
            # the gradient is ready on the current stream; the copy waits for it on the side stream
            self._stream.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(self._stream):
                grad.record_stream(self._stream)
                target.copy_(grad, non_blocking=True)
        elif accumulate:
            host.grad.add_(grad)
        else:
            host.grad.copy_(grad)
        self._copied.add(index)
        if self.overlap:
            p.grad = None

    def synchronize(self) -> None:
        """Make the host gradients current: wait for the copies in flight, add staged accumulations, and move any
        gradient no hook moved (``overlap=False``, or gradients set by hand). Called by :meth:`step`, by
        :meth:`clip_grad_norm_` and by :func:`lmopt.train.clip_grad_norm`."""
        for index, p in enumerate(self.device_params):
            grad = p.grad
            # without overlap: moved once per gradient (a second synchronize must not undo a clip of the host copy)
            if grad is not None and self._moved.get(index) != (id(grad), grad._version):
                self._copy_grad(index)
                if not self.overlap:
                    self._moved[index] = (id(grad), grad._version)
        if self._stream is not None:
            self._stream.synchronize()
            for index in self._pending:
                self.host_params[index].grad.add_(self._staging[index])
            self._pending.clear()
        for index, host in enumerate(self.host_params):
            if index not in self._copied:
                host.grad = None  # no gradient since zero_grad: the inner optimizer skips it

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the host gradients (the ones the step uses) to a global norm; returns the norm before clipping."""
        self.synchronize()
        grads = [h for h in self.host_params if h.grad is not None]
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, norm_type=norm_type)

    # -- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate ``closure`` (its backward copies the gradients), step the host copies, copy them back."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self.frozen_params:
            if p.grad is not None:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} was frozen (requires_grad=False) when lmopt.offload built "
                    "this optimizer and now has a gradient; nothing was stepped. Build the offloaded optimizer again "
                    "after unfreezing it (lmopt.offload(name, model, ...))"
                )
        self.synchronize()
        before = getattr(self.optimizer, "skipped_steps", None)
        self.optimizer.step()
        if before is not None and getattr(self.optimizer, "skipped_steps", None) != before:
            return loss  # the inner step was skipped (non-finite gradients): nothing changed, nothing to copy
        for p, host in zip(self.device_params, self.host_params, strict=True):
            p.data.copy_(host, non_blocking=p.is_cuda)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.device_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._copied.clear()
        self._moved.clear()

    # -- forwarding ----------------------------------------------------------------------------------------------
    def train(self) -> OffloadOptimizer:
        """Schedule-Free inner optimizers: back to the training point (host), copied to the device parameters."""
        self._swap("train")
        return self

    def eval(self) -> OffloadOptimizer:
        """Schedule-Free inner optimizers: the averaged point for evaluation (host), copied to the device."""
        self._swap("eval")
        return self

    def _swap(self, mode: str) -> None:
        switch = getattr(self.optimizer, mode, None)
        if switch is None:
            raise AttributeError(f"{type(self.optimizer).__name__} has no {mode}() (only Schedule-Free optimizers do)")
        switch()
        with torch.no_grad():
            for p, host in zip(self.device_params, self.host_params, strict=True):
                p.copy_(host, non_blocking=p.is_cuda)

    def __getattr__(self, name: str) -> Any:
        # the inner optimizer's own methods (Sophia's update_hessian / hessian_due, ...); only reached for names
        # this object lacks
        if name != "optimizer" and "optimizer" in self.__dict__:
            return getattr(self.__dict__["optimizer"], name)
        raise AttributeError(name)

    @property
    def skipped_steps(self) -> int:
        """Steps the inner optimizer skipped for non-finite gradients (0 without the policy)."""
        return int(getattr(self.optimizer, "skipped_steps", 0))

    def record_grad_norm(self, norm: Tensor | float) -> None:
        """Forwarded to an lmopt inner optimizer (see :meth:`lmopt.LmoptOptimizer.record_grad_norm`)."""
        record = getattr(self.optimizer, "record_grad_norm", None)
        if record is not None:
            record(norm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if any(param_group is g for g in self.optimizer.param_groups):  # torch's __init__ registering our groups
            if not any(param_group is g for g in self.param_groups):
                self.param_groups.append(param_group)
            return
        raise NotImplementedError(
            "OffloadOptimizer.add_param_group: build the offloaded optimizer with every parameter (lmopt.offload)"
        )

    def state_dict(self) -> dict[str, Any]:
        """The inner (host) optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer (with its checks; state lands on the host, where its parameters are)."""
        self.optimizer.load_state_dict(state_dict)
        self._link()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("OffloadOptimizer holds autograd hooks and streams; save its state_dict() instead")

    def __repr__(self) -> str:
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        devices = sorted({str(p.device) for p in self.device_params})
        return (
            f"OffloadOptimizer (parameters on {', '.join(devices)}; state, gradients copies and the step on the "
            f"host; overlap={self.overlap}) around\n{inner}"
        )


def offload(
    optimizer_or_name: str | Optimizer,
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    *,
    pin_memory: bool | None = None,
    overlap: bool = True,
    **hyperparameters: Any,
) -> OffloadOptimizer:
    """An optimizer whose state and step live on the host (see :mod:`lmopt.optim.offload`).

    Args:
        optimizer_or_name: a registry name (``"adamw8bit"``, ``"came"``, ...) built on host copies of
            ``model_or_params`` with ``hyperparameters``, as :func:`lmopt.create_optimizer` builds it (a model
            keeps the structural groups and Muon / Adam-mini routing: the host copy of the model shares nothing
            with the device one but its structure); or an optimizer instance, re-homed: its groups are rebuilt on
            host copies and its state, if any, moved there.
        model_or_params: the model or parameters (param groups) to train; not with an optimizer instance.
        pin_memory: page-locked host buffers for asynchronous copies (default: when the parameters are on CUDA).
        overlap: copy each gradient as autograd produces it (default True); False copies them all at
            :meth:`OffloadOptimizer.step`.
        **hyperparameters: for the named optimizer.

    Example:
        >>> opt = lmopt.offload("adamw8bit", model, lr=3e-4, weight_decay=0.1)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    """
    if isinstance(optimizer_or_name, Optimizer):
        if model_or_params is not None or hyperparameters:
            raise ValueError(
                "offload(optimizer): the optimizer already holds its parameters and hyperparameters; pass only it"
            )
        return _rehome(optimizer_or_name, pin_memory, overlap)
    if not isinstance(optimizer_or_name, str):
        raise ValueError(f"optimizer_or_name must be a registry name or a torch Optimizer, got {optimizer_or_name!r}")
    if model_or_params is None:
        raise ValueError(f"offload({optimizer_or_name!r}) needs the model or parameters to train")
    from ..registry import create_optimizer

    if isinstance(model_or_params, nn.Module):
        device_params = list(dict.fromkeys(model_or_params.parameters()))
        host = _host_copies(device_params, pin_memory)
        # the structure without the device tensors: deepcopy with every parameter mapped to its host copy
        # (buffers are copied where they are; the optimizer never reads them)
        host_model = copy.deepcopy(model_or_params, memo={id(p): host[id(p)] for p in device_params})
        inner = create_optimizer(optimizer_or_name, host_model, **hyperparameters)
    else:
        items = list(model_or_params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        device_params = list(dict.fromkeys(p for g in groups for p in g["params"]))
        host = _host_copies(device_params, pin_memory)
        host_groups = [{**g, "params": [host[id(p)] for p in g["params"]]} for g in groups]
        inner = create_optimizer(optimizer_or_name, host_groups, **hyperparameters)
    _refuse_wrappers(inner)
    return OffloadOptimizer(inner, device_params, [host[id(p)] for p in device_params], overlap=overlap)


def _refuse_wrappers(inner: Optimizer) -> None:
    from .release import GradientRelease

    if isinstance(inner, GradientRelease):
        raise ValueError("gradient release steps inside backward on the device; it cannot be offloaded")
    if hasattr(inner, "update_hessian"):
        raise ValueError(
            f"{type(inner).__name__}'s Hessian estimate differentiates through the model's parameters, which stay on "
            "the device; it cannot be offloaded (offload another optimizer, or keep it on the device)"
        )


def _rehome(optimizer: Optimizer, pin_memory: bool | None, overlap: bool) -> OffloadOptimizer:
    device_params = list(dict.fromkeys(p for g in optimizer.param_groups for p in g["params"]))
    host = _host_copies(device_params, pin_memory)
    groups = [{**g, "params": [host[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    try:
        inner = type(optimizer)(groups)
    except Exception as error:
        raise ValueError(
            f"offload({type(optimizer).__name__} instance): it cannot be rebuilt from its param groups ({error}); "
            "build it by name instead: lmopt.offload(name, model, **hyperparameters)"
        ) from error
    for attribute in ("nonfinite", "check_finite"):
        if hasattr(optimizer, attribute):
            setattr(inner, attribute, getattr(optimizer, attribute))
    if optimizer.state:
        inner.load_state_dict(optimizer.state_dict())
    _refuse_wrappers(inner)
    return OffloadOptimizer(inner, device_params, [host[id(p)] for p in device_params], overlap=overlap)
