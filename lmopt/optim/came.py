"""CAME: Adafactor's factored second moment plus a confidence-guided, factored residual.

Update rule (Luo et al. 2023, Algorithm 1, as the authors' ``came-pytorch`` package), for gradient ``g``:

.. code-block:: text

    tensors with >= 2 dims (factored over the last two dims):
        R <- beta2 * R + (1 - beta2) * mean_cols(g^2 + eps1);  C <- likewise over rows    (row_var, col_var)
        u <- g / sqrt(R C^T / mean(R))
    tensors with < 2 dims:  V <- beta2 * V + (1 - beta2) * (g^2 + eps1);  u <- g / sqrt(V)      (variance)
    u <- u / max(1, RMS(u) / clip_threshold)                                     (update clipping)
    m <- beta1 * m + (1 - beta1) * u                                             (exp_avg)
    factored:  res <- (u - m)^2 + eps2                                           (instability)
               Rr <- beta3 * Rr + (1 - beta3) * mean_cols(res);  Cr <- likewise  (res_row_var, res_col_var)
               update <- m / sqrt(Rr Cr^T / mean(Rr))                            (confidence-guided step)
    otherwise: update <- m
    p <- p - lr * weight_decay * p - lr * update                                 (decoupled decay)

State per parameter: ``step`` (fp32 scalar); the first moment ``exp_avg`` (parameter shape, in the parameter's
dtype by default); for factored tensors ``row_var``, ``col_var`` and the residual's ``res_row_var``,
``res_col_var``; else ``variance`` (statistics in fp32, fp64 for fp64 parameters). About 4.0 bytes per fp32
parameter (the first moment) plus the factors.

``momentum_precision`` keeps the first moment in ``"fp32"``, ``"bf16"`` (2 B/param), ``"8bit"`` (1.016 B/param:
``exp_avg_codes`` uint8 + one fp32 ``exp_avg_scales`` per 256 values) or ``"4bit"`` (0.531 B/param: codes two
per byte + one scale per 128), with the signed dynamic-exponent maps of Dettmers et al. 2022 / Li et al. 2023;
tensors under ``min_quantized_numel`` elements (default 4096) keep an fp32 ``exp_avg``. A quantized step is:
dequantize ``m`` -> the fp32 update above, unchanged (the parameter moves by the unquantized new ``m``, and the
residual uses it) -> quantize ``m`` back (see :mod:`lmopt.optim._momentum`). The factored statistics stay fp32.

Implementations: ``for_loop`` (plain per-tensor reference; reductions over dims, right on DTensor) and
``blocked`` (plain CPU tensors: cache-blocked passes -- statistics, RMS of the update without materialising it,
the first moment with the residual's statistics, then the parameter update); ``auto`` picks ``blocked`` on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import STATE_PRECISIONS, OptimizerSpec, StateTensor, Translation
from ._dispatch import blockable, math_dtype, resolve_implementation
from ._impl import copy_back, ema_, run_on, traced_lr, upcast
from ._momentum import (
    QuantizedMomentumLoading,
    init_momentum,
    momentum_state,
    momentum_summary,
    step_with_momentum,
    validate_momentum_options,
)
from ._precision import warn_deprecated_precision
from .adafactor import (
    _as_batched,
    approx_rsqrt_factors,
    blocked_clipped_factors,
    check_eps_pair,
    clip_update_,
    column_sums,
    ema_factors_,
    factored_precondition,
    factored_shapes,
    second_moment_update,
    split_blockable,
)
from .base import (
    Implementation,
    LmoptOptimizer,
    check_positive,
    constructor_defaults,
)

__all__ = ["CAME", "came"]


class CAMEHyper(NamedTuple):
    """The scalar hyperparameters of one CAME step (what every implementation takes)."""

    lr: float
    eps1: float
    eps2: float
    clip_threshold: float
    beta1: float
    beta2: float
    beta3: float
    weight_decay: float


def _single_tensor_came(
    params, grads, row_vars, col_vars, res_row_vars, res_col_vars, variances, exp_avgs, state_steps, hp
):
    for i, p in enumerate(params):
        state_steps[i] += 1
        if p.numel() == 0:
            continue
        dtype = math_dtype(p.dtype)
        p32 = upcast(p, dtype)
        g = grads[i].to(dtype)
        update = second_moment_update(g, hp.eps1, hp.beta2, row_vars[i], col_vars[i], variances[i])
        clip_update_(update, hp.clip_threshold)
        m = exp_avgs[i]
        m32 = upcast(m, dtype)
        ema_(m32, update, hp.beta1)
        if row_vars[i] is not None:
            res = (update - m32).square_().add_(hp.eps2)
            ema_factors_(res_row_vars[i], res_col_vars[i], res, hp.beta3)
            update = factored_precondition(res_row_vars[i], res_col_vars[i], m32)
        else:
            update = m32
        if hp.weight_decay != 0:
            p32.mul_(1 - hp.weight_decay * hp.lr)
        p32.add_(update, alpha=-hp.lr)
        copy_back(m, m32)
        copy_back(p, p32)


def _blocked_came(params, grads, row_vars, col_vars, res_row_vars, res_col_vars, variances, exp_avgs, state_steps, hp):
    lr, beta1 = hp.lr, hp.beta1
    take, rest = split_blockable(params, grads, row_vars, exp_avgs)
    for i in take:
        p, m = params[i], exp_avgs[i]
        state_steps[i] += 1
        blocks, g3, a, b = blocked_clipped_factors(
            p, grads[i], row_vars[i], col_vars[i], hp.beta2, hp.eps1, hp.clip_threshold
        )
        nb, nr, nc = blocks.batch, blocks.rows, blocks.cols
        p3, m3 = _as_batched(p), _as_batched(m)
        # pass 3: the first moment, and the residual's row/column sums while u and m are in cache
        res_row_sum = torch.empty(nb, nr, dtype=blocks.dtype, device=p.device)
        res_col_sum = torch.zeros(nb, nc, dtype=blocks.dtype, device=p.device)
        # a low-precision m (bf16) is rounded when stored; the parameter moves by the unrounded new m (as in the
        # for_loop path and the paper), kept here in the math dtype until pass 4
        m_exact = None if m.dtype == blocks.dtype else torch.empty(nb, nr, nc, dtype=blocks.dtype, device=p.device)
        for k, r0, r1, buf in blocks:
            mc = m3[k, r0:r1]
            m32 = mc if m_exact is None else m_exact[k, r0:r1].copy_(mc)
            u = torch.outer(a[k, r0:r1], b[k], out=buf).mul_(blocks.read(g3[k, r0:r1]))
            ema_(m32, u, beta1)
            res = u.sub_(m32).square_()
            torch.sum(res, dim=1, out=res_row_sum[k, r0:r1])
            res_col_sum[k].add_(column_sums(res, blocks))
            copy_back(mc, m32)
        res_row, res_col = res_row_vars[i].view(nb, nr), res_col_vars[i].view(nb, nc)
        ema_(res_row, res_row_sum.div_(nc).add_(hp.eps2), hp.beta3)
        ema_(res_col, res_col_sum.div_(nr).add_(hp.eps2), hp.beta3)
        ra, rb = approx_rsqrt_factors(res_row, res_col)
        ra.mul_(-lr)
        decay = 1 - hp.weight_decay * lr if hp.weight_decay != 0 else None
        low = p.dtype != blocks.dtype
        # pass 4: p <- p * decay - lr * (ra rb^T) * m
        for k, r0, r1, buf in blocks:
            pc = p3[k, r0:r1]
            p32 = blocks.read(pc)
            scale = torch.outer(ra[k, r0:r1], rb[k], out=buf)
            if decay is not None:
                p32.mul_(decay)
            p32.addcmul_(scale, m3[k, r0:r1] if m_exact is None else m_exact[k, r0:r1])
            if low:
                pc.copy_(p32)
    lists = (params, grads, row_vars, col_vars, res_row_vars, res_col_vars, variances, exp_avgs, state_steps)
    run_on(_single_tensor_came, rest, lists, hp)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_came, "blocked": _blocked_came}


def came(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    res_row_vars: list[Tensor | None],
    res_col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    beta1: float,
    beta2: float,
    beta3: float,
    weight_decay: float,
    implementation: Implementation = "auto",
) -> str:
    """Functional CAME step (see the module docstring); lists hold ``None`` where a tensor has no such
    state."""
    blocked = all(p.device.type == "cpu" and blockable(p) for p in params)
    implementation = resolve_implementation(
        {"fused": "blocked"}.get(implementation, implementation),
        tuple(_IMPLEMENTATIONS),
        {"blocked": blocked},
        preference=("blocked", "for_loop"),
        owner="came",
    )
    hp = CAMEHyper(lr, eps1, eps2, clip_threshold, beta1, beta2, beta3, weight_decay)
    _IMPLEMENTATIONS[implementation](
        params, grads, row_vars, col_vars, res_row_vars, res_col_vars, variances, exp_avgs, state_steps, hp
    )
    return implementation


class CAME(QuantizedMomentumLoading, LmoptOptimizer):
    """CAME: confidence-guided adaptive memory-efficient optimization (Adafactor + factored residual).

    Args:
        params: parameters or param groups.
        lr: learning rate (default 2e-4, the paper's BERT/GPT-2 setting).
        betas: ``(beta1, beta2, beta3)``: first moment, second moment, residual decays
            (default (0.9, 0.999, 0.9999)).
        eps: ``(eps1, eps2)`` added to ``g^2`` and to the residual (default (1e-30, 1e-16)).
        clip_threshold: the update's RMS is clipped to this (default 1.0).
        weight_decay: decoupled decay, multiplied by lr (default 0.0).
        state_precision: storage of the first moment ``exp_avg``: ``None`` (default: the parameter's dtype),
            ``"fp32"``, ``"bf16"``, ``"8bit"`` or ``"4bit"`` (blockwise-quantized, signed dynamic-exponent map).
        block_size: values per absmax scale of a quantized moment (default None: 256 for 8-bit, 128 for 4-bit;
            a multiple of 16 in [16, 4096]).
        min_quantized_numel: tensors with fewer elements keep an fp32 first moment (default 4096).
        implementation: ``"auto"`` (default), ``"for_loop"`` or ``"blocked"`` (old name ``"fused"``).
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.
        momentum_precision: deprecated alias of ``state_precision``.

    State: ``step``, ``exp_avg`` (or ``exp_avg_codes`` + ``exp_avg_scales`` when quantized); ``row_var``,
    ``col_var``, ``res_row_var``, ``res_col_var`` (>= 2 dims) or ``variance`` (< 2 dims).

    Example:
        >>> opt = CAME(lmopt.param_groups(model, weight_decay=0.01), lr=2e-4)
        >>> opt = CAME(model.parameters(), lr=2e-4, state_precision="8bit")   # ~1 B/param of state
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023;
    quantized first moment after Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
    and Li et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
    """

    implementations = ("for_loop", "blocked")
    implementation_aliases = {"fused": "blocked"}  # the name before lmopt's one vocabulary
    betas_count = 3

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-4,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        *,
        state_precision: str | torch.dtype | None = None,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        momentum_precision: str | torch.dtype | None = None,
    ) -> None:
        warn_deprecated_precision("momentum_precision", momentum_precision)
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_eps_pair("eps", group["eps"])
        check_positive("clip_threshold", group["clip_threshold"])
        validate_momentum_options(group)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        stat_dtype = math_dtype(param.dtype)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        init_momentum(type(self).__name__, group, param, state)
        shapes = factored_shapes(tuple(param.shape))
        if shapes is not None:
            state["row_var"] = param.new_zeros(shapes[0], dtype=stat_dtype)
            state["col_var"] = param.new_zeros(shapes[1], dtype=stat_dtype)
            state["res_row_var"] = param.new_zeros(shapes[0], dtype=stat_dtype)
            state["res_col_var"] = param.new_zeros(shapes[1], dtype=stat_dtype)
        else:
            state["variance"] = torch.zeros_like(param, dtype=stat_dtype, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        eps1, eps2 = group["eps"]
        beta1, beta2, beta3 = group["betas"]

        def run(idx: list[int], exp_avgs: list[Tensor | None]) -> str:
            return came(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                *([states[i].get(k) for i in idx] for k in ("row_var", "col_var", "res_row_var", "res_col_var")),
                [states[i].get("variance") for i in idx],
                exp_avgs,  # type: ignore[arg-type]
                [states[i]["step"] for i in idx],
                lr=traced_lr(group["lr"]),
                eps1=eps1,
                eps2=eps2,
                clip_threshold=group["clip_threshold"],
                beta1=beta1,
                beta2=beta2,
                beta3=beta3,
                weight_decay=group["weight_decay"],
                implementation=group["implementation"],
            )

        self._implementation_used[id(group)] = step_with_momentum(group, params, states, run)

    def __repr__(self) -> str:
        summary = momentum_summary(self.param_groups, list(self.state.values()))
        return super().__repr__() + (f"\n  state: {summary}" if summary else "")


# ------------------------------------------------------------------------------------------------------------
# registry entries
def came_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """``step``, the first moment at ``momentum_precision`` (codes + scales when quantized), the factors."""
    stat = math_dtype(dtype)
    out = [StateTensor("step", (), torch.float32), *momentum_state(shape, dtype, hyper)]
    shapes = factored_shapes(shape)
    if shapes is not None:
        out += [
            StateTensor("row_var", shapes[0], stat),
            StateTensor("col_var", shapes[1], stat),
            StateTensor("res_row_var", shapes[0], stat),
            StateTensor("res_col_var", shapes[1], stat),
        ]
    else:
        out.append(StateTensor("variance", shape, stat))
    return out


SPECS = [
    OptimizerSpec(
        name="came",
        cls=CAME,
        summary="Adafactor's factored second moment + factored confidence residual; one full moment of state "
        "(fp32, or bf16 / 8-bit / 4-bit with momentum_precision)",
        paper="Luo et al., CAME: Confidence-guided Adaptive Memory Efficient Optimization, ACL 2023",
        state=came_state,
        family="factored",
        aliases={
            "came_bf16": {"state_precision": "bf16"},
            "came8bit": {"state_precision": "8bit"},
            "came4bit": {"state_precision": "4bit"},
        },
        state_precisions=STATE_PRECISIONS,
        translation=Translation(
            label="CAME paper: betas (b1, 0.999, 0.9999), eps (1e-30, 1e-16)",
            betas="came",
            pass_eps=False,
            optional={"pretrain": {"eps": (1e-30, 1e-16)}, "finetune": {"eps": (1e-30, 1e-16)}},
            source="Luo et al., CAME: Confidence-guided Adaptive Memory Efficient Optimization, ACL 2023: betas "
            "(beta1, 0.999, 0.9999), eps (1e-30, 1e-16), lr and weight decay as AdamW",
        ),
        # its confidence-scaled update takes larger steps than AdamW's at the same lr: lmopt tune's full grid on
        # this workload picks 5.8e-5, 1/17 of tuned AdamW's (docs/compare.md, "What tuning says about the recipes")
        compare={"lr": 6e-5, "weight_decay": 0.1},
        compare_default=5,
        recommend_tier=2,
        recommend_reason="CAME: factored state (Luo et al. 2023)",
    ),
]
