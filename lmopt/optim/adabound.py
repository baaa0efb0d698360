"""AdaBound and AMSBound: Adam whose per-coordinate step is clipped to bounds that converge to an SGD rate.

Update rule (Luo et al. 2019, Algorithm 2 with the official code's bias correction), gradient ``g`` (negated
when
``maximize``), step ``t``:

.. code-block:: text

    g <- g + weight_decay * p                  (coupled L2, the paper)      or
    p <- p * (1 - lr * weight_decay)           (decoupled_weight_decay=True: AdaBoundW)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2         (AMSBound: v_hat = max(v_hat, v), used below instead of v)
    final = final_lr * lr / base_lr            (base_lr: the group's lr at construction, so LR schedulers
                                                move the bounds with the rate)
    lower = final * (1 - 1 / (gamma * t + 1)),   upper = final * (1 + 1 / (gamma * t))
    rate  = clip(lr * sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v) + eps), lower, upper)
    p <- p - rate * m

Early on the bounds are wide (Adam); as ``t`` grows both converge to ``final_lr`` (SGD with momentum).

Reference: Luo, Xiong, Liu & Sun, "Adaptive Gradient Methods with Dynamic Bound of Learning Rate", ICLR 2019.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import OptimizerSpec
from . import _dispatch
from ._dispatch import blocked_applies, resolve_implementation, split_blocks
from ._impl import traced_lr
from .adamw import adam_state
from .base import LR_MAX, LmoptOptimizer, check_choice, check_positive, constructor_defaults

__all__ = ["AdaBound", "adabound"]


class AdaBoundHyper(NamedTuple):
    """The scalar hyperparameters of one AdaBound step (what every implementation takes)."""

    lr: float
    beta1: float
    beta2: float
    final_lr: float
    gamma: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsbound: bool
    maximize: bool


def _sqrt(x):
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _bounds(final_lr: float, gamma: float, step: float) -> tuple[float, float]:
    return final_lr * (1 - 1 / (gamma * step + 1)), final_lr * (1 + 1 / (gamma * step))


def _single_tensor_adabound(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp):
    lr, beta1, beta2, final_lr, gamma, eps, weight_decay, decoupled, amsbound, maximize = hp
    for i, p in enumerate(params):
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        grad = grads[i].to(dtype)
        if maximize:
            grad = -grad
        p32 = p if p.dtype == dtype else p.to(dtype)
        m = exp_avgs[i] if exp_avgs[i].dtype == dtype else exp_avgs[i].to(dtype)
        v = exp_avg_sqs[i] if exp_avg_sqs[i].dtype == dtype else exp_avg_sqs[i].to(dtype)
        t = steps[i]
        if weight_decay != 0:
            if decoupled:
                p32.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(p32, alpha=weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsbound:
            vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs[i].dtype == dtype else max_exp_avg_sqs[i].to(dtype)
            torch.maximum(vmax, v, out=vmax)
            if vmax is not max_exp_avg_sqs[i]:
                max_exp_avg_sqs[i].copy_(vmax)
            v_hat = vmax
        else:
            v_hat = v
        lower, upper = _bounds(final_lr, gamma, t)
        rate = v_hat.sqrt().add_(eps).reciprocal_().mul_(lr * math.sqrt(1 - beta2**t) / (1 - beta1**t))
        rate.clamp_(lower, upper)
        p32.addcmul_(rate, m, value=-1)
        for dst, src in ((exp_avgs[i], m), (exp_avg_sqs[i], v), (p, p32)):
            if dst is not src:
                dst.copy_(src)


def _copy_back(dst: list[Tensor], src: list[Tensor]) -> None:
    # per tensor: DTensor has no sharding rule for _foreach_copy_, and only low-precision tensors get here
    for d, s in zip(dst, src, strict=True):
        if d is not s:
            d.copy_(s)


def _multi_tensor_adabound(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp):
    lr, beta1, beta2, final_lr, gamma, eps, weight_decay, decoupled, amsbound, maximize = hp
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype, exp_avgs[i].dtype)].append(i)
    for (_device, pdtype, _sdtype), idx in buckets.items():
        dtype = torch.float64 if pdtype == torch.float64 else torch.float32

        def up(ts, dtype=dtype):
            return [t if t.dtype == dtype else t.to(dtype) for t in ts]

        p_, m_, v_ = [params[i] for i in idx], [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        p32, m, v = up(p_), up(m_), up(v_)
        g = up([grads[i] for i in idx])
        if maximize:
            g = torch._foreach_neg(g)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(p32, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, p32, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        v_hat = v
        if amsbound:
            vmax_ = [max_exp_avg_sqs[i] for i in idx]
            vmax = up(vmax_)
            torch._foreach_maximum_(vmax, v)
            _copy_back(vmax_, vmax)
            v_hat = vmax
        ts = [steps[i] for i in idx]
        bounds = [_bounds(final_lr, gamma, t) for t in ts]
        rate = torch._foreach_sqrt(v_hat)
        torch._foreach_add_(rate, eps)
        torch._foreach_reciprocal_(rate)
        torch._foreach_mul_(rate, [lr * _sqrt(1 - beta2**t) / (1 - beta1**t) for t in ts])
        torch._foreach_clamp_min_(rate, [b[0] for b in bounds])
        torch._foreach_clamp_max_(rate, [b[1] for b in bounds])
        torch._foreach_addcmul_(p32, rate, m, value=-1)
        del rate
        for dst, src in ((m_, m), (v_, v), (p_, p32)):
            _copy_back(dst, src)


def _blocked_adabound(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp):
    # the plain per-tensor path on cache-sized blocks: one pass over memory (see lmopt.optim._blocks)
    amsbound = hp.amsbound
    small = [i for i, p in enumerate(params) if p.numel() < _dispatch.BLOCK_ELEMENTS]
    if small:  # tensors that fit one block: one foreach call each op, not one Python call per tensor
        pick = [[t[i] for i in small] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        _multi_tensor_adabound(
            *pick, [max_exp_avg_sqs[i] for i in small] if amsbound else [], [steps[i] for i in small], hp
        )
        large = [i for i in range(len(params)) if params[i].numel() >= _dispatch.BLOCK_ELEMENTS]
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            [t[i] for i in large] for t in (params, grads, exp_avgs, exp_avg_sqs, steps)
        )
        max_exp_avg_sqs = [max_exp_avg_sqs[i] for i in large] if amsbound else []
        if not params:
            return
    lists = [params, grads, exp_avg_sqs, exp_avgs] + ([max_exp_avg_sqs] if amsbound else [])
    blocks, source = split_blocks(lists)
    _single_tensor_adabound(
        blocks[0],
        blocks[1],
        blocks[3],
        blocks[2],
        blocks[4] if amsbound else [],
        [steps[i] for i in source],
        hp,
    )


_IMPLEMENTATIONS = {
    "for_loop": _single_tensor_adabound,
    "foreach": _multi_tensor_adabound,
    "blocked": _blocked_adabound,
}


def adabound(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    final_lr: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled: bool = False,
    amsbound: bool = False,
    maximize: bool = False,
    implementation: str = "auto",
) -> None:
    """Functional AdaBound / AMSBound step (see the module docstring); ``final_lr`` is already scaled by
    ``lr / base_lr``. Increments ``state_steps`` and updates parameters and moments in place."""
    # measured: blocks pay off for fp32 tensors; low-precision ones take foreach under "auto"
    fp32 = implementation == "blocked" or all(p.dtype == torch.float32 for p in params)
    blocked = fp32 and blocked_applies([*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs])
    implementation = resolve_implementation(
        implementation, tuple(_IMPLEMENTATIONS), {"blocked": blocked}, owner="AdaBound"
    )
    torch._foreach_add_(state_steps, 1)
    # while torch.compile traces, the counters stay tensors (reading them is a graph break); foreach takes them
    steps = (
        list(state_steps)
        if implementation == "foreach" and torch.compiler.is_compiling()
        else [float(s) for s in state_steps]
    )
    hp = AdaBoundHyper(lr, beta1, beta2, final_lr, gamma, eps, weight_decay, decoupled, amsbound, maximize)
    _IMPLEMENTATIONS[implementation](params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)


class AdaBound(LmoptOptimizer):
    """AdaBound / AMSBound (Luo et al. 2019): Adam with per-coordinate rates clipped to converging bounds.

    Args:
        params: parameters or param groups.
        lr: Adam-phase learning rate (default 1e-3).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999)).
        final_lr: the SGD rate both bounds converge to (default 0.1), scaled by ``lr / base_lr`` when a
            scheduler changes ``lr`` (``base_lr``, a group key, is the lr at construction).
        gamma: convergence speed of the bounds (default 1e-3).
        eps: added to the denominator (default 1e-8).
        weight_decay: L2 penalty added to the gradient (default 0), or decoupled decay with
            ``decoupled_weight_decay=True`` (AdaBoundW).
        amsbound: use the running maximum of the second moment (AMSBound).
        maximize: ascend instead of descend.
        implementation: ``"auto"`` (``"blocked"`` for fp32 CPU tensors, else ``"foreach"``), ``"for_loop"``,
            ``"foreach"`` or ``"blocked"`` (the plain path on cache-sized blocks).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: ``step`` (fp32 scalar), ``exp_avg``, ``exp_avg_sq`` and with AMSBound
    ``max_exp_avg_sq``, in the parameter's dtype.

    Example:
        >>> opt = AdaBound(model.parameters(), lr=1e-3, final_lr=0.1)

    Reference: Luo et al., "Adaptive Gradient Methods with Dynamic Bound of Learning Rate", ICLR 2019.
    """

    implementations = ("for_loop", "foreach", "blocked")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsbound: bool = False,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("final_lr", group["final_lr"])
        if float(group["final_lr"]) > LR_MAX:
            raise ValueError(f"final_lr={group['final_lr']!r} is beyond {LR_MAX:g}, like lr; use a smaller value")
        check_positive("gamma", group["gamma"])
        if float(group["final_lr"]) / float(group["gamma"]) > 1e30:
            raise ValueError(
                f"gamma={group['gamma']!r} is too small for final_lr={group['final_lr']!r}: the bounds "
                "final_lr * (1 + 1 / (gamma * t)) overflow float32; use gamma >= 1e-6 (default 1e-3)"
            )
        for flag in ("amsbound", "decoupled_weight_decay", "maximize"):
            check_choice(flag, group[flag], (True, False))
        group.setdefault("base_lr", float(group["lr"]))

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsbound"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        lr = traced_lr(group["lr"])
        # lr = 0 (checkpoint initialisation) gives final = 0 and a zero rate: parameters stay unchanged
        final_lr = group["final_lr"] * lr / group["base_lr"] if group["base_lr"] > 0 else 0.0
        adabound(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsbound"] else [],
            [s["step"] for s in states],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            final_lr=final_lr,
            gamma=group["gamma"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"],
            amsbound=group["amsbound"],
            maximize=group["maximize"],
            implementation=group["implementation"],
        )


def _adabound_state(shape, dtype, hyper: Mapping[str, Any]):
    return adam_state(shape, dtype, {"amsgrad": hyper.get("amsbound", False)})


SPECS = [
    OptimizerSpec(
        name="adabound",
        cls=AdaBound,
        summary="AdaBound: Adam with per-coordinate rates clipped to bounds converging to an SGD rate",
        paper="Luo et al., Adaptive Gradient Methods with Dynamic Bound of Learning Rate, ICLR 2019",
        state=_adabound_state,
        family="adam",
        aliases={"adaboundw": {"decoupled_weight_decay": True}},
        lookahead=True,
    ),
    OptimizerSpec(
        name="amsbound",
        cls=AdaBound,
        summary="AMSBound: AdaBound with the running maximum of the second moment",
        paper="Luo et al., Adaptive Gradient Methods with Dynamic Bound of Learning Rate, ICLR 2019",
        state=_adabound_state,
        defaults={"amsbound": True},
        family="adam",
    ),
]
