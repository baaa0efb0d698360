"""Schedule-Free AdamW: no learning-rate schedule, an average of iterates that needs no extra memory.

Update rule (Defazio et al. 2024, Algorithm 1 with Adam preconditioning; the form of the ``schedulefree``
package's ``AdamWScheduleFree``). The optimizer keeps ``z`` (the base SGD-like sequence) and ``v`` (Adam's
second
moment); the parameter holds ``y`` in train mode and the averaged point ``x`` in eval mode, where
``y = (1 - beta1) * z + beta1 * x``. At step ``t = k + 1`` with gradient ``g`` evaluated at ``y``:

.. code-block:: text

    lr_t   = lr * min(1, t / warmup_steps)                         (linear warmup; no other schedule)
    lr_max = max(lr_max, lr_t)
    w_t    = t^r * lr_max^weight_lr_power;   W_t = W_{t-1} + w_t;   c_t = w_t / W_t
    v      <- beta2 * v + (1 - beta2) * g^2
    u      = g / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * y        (decay evaluated at y)
    y      <- (1 - c_t) * y + c_t * z + lr_t * (beta1 * (1 - c_t) - 1) * u
    z      <- z - lr_t * u

which is the paper's ``z <- z - lr u``, ``x <- (1 - c) x + c z``, ``y = (1 - beta1) z + beta1 x`` written on
``y`` directly, so ``x`` is never stored. :meth:`ScheduleFreeAdamW.eval` moves the parameters to ``x``
(``p <- p + (1 - 1/beta1)(z - p)``) and :meth:`~ScheduleFreeAdamW.train` back to ``y``.

Modes and checkpoints: a new optimizer starts in train mode (``y = x = z`` before the first step). The mode is
kept per group as ``train_mode`` and saved in ``state_dict``; loading a checkpoint restores the mode it was
saved
in, which matches the parameters saved with it. :meth:`~ScheduleFreeAdamW.evaluating` is a context manager
that
switches the optimizer (and optionally the model) to eval mode and back, for evaluation and for checkpoints
taken at ``x``. :func:`recompute_batchnorm_statistics` refreshes BatchNorm running statistics at ``x``.

Schedule-Free SGD (:class:`ScheduleFreeSGD`, state ``z`` only) and Schedule-Free RAdam
(:class:`ScheduleFreeRAdam`: RAdam's rectification as the step's rate, no warmup) are the package's
``SGDScheduleFree`` and ``RAdamScheduleFree``; all three share :class:`ScheduleFree`'s modes, ``evaluating``,
state-dict handling and the detection :func:`schedule_free_mode` (integrations callbacks, ``save_checkpoint``).

Reference: Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024;
``schedulefree`` (facebookresearch/schedule_free), ``AdamWScheduleFree``, ``SGDScheduleFree``,
``RAdamScheduleFree``.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..spec import OptimizerSpec, StateTensor, Translation
from . import _dispatch
from ._dispatch import blockable, blocked_applies, resolve_implementation
from ._impl import add_scaled_, foreach_add_scaled_, run_flat_blocks, traced_lr
from .base import (
    Implementation,
    LmoptOptimizer,
    check_flag,
    check_positive,
    check_range,
    constructor_defaults,
)

__all__ = [
    "ScheduleFree",
    "ScheduleFreeAdamW",
    "ScheduleFreeRAdam",
    "ScheduleFreeSGD",
    "recompute_batchnorm_statistics",
    "schedule_free_adamw",
    "schedule_free_radam",
    "schedule_free_sgd",
]


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _single_tensor_sf(ys, grads, zs, vs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2):
    # reads like the package's for-loop path: u = g / denom (+ decay at y), then y and z
    adaptive_y_lr = lr * (beta1 * (1 - ckp1) - 1)
    for y_, g_, z_, v_ in zip(ys, grads, zs, vs, strict=False):
        dtype = _math_dtype(y_)
        y, g, z, v = (t if t.dtype == dtype else t.to(dtype) for t in (y_, g_, z_, v_))
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(bias_correction2).sqrt_().add_(eps)
        u = g.div(denom)
        if weight_decay != 0:
            u.add_(y, alpha=weight_decay)
        y.lerp_(z, ckp1)
        y.add_(u, alpha=adaptive_y_lr)
        add_scaled_(z, u, -lr)
        for dst, src in ((y_, y), (z_, z), (v_, v)):
            if dst is not src:
                dst.copy_(src)


def _blocked_coefficients(lr, beta1, weight_decay, ckp1, bias_correction2):
    # u = s * g / (sqrt(v) + eps * s) with s = sqrt(bias_correction2) equals g / (sqrt(v / bc2) + eps); decay
    # is
    # folded into the y and z coefficients: z' = z - lr*wd*y, y' = c_y*y + c*z' + a*s*g/d (see module
    # docstring)
    s = math.sqrt(bias_correction2)
    a = lr * (beta1 * (1 - ckp1) - 1)
    c_y = 1 - ckp1 + weight_decay * (a + ckp1 * lr)
    return s, a, c_y


def _multi_tensor_sf(ys, grads, zs, vs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2):
    s, a, c_y = _blocked_coefficients(lr, beta1, weight_decay, ckp1, bias_correction2)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, y in enumerate(ys):
        buckets[(y.device, y.dtype)].append(i)
    for (_device, dtype), idx in buckets.items():
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        y_, z_, v_ = [ys[i] for i in idx], [zs[i] for i in idx], [vs[i] for i in idx]
        y, z, v = (t if dtype == math_dtype else [x.to(math_dtype) for x in t] for t in (y_, z_, v_))
        g = [grads[i] if grads[i].dtype == math_dtype else grads[i].to(math_dtype) for i in idx]
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps * s)
        if weight_decay != 0:
            foreach_add_scaled_(z, y, -lr * weight_decay)
            torch._foreach_mul_(y, c_y)
            torch._foreach_add_(y, z, alpha=ckp1)
        else:
            torch._foreach_lerp_(y, z, ckp1)
        torch._foreach_addcdiv_(y, g, denom, a * s)
        torch._foreach_addcdiv_(z, g, denom, -lr * s)
        del denom, g
        if dtype != math_dtype:
            for dst, src in zip(y_ + z_ + v_, y + z + v, strict=True):
                dst.copy_(src)


#: the scalar hyperparameters every implementation takes, by keyword
_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "ckp1", "bias_correction2")


def _blocked_sf(ys, grads, zs, vs, **hyper):
    # the foreach rule applied block by block, so the 4 tensors and the denominator stay in cache between the
    # ops: one read of y, z, v, g and one write of y, z, v from memory (28 bytes per fp32 parameter)
    small = [i for i, y in enumerate(ys) if y.numel() < _dispatch.BLOCK_ELEMENTS]
    if small:  # tensors that fit one block: one foreach call each op, not one Python call per tensor
        _multi_tensor_sf(*([t[i] for i in small] for t in (ys, grads, zs, vs)), **hyper)
        large = [i for i in range(len(ys)) if ys[i].numel() >= _dispatch.BLOCK_ELEMENTS]
        ys, grads, zs, vs = ([t[i] for i in large] for t in (ys, grads, zs, vs))
    lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2 = (hyper[k] for k in _HYPER)
    s, a, c_y = _blocked_coefficients(lr, beta1, weight_decay, ckp1, bias_correction2)
    scratch: dict[torch.dtype, Tensor] = {}
    for y_, g_, z_, v_ in zip(ys, grads, zs, vs, strict=False):
        n = y_.numel()
        dtype = _math_dtype(y_)
        flat = [t.reshape(-1) for t in (y_, g_, z_, v_)]
        if dtype not in scratch:
            scratch[dtype] = torch.empty(min(n, _dispatch.BLOCK_ELEMENTS), dtype=dtype, device=y_.device)
        elif scratch[dtype].numel() < min(n, _dispatch.BLOCK_ELEMENTS):
            scratch[dtype] = torch.empty(min(n, _dispatch.BLOCK_ELEMENTS), dtype=dtype, device=y_.device)
        for start in range(0, n, _dispatch.BLOCK_ELEMENTS):
            end = min(n, start + _dispatch.BLOCK_ELEMENTS)
            yb_, gb, zb_, vb_ = (t[start:end] for t in flat)
            yb, zb, vb = (t if t.dtype == dtype else t.to(dtype) for t in (yb_, zb_, vb_))
            if gb.dtype != dtype:
                gb = gb.to(dtype)
            vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
            denom = torch.sqrt(vb, out=scratch[dtype][: end - start])
            denom.add_(eps * s)
            if weight_decay != 0:
                zb.add_(yb, alpha=-lr * weight_decay)
                yb.mul_(c_y).add_(zb, alpha=ckp1)
            else:
                yb.lerp_(zb, ckp1)
            yb.addcdiv_(gb, denom, value=a * s)
            zb.addcdiv_(gb, denom, value=-lr * s)
            for dst, src in ((yb_, yb), (zb_, zb), (vb_, vb)):
                if dst is not src:
                    dst.copy_(src)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_sf, "foreach": _multi_tensor_sf, "blocked": _blocked_sf}


def schedule_free_adamw(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    implementation: str = "auto",
) -> None:
    """Functional Schedule-Free AdamW step (see the module docstring for the rule).

    ``ys`` are the parameters in train mode; ``lr`` is the warmed-up rate of this step, ``ckp1`` the averaging
    weight ``c_t`` and ``bias_correction2`` is ``1 - beta2^t``. Updates ``ys``, ``zs`` and ``exp_avg_sqs`` in
    place; the gradients are not modified.
    """
    implementation = resolve_implementation(
        implementation, tuple(_IMPLEMENTATIONS), {"blocked": blocked_applies(ys)}, owner="Schedule-Free AdamW"
    )
    hyper = {k: v for k, v in locals().items() if k in _HYPER}
    _IMPLEMENTATIONS[implementation](ys, grads, zs, exp_avg_sqs, **hyper)


def _upcast_all(tensors: list[Tensor]) -> list[Tensor]:
    return [t if t.dtype == _math_dtype(t) else t.to(_math_dtype(t)) for t in tensors]


def _copy_back_all(dst: list[Tensor], src: list[Tensor]) -> None:
    for d, s_ in zip(dst, src, strict=True):
        if d is not s_:
            d.copy_(s_)


def _single_tensor_sf_sgd(ys, grads, zs, *, lr, momentum, weight_decay, ckp1):
    for y_, g_, z_ in zip(ys, grads, zs, strict=True):
        y, g, z = _upcast_all([y_, g_, z_])
        u = g.add(y, alpha=weight_decay) if weight_decay != 0 else g
        y.lerp_(z, ckp1)
        add_scaled_(y, u, lr * (momentum * (1 - ckp1) - 1))
        add_scaled_(z, u, -lr)
        _copy_back_all([y_, z_], [y, z])


def _multi_tensor_sf_sgd(ys, grads, zs, *, lr, momentum, weight_decay, ckp1):
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, y in enumerate(ys):
        buckets[(y.device, y.dtype)].append(i)
    for idx in buckets.values():
        y_, z_ = [ys[i] for i in idx], [zs[i] for i in idx]
        y, z, g = _upcast_all(y_), _upcast_all(z_), _upcast_all([grads[i] for i in idx])
        u = torch._foreach_add(g, y, alpha=weight_decay) if weight_decay != 0 else g
        torch._foreach_lerp_(y, z, ckp1)
        foreach_add_scaled_(y, u, lr * (momentum * (1 - ckp1) - 1))
        foreach_add_scaled_(z, u, -lr)
        _copy_back_all(y_ + z_, y + z)


def _split_blocked(ys: list[Tensor], *others: list[Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the tensors a blocked pass walks (contiguous, at least one block) and of the rest (foreach)."""
    large = [
        i for i, y in enumerate(ys) if y.numel() >= _dispatch.BLOCK_ELEMENTS and blockable(y, *(o[i] for o in others))
    ]
    chosen = set(large)
    return large, [i for i in range(len(ys)) if i not in chosen]


def _blocked_sf_sgd(ys, grads, zs, *, lr, momentum, weight_decay, ckp1):
    # the foreach rule block by block (same operations, so the same values): y, z and g stay in cache between
    # the ops, one read of y, z, g and one write of y, z from memory (20 B per fp32 parameter)
    large, rest = _split_blocked(ys, grads, zs)
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1)
    if rest:
        _multi_tensor_sf_sgd(*([t[i] for i in rest] for t in (ys, grads, zs)), **hyper)
    a = lr * (momentum * (1 - ckp1) - 1)

    def block(y, z, g, buf):
        u = torch.add(g, y, alpha=weight_decay, out=buf) if weight_decay != 0 else g
        y.lerp_(z, ckp1)
        y.add_(u, alpha=a)
        add_scaled_(z, u, -lr)

    for i in large:
        run_flat_blocks((ys[i], zs[i], grads[i]), 2, block)


_SGD_IMPLEMENTATIONS = {"for_loop": _single_tensor_sf_sgd, "foreach": _multi_tensor_sf_sgd, "blocked": _blocked_sf_sgd}


def schedule_free_sgd(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    ckp1: float,
    implementation: str = "auto",
) -> str:
    """Functional Schedule-Free SGD step (see :class:`ScheduleFreeSGD` for the rule): ``lr`` is this step's
    warmed-up rate, ``ckp1`` the averaging weight ``c_t``. Updates ``ys`` and ``zs`` in place (the gradients are
    not modified); returns the implementation that ran."""
    implementation = resolve_implementation(
        implementation, tuple(_SGD_IMPLEMENTATIONS), {"blocked": blocked_applies(ys)}, owner="Schedule-Free SGD"
    )
    _SGD_IMPLEMENTATIONS[implementation](ys, grads, zs, lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1)
    return implementation


def _single_tensor_sf_radam(ys, grads, zs, vs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                            rectified):  # fmt: skip
    # the package's for-loop path, on copies: v, u = g / denom (rectified steps), + decay at y, then y and z
    for y_, g_, z_, v_ in zip(ys, grads, zs, vs, strict=True):
        y, g, z, v = _upcast_all([y_, g_, z_, v_])
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = g.div(v.div(bias_correction2).sqrt_().add_(eps)) if rectified else g
        if weight_decay != 0:
            u = u.add(y, alpha=weight_decay)
        y.lerp_(z, ckp1)
        add_scaled_(y, u, lr * (beta1 * (1 - ckp1) - 1))
        add_scaled_(z, u, -lr)
        _copy_back_all([y_, z_, v_], [y, z, v])


def _multi_tensor_sf_radam(ys, grads, zs, vs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                           rectified):  # fmt: skip
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, y in enumerate(ys):
        buckets[(y.device, y.dtype)].append(i)
    for idx in buckets.values():
        y_, z_, v_ = ([t[i] for i in idx] for t in (ys, zs, vs))
        y, z, v, g = _upcast_all(y_), _upcast_all(z_), _upcast_all(v_), _upcast_all([grads[i] for i in idx])
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        if rectified:
            denom = torch._foreach_div(v, bias_correction2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            u = torch._foreach_div(g, denom)
            del denom
        else:
            u = g
        if weight_decay != 0:
            u = torch._foreach_add(u, y, alpha=weight_decay)
        torch._foreach_lerp_(y, z, ckp1)
        foreach_add_scaled_(y, u, lr * (beta1 * (1 - ckp1) - 1))
        foreach_add_scaled_(z, u, -lr)
        _copy_back_all(y_ + z_ + v_, y + z + v)


def _blocked_sf_radam(ys, grads, zs, vs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                      rectified):  # fmt: skip
    # the foreach rule block by block (same operations, same values): one read of y, z, v, g and one write of
    # y, z, v from memory (28 B per fp32 parameter; the package's foreach path makes ~10 passes)
    large, rest = _split_blocked(ys, grads, zs, vs)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                 bias_correction2=bias_correction2, rectified=rectified)  # fmt: skip
    if rest:
        _multi_tensor_sf_radam(*([t[i] for i in rest] for t in (ys, grads, zs, vs)), **hyper)
    a = lr * (beta1 * (1 - ckp1) - 1)

    def block(y, z, v, g, buf):
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if rectified:
            denom = torch.div(v, bias_correction2, out=buf).sqrt_().add_(eps)
            u = torch.div(g, denom, out=denom)
            if weight_decay != 0:
                u.add_(y, alpha=weight_decay)
        else:
            u = torch.add(g, y, alpha=weight_decay, out=buf) if weight_decay != 0 else g
        y.lerp_(z, ckp1)
        y.add_(u, alpha=a)
        add_scaled_(z, u, -lr)

    for i in large:
        run_flat_blocks((ys[i], zs[i], vs[i], grads[i]), 3, block)


_RADAM_IMPLEMENTATIONS = {
    "for_loop": _single_tensor_sf_radam,
    "foreach": _multi_tensor_sf_radam,
    "blocked": _blocked_sf_radam,
}


def schedule_free_radam(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    rectified: bool,
    implementation: str = "auto",
) -> str:
    """Functional Schedule-Free RAdam step (see :class:`ScheduleFreeRAdam` for the rule): ``lr`` is this step's
    rectified rate, ``ckp1`` the averaging weight, ``bias_correction2`` ``1 - beta2^t`` and ``rectified`` whether
    ``rho_t > 4`` (the gradient is normalised by the second moment). Updates ``ys``, ``zs`` and ``exp_avg_sqs``
    in place (the gradients are not modified); returns the implementation that ran."""
    implementation = resolve_implementation(
        implementation, tuple(_RADAM_IMPLEMENTATIONS), {"blocked": blocked_applies(ys)}, owner="Schedule-Free RAdam"
    )
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                 bias_correction2=bias_correction2, rectified=rectified)  # fmt: skip
    _RADAM_IMPLEMENTATIONS[implementation](ys, grads, zs, exp_avg_sqs, **hyper)
    return implementation


def schedule_free_mode(optimizer: Any) -> str | None:
    """``"train"`` or ``"eval"`` for an optimizer with Schedule-Free modes (callable ``train()`` / ``eval()``, and a
    ``mode`` or per-group ``train_mode`` as lmopt's and the schedulefree package's keep), else None."""
    if not (callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))):
        return None
    mode = getattr(optimizer, "mode", None)
    if mode in ("train", "eval"):
        return mode
    groups = getattr(optimizer, "param_groups", None) or []
    if groups and all("train_mode" in g for g in groups):
        return "train" if all(g["train_mode"] for g in groups) else "eval"
    return None


class ScheduleFree(LmoptOptimizer):
    """The train/eval machinery every Schedule-Free optimizer shares (:class:`ScheduleFreeAdamW`,
    :class:`ScheduleFreeSGD`, :class:`ScheduleFreeRAdam`).

    The parameters hold ``y`` (where gradients are taken) in train mode and the average ``x`` in eval mode; the
    state holds ``z``, and ``y = (1 - beta) * z + beta * x`` with ``beta`` the interpolation (``betas[0]``, SGD's
    ``momentum``). The mode is kept per group as ``train_mode`` and saved in ``state_dict``; ``mode``,
    :meth:`eval`, :meth:`train` and :meth:`evaluating` are what :func:`schedule_free_mode`,
    :mod:`lmopt.integrations` and :func:`lmopt.train.save_checkpoint` look for.
    """

    def _interpolation(self, group: Mapping[str, Any]) -> float:
        """``beta``: the weight of ``x`` in ``y``."""
        return group["betas"][0]

    # -- modes -------------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"train"`` (parameters hold y) or ``"eval"`` (parameters hold x)."""
        return "train" if all(g["train_mode"] for g in self.param_groups) else "eval"

    @torch.no_grad()
    def eval(self) -> None:
        """Move the parameters to the averaged point ``x`` (for evaluation and checkpoints). Idempotent."""
        for group in self.param_groups:
            if group["train_mode"]:
                self._move(group, 1 - 1 / self._interpolation(group))
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Move the parameters back to ``y``, where gradients are taken. Idempotent."""
        for group in self.param_groups:
            if not group["train_mode"]:
                self._move(group, 1 - self._interpolation(group))
                group["train_mode"] = True

    def _move(self, group: dict[str, Any], weight: float) -> None:
        params = [p for p in group["params"] if "z" in self.state[p]]
        if params:
            zs = [self.state[p]["z"] for p in params]
            if all(p.dtype == z.dtype for p, z in zip(params, zs, strict=False)):
                torch._foreach_lerp_(params, zs, weight)
            else:
                for p, z in zip(params, zs, strict=False):
                    p.lerp_(z.to(p.dtype), weight)

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module | None = None) -> Iterator[ScheduleFree]:
        """Context manager: parameters at ``x`` (and ``model.eval()`` when given) inside, restored after.

        Use it around evaluation and around ``torch.save`` of a checkpoint; it restores the previous mode of the
        optimizer and of the model on exit, also when the block raises.
        """
        was_train = self.mode == "train"
        model_was_training = model.training if model is not None else False
        self.eval()
        if model is not None:
            model.eval()
        try:
            yield self
        finally:
            if was_train:
                self.train()
            if model is not None:
                model.train(model_was_training)

    # -- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step; the optimizer must be in train mode (see :meth:`train`)."""
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the average x, not y. Call "
                "optimizer.train() before training steps (and optimizer.eval() before evaluation), or use "
                "`with optimizer.evaluating(model):` around evaluation"
            )
        return super().step(closure)

    def _validate_schedule_free(self, group: dict[str, Any]) -> None:
        """The averaging options every variant has: ``r`` and ``weight_lr_power``."""
        for key in ("r", "weight_lr_power"):  # powers of the step and of lr_max, in float64: keep them finite
            check_range(key, group[key], 0.0, 16.0, high_inclusive=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("train_mode", True)


def _averaging_weight(group: dict[str, Any], lr: float, step: int) -> float:
    """Update the group's ``lr_max`` and ``weight_sum`` for step ``step`` at rate ``lr``; returns ``c_t``, the weight
    of ``z`` in the new average (0 while every rate so far is 0: checkpoint initialisation, RAdam's silent phase)."""
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = (step ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    return weight / weight_sum if weight_sum != 0 else 0.0


class ScheduleFreeAdamW(ScheduleFree):
    """Schedule-Free AdamW (Defazio et al. 2024): train without a learning-rate schedule.

    The parameters hold ``y`` (where gradients are taken) in train mode and the average ``x`` in eval mode.
    Call :meth:`train` before training steps and :meth:`eval` before evaluation or saving, or use
    ``with optimizer.evaluating(model): ...`` which does both ways for you. The mode is saved in
    ``state_dict``.

    Args:
        params: parameters or param groups.
        lr: peak learning rate (default 0.0025, the package's default; the paper uses 1-10x AdamW's lr).
        betas: ``(beta1, beta2)``: beta1 is the interpolation between ``z`` and ``x`` (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decay evaluated at ``y``, applied to both sequences (default 0).
        warmup_steps: linear warmup length (default 0); no other schedule is needed.
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: the average weights steps by ``lr_max^weight_lr_power`` (default 2).
        implementation: ``"auto"`` (default: ``"blocked"`` on CPU, else ``"foreach"``), ``"for_loop"``,
            ``"foreach"`` or ``"blocked"`` (the foreach rule over cache-sized blocks: one pass over memory).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: ``z`` and ``exp_avg_sq``, in the parameter's dtype. Per group: ``k`` (steps taken),
    ``weight_sum``, ``lr_max``, ``scheduled_lr`` (for logging) and ``train_mode``.

    Example:
        >>> opt = ScheduleFreeAdamW(model.parameters(), lr=1e-3, warmup_steps=100)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        >>> with opt.evaluating(model):        # parameters at x, model.eval(); restored afterwards
        ...     val_loss = loss_fn(model(x_val), y_val)
        ...     torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "ckpt.pt")

    Reference: Defazio et al., "The Road Less Scheduled", NeurIPS 2024.
    """

    implementations = ("for_loop", "foreach", "blocked")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        implementation: Implementation | str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            implementation=implementation,
            k=0,
            weight_sum=0.0,
            lr_max=-1.0,
            scheduled_lr=0.0,
            train_mode=True,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("betas[0]", group["betas"][0])  # eval mode divides by beta1
        ws = group["warmup_steps"]
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {ws!r}")
        self._validate_schedule_free(group)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["z"] = param.detach().clone(memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        k = group["k"]
        warmup = group["warmup_steps"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = traced_lr(group["lr"]) * sched
        group["scheduled_lr"] = lr
        ckp1 = _averaging_weight(group, lr, k + 1)
        states = [self.state[p] for p in params]
        schedule_free_adamw(
            params,
            grads,
            [s["z"] for s in states],
            [s["exp_avg_sq"] for s in states],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            ckp1=ckp1,
            bias_correction2=1 - beta2 ** (k + 1),
            implementation=group["implementation"],
        )
        group["k"] = k + 1


class ScheduleFreeSGD(ScheduleFree):
    """Schedule-Free SGD (Defazio et al. 2024, Algorithm 1; the ``schedulefree`` package's ``SGDScheduleFree``).

    Update rule at step ``t = k + 1`` with gradient ``g`` at ``y`` (``z`` in the state, ``x`` never stored):

    .. code-block:: text

        lr_t = lr * min(1, t / warmup_steps);  c_t as for ScheduleFreeAdamW (weights t^r * lr_max^weight_lr_power)
        u    = g + weight_decay * y                          (L2 penalty evaluated at y)
        y   <- (1 - c_t) * y + c_t * z + lr_t * (momentum * (1 - c_t) - 1) * u
        z   <- z - lr_t * u

    ``eval()`` moves the parameters to ``x`` (``p <- p + (1 - 1/momentum)(z - p)``), ``train()`` back to ``y``;
    modes, ``evaluating``, checkpoints and callbacks as for :class:`ScheduleFreeAdamW`. The gradients are not
    modified (the package adds the decay to ``p.grad`` in place).

    Args:
        params: parameters or param groups.
        lr: peak learning rate (default 1.0, the package's; SGD rates are problem-specific).
        momentum: the interpolation ``beta`` between ``z`` and ``x``, in (0, 1) (default 0.9).
        weight_decay: L2 penalty evaluated at ``y`` (default 0).
        warmup_steps: linear warmup length (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: the average weights steps by ``lr_max^weight_lr_power`` (default 2).
        implementation: ``"auto"`` (default: ``"blocked"`` on CPU, else ``"foreach"``), ``"for_loop"``,
            ``"foreach"`` or ``"blocked"`` (the foreach rule over cache-sized blocks: one pass over memory).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: ``z`` (the parameter's dtype). Per group: ``k``, ``weight_sum``, ``lr_max``,
    ``scheduled_lr`` and ``train_mode``.

    Example:
        >>> opt = ScheduleFreeSGD(model.parameters(), lr=0.5, warmup_steps=100)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        >>> with opt.evaluating(model):
        ...     val_loss = loss_fn(model(x_val), y_val)

    Reference: Defazio et al., "The Road Less Scheduled", NeurIPS 2024; ``schedulefree.SGDScheduleFree``.
    """

    implementations = ("for_loop", "foreach", "blocked")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        implementation: Implementation | str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(constructor_defaults(locals()), k=0, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, {**defaults, "train_mode": True}, nonfinite=nonfinite, check_finite=check_finite)

    def _interpolation(self, group: Mapping[str, Any]) -> float:
        return group["momentum"]

    def _validate_group(self, group: dict[str, Any]) -> None:
        momentum = group["momentum"]
        check_range("momentum", momentum, 0.0, 1.0)
        if momentum == 0:  # eval mode divides by it
            raise ValueError("momentum must be in (0, 1) (eval() moves by 1 - 1/momentum), got 0")
        ws = group["warmup_steps"]
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {ws!r}")
        self._validate_schedule_free(group)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["z"] = param.detach().clone(memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        k, warmup = group["k"], group["warmup_steps"]
        lr = traced_lr(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
        group["scheduled_lr"] = lr
        ckp1 = _averaging_weight(group, lr, k + 1)
        used = schedule_free_sgd(
            params,
            grads,
            [self.state[p]["z"] for p in params],
            lr=lr,
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            ckp1=ckp1,
            implementation=group["implementation"],
        )
        self._implementation_used[id(group)] = used
        group["k"] = k + 1


class ScheduleFreeRAdam(ScheduleFree):
    """Schedule-Free RAdam (the ``schedulefree`` package's ``RAdamScheduleFree``): no warmup, no schedule.

    Update rule at step ``t = k + 1`` (RAdam's rectification, Liu et al. 2020, as the step's rate):

    .. code-block:: text

        rho_inf = 2 / (1 - beta2) - 1;   rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
        rect_t  = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))   if rho_t > 4
                  else (0 if silent_sgd_phase else 1)
        lr_t    = lr * rect_t;   c_t as for ScheduleFreeAdamW
        v      <- beta2 * v + (1 - beta2) * g^2
        u       = g / (sqrt(v / (1 - beta2^t)) + eps)  if rho_t > 4  else g;   u += weight_decay * y
        y      <- (1 - c_t) * y + c_t * z + lr_t * (beta1 * (1 - c_t) - 1) * u
        z      <- z - lr_t * u

    With ``silent_sgd_phase=True`` (default) the first steps (``rho_t <= 4``: 5 steps at beta2=0.999) only
    accumulate ``v``; parameters do not move. Modes, ``evaluating``, checkpoints and callbacks as for
    :class:`ScheduleFreeAdamW`; the gradients are not modified.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.0025, the package's).
        betas: ``(beta1, beta2)``: interpolation and second-moment decay (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: L2 penalty evaluated at ``y``, added after the normalisation (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: the average weights steps by ``lr_max^weight_lr_power`` (default 2).
        silent_sgd_phase: skip the parameter updates while RAdam's rectification is undefined (default True).
        implementation: ``"auto"`` (default: ``"blocked"`` on CPU, else ``"foreach"``), ``"for_loop"``,
            ``"foreach"`` or ``"blocked"`` (the foreach rule over cache-sized blocks: one pass over memory).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: ``z`` and ``exp_avg_sq`` (the parameter's dtype). Per group: ``k``, ``weight_sum``,
    ``lr_max``, ``scheduled_lr`` and ``train_mode``.

    Example:
        >>> opt = ScheduleFreeRAdam(model.parameters(), lr=2.5e-3)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()

    Reference: Defazio et al., "The Road Less Scheduled", NeurIPS 2024; ``schedulefree.RAdamScheduleFree``;
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """

    implementations = ("for_loop", "foreach", "blocked")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        silent_sgd_phase: bool = True,
        implementation: Implementation | str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(constructor_defaults(locals()), k=0, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, {**defaults, "train_mode": True}, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("betas[0]", group["betas"][0])  # eval mode divides by beta1
        check_flag("silent_sgd_phase", group["silent_sgd_phase"])
        self._validate_schedule_free(group)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["z"] = param.detach().clone(memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        k = group["k"]
        step = k + 1
        beta2_t = beta2**step
        bias_correction2 = 1 - beta2_t
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * beta2_t / bias_correction2
        rectified = rho_t > 4.0
        if rectified:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        else:
            rect = float(not group["silent_sgd_phase"])
        lr = traced_lr(group["lr"]) * rect
        group["scheduled_lr"] = lr
        ckp1 = _averaging_weight(group, lr, step)
        states = [self.state[p] for p in params]
        used = schedule_free_radam(
            params,
            grads,
            [s["z"] for s in states],
            [s["exp_avg_sq"] for s in states],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            ckp1=ckp1,
            bias_correction2=bias_correction2,
            rectified=rectified,
            implementation=group["implementation"],
        )
        self._implementation_used[id(group)] = used
        group["k"] = k + 1


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: ScheduleFree | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer at the evaluation point ``x``.

    BatchNorm running means and variances are accumulated during training at ``y``, where the gradients are
    taken, but Schedule-Free evaluates at ``x``: the statistics no longer match the weights, which costs
    accuracy
    (the ``schedulefree`` authors recommend this refresh). This helper resets the running statistics, switches
    the
    optimizer to eval mode (parameters at ``x``) and runs ``model`` in train mode over ``batches`` with an
    exact
    cumulative average (``momentum=None``), then restores each layer's momentum, the model's mode and the
    optimizer's mode. Models without BatchNorm are left untouched.

    Args:
        model: the model.
        batches: an iterable of inputs (a few dozen training batches is usually enough).
        optimizer: the Schedule-Free optimizer (its mode is switched to eval during the pass and restored);
            None when the parameters already hold ``x``.
        forward: ``forward(model, batch)`` (default: ``model(batch)``, or ``model(*batch)`` for tuples/lists).

    Returns:
        the number of batches run (0 when the model has no BatchNorm layer).

    Example:
        >>> recompute_batchnorm_statistics(model, (x for x, _ in itertools.islice(train_loader, 50)), opt)
        >>> with opt.evaluating(model):
        ...     accuracy = evaluate(model)
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    was_train_mode = optimizer is not None and optimizer.mode == "train"
    if optimizer is not None:
        optimizer.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    count = 0
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=False):
            m.momentum = momentum
        model.train(was_training)
        if was_train_mode:
            optimizer.train()
    return count


# -----------------------------------------------------------------------------------------------------------
# registry entry
def _schedule_free_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [StateTensor("z", shape, dtype), StateTensor("exp_avg_sq", shape, dtype)]


def _schedule_free_sgd_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [StateTensor("z", shape, dtype)]


_SF_PAPER = "Defazio et al., The Road Less Scheduled, NeurIPS 2024"
_SF_CONSTANT = Translation(
    label="Schedule-Free paper: no decay schedule",
    schedule="constant",
    source="Defazio et al., The Road Less Scheduled, NeurIPS 2024: no decay schedule (warmup only); the "
    "schedulefree README suggests lr 1x-10x AdamW's, lmopt keeps 1x",
)


SPECS = [
    OptimizerSpec(
        name="schedule_free_adamw",
        cls=ScheduleFreeAdamW,
        summary="Schedule-Free AdamW: no LR schedule, iterate averaging at no extra memory, train/eval modes",
        paper="Defazio et al., The Road Less Scheduled, NeurIPS 2024",
        state=_schedule_free_state,
        # LLM recipe (the paper's GPT-2 runs and the package README): warmup, beta2 0.95, decay 0.1
        defaults={},
        family="adam",
        per_parameter=False,  # the averaging weight and step counter are per group: no gradient release
        aliases={"schedule_free": {}, "adamw_schedulefree": {}},
        translation=Translation(
            label="Schedule-Free paper: no decay schedule",
            schedule="constant",
            source="Defazio et al., The Road Less Scheduled, NeurIPS 2024: no decay schedule (warmup only); the "
            "schedulefree README suggests lr 1x-10x AdamW's, lmopt keeps 1x",
        ),
        # a larger lr than a scheduled AdamW (schedulefree README: 1x-10x): lmopt tune's full grid picks 2x tuned
        # AdamW's on this workload (docs/compare.md, "What tuning says about the recipes")
        compare={"lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
        compare_default=7,
    ),
    OptimizerSpec(
        name="schedule_free_sgd",
        cls=ScheduleFreeSGD,
        summary="Schedule-Free SGD: no LR schedule, iterate averaging; state z only (4 B/param), train/eval modes",
        paper=_SF_PAPER,
        state=_schedule_free_sgd_state,
        family="sgd",
        per_parameter=False,  # the averaging weight and step counter are per group: no gradient release
        aliases={"sgd_schedulefree": {}, "sgd_schedule_free": {}},  # HF Trainer: optim="schedule_free_sgd"
        translation=Translation(
            label="Schedule-Free SGD: lr x 300, weight decay / 300 (lr x wd kept), no decay schedule",
            lr_factor=300.0,
            weight_decay_factor=1 / 300,
            betas="drop",
            pass_eps=False,
            schedule="constant",
            source="lmopt's rule, not a published one: SGD needs a far larger step than Adam's normalised one "
            "(the schedulefree package's defaults: SGD lr=1.0, AdamW 0.0025, 400x; on lmopt compare's tiny model "
            "the best of lr 0.1 / 0.3 / 1 / 3 was 1.0, 333x AdamW's 3e-3); the decay is an L2 penalty scaled by "
            "lr, so lr x weight_decay is kept as in AdamW; no decay schedule (Defazio et al. 2024)",
        ),
        # measured with lmopt compare --model tiny --steps 150 (val loss): lr 0.1 3.05, 0.3 2.73, 1.0 2.58, 3.0 2.74
        compare={"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0},
    ),
    OptimizerSpec(
        name="schedule_free_radam",
        cls=ScheduleFreeRAdam,
        summary="Schedule-Free RAdam: no warmup and no LR schedule (rectified rate), train/eval modes",
        paper=_SF_PAPER + "; Liu et al., On the Variance of the Adaptive Learning Rate and Beyond, ICLR 2020",
        state=_schedule_free_state,
        family="adam",
        per_parameter=False,
        aliases={"radam_schedulefree": {}, "radam_schedule_free": {}},  # HF Trainer: optim="schedule_free_radam"
        translation=_SF_CONSTANT,
        compare={"lr": 6e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
    ),
]
