"""AdEMAMix: Adam with a mixture of a fast and a slow EMA of the gradient, with a choice of state precision.

Update rule (Pagliardini, Ablin & Grangier 2024, Algorithm 1, as bitsandbytes' ``AdEMAMix`` implements it:
``bitsandbytes/optim/ademamix.py`` and its CPU kernel ``bitsandbytes/backends/cpu/ops.py``), for gradient ``g_t``
(negated when ``maximize``) at step ``t``:

.. code-block:: text

    alpha_t = min(t * alpha / t_alpha, alpha)                                   (t_alpha None: alpha)
    beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 - s) ln(beta3) + s ln(beta1))), beta3),  s = t / t_beta3
                                                                                (t_beta3 None: beta3)
    m1 <- beta1 * m1 + (1 - beta1) * g            (fast EMA, ``exp_avg``)
    m2 <- beta3_t * m2 + (1 - beta3_t) * g        (slow EMA, ``exp_avg_slow``; no bias correction)
    nu <- beta2 * nu + (1 - beta2) * g^2          (second moment, ``exp_avg_sq``)
    p  <- p * (1 - lr * weight_decay)             (decoupled decay)
    p  <- p - lr * (m1 / (1 - beta1^t) + alpha_t * m2) / (sqrt(nu) / sqrt(1 - beta2^t) + eps)

Cautious masking (``cautious=True``; Liang et al. 2024, :mod:`lmopt.optim._cautious`): the whole update direction
``d = m1 / (1 - beta1^t) + alpha_t * m2`` is kept where it agrees in sign with ``g`` and rescaled by the kept
fraction of the tensor, ``d * 1[d * g > 0] / max(mean, 1e-3)``, before the division by the denominator
(pytorch_optimizer's ``cautious`` masks ``m1`` alone); cautious weight decay (``cautious_weight_decay=True``;
Chen et al. 2025) decays only where ``d`` and ``p`` agree in sign. No state.

State per parameter (torch's names): ``step`` (fp32 scalar), ``exp_avg``, ``exp_avg_slow`` and ``exp_avg_sq``,
at ``state_precision``: ``None`` (the parameter's dtype), ``"fp32"`` (fp64 for fp64 parameters), ``"bf16"``,
``"8bit"`` or ``"4bit"`` (blockwise quantized with :mod:`lmopt.quant.moments`: ``<name>_codes`` and
``<name>_scales``; signed maps for the two EMAs, an unsigned map for ``nu``; tensors with fewer than
``min_quantized_numel`` elements keep fp32 moments). bitsandbytes stores ``m1`` and ``m2`` stacked in one
``state1`` tensor; lmopt keeps them apart, each with its own blocks (bitsandbytes' 8-bit blocks are also per
EMA, so the quantization is the same). The math always runs in fp32 (fp64 for fp64 parameters); a quantized
tensor is stepped alone: dequantize its moments, the same update, quantize them back.

Implementations: ``for_loop`` (:func:`ademamix_delta` per tensor, the reference at every precision) and
``foreach`` (multi-tensor, full-precision moments); ``auto`` is ``foreach``. With 8/4-bit state every tensor steps
through the per-tensor rule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..spec import STATE_PRECISIONS, Implementation, OptimizerSpec, StateTensor
from ._cautious import cautious_decay_mask, cautious_mask
from ._dispatch import math_dtype, resolve_implementation
from ._impl import scalar_min, scalar_sqrt, traced_lr, traced_step
from ._precision import MomentPrecision, moments_state, validate_state_precision
from .adamw import _copy_back, _upcast, step_tensor
from .base import LmoptOptimizer, check_flag, check_nonnegative, constructor_defaults, is_dtensor

__all__ = ["AdEMAMix", "ademamix", "ademamix_delta"]

#: (state name, moment kind): signed EMAs, a non-negative second moment
_MOMENTS = (("exp_avg", "first"), ("exp_avg_slow", "first"), ("exp_avg_sq", "second"))


def alpha_schedule(alpha: float, step: float | Tensor, t_alpha: int | None) -> float | Tensor:
    """The paper's linear warmup of alpha over ``t_alpha`` steps (None or 0: no warmup)."""
    return scalar_min(step * alpha / t_alpha, alpha) if t_alpha else alpha


def beta3_schedule(beta1: float, beta3: float, step: float | Tensor, t_beta3: int | None) -> float | Tensor:
    """The paper's beta3 warmup over ``t_beta3`` steps, from beta1 to beta3 with a half-life growing linearly
    (None or 0: no warmup)."""
    if not t_beta3:
        return beta3
    ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
    s = step / t_beta3
    exponent = (ln_beta1 * ln_beta3) / ((1 - s) * ln_beta3 + s * ln_beta1)
    return scalar_min(exponent.exp() if isinstance(exponent, Tensor) else math.exp(exponent), beta3)


def _scalars(state_steps, *, beta1, beta2, beta3, alpha, t_alpha, t_beta3):
    """Increment the step counters; per tensor: (1 - beta3_t, alpha_t, 1 - beta1^t, sqrt(1 - beta2^t))."""
    torch._foreach_add_(state_steps, 1)
    return [_step_scalars(float(t), beta1, beta2, beta3, alpha, t_alpha, t_beta3) for t in state_steps]


def _step_scalars(step, beta1, beta2, beta3, alpha, t_alpha, t_beta3):
    weight3 = 1 - beta3_schedule(beta1, beta3, step, t_beta3)
    return weight3, alpha_schedule(alpha, step, t_alpha), 1 - beta1**step, scalar_sqrt(1 - beta2**step)


def ademamix_delta(
    p32: Tensor,
    g32: Tensor,
    exp_avg: Tensor,
    exp_avg_slow: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    t_alpha: int | None = None,
    t_beta3: int | None = None,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
) -> Tensor:
    """The AdEMAMix rule for one tensor (see the module docstring): updates the three moments in place (math
    dtype) and returns the parameter's update. The ``for_loop`` path and every state precision run this."""
    weight3, alpha_t, bias_correction1, bias_correction2_sqrt = _step_scalars(
        step, beta1, beta2, beta3, alpha, t_alpha, t_beta3
    )
    exp_avg.lerp_(g32, 1 - beta1)
    exp_avg_slow.lerp_(g32, weight3)
    exp_avg_sq.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    mixed = torch.mul(exp_avg_slow, alpha_t).add_(torch.div(exp_avg, bias_correction1))
    if cautious:
        mixed.mul_(cautious_mask(mixed, g32))
    decay = p32 * (lr * weight_decay) if weight_decay != 0 else None
    if decay is not None and cautious_weight_decay:
        decay.mul_(cautious_decay_mask(mixed, p32))
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    delta = mixed.div_(denom).mul_(-lr)
    if decay is not None:
        delta.sub_(decay)
    return delta


def _single_tensor_ademamix(params, grads, m1s, m2s, nus, state_steps, *, maximize, **hyper):
    torch._foreach_add_(state_steps, 1)
    for i, (p, grad) in enumerate(zip(params, grads)):
        (p32, g, m1, m2, nu) = _upcast([p, grad, m1s[i], m2s[i], nus[i]], math_dtype(p.dtype))
        if maximize:
            g = -g
        p32.add_(ademamix_delta(p32, g, m1, m2, nu, step=traced_step(state_steps[i]), **hyper))
        _copy_back([m1s[i], m2s[i], nus[i], p], [m1, m2, nu, p32])


def _multi_tensor_ademamix(params, grads, m1s, m2s, nus, state_steps, *, lr, beta1, beta2, eps, weight_decay,
                           maximize, cautious=False, cautious_weight_decay=False, **schedule):  # fmt: skip
    if torch.compiler.is_compiling():  # per tensor with 0-d tensor scalars; Inductor fuses across tensors itself
        return _single_tensor_ademamix(params, grads, m1s, m2s, nus, state_steps, lr=lr, beta1=beta1, beta2=beta2,
                                       eps=eps, weight_decay=weight_decay, maximize=maximize, cautious=cautious,
                                       cautious_weight_decay=cautious_weight_decay, **schedule)  # fmt: skip
    scalars = _scalars(state_steps, beta1=beta1, beta2=beta2, **schedule)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype, m1s[i].dtype)].append(i)
    for (_device, pdtype, _sdtype), idx in buckets.items():
        dtype = math_dtype(pdtype)
        p_, m1_, m2_, nu_ = ([ts[i] for i in idx] for ts in (params, m1s, m2s, nus))
        p32, m1, m2, nu = (_upcast(ts, dtype) for ts in (p_, m1_, m2_, nu_))
        g = _upcast([grads[i] for i in idx], dtype)
        if maximize:
            g = torch._foreach_neg(g)
        weight3, alpha_t, bias_correction1, bias_correction2_sqrt = (list(c) for c in zip(*(scalars[i] for i in idx)))
        torch._foreach_lerp_(m1, g, 1 - beta1)
        torch._foreach_lerp_(m2, g, weight3)
        torch._foreach_mul_(nu, beta2)
        torch._foreach_addcmul_(nu, g, g, 1 - beta2)
        mixed = torch._foreach_mul(m2, alpha_t)
        torch._foreach_add_(mixed, torch._foreach_div(m1, bias_correction1))
        if cautious:  # per tensor: the kept fraction is each whole tensor's
            torch._foreach_mul_(mixed, [cautious_mask(d, gi) for d, gi in zip(mixed, g, strict=True)])
        del g
        if weight_decay != 0 and cautious_weight_decay:
            decay = [pi.mul(cautious_decay_mask(d, pi)) for pi, d in zip(p32, mixed, strict=True)]
            torch._foreach_add_(p32, decay, alpha=-lr * weight_decay)
            del decay
        elif weight_decay != 0:
            torch._foreach_mul_(p32, 1 - lr * weight_decay)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, mixed, denom, -lr)
        del mixed, denom
        for dst, src in ((m1_, m1), (m2_, m2), (nu_, nu), (p_, p32)):
            _copy_back(dst, src)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_ademamix, "foreach": _multi_tensor_ademamix}


def ademamix(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_slows: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    t_alpha: int | None = None,
    t_beta3: int | None = None,
    maximize: bool = False,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    implementation: Implementation = "auto",
) -> str:
    """Functional AdEMAMix step over lists of tensors (see the module docstring for the rule).

    Updates ``params``, the three moments and ``state_steps`` in place; moments in another dtype than the math
    dtype are upcast and written back. Returns the implementation that ran (what ``"auto"`` chose).
    """
    implementation = resolve_implementation(implementation, tuple(_IMPLEMENTATIONS), owner="AdEMAMix")
    _IMPLEMENTATIONS[implementation](
        params,
        grads,
        exp_avgs,
        exp_avg_slows,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        t_alpha=t_alpha,
        t_beta3=t_beta3,
        maximize=maximize,
        cautious=cautious,
        cautious_weight_decay=cautious_weight_decay,
    )
    return implementation


class AdEMAMix(MomentPrecision, LmoptOptimizer):
    """AdEMAMix: ``p -= lr * (m1_hat + alpha * m2) / (sqrt(nu_hat) + eps)`` with a slow EMA ``m2`` (beta3).

    The slow EMA (half-life of ~7000 steps at beta3=0.9999) keeps gradients from thousands of steps ago in the
    update; the fast one (beta1) keeps Adam's responsiveness. The paper warms alpha and beta3 up over ``t_alpha``
    / ``t_beta3`` steps (typically the whole run) to avoid early instability.

    Args:
        params: parameters or param groups (``lmopt.param_groups(model)`` builds decay / no-decay groups).
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2, beta3)``: fast EMA, second moment, slow EMA (default (0.9, 0.999, 0.9999)).
        alpha: weight of the slow EMA (default 5.0).
        t_alpha: steps of alpha's linear warmup (default None: none).
        t_beta3: steps of beta3's warmup from beta1 (default None: none).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay coefficient, multiplied by lr (default 1e-2).
        maximize: ascend instead of descend.
        state_precision: ``None`` (the parameter's dtype, default), ``"fp32"``, ``"bf16"``, ``"8bit"`` or
            ``"4bit"`` moments (8-bit: 3 + 12/256 B/param instead of 12).
        block_size: elements per absmax block of quantized moments (default 256 for 8-bit, 128 for 4-bit).
        min_quantized_numel: smaller tensors keep fp32 moments (default 4096, as bitsandbytes' min_8bit_size).
        implementation: ``"auto"`` (default, ``"foreach"``), ``"for_loop"`` or ``"foreach"``.
        cautious: mask the update where its sign disagrees with the gradient, rescaled by the kept fraction
            (default False; Liang et al. 2024).
        cautious_weight_decay: decay only where the update and the parameter agree in sign (default False;
            Chen et al. 2025, arXiv:2510.12402).
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.

    Example:
        >>> opt = AdEMAMix(lmopt.param_groups(model, weight_decay=0.1), lr=1e-3, t_alpha=100_000, t_beta3=100_000)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", ICLR 2025
    (arXiv:2409.03137, 2024).
    """

    implementations = ("for_loop", "foreach")
    moments = _MOMENTS
    betas_count = 3

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        state_precision: str | torch.dtype | None = None,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("alpha", group["alpha"])
        for name in ("t_alpha", "t_beta3"):
            value = group[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0 (steps of warmup), got {value!r}")
        if group["t_beta3"] and min(group["betas"][0], group["betas"][2]) == 0:
            raise ValueError(f"betas[0] and betas[2] must be > 0 with t_beta3 (log-space warmup), got {group['betas']}")
        validate_state_precision(group)
        group.setdefault("cautious", False)
        group.setdefault("cautious_weight_decay", False)
        check_flag("cautious", group["cautious"])
        check_flag("cautious_weight_decay", group["cautious_weight_decay"])
        masked = group["cautious"] or (group["cautious_weight_decay"] and group["weight_decay"])
        if masked and self._quantized_group(group) and any(is_dtensor(p) for p in group["params"]):
            raise NotImplementedError(
                "cautious masking with 8/4-bit state steps each local shard of a DTensor (FSDP2) parameter alone, "
                "so the kept fraction would be a shard's, not the tensor's; use state_precision='bf16' / 'fp32' "
                "with cautious=True under FSDP2"
            )

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        self._init_moments(group, param, state)

    def _update(self, group, p32, g32, values, step):
        beta1, beta2, beta3 = group["betas"]
        return ademamix_delta(
            p32,
            g32,
            *(values[name] for name, _ in _MOMENTS),
            step=step,
            lr=traced_lr(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            t_alpha=group["t_alpha"],
            t_beta3=group["t_beta3"],
            cautious=group["cautious"],
            cautious_weight_decay=group["cautious_weight_decay"],
        )

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        impl = group["implementation"]
        if self._quantized_group(group):  # whatever the implementation: one tensor at a time (dequantize, the rule,
            # quantize back), so the fp32 temporaries are those of the largest tensor
            used = self._step_quantized(group, params, grads, kernel=False)
        elif impl == "for_loop":
            used = self._step_per_tensor(group, params, grads)
        else:
            states = [self.state[p] for p in params]
            beta1, beta2, beta3 = group["betas"]
            used = ademamix(
                params,
                grads,
                *([s[name] for s in states] for name, _ in _MOMENTS),
                [s["step"] for s in states],
                lr=traced_lr(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                beta3=beta3,
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                t_alpha=group["t_alpha"],
                t_beta3=group["t_beta3"],
                maximize=group["maximize"],
                cautious=group["cautious"],
                cautious_weight_decay=group["cautious_weight_decay"],
                implementation=impl,
            )
        self._implementation_used[id(group)] = used


# ---------------------------------------------------------------------------------------------------------------
# registry entries
def ademamix_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [step_tensor(), *moments_state(_MOMENTS, shape, dtype, hyper)]


SPECS = [
    OptimizerSpec(
        name="ademamix",
        cls=AdEMAMix,
        summary="Adam with a fast and a slow gradient EMA (alpha * m2, beta3=0.9999); 12 B/param, 8-bit: ~3",
        paper="Pagliardini, Ablin & Grangier, The AdEMAMix Optimizer: Better, Faster, Older, ICLR 2025",
        state=ademamix_state,
        family="adam",
        state_precisions=STATE_PRECISIONS,
        aliases={
            "ademamix8bit": {"state_precision": "8bit"},
            "ademamix_8bit": {"state_precision": "8bit"},
            "ademamix_32bit": {"state_precision": "fp32"},
            "paged_ademamix_8bit": {"state_precision": "8bit", "offload": True},
            "paged_ademamix_32bit": {"state_precision": "fp32", "offload": True},
            "ademamix4bit": {"state_precision": "4bit"},
            "cautious_ademamix": {"cautious": True},
        },
    ),
]
