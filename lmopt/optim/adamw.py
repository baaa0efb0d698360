"""Adam, AdamW and AMSGrad at any state precision: fp32, bf16, 8-bit or 4-bit moments.

Update rule (Kingma & Ba 2015; decoupled weight decay: Loshchilov & Hutter 2019; AMSGrad: Reddi et al. 2018),
for gradient ``g_t`` (negated when ``maximize``) at step ``t``:

.. code-block:: text

    Adam:   g <- g + weight_decay * p                     (coupled L2 penalty)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    v_max <- max(v_max, v)                                (AMSGrad only; used in place of v below)
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    AdamW:  p <- p - lr * weight_decay * p                (decoupled decay, from the p before the step)

Cautious masking (``cautious=True``; Liang et al. 2024, :mod:`lmopt.optim._cautious`): the update's direction
``m`` (the denominator is positive) is kept only where it agrees in sign with the gradient ``g`` (the one ``m``
averages: with Adam's coupled L2 penalty included) and rescaled by the kept fraction of the whole tensor,
``m <- m * 1[m * g > 0] / max(mean(1[m * g > 0]), 1e-3)``, before the division by the denominator. Cautious
weight decay (``cautious_weight_decay=True``, AdamW only; Chen et al. 2025): the decoupled decay applies only
where the (masked) update ``u = m / denom`` and the parameter have the same sign, ``1[u * p >= 0]``. Neither
keeps state.

State per parameter (torch's names): ``step`` (fp32 scalar; on the CPU for 8/4-bit state, so reading it never
waits for a GPU), ``exp_avg`` and ``exp_avg_sq`` (parameter shape), ``max_exp_avg_sq`` with ``amsgrad=True``.
``state_precision`` (:mod:`lmopt.optim._precision`) stores the moments in the parameter's dtype (None, default),
``"fp32"``, ``"bf16"``, or blockwise-quantized ``"8bit"`` / ``"4bit"`` (Dettmers et al. 2022; Li et al. 2023:
``<name>_codes`` + ``<name>_scales``, fp32 moments for tensors under ``min_quantized_numel``); ``kahan_comp``
for bf16/fp16 parameters with ``param_rounding="kahan"``. The math always runs in fp32 (fp64 for fp64 tensors).
:class:`AdamW8bit`, :class:`Adam8bit` and :class:`AdamW4bit` are AdamW / Adam with another default precision.

Implementations (``implementation=``, vocabulary in :mod:`lmopt.spec`): ``for_loop`` (the one per-tensor rule
:func:`adam_delta`, the reference, at every precision), ``foreach`` (multi-tensor), ``fused`` (torch's fused
kernel), ``blocked`` (the foreach rule over cache-sized blocks of plain CPU tensors, bit-identical to it; two passes
for the cautious masks, which ``fused`` cannot compute), ``kernel`` (lmopt's C kernel on CPUs, Triton on CUDA, for
8/4-bit state: bit-identical to ``for_loop``), and ``auto`` (default; :func:`lmopt.optim.resolve_implementation`):
``kernel`` for quantized state, ``fused`` where it applies (state in the parameter's dtype, non-DTensor
parameters, no cautious mask), then ``blocked`` (CPU), else ``foreach``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import partialmethod
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import SAME_AS_ADAMW, STATE_PRECISIONS, Implementation, OptimizerSpec, StateTensor, Translation
from . import _dispatch
from ._cautious import CAUTIOUS_MIN_FRACTION, cautious_decay_mask, cautious_mask
from ._dispatch import blockable, blocked_applies, flat_blocks, resolve_implementation
from ._impl import run_on, traced_lr
from ._precision import (
    ROUNDING_CODES,
    MomentPrecision,
    _sqrt,
    adam_scalars,
    kahan_state,
    moments_state,
    validate_state_precision,
    warn_deprecated_precision,
)
from .base import (
    LmoptOptimizer,
    check_flag,
    constructor_defaults,
    is_dtensor,
)

__all__ = ["Adam", "Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit", "adam_delta", "adamw"]


def adam_delta(
    p32: Tensor,
    g32: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    ieee_sqrt: bool = True,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
) -> Tensor:
    """The Adam/AdamW/AMSGrad rule for one tensor (see the module docstring): updates the moments in place
    (math-dtype tensors) and returns the parameter's update. Every precision and the ``for_loop`` path run this;
    lmopt's kernels compute the same operations in the same order (no fused multiply-add). ``ieee_sqrt``: the
    correctly rounded square root the kernels compute (groups with 8/4-bit state); False takes torch's
    vectorized one (3x cheaper on CPU, within an ulp), where no kernel has to be matched bit for bit.
    ``cautious`` / ``cautious_weight_decay``: the masks of the module docstring (no kernel computes them)."""
    if not decoupled and weight_decay != 0:
        g32 = g32 + p32 * weight_decay
    # one scratch tensor for every temporary (fresh allocations of parameter-sized tensors cost page faults)
    scratch = torch.mul(g32, 1 - beta1)
    exp_avg.mul_(beta1).add_(scratch)
    exp_avg_sq.mul_(beta2).add_(torch.mul(g32, g32, out=scratch).mul_(1 - beta2))
    v_hat = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=scratch)
        max_exp_avg_sq.copy_(scratch)
        v_hat = max_exp_avg_sq
    step_size, inv_bc2 = adam_scalars(lr, beta1, beta2, step)
    direction = cautious_mask(exp_avg, g32).mul_(exp_avg) if cautious else exp_avg
    root = _sqrt(v_hat) if ieee_sqrt else torch.sqrt(v_hat, out=scratch)
    delta = torch.div(direction, root.mul_(inv_bc2).add_(eps), out=root).mul_(-step_size)  # -(x * s): exact
    if decoupled and weight_decay != 0:
        decay = p32 * (lr * weight_decay)
        if cautious_weight_decay:  # where u = direction / denom and p agree in sign
            decay.mul_(cautious_decay_mask(direction, p32))
        delta.sub_(decay)
    return delta


class AdamHyper(NamedTuple):
    """The scalar hyperparameters of one Adam/AdamW step (what every implementation takes)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool
    cautious: bool = False
    cautious_weight_decay: bool = False

    def rule(self) -> dict[str, Any]:
        """The keywords of :func:`adam_delta`, less ``step``."""
        return {k: v for k, v in self._asdict().items() if k not in ("amsgrad", "maximize")}


def _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp):
    amsgrad, maximize = hp.amsgrad, hp.maximize
    for i, p in enumerate(params):
        math_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        grad = grads[i].to(math_dtype)
        if maximize:
            grad = -grad
        p32, m, v = _upcast([p, exp_avgs[i], exp_avg_sqs[i]], math_dtype)
        vmax = _upcast([max_exp_avg_sqs[i]], math_dtype)[0] if amsgrad else None
        state_steps[i] += 1
        delta = adam_delta(p32, grad, m, v, vmax, step=float(state_steps[i]), **hp.rule(), ieee_sqrt=False)
        p32.add_(delta)
        _copy_back(
            [exp_avgs[i], exp_avg_sqs[i], p, *([max_exp_avg_sqs[i]] if amsgrad else [])],
            [m, v, p32, *([vmax] if amsgrad else [])],
        )


def _upcast(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _copy_back(dst: list[Tensor], src: list[Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if pairs and not is_dtensor(pairs[0][0]):
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
    else:  # DTensor has no sharding rule for _foreach_copy_
        for d, s in pairs:
            d.copy_(s)


def _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp):
    lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, cautious, cautious_wd = hp
    traced = torch.compiler.is_compiling()
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
                if not cautious_wd:  # cautious decay needs the update's sign: applied below
                    torch._foreach_mul_(p32, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, p32, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        # the update's direction: m, masked per tensor where cautious (the mean is over each whole tensor)
        direction = [cautious_mask(mi, gi).mul_(mi) for mi, gi in zip(m, g, strict=True)] if cautious else m
        del g
        if cautious_wd and decoupled and weight_decay != 0:
            decay = [pi.mul(cautious_decay_mask(di, pi)) for pi, di in zip(p32, direction, strict=True)]
            torch._foreach_mul_(decay, lr * weight_decay)
            torch._foreach_sub_(p32, decay)
            del decay
        if amsgrad:
            vmax_ = [max_exp_avg_sqs[i] for i in idx]
            vmax = _upcast(vmax_, math_dtype)
            torch._foreach_maximum_(vmax, v)
            _copy_back(vmax_, vmax)
            v_hat = vmax
        else:
            v_hat = v
        if traced:  # the step counters stay tensors (reading them is a graph break): torch's capturable formulation
            bias_correction2_sqrt = [(1 - beta2**s).sqrt() for s in steps]
        else:
            step_values = [float(s) for s in steps]
            bias_correction2_sqrt = [math.sqrt(1 - beta2**s) for s in step_values]
        denom = torch._foreach_sqrt(v_hat)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        if traced:
            torch._foreach_mul_(denom, torch._foreach_div([1 - beta1**s for s in steps], -lr))
            torch._foreach_addcdiv_(p32, direction, denom)
        else:
            torch._foreach_addcdiv_(p32, direction, denom, [-lr / (1 - beta1**s) for s in step_values])
        del denom, direction
        _copy_back([exp_avgs[i] for i in idx], m)
        _copy_back([exp_avg_sqs[i] for i in idx], v)
        _copy_back(p_, p32)


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp):
    amsgrad = hp.amsgrad
    kernel = torch._fused_adamw_ if hp.decoupled else torch._fused_adam_
    # torch's fused kernel walks every tensor as flat contiguous memory: a strided or transposed tensor gets wrong
    # updates and an expanded (stride-0) gradient NaN (docs/hardening.md has the reproducer). Such tensors take
    # the foreach path, which computes the same rule through strided views.
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else exp_avg_sqs)
    strided = [i for i in range(len(params)) if not all(t[i].is_contiguous() for t in lists)]
    if strided:
        run_on(
            _multi_tensor_adamw,
            strided,
            (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params), state_steps),
            hp,
        )
    buckets: dict[tuple, list[int]] = defaultdict(list)
    skip = set(strided)
    for i, p in enumerate(params):
        if i not in skip:
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
            lr=hp.lr,
            beta1=hp.beta1,
            beta2=hp.beta2,
            weight_decay=hp.weight_decay,
            eps=hp.eps,
            amsgrad=hp.amsgrad,
            maximize=hp.maximize,
        )


def _blocked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp):
    """The foreach rule over cache-sized blocks of each large plain contiguous fp32/fp64 CPU tensor (the same
    operations, so the same values; the rest take foreach). It exists for the cautious masks, which torch's fused
    kernel cannot compute: their kept fraction is a whole-tensor mean, so a masked tensor takes two passes -- the
    moments and the count of agreeing signs, then the update -- about 40 B per fp32 parameter from memory, where
    the foreach rule makes ~15 passes (``auto`` picks ``fused`` for unmasked groups: one pass)."""
    amsgrad = hp.amsgrad
    large, rest = [], []
    for i, p in enumerate(params):
        tensors = [p, grads[i], exp_avgs[i], exp_avg_sqs[i], *([max_exp_avg_sqs[i]] if amsgrad else [])]
        same = all(t.dtype == p.dtype for t in tensors) and p.dtype in (torch.float32, torch.float64)
        # small tensors: one foreach call per op beats Python calls per block
        big = p.numel() >= max(1, _dispatch.BLOCK_ELEMENTS // 4)
        (large if same and big and blockable(*tensors) else rest).append(i)
    scratch: dict[torch.dtype, Tensor] = {}
    for i in large:
        p = params[i]
        size = min(p.numel(), _dispatch.BLOCK_ELEMENTS)
        if p.dtype not in scratch or scratch[p.dtype].shape[1] < size:
            scratch[p.dtype] = torch.empty((4, size), dtype=p.dtype, device=p.device)
        state_steps[i] += 1
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        _blocked_adamw_tensor(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, float(state_steps[i]), hp, scratch[p.dtype]
        )
    run_on(
        _multi_tensor_adamw,
        rest,
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params), state_steps),
        hp,
    )


def _blocked_adamw_tensor(p, g, m, v, vmax, step: float, hp: AdamHyper, scratch: Tensor) -> None:
    """One tensor of :func:`_blocked_adamw`; ``scratch``: 4 rows of at least one block."""
    lr, beta1, beta2, eps, weight_decay, decoupled, _amsgrad, maximize, cautious, cautious_wd = hp
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = -lr / (1 - beta1**step)
    flat = [t.view(-1) for t in (p, g, m, v, *([vmax] if vmax is not None else []))]
    blocks = list(flat_blocks(p.numel()))

    def views(start, stop):
        pb, gb, mb, vb, *rest = (t[start:stop] for t in flat)
        gbuf, buf, denom, decay = (row[: stop - start] for row in scratch)
        if maximize:
            gb = torch.neg(gb, out=gbuf)
        if not decoupled and weight_decay != 0:
            gb = torch.add(gb, pb, alpha=weight_decay, out=gbuf)
        return pb, gb, mb, vb, (rest[0] if rest else None), buf, denom, decay

    kept = 0.0
    for start, stop in blocks:  # pass 1 (the only one without the masks): the moments
        pb, gb, mb, vb, vmaxb, buf, denom, decay = views(start, stop)
        mb.lerp_(gb, 1 - beta1)
        vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
        if vmaxb is not None:
            torch.maximum(vmaxb, vb, out=vmaxb)
        if cautious:
            kept += float(torch.mul(mb, gb, out=buf).gt_(0).sum())
        else:  # no mask: the update in the same pass
            _blocked_adamw_update(pb, mb, vmaxb if vmaxb is not None else vb, mb, denom, decay, hp, step_size,
                                  bias_correction2_sqrt)  # fmt: skip
    if not cautious:
        return
    fraction = max(kept / p.numel(), CAUTIOUS_MIN_FRACTION)  # mean(mask) of lmopt.optim._cautious
    for start, stop in blocks:  # pass 2: the masked update
        pb, gb, mb, vb, vmaxb, buf, denom, decay = views(start, stop)
        direction = torch.mul(mb, gb, out=buf).gt_(0).div_(fraction).mul_(mb)
        _blocked_adamw_update(pb, direction, vmaxb if vmaxb is not None else vb, mb, denom, decay, hp, step_size,
                              bias_correction2_sqrt)  # fmt: skip


def _blocked_adamw_update(p, direction, v_hat, m, denom, decay, hp, step_size, bias_correction2_sqrt) -> None:
    lr, weight_decay, decoupled, cautious_wd = hp.lr, hp.weight_decay, hp.decoupled, hp.cautious_weight_decay
    if decoupled and weight_decay != 0:
        if cautious_wd:  # where u = direction / denom and p agree in sign (lmopt.optim._cautious)
            p.sub_(torch.mul(direction, p, out=decay).ge_(0).mul_(p).mul_(lr * weight_decay))
        else:
            p.mul_(1 - lr * weight_decay)
    torch.sqrt(v_hat, out=denom).div_(bias_correction2_sqrt).add_(hp.eps)
    p.addcdiv_(direction, denom, value=step_size)


_IMPLEMENTATIONS = {
    "for_loop": _single_tensor_adamw,
    "foreach": _multi_tensor_adamw,
    "fused": _fused_adamw,
    "blocked": _blocked_adamw,
}


def fused_applies(params: list[Tensor], exp_avgs: list[Tensor]) -> bool:
    """torch's fused kernel needs state in the parameter's dtype, plain (non-DTensor) CPU or CUDA tensors."""
    return all(
        m.dtype == p.dtype and p.device.type in ("cpu", "cuda") and not is_dtensor(p) for p, m in zip(params, exp_avgs)
    )


def _blocked_applies(params: list[Tensor], exp_avgs: list[Tensor]) -> bool:
    """``blocked`` walks plain contiguous CPU tensors whose moments have the parameter's dtype (as ``fused``)."""
    return blocked_applies(params) and all(m.dtype == p.dtype for p, m in zip(params, exp_avgs))


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
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    implementation: Implementation = "auto",
) -> str:
    """Functional Adam/AdamW/AMSGrad step over lists of tensors with full-precision moments (see the module
    docstring for the rule).

    Updates ``params``, the moments and ``state_steps`` in place. ``decoupled=False`` is Adam with an L2
    penalty added to the gradient. ``cautious`` / ``cautious_weight_decay``: the masks of the module docstring
    (torch's fused kernel cannot mask: ``"auto"`` then takes ``blocked`` on CPU, else ``foreach``). Returns the
    implementation that ran (what ``"auto"`` chose).
    """
    masked = cautious or (cautious_weight_decay and decoupled and weight_decay != 0)
    implementation = resolve_implementation(
        implementation,
        tuple(_IMPLEMENTATIONS),
        {"fused": fused_applies(params, exp_avgs) and not masked, "blocked": _blocked_applies(params, exp_avgs)},
        owner="cautious AdamW" if masked else "AdamW",
    )
    hp = AdamHyper(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, cautious, cautious_weight_decay)
    _IMPLEMENTATIONS[implementation](params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp)
    return implementation


class AdamW(MomentPrecision, LmoptOptimizer):
    """AdamW (decoupled weight decay), optionally AMSGrad, with moments at any state precision.

    Args:
        params: parameters or param groups (``lmopt.param_groups(model)`` builds decay / no-decay groups).
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)`` moment decay rates (default (0.9, 0.999); LLM pre-training uses (0.9, 0.95)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay coefficient, multiplied by lr (default 0.01).
        amsgrad: keep the running maximum of the second moment (Reddi et al. 2018).
        maximize: ascend instead of descend.
        state_precision: how the moments are stored: None (the parameter's dtype, default), ``"fp32"``,
            ``"bf16"`` (4 bytes of state per parameter instead of 8), ``"8bit"`` (~2) or ``"4bit"`` (~1); see
            :mod:`lmopt.optim._precision`.
        block_size: elements per absmax block of 8/4-bit moments (default None: 256 for 8-bit, 128 for 4-bit).
        min_quantized_numel: tensors with fewer elements keep fp32 moments under 8/4-bit precision (default
            4096).
        implementation: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"fused"`` (full-precision
            moments), ``"blocked"`` (CPU, full-precision moments; ``auto``'s choice for cautious groups there) or
            ``"kernel"`` (8/4-bit moments: the C kernel on CPU, Triton on CUDA). For 8/4-bit state the old name
            ``"fused"`` means ``"kernel"``.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.
        param_rounding: how bf16/fp16 parameters (no fp32 master copy) take the update: ``"nearest"``
            (default), ``"stochastic"`` (bf16) or ``"kahan"`` (adds a ``kahan_comp`` state tensor in the
            parameter's dtype); see :mod:`lmopt.quant.rounding`. No effect on fp32 parameters.
        state_dtype: deprecated alias of ``state_precision`` (``"fp32"`` / ``"bf16"``).
        cautious: mask the update where its sign disagrees with the gradient, rescaled by the kept fraction
            (default False; Liang et al. 2024; registry ``cautious_adamw``). torch's fused kernel and lmopt's
            8/4-bit kernel cannot mask: ``"auto"`` takes ``blocked`` (CPU) / ``foreach`` / the per-tensor rule
            instead (``repr`` says which ran) and an explicit ``"fused"`` / ``"kernel"`` is refused.
        cautious_weight_decay: decay only where the update and the parameter have the same sign (default
            False; Chen et al. 2025, arXiv:2510.12402); AdamW (decoupled decay) only.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(lmopt.param_groups(model, weight_decay=0.1), lr=3e-4, betas=(0.9, 0.95))
        >>> model(torch.randn(8, 4)).square().mean().backward(); opt.step(); opt.zero_grad()
        >>> opt8 = AdamW(model.parameters(), state_precision="8bit")   # = lmopt.AdamW8bit(model.parameters())
        >>> c_opt = AdamW(model.parameters(), cautious=True)             # = create_optimizer("cautious_adamw", ...)

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; 8-bit state: Dettmers
    et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022; 4-bit: Li et al., "Memory Efficient
    Optimizers with 4-bit States", NeurIPS 2023.
    """

    implementations = ("for_loop", "foreach", "fused", "blocked", "kernel")
    moments = (("exp_avg", "first"), ("exp_avg_sq", "second"))
    kernel_algorithm = "adam"
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
        state_precision: str | torch.dtype | None = None,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        param_rounding: str = "nearest",
        state_dtype: str | torch.dtype | None = None,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
    ) -> None:
        warn_deprecated_precision("state_dtype", state_dtype)
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        group.setdefault("param_rounding", "nearest")
        validate_state_precision(group, legacy="state_dtype")
        quantized = self._quantized_group(group)
        if quantized and group["implementation"] == "fused":  # the old low-bit classes' name for the kernel
            group["implementation"] = "kernel"
        impl = group["implementation"]
        if quantized and impl not in ("auto", "kernel", "for_loop", "compiled"):
            raise ValueError(
                f"implementation={impl!r} needs full-precision moments; state_precision="
                f"{group['state_precision']!r} steps with implementation='kernel' (C/Triton), 'for_loop' or 'auto'"
            )
        if not quantized and impl == "kernel":
            raise ValueError(
                "implementation='kernel' is lmopt's 8/4-bit step kernel; use state_precision='8bit' or '4bit', or "
                "implementation='auto' / 'fused' / 'foreach' / 'for_loop'"
            )
        if impl == "fused" and group["state_precision"] is not None:
            raise ValueError(
                "implementation='fused' needs state in the parameter's dtype (torch's fused kernel); with "
                f"state_precision={group['state_precision']!r} use implementation='foreach' or 'auto'"
            )
        self._validate_cautious(group, quantized)

    def _validate_cautious(self, group: dict[str, Any], quantized: bool) -> None:
        group.setdefault("cautious", False)
        group.setdefault("cautious_weight_decay", False)
        check_flag("cautious", group["cautious"])
        check_flag("cautious_weight_decay", group["cautious_weight_decay"])
        if group["cautious_weight_decay"] and not self._decoupled:
            raise ValueError(
                "cautious_weight_decay=True masks decoupled weight decay (Chen et al. 2025); Adam's coupled L2 "
                "penalty is part of the gradient: use AdamW (or lmopt.Adam without cautious_weight_decay)"
            )
        if not _masks(group):
            return
        impl = group["implementation"]
        if impl in ("fused", "kernel"):
            what = "torch's fused kernel" if impl == "fused" else "lmopt's 8/4-bit C/Triton kernel"
            raise ValueError(
                f"implementation={impl!r} ({what}) cannot mask updates, which cautious=True / "
                "cautious_weight_decay=True need; use implementation='auto' (it picks "
                f"{'the per-tensor rule' if quantized else 'blocked on CPU, else foreach'}) or "
                f"{'for_loop' if quantized else 'blocked / foreach / for_loop'}"
            )
        if quantized and any(is_dtensor(p) for p in group["params"]):
            raise NotImplementedError(
                "cautious masking with 8/4-bit state steps each local shard of a DTensor (FSDP2) parameter alone, "
                "so the kept fraction would be a shard's, not the tensor's; use state_precision='bf16' / 'fp32' "
                "with cautious=True under FSDP2"
            )

    def _moments(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        return (*self.moments, ("max_exp_avg_sq", "second")) if group.get("amsgrad") else self.moments

    def _kernel_applies_to_group(self, group: dict[str, Any]) -> bool:
        return not group["amsgrad"] and not _masks(group)  # the kernels have no (whole-tensor) masks

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        # quantized groups count steps on the CPU (as torch.optim's non-capturable optimizers): reading the
        # counter for the bias corrections and the stochastic-rounding key then never waits for the GPU
        device = "cpu" if self._quantized_group(group) else param.device
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        self._init_moments(group, param, state)
        self._init_rounding(group, param, state)

    def _update(self, group, p32, g32, values, step):
        beta1, beta2 = group["betas"]
        return adam_delta(
            p32,
            g32,
            values["exp_avg"],
            values["exp_avg_sq"],
            values.get("max_exp_avg_sq"),
            step=step,
            lr=traced_lr(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled=self._decoupled,
            ieee_sqrt=self._quantized_group(group),
            cautious=group["cautious"],
            cautious_weight_decay=group["cautious_weight_decay"],
        )

    def _kernel_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            lr=float(group["lr"]),
            decoupled=self._decoupled,
            maximize=group["maximize"],
            rounding=ROUNDING_CODES[group["param_rounding"]],
        )

    def _kernel_scalars(self, group: dict[str, Any], step: float) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        return adam_scalars(float(group["lr"]), beta1, beta2, step)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        impl = group["implementation"]
        if self._quantized_group(group):
            used = self._step_quantized(group, params, grads, impl != "for_loop")
            if impl != "for_loop" and _masks(group):
                used += " (cautious: lmopt's 8/4-bit kernel cannot mask; the per-tensor rule ran)"
            self._implementation_used[id(group)] = used
            return
        used = []
        if group["param_rounding"] != "nearest":  # low-precision parameters take the rounded per-tensor rule
            low = {i for i, p in enumerate(params) if p.dtype in (torch.bfloat16, torch.float16)}
            if low:
                self._step_per_tensor(group, [params[i] for i in low], [grads[i] for i in low])
                used.append(f"{group['param_rounding']} rounding (per tensor)")
                params = [p for i, p in enumerate(params) if i not in low]
                grads = [g for i, g in enumerate(grads) if i not in low]
        if params and impl == "for_loop":
            used.append(self._step_per_tensor(group, params, grads))
        elif params:
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            used.append(
                adamw(
                    params,
                    grads,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                    [s["step"] for s in states],
                    lr=traced_lr(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled=self._decoupled,
                    amsgrad=group["amsgrad"],
                    maximize=group["maximize"],
                    cautious=group["cautious"],
                    cautious_weight_decay=group["cautious_weight_decay"],
                    implementation=impl,
                )
            )
        self._implementation_used[id(group)] = " + ".join(used)

    def __repr__(self) -> str:
        text = super().__repr__()
        if any(self._quantized_group(g) for g in self.param_groups):
            text += f"\n  state: {self.state_summary()}"
        return text


def _masks(group: Mapping[str, Any]) -> bool:
    """The group masks its updates (cautious, or cautious weight decay with decay to mask)."""
    return bool(group.get("cautious")) or bool(group.get("cautious_weight_decay") and group.get("weight_decay"))


class Adam(AdamW):
    """Adam with a coupled L2 penalty (``g <- g + weight_decay * p``); ``weight_decay`` defaults to 0.

    Same arguments, state, precisions and implementations as :class:`AdamW`. AMSGrad: ``Adam(...,
    amsgrad=True)``.

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """

    _decoupled = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,  # torch.optim.Adam's default and position; the rest as AdamW's
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        state_precision: str | torch.dtype | None = None,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        param_rounding: str = "nearest",
        state_dtype: str | torch.dtype | None = None,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
    ) -> None:
        options = constructor_defaults(locals())
        super().__init__(params, **options, nonfinite=nonfinite, check_finite=check_finite)


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise-quantized moments (Dettmers et al. 2022): ~2 bytes of state per parameter.

    ``AdamW(..., state_precision="8bit")``: same arguments (``block_size`` default 256, ``min_quantized_numel``
    4096, ``param_rounding``), same rule; ``implementation="auto"`` runs lmopt's C kernel on CPUs and the Triton
    kernel on CUDA (``"kernel"``; the old name ``"fused"`` still works), ``"for_loop"`` the PyTorch reference,
    bit for bit the same. ``optimizer.state_summary()`` (also in ``repr``) says which tensors are quantized.

    Example:
        >>> opt = lmopt.AdamW8bit(lmopt.param_groups(model, weight_decay=0.1), lr=3e-4, betas=(0.9, 0.95))

    Reference: Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
    ICLR 2022.
    """

    __init__ = partialmethod(AdamW.__init__, state_precision="8bit")  # type: ignore[assignment]


class Adam8bit(Adam):
    """Adam (coupled L2: ``g <- g + weight_decay * p``) with 8-bit moments; ``weight_decay`` defaults to 0.

    ``Adam(..., state_precision="8bit")``; see :class:`AdamW8bit`.

    Reference: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022; Kingma & Ba 2015.
    """

    __init__ = partialmethod(Adam.__init__, state_precision="8bit")  # type: ignore[assignment]


class AdamW4bit(AdamW):
    """AdamW with 4-bit moments (Li et al. 2023): ~1 byte of state per parameter.

    ``AdamW(..., state_precision="4bit")``: first moment on a signed 4-bit dynamic-exponent map, second moment
    on a zero-point-free linear map (``(k + 1) / 16``, so no second moment rounds to zero), blocks of 128 by
    default, codes two per byte; see :class:`AdamW8bit`.

    Reference: Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
    """

    __init__ = partialmethod(AdamW.__init__, state_precision="4bit")  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
# registry entries
def step_tensor() -> StateTensor:
    """torch's per-parameter ``step`` counter: an fp32 scalar tensor."""
    return StateTensor("step", (), torch.float32)


def adam_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    moments = AdamW.moments + ((("max_exp_avg_sq", "second"),) if hyper.get("amsgrad") else ())
    return [step_tensor(), *moments_state(moments, shape, dtype, hyper), *kahan_state(shape, dtype, hyper)]


_ADAMW_PAPER = "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019"
_ADAM_PAPER = "Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015"
_CAUTIOUS_PAPER = (
    "Liang, Chen, Liu & Liu, Cautious Optimizers: Improving Training with One Line of Code, arXiv:2411.16085, 2024"
)
_DETTMERS = "Dettmers, Lewis, Shleifer & Zettlemoyer, 8-bit Optimizers via Block-wise Quantization, ICLR 2022"
#: lmopt compare's workload: the learning rate is lmopt tune's full-grid pick on it (docs/compare.md, "What tuning
#: says about the recipes")
_ADAMW_COMPARE = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
_ADAM_COMPARE = {"lr": 1e-3, "betas": (0.9, 0.95)}
_LOW_BIT = Translation(
    label="8-bit Adam paper: as AdamW",
    source="Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022: "
    "8-bit state uses the 32-bit hyperparameters unchanged",
)
_ADAM_FAMILY = dict(state=adam_state, family="adam", state_precisions=STATE_PRECISIONS)

SPECS = [
    OptimizerSpec(
        name="adamw",
        cls=AdamW,
        summary="Adam with decoupled weight decay; the LLM default; fp32 / bf16 / 8-bit / 4-bit moments",
        paper=_ADAMW_PAPER,
        aliases={
            "adamw_torch": {},
            "adamw_hf": {},
            "adamw_torch_fused": {"implementation": "fused"},
            "adamw_bf16": {"state_precision": "bf16"},
            "paged_adamw_32bit": {"offload": True},  # the offload path (docs/offload.md)
            "paged_adamw": {"offload": True},
        },
        lookahead=True,
        translation=SAME_AS_ADAMW,
        compare=_ADAMW_COMPARE,
        compare_default=1,
        recommend_tier=0,
        recommend_reason="AdamW, the reference",
        **_ADAM_FAMILY,
    ),
    OptimizerSpec(
        name="cautious_adamw",
        cls=AdamW,
        summary="AdamW with cautious masking (update kept where it agrees with the gradient); no extra state",
        paper=_CAUTIOUS_PAPER,
        defaults={"cautious": True},
        aliases={
            "c_adamw": {},
            "adamw_cautious": {},
            "cautious_adamw_cwd": {"cautious_weight_decay": True},
            "cautious_adamw8bit": {"state_precision": "8bit"},
        },
        translation=SAME_AS_ADAMW,
        compare=_ADAMW_COMPARE,
        **_ADAM_FAMILY,
    ),
    OptimizerSpec(
        name="adam",
        cls=Adam,
        summary="Adam with coupled L2 weight decay",
        paper=_ADAM_PAPER,
        lookahead=True,
        translation=SAME_AS_ADAMW,
        compare=_ADAM_COMPARE,
        **_ADAM_FAMILY,
    ),
    OptimizerSpec(
        name="amsgrad",
        cls=AdamW,
        summary="AdamW with the running maximum of the second moment",
        paper="Reddi, Kale & Kumar, On the Convergence of Adam and Beyond, ICLR 2018",
        defaults={"amsgrad": True},
        aliases={"adamw_amsgrad": {}},
        translation=SAME_AS_ADAMW,
        compare=_ADAMW_COMPARE,
        **_ADAM_FAMILY,
    ),
    OptimizerSpec(
        name="adamw8bit",
        cls=AdamW8bit,
        summary="AdamW with 8-bit blockwise-quantized moments (2 B/param); C / Triton kernel",
        paper=_DETTMERS,
        aliases={
            "adamw_bnb_8bit": {},
            "adamw_8bit": {},
            "adamw_torch_8bit": {},
            "paged_adamw_8bit": {"offload": True},  # the offload path (docs/offload.md), never the plain one
            "adamw_8bit_sr": {"param_rounding": "stochastic"},
            "adamw_8bit_kahan": {"param_rounding": "kahan"},
        },
        translation=_LOW_BIT,
        compare=_ADAMW_COMPARE,
        compare_default=2,
        recommend_tier=1,
        recommend_reason="8-bit AdamW: 1/4 of the state, AdamW's quality (Dettmers et al. 2022)",
        **_ADAM_FAMILY,
    ),
    OptimizerSpec(
        name="adam8bit",
        cls=Adam8bit,
        summary="Adam (coupled L2) with 8-bit blockwise-quantized moments",
        paper=_DETTMERS,
        aliases={"adam_8bit": {}, "adam_bnb_8bit": {}, "paged_adam_8bit": {"offload": True}},
        translation=_LOW_BIT,
        compare=_ADAM_COMPARE,
        **_ADAM_FAMILY,
    ),
    OptimizerSpec(
        name="adamw4bit",
        cls=AdamW4bit,
        summary="AdamW with 4-bit moments (1 B/param): DE map for m, zero-free linear map for v",
        paper="Li, Chen & Zhu, Memory Efficient Optimizers with 4-bit States, NeurIPS 2023",
        aliases={"adamw_torch_4bit": {}, "adamw_4bit": {}},
        translation=_LOW_BIT,
        compare=_ADAMW_COMPARE,
        recommend_tier=2,
        recommend_reason="4-bit AdamW: 1/8 of the state (Li et al. 2023)",
        **_ADAM_FAMILY,
    ),
]
