"""Adam, AdamW and AMSGrad with a choice of state precision.

Update rule (Kingma & Ba 2015; decoupled weight decay: Loshchilov & Hutter 2019; AMSGrad: Reddi et al. 2018),
for gradient ``g_t`` (negated when ``maximize``) at step ``t``:

.. code-block:: text

    AdamW:  p <- p * (1 - lr * weight_decay)              (decoupled decay)
    Adam:   g <- g + weight_decay * p                     (coupled L2 penalty)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    v_max <- max(v_max, v)                                (AMSGrad only; used in place of v below)
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

State per parameter (torch's names): ``step`` (fp32 scalar), ``exp_avg`` and ``exp_avg_sq`` (parameter shape,
in ``state_dtype``: the parameter's dtype by default, or bf16), ``max_exp_avg_sq`` with ``amsgrad=True``.
The math always runs in fp32 (fp64 for fp64 tensors).

Implementations (``implementation=``): ``for_loop`` (the plain per-tensor path, the reference), ``foreach``
(multi-tensor), ``fused`` (torch's fused CPU/GPU kernel: one pass over memory), and ``auto`` (default:
``fused`` where it applies -- state in the parameter's dtype, non-DTensor parameters -- else ``foreach``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..quant.rounding import PARAM_ROUNDINGS, apply_update_, stochastic_key
from ..registry import OptimizerSpec, StateTensor
from .base import (
    Implementation,
    LmoptOptimizer,
    check_betas,
    check_choice,
    check_nonnegative,
    check_positive,
    is_dtensor,
)

__all__ = ["Adam", "AdamW", "adamw"]

_STATE_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def normalize_state_dtype(state_dtype: Any) -> str | None:
    """``None`` (follow the parameter), ``"fp32"`` or ``"bf16"``; torch dtypes are accepted and named."""
    state_dtype = _DTYPE_NAMES.get(state_dtype, state_dtype)
    check_choice("state_dtype", state_dtype, list(_STATE_DTYPES))
    return state_dtype


def resolve_state_dtype(state_dtype: str | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a moment tensor for a parameter of ``param_dtype``."""
    resolved = _STATE_DTYPES[state_dtype]
    return param_dtype if resolved is None else resolved


def _single_tensor_adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
):
    for i, p in enumerate(params):
        grad = grads[i].to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        if maximize:
            grad = -grad
        p32 = p if p.dtype in (torch.float32, torch.float64) else p.float()
        m = exp_avgs[i] if exp_avgs[i].dtype == p32.dtype else exp_avgs[i].to(p32.dtype)
        v = exp_avg_sqs[i] if exp_avg_sqs[i].dtype == p32.dtype else exp_avg_sqs[i].to(p32.dtype)
        state_steps[i] += 1
        step = float(state_steps[i])
        if weight_decay != 0:
            if decoupled:
                p32.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(p32, alpha=weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsgrad:
            vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs[i].dtype == p32.dtype else max_exp_avg_sqs[i].to(p32.dtype)
            torch.maximum(vmax, v, out=vmax)
            if vmax is not max_exp_avg_sqs[i]:
                max_exp_avg_sqs[i].copy_(vmax)
            v_hat = vmax
        else:
            v_hat = v
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (v_hat.sqrt() / bias_correction2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-lr / bias_correction1)
        if m is not exp_avgs[i]:
            exp_avgs[i].copy_(m)
        if v is not exp_avg_sqs[i]:
            exp_avg_sqs[i].copy_(v)
        if p32 is not p:
            p.copy_(p32)


def _upcast(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _copy_back(dst: list[Tensor], src: list[Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if pairs and not is_dtensor(pairs[0][0]):
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
    else:  # DTensor has no sharding rule for _foreach_copy_
        for d, s in pairs:
            d.copy_(s)


def _multi_tensor_adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
):
    # one foreach pass per (device, parameter dtype, state dtype) bucket
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype, exp_avgs[i].dtype)].append(i)
    for (_device, pdtype, _sdtype), idx in buckets.items():
        math_dtype = torch.float64 if pdtype == torch.float64 else torch.float32
        p_ = [params[i] for i in idx]
        p32 = _upcast(p_, math_dtype)
        g = _upcast([grads[i] for i in idx], math_dtype)
        if maximize:
            g = torch._foreach_neg(g)
        m = _upcast([exp_avgs[i] for i in idx], math_dtype)
        v = _upcast([exp_avg_sqs[i] for i in idx], math_dtype)
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(p32, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, p32, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        if amsgrad:
            vmax_ = [max_exp_avg_sqs[i] for i in idx]
            vmax = _upcast(vmax_, math_dtype)
            torch._foreach_maximum_(vmax, v)
            _copy_back(vmax_, vmax)
            v_hat = vmax
        else:
            v_hat = v
        step_values = [float(s) for s in steps]
        bias_correction2_sqrt = [math.sqrt(1 - beta2**s) for s in step_values]
        step_size = [-lr / (1 - beta1**s) for s in step_values]
        denom = torch._foreach_sqrt(v_hat)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, m, denom, step_size)
        del denom
        _copy_back([exp_avgs[i] for i in idx], m)
        _copy_back([exp_avg_sqs[i] for i in idx], v)
        _copy_back(p_, p32)


def _fused_adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
):
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for idx in buckets.values():
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        kernel(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [max_exp_avg_sqs[i] for i in idx] if amsgrad else [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=amsgrad,
            maximize=maximize,
        )


_IMPLEMENTATIONS = {"for_loop": _single_tensor_adamw, "foreach": _multi_tensor_adamw, "fused": _fused_adamw}


def fused_applies(params: list[Tensor], exp_avgs: list[Tensor]) -> bool:
    """torch's fused kernel needs state in the parameter's dtype, plain (non-DTensor) CPU or CUDA tensors."""
    return all(
        m.dtype == p.dtype and p.device.type in ("cpu", "cuda") and not is_dtensor(p) for p, m in zip(params, exp_avgs)
    )


def adamw(
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
    eps: float,
    weight_decay: float,
    decoupled: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    implementation: Implementation = "auto",
) -> str:
    """Functional Adam/AdamW/AMSGrad step over lists of tensors (see the module docstring for the rule).

    Updates ``params``, the moments and ``state_steps`` in place. ``decoupled=False`` is Adam with an L2
    penalty added to the gradient. Returns the implementation that ran (what ``"auto"`` chose).
    """
    if implementation == "auto":
        implementation = "fused" if fused_applies(params, exp_avgs) else "foreach"
    if implementation == "fused" and not fused_applies(params, exp_avgs):
        raise ValueError(
            "implementation='fused' needs state in the parameter's dtype on CPU/CUDA non-DTensor parameters; "
            "use implementation='foreach' or 'auto'"
        )
    _IMPLEMENTATIONS[implementation](
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
    )
    return implementation


class AdamW(LmoptOptimizer):
    """AdamW (decoupled weight decay), optionally AMSGrad, with fp32 or bf16 moments.

    Args:
        params: parameters or param groups (``lmopt.param_groups(model)`` builds decay / no-decay groups).
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)`` moment decay rates (default (0.9, 0.999); LLM pre-training uses (0.9, 0.95)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay coefficient, multiplied by lr (default 0.01).
        amsgrad: keep the running maximum of the second moment (Reddi et al. 2018).
        maximize: ascend instead of descend.
        state_dtype: ``None`` (the parameter's dtype, default), ``"fp32"`` or ``"bf16"`` moments
            (bf16 halves state memory: 4 bytes per parameter instead of 8).
        implementation: ``"auto"`` (default), ``"for_loop"``, ``"foreach"`` or ``"fused"``.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.
        param_rounding: how bf16/fp16 parameters (no fp32 master copy) take the update: ``"nearest"``
            (default), ``"stochastic"`` (bf16) or ``"kahan"`` (adds a ``kahan_comp`` state tensor in the
            parameter's dtype); see :mod:`lmopt.quant.rounding`. No effect on fp32 parameters.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(lmopt.param_groups(model, weight_decay=0.1), lr=3e-4, betas=(0.9, 0.95))
        >>> model(torch.randn(8, 4)).square().mean().backward(); opt.step(); opt.zero_grad()

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    implementations = ("for_loop", "foreach", "fused")
    _decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        state_dtype: str | torch.dtype | None = None,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        param_rounding: str = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            state_dtype=state_dtype,
            implementation=implementation,
            param_rounding=param_rounding,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_positive("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_choice("amsgrad", group["amsgrad"], (True, False))
        check_choice("maximize", group["maximize"], (True, False))
        group["state_dtype"] = normalize_state_dtype(group["state_dtype"])
        check_choice("implementation", group["implementation"], ("auto", *self.implementations))
        group.setdefault("param_rounding", "nearest")
        check_choice("param_rounding", group["param_rounding"], PARAM_ROUNDINGS)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        dtype = resolve_state_dtype(group["state_dtype"], param.dtype)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        rounding = group.get("param_rounding", "nearest")
        if rounding == "stochastic" and param.dtype == torch.float16:
            raise ValueError("param_rounding='stochastic' supports bf16 parameters, not float16; use 'kahan'")
        if rounding == "kahan" and param.dtype in (torch.bfloat16, torch.float16):
            state["kahan_comp"] = torch.zeros_like(param, memory_format=torch.contiguous_format)

    def _rounded_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """bf16/fp16 parameters without a master copy, ``param_rounding`` "stochastic" or "kahan": the update of
        each tensor is computed on an fp32 copy (one tensor at a time: no full-model temporaries), then written
        back with that rounding (lmopt.quant.rounding)."""
        beta1, beta2 = group["betas"]
        seeds = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        impl = "for_loop" if group["implementation"] == "for_loop" else "foreach"
        for p, g in zip(params, grads):
            s = self.state[p]
            shadow = p.float()
            adamw(
                [shadow],
                [g],
                [s["exp_avg"]],
                [s["exp_avg_sq"]],
                [s["max_exp_avg_sq"]] if group["amsgrad"] else [],
                [s["step"]],
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=self._decoupled,
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                implementation=impl,
            )
            before = p.float()
            apply_update_(
                p,
                before,
                shadow.sub_(before),
                group["param_rounding"],
                comp=s.get("kahan_comp"),
                key=stochastic_key(seeds.get(id(p), 0), int(float(s["step"]))),
            )

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        if group.get("param_rounding", "nearest") != "nearest":
            low = [i for i, p in enumerate(params) if p.dtype in (torch.bfloat16, torch.float16)]
            if low:
                self._rounded_step(group, [params[i] for i in low], [grads[i] for i in low])
                self._implementation_used[id(group)] = f"{group['param_rounding']} rounding (per tensor)"
                keep = [i for i in range(len(params)) if i not in set(low)]
                params, grads = [params[i] for i in keep], [grads[i] for i in keep]
                if not params:
                    return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        self._implementation_used[id(group)] = adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=self._decoupled,
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            implementation=group["implementation"],
        )


class Adam(AdamW):
    """Adam with a coupled L2 penalty (``g <- g + weight_decay * p``); ``weight_decay`` defaults to 0.

    Same arguments, state and implementations as :class:`AdamW`. AMSGrad: ``Adam(..., amsgrad=True)``.

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """

    _decoupled = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        state_dtype: str | torch.dtype | None = None,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        param_rounding: str = "nearest",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            state_dtype=state_dtype,
            implementation=implementation,
            nonfinite=nonfinite,
            check_finite=check_finite,
            param_rounding=param_rounding,
        )


# ---------------------------------------------------------------------------------------------------------------
# registry entries
def step_tensor() -> StateTensor:
    """torch's per-parameter ``step`` counter: an fp32 scalar tensor."""
    return StateTensor("step", (), torch.float32)


def adam_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    moment = resolve_state_dtype(normalize_state_dtype(hyper.get("state_dtype")), dtype)
    out = [step_tensor(), StateTensor("exp_avg", shape, moment), StateTensor("exp_avg_sq", shape, moment)]
    if hyper.get("amsgrad"):
        out.append(StateTensor("max_exp_avg_sq", shape, moment))
    if hyper.get("param_rounding") == "kahan" and dtype in (torch.bfloat16, torch.float16):
        out.append(StateTensor("kahan_comp", shape, dtype))
    return out


_ADAMW_PAPER = "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019"
_ADAM_PAPER = "Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015"

SPECS = [
    OptimizerSpec(
        name="adamw",
        cls=AdamW,
        summary="Adam with decoupled weight decay; the LLM default",
        paper=_ADAMW_PAPER,
        state=adam_state,
        family="adam",
        aliases={
            "adamw_torch": {},
            "adamw_hf": {},
            "adamw_torch_fused": {"implementation": "fused"},
            "adamw_bf16": {"state_dtype": "bf16"},
        },
    ),
    OptimizerSpec(
        name="adam",
        cls=Adam,
        summary="Adam with coupled L2 weight decay",
        paper=_ADAM_PAPER,
        state=adam_state,
        family="adam",
    ),
    OptimizerSpec(
        name="amsgrad",
        cls=AdamW,
        summary="AdamW with the running maximum of the second moment",
        paper="Reddi, Kale & Kumar, On the Convergence of Adam and Beyond, ICLR 2018",
        state=adam_state,
        defaults={"amsgrad": True},
        family="adam",
        aliases={"adamw_amsgrad": {}},
    ),
]
