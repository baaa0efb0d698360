"""StableAdamW: AdamW with per-tensor update clipping (an AdamW-Adafactor hybrid).

Update rule (Wortsman et al. 2023, Algorithm 2, as torch-optimi's ``StableAdamW`` implements it:
``optimi/stableadamw.py``), for gradient ``g_t`` (negated when ``maximize``) at step ``t``:

.. code-block:: text

    beta1_t = beta1 * (1 - beta1^(t-1)) / (1 - beta1^t)    (debiased betas: the moments are bias-corrected
    beta2_t = beta2 * (1 - beta2^(t-1)) / (1 - beta2^t)     as they are accumulated; 0 at t = 1)
    m <- beta1_t * m + (1 - beta1_t) * g
    v <- beta2_t * v + (1 - beta2_t) * g^2
    rms = sqrt(mean(g^2 / max(v, eps^2)))                  (one number per tensor)
    lr_t = lr / max(1, rms)                                (update clipping, AdaFactor-style)
    p <- p * (1 - lr_t * weight_decay)                     (decoupled decay, by the clipped lr;
                                                            decouple_lr=True: 1 - lr_t / max_lr * weight_decay)
    p <- p - lr_t * m / (sqrt(v) + eps)

State per parameter (torch's names): ``step`` (fp32 scalar), ``exp_avg`` and ``exp_avg_sq`` (parameter shape
and dtype). The math runs in fp32 (fp64 for fp64 tensors). torch-optimi keeps one step counter per group; lmopt
keeps torch's per-parameter counter (they agree whenever every parameter has a gradient at every step).

Implementations: ``for_loop`` (plain per-tensor reference) and ``foreach`` (multi-tensor; the per-tensor RMS
values are read back in one transfer per bucket); ``auto`` is ``foreach``. Both give bit-identical results.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import OptimizerSpec, StateTensor
from ._dispatch import as_math, math_dtype, resolve_implementation
from ._impl import traced_lr, traced_step
from .adamw import _copy_back, _upcast, step_tensor
from .base import (
    Implementation,
    LmoptOptimizer,
    check_nonnegative,
    check_positive,
    constructor_defaults,
    is_dtensor,
)

__all__ = ["StableAdamW", "stable_adamw"]


def debias_beta(beta: float, step: float | Tensor) -> float | Tensor:
    """``beta * (1 - beta^(t-1)) / (1 - beta^t)``, written as torch-optimi writes it (0 at t = 1)."""
    return (beta**step - beta) / (beta**step - 1)


def _mean(t: Tensor) -> Tensor:
    """The mean of a (DTensor: the whole, all-reduced) tensor; 0 for an empty tensor (no update to clip)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=t.dtype, device=t.device)
    m = t.mean()
    return m.full_tensor() if is_dtensor(m) else m


def _clipped_lr(lr: float, rms: float) -> float:
    return lr / max(1.0, rms)


def _decay(lr_t: float, weight_decay: float, max_lr: float | None) -> float:
    """The decoupled decay factor: by the clipped lr, or by ``lr_t / max_lr`` (fully decoupled)."""
    return 1 - (lr_t / max_lr if max_lr is not None else lr_t) * weight_decay


class StableAdamWHyper(NamedTuple):
    """The scalar hyperparameters of one StableAdamW step (what every implementation takes)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    max_lr: float | None
    maximize: bool


def _single_tensor_stable_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, hp):
    lr, beta1, beta2, eps, weight_decay, max_lr, maximize = hp
    traced = torch.compiler.is_compiling()
    for p, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        g = as_math(grad)
        if maximize:
            g = -g
        p32, m, v = as_math(p), as_math(exp_avg), as_math(exp_avg_sq)
        step_t += 1
        step = traced_step(step_t)
        beta1_t, beta2_t = debias_beta(beta1, step), debias_beta(beta2, step)
        m.lerp_(g, 1 - beta1_t)
        if traced:  # 0-d tensor scalars: no host read breaks the graph (docs/compile.md)
            v.mul_(beta2_t).add_(g * g * (1 - beta2_t))
        else:
            v.mul_(beta2_t).addcmul_(g, g, value=1 - beta2_t)
        rms = _mean(g.square().div_(v.clamp_min(eps * eps))).sqrt()
        lr_t = lr / rms.clamp(min=1.0) if traced else _clipped_lr(lr, float(rms))
        if weight_decay != 0:
            p32.mul_(_decay(lr_t, weight_decay, max_lr))
        if traced:
            p32.sub_(m / v.sqrt().add_(eps) * lr_t)
        else:
            p32.addcdiv_(m, v.sqrt().add_(eps), value=-lr_t)
        _copy_back([exp_avg, exp_avg_sq, p], [m, v, p32])


def _multi_tensor_stable_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, hp):
    if torch.compiler.is_compiling():  # per tensor with 0-d tensor scalars; Inductor fuses across tensors itself
        return _single_tensor_stable_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, hp)
    lr, beta1, beta2, eps, weight_decay, max_lr, maximize = hp
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype, exp_avgs[i].dtype)].append(i)
    for (_device, pdtype, _sdtype), idx in buckets.items():
        dtype = math_dtype(pdtype)
        p_, m_, v_ = ([ts[i] for i in idx] for ts in (params, exp_avgs, exp_avg_sqs))
        p32, m, v = _upcast(p_, dtype), _upcast(m_, dtype), _upcast(v_, dtype)
        g = _upcast([grads[i] for i in idx], dtype)
        if maximize:
            g = torch._foreach_neg(g)
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        step_values = [float(s) for s in steps]
        torch._foreach_lerp_(m, g, [1 - debias_beta(beta1, s) for s in step_values])
        beta2_t = [debias_beta(beta2, s) for s in step_values]
        torch._foreach_mul_(v, beta2_t)
        torch._foreach_addcmul_(v, g, g, [1 - b for b in beta2_t])
        ratios = torch._foreach_mul(g, g)
        del g
        torch._foreach_div_(ratios, torch._foreach_clamp_min(v, eps * eps))
        rms = torch.stack([_mean(r) for r in ratios]).sqrt().tolist()  # one read-back for the bucket
        del ratios
        lr_t = [_clipped_lr(lr, r) for r in rms]
        if weight_decay != 0:
            torch._foreach_mul_(p32, [_decay(a, weight_decay, max_lr) for a in lr_t])
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, m, denom, [-a for a in lr_t])
        del denom
        _copy_back(m_, m)
        _copy_back(v_, v)
        _copy_back(p_, p32)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_stable_adamw, "foreach": _multi_tensor_stable_adamw}


def stable_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_lr: float | None = None,
    maximize: bool = False,
    implementation: Implementation = "auto",
) -> str:
    """Functional StableAdamW step over lists of tensors (see the module docstring for the rule).

    Updates ``params``, the moments and ``state_steps`` in place. ``max_lr`` given: fully decoupled weight decay
    (``p *= 1 - lr_t / max_lr * weight_decay``). Returns the implementation that ran.
    """
    implementation = resolve_implementation(implementation, tuple(_IMPLEMENTATIONS), owner="StableAdamW")
    hp = StableAdamWHyper(lr, beta1, beta2, eps, weight_decay, max_lr, maximize)
    _IMPLEMENTATIONS[implementation](params, grads, exp_avgs, exp_avg_sqs, state_steps, hp)
    return implementation


class StableAdamW(LmoptOptimizer):
    """StableAdamW: AdamW whose learning rate is divided, per tensor, by ``max(1, RMS(g^2 / max(v, eps^2)))``.

    The clipping tames the loss spikes AdamW shows when the second moment lags behind suddenly larger gradients
    (Wortsman et al. 2023); the moments use debiased betas instead of Adam's bias corrections (same values).

    Args:
        params: parameters or param groups (``lmopt.param_groups(model)`` builds decay / no-decay groups).
        lr: learning rate (default 1e-3; torch-optimi has no default).
        betas: ``(beta1, beta2)`` (default (0.9, 0.99), torch-optimi's).
        weight_decay: decoupled decay coefficient, multiplied by the clipped lr (default 1e-2).
        eps: added to ``sqrt(v)``; ``eps^2`` floors ``v`` in the RMS (default 1e-6, torch-optimi's).
        decouple_lr: fully decoupled weight decay, ``p *= 1 - lr_t / max_lr * weight_decay`` (default False).
        max_lr: the schedule's peak lr for ``decouple_lr`` (default: ``lr``).
        maximize: ascend instead of descend.
        implementation: ``"auto"`` (default, ``"foreach"``), ``"for_loop"`` or ``"foreach"``.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.

    State: ``step``, ``exp_avg``, ``exp_avg_sq`` (parameter shape and dtype). torch-optimi's Kahan summation of
    bf16 parameters is not offered.

    Example:
        >>> opt = StableAdamW(lmopt.param_groups(model, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.95))
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Wortsman et al., "Stable and low-precision training for large-scale vision-language models",
    NeurIPS 2023.
    """

    implementations = ("for_loop", "foreach")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
        *,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        maximize: bool = False,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        if decouple_lr and max_lr is None:  # fixed at construction, as torch-optimi: a schedule must not move it
            max_lr = lr
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if group["max_lr"] is not None:
            check_nonnegative("max_lr", group["max_lr"])
            if float(group["max_lr"]) == 0 and group.get("decouple_lr"):
                raise ValueError(
                    "max_lr must be > 0 for decouple_lr=True (it defaults to lr, here 0): pass max_lr=, the "
                    "schedule's peak learning rate"
                )
            check_positive("max_lr", group["max_lr"])

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        self._implementation_used[id(group)] = stable_adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            lr=traced_lr(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            max_lr=group["max_lr"] if group["decouple_lr"] else None,
            maximize=group["maximize"],
            implementation=group["implementation"],
        )


# ---------------------------------------------------------------------------------------------------------------
# registry entries
def stable_adamw_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [step_tensor(), StateTensor("exp_avg", shape, dtype), StateTensor("exp_avg_sq", shape, dtype)]


SPECS = [
    OptimizerSpec(
        name="stable_adamw",
        cls=StableAdamW,
        summary="AdamW with per-tensor update clipping (lr / max(1, RMS(g^2 / v))); fewer loss spikes",
        paper="Wortsman et al., Stable and low-precision training for large-scale vision-language models, NeurIPS 2023",
        state=stable_adamw_state,
        family="adam",
        aliases={"stableadamw": {}, "stable_adamw_optimi": {}},
    ),
]
