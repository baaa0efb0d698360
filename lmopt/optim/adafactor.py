"""Adafactor: a factored second moment (row and column statistics), update clipping, relative step sizes.

Update rule (Shazeer & Stern 2018, Algorithms 4 and 5, with the conventions of transformers' ``Adafactor``),
for gradient ``g`` at step ``t`` of a parameter ``p``:

.. code-block:: text

    beta2_t = 1 - t^decay_rate                                   (decay_rate = -0.8)
    rho_t   = min(lr, 1/sqrt(t))         if relative_step        (lr caps the relative step; 1e-2 by default)
            = min(1e-6 * t, 1/sqrt(t))   if relative_step and warmup_init
            = lr                         otherwise (explicit learning rate, for fine-tuning)
    lr_t    = max(eps2, RMS(p)) * rho_t  if scale_parameter, else rho_t
    tensors with >= 2 dims (factored over the last two dims; leading dims are a batch of matrices):
        R <- beta2_t * R + (1 - beta2_t) * mean_cols(g^2 + eps1)         (row_var: shape[:-1])
        C <- beta2_t * C + (1 - beta2_t) * mean_rows(g^2 + eps1)         (col_var: shape[:-2] + shape[-1:])
        u <- g / sqrt(R C^T / mean(R))                                   (rank-1 second-moment estimate)
    tensors with < 2 dims:
        V <- beta2_t * V + (1 - beta2_t) * (g^2 + eps1);  u <- g / sqrt(V)          (variance)
    u <- lr_t * u / max(1, RMS(u) / clip_threshold)                     (update clipping)
    m <- beta1 * m + (1 - beta1) * u;  u <- m                           (only when beta1 is not None)
    p <- p - weight_decay * lr_t * p - u                                (decoupled decay)

State per parameter (torch.optim.Adafactor's key names): ``step`` (fp32 scalar); ``row_var`` and ``col_var``
for factored tensors, ``variance`` for the others (fp32, fp64 for fp64 parameters); ``exp_avg`` (parameter
shape, in the parameter's dtype by default) only with ``beta1``. A 4096 x 4096 fp32 matrix keeps 32 KiB instead
of AdamW's 128 MiB (64 MiB more with ``beta1``).

``momentum_precision`` (with ``beta1``) keeps the first moment in ``"fp32"``, ``"bf16"`` (2 B/param),
``"8bit"`` (1.016 B/param: ``exp_avg_codes`` uint8 + one fp32 ``exp_avg_scales`` per 256 values) or ``"4bit"``
(0.531 B/param: codes two per byte + one scale per 128), with the signed dynamic-exponent maps of Dettmers et al.
2022 / Li et al. 2023; tensors under ``min_quantized_numel`` elements (default 4096) keep an fp32 ``exp_avg``. A
quantized step is: dequantize ``m`` -> the fp32 update above, unchanged (the parameter moves by the unquantized
new ``m``) -> quantize ``m`` back (see :mod:`lmopt.optim._momentum`). The factored statistics stay fp32.

With ``relative_step=True`` (this class's default, as the paper and transformers' class) ``lr`` is the cap of
the relative step; ``warmup_init=True`` replaces the cap by ``1e-6 * t``. With ``relative_step=False`` the
learning rate is explicit (what ``TrainingArguments(optim="adafactor")`` does, and this registry entry's
default: ``lr=1e-3, relative_step=False, scale_parameter=False``).

Implementations: ``for_loop`` (the plain per-tensor reference, also right for DTensor parameters: its
reductions are torch reductions over dims, which DTensor shards correctly) and ``blocked`` (plain CPU tensors:
cache-blocked passes over each matrix -- statistics, the RMS of the update computed without materialising
it, then the update -- reading the gradient three times and the parameter once); ``auto`` picks ``blocked`` for
plain CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import STATE_PRECISIONS, OptimizerSpec, StateTensor, Translation
from ._dispatch import BLOCK_ELEMENTS, blockable, math_dtype, resolve_implementation, row_blocks
from ._impl import copy_back, ema_, run_on, scalar_min, scalar_sqrt, traced_lr, traced_step, upcast
from ._momentum import (
    QuantizedMomentumLoading,
    init_momentum,
    momentum_state,
    momentum_summary,
    step_with_momentum,
    validate_momentum_options,
)
from ._precision import warn_deprecated_precision
from .base import (
    Implementation,
    LmoptOptimizer,
    check_choice,
    check_nonnegative,
    check_positive,
    check_range,
    constructor_defaults,
)

__all__ = ["Adafactor", "adafactor", "factored_shapes"]


def factored_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Shapes of the row and column statistics of a tensor, or None when it is not factored (< 2 dims)."""
    if len(shape) < 2:
        return None
    return tuple(shape[:-1]), tuple(shape[:-2]) + (shape[-1],)


class AdafactorHyper(NamedTuple):
    """The scalar hyperparameters of one Adafactor step (what every implementation takes)."""

    lr: float
    eps1: float
    eps2: float
    clip_threshold: float
    decay_rate: float
    beta1: float | None
    weight_decay: float
    scale_parameter: bool
    relative_step: bool
    warmup_init: bool


def _relative_step(step: float | Tensor, lr: float | Tensor, relative_step: bool, warmup_init: bool) -> float | Tensor:
    if not relative_step:
        return lr
    cap = 1e-6 * step if warmup_init else lr
    return scalar_min(cap, 1.0 / scalar_sqrt(step))


def _param_rms(p: Tensor) -> Tensor:
    return torch.linalg.vector_norm(p, dtype=math_dtype(p.dtype)) / math.sqrt(p.numel())


def _step_size(p: Tensor, step: float | Tensor, hp: AdafactorHyper) -> Tensor | float:
    rho = _relative_step(step, hp.lr, hp.relative_step, hp.warmup_init)
    if hp.scale_parameter:
        return _param_rms(p).clamp(min=hp.eps2) * rho
    return rho


def approx_rsqrt_factors(row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``1 / sqrt(R C^T / mean(R)) = a b^T`` (row factor ``a``: shape of ``row``, ``b``: of
    ``col``).

    Reduces over the last dim of ``row`` (for DTensor a reduction over that dim, kept as a DTensor).
    """
    a = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()
    return a, col.rsqrt()


def factored_precondition(row: Tensor, col: Tensor, x: Tensor) -> Tensor:
    """``x / sqrt(R C^T / mean(R))`` for factored statistics ``row``, ``col`` of the last two dims of ``x``.

    Means over the last two dims (DTensor: reductions over possibly sharded dims, kept distributed).
    """
    a, b = approx_rsqrt_factors(row, col)
    return a.unsqueeze(-1) * b.unsqueeze(-2) * x


def ema_factors_(row: Tensor, col: Tensor, x: Tensor, beta: float | Tensor) -> None:
    """Fold the row and column means of ``x`` into the factored statistics ``row`` and ``col``."""
    ema_(row, x.mean(dim=-1), beta)
    ema_(col, x.mean(dim=-2), beta)


def second_moment_update(g: Tensor, eps1: float, beta2: float, row: Tensor | None, col, var) -> Tensor:
    """``u = g / sqrt(V)`` after folding ``g^2 + eps1`` into the second moment: factored (``row``, ``col``) or
    full (``var``, when ``row`` is None)."""
    sq = g * g + eps1
    if row is not None:
        ema_factors_(row, col, sq, beta2)
        return factored_precondition(row, col, g)
    ema_(var, sq, beta2)
    return var.rsqrt() * g


def clip_update_(update: Tensor, clip_threshold: float) -> Tensor:
    """``u <- u / max(1, RMS(u) / clip_threshold)``, in place."""
    rms = torch.linalg.vector_norm(update) / math.sqrt(update.numel())
    return update.div_((rms / clip_threshold).clamp_(min=1.0))


# ------------------------------------------------------------------------------------------------------------
# the plain per-tensor path
def _single_tensor_adafactor(params, grads, row_vars, col_vars, variances, exp_avgs, state_steps, hp):
    for i, p in enumerate(params):
        state_steps[i] += 1
        if p.numel() == 0:
            continue
        step = traced_step(state_steps[i])
        dtype = math_dtype(p.dtype)
        p32 = upcast(p, dtype)
        g = grads[i].to(dtype)
        lr_t = _step_size(p32, step, hp)
        beta2_t = 1.0 - step**hp.decay_rate
        update = second_moment_update(g, hp.eps1, beta2_t, row_vars[i], col_vars[i], variances[i])
        clip_update_(update, hp.clip_threshold)
        update.mul_(lr_t)
        if hp.beta1 is not None:
            m = exp_avgs[i]
            m32 = upcast(m, dtype)
            ema_(m32, update, hp.beta1)
            update = m32
            copy_back(m, m32)
        if hp.weight_decay != 0:
            p32.mul_(1 - hp.weight_decay * lr_t)
        p32.sub_(update)
        copy_back(p, p32)


# ------------------------------------------------------------------------------------------------------------
# the cache-blocked CPU path
def _as_batched(t: Tensor) -> Tensor:
    """View a tensor with >= 2 dims as ``(batch, rows, cols)``."""
    return t.view(-1, t.shape[-2], t.shape[-1])


class _Blocks:
    """Row blocks of a ``(batch, rows, cols)`` tensor, each upcast to the math dtype when needed."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.batch = math.prod(shape[:-2])
        self.rows, self.cols = shape[-2], shape[-1]
        self.dtype = math_dtype(dtype)
        self.buf = torch.empty(
            min(self.rows * self.cols, max(BLOCK_ELEMENTS, self.cols)), dtype=self.dtype, device=device
        )
        self.ones = torch.ones(
            min(self.rows, max(1, BLOCK_ELEMENTS // max(1, self.cols))), dtype=self.dtype, device=device
        )

    def __iter__(self):
        for b in range(self.batch):
            for r0, r1 in row_blocks(self.rows, self.cols):
                yield b, r0, r1, self.buf[: (r1 - r0) * self.cols].view(r1 - r0, self.cols)

    def read(self, t: Tensor) -> Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)


def blocked_square_means(g3: Tensor, blocks: _Blocks, eps: float) -> tuple[Tensor, Tensor]:
    """Row and column means of ``g^2 + eps`` of a ``(batch, rows, cols)`` tensor in one cache-blocked pass."""
    row_sum = torch.empty(blocks.batch, blocks.rows, dtype=blocks.dtype, device=g3.device)
    col_sum = torch.zeros(blocks.batch, blocks.cols, dtype=blocks.dtype, device=g3.device)
    for b, r0, r1, buf in blocks:
        gc = blocks.read(g3[b, r0:r1])
        sq = torch.mul(gc, gc, out=buf)
        torch.sum(sq, dim=1, out=row_sum[b, r0:r1])
        col_sum[b].add_(column_sums(sq, blocks))
    return row_sum.div_(blocks.cols).add_(eps), col_sum.div_(blocks.rows).add_(eps)


def column_sums(block: Tensor, blocks: _Blocks) -> Tensor:
    """Sums over the rows of a block, as a matrix-vector product (several times faster on CPU than
    ``block.sum(0)``, a reduction across the contiguous dimension)."""
    return torch.mv(block.t(), blocks.ones[: block.shape[0]])


def blocked_scaled_rms(g3: Tensor, a: Tensor, b: Tensor, blocks: _Blocks) -> Tensor:
    """RMS of ``u = a b^T * g`` (``a``: (batch, rows), ``b``: (batch, cols)) without materialising ``u``.

    ``sum(u^2) = sum_i a_i^2 sum_j g_ij^2 b_j^2``: a squared block times ``b^2`` (a matrix-vector product in
    cache).
    """
    b2 = b * b
    weighted = torch.empty(blocks.batch, blocks.rows, dtype=blocks.dtype, device=g3.device)
    for k, r0, r1, buf in blocks:
        gc = blocks.read(g3[k, r0:r1])
        torch.mv(torch.mul(gc, gc, out=buf), b2[k], out=weighted[k, r0:r1])
    return (weighted.mul_(a * a).sum() / (blocks.batch * blocks.rows * blocks.cols)).sqrt_()


def blocked_clipped_factors(
    p: Tensor, g: Tensor, row_var: Tensor, col_var: Tensor, beta2, eps1: float, clip_threshold: float, step_size=None
) -> tuple[_Blocks, Tensor, Tensor, Tensor]:
    """The cache-blocked second-moment passes shared by Adafactor and CAME over the (>= 2-dim) gradient ``g`` of ``p``.

    Folds ``g^2 + eps1`` into the factored statistics (one pass), then (a second pass) the RMS of the
    preconditioned update, and returns ``(blocks, g3, a, b)``: the row blocks, ``g`` as ``(batch, rows, cols)``
    and the factors of ``step_size / max(1, RMS(u) / clip_threshold) / sqrt(R C^T / mean(R))`` as ``a b^T``
    (``step_size`` None: 1).
    """
    blocks = _Blocks(tuple(p.shape), p.dtype, p.device)
    g3 = _as_batched(g)
    row, col = row_var.view(blocks.batch, blocks.rows), col_var.view(blocks.batch, blocks.cols)
    row_mean, col_mean = blocked_square_means(g3, blocks, eps1)
    ema_(row, row_mean, beta2)
    ema_(col, col_mean, beta2)
    a, b = approx_rsqrt_factors(row, col)
    rms = blocked_scaled_rms(g3, a, b, blocks)
    # every row's coefficient: step_size / max(1, RMS(u) / clip) * a_i
    coef = (rms / clip_threshold).clamp_(min=1.0).reciprocal_()
    a.mul_(coef if step_size is None else coef.mul_(step_size))
    return blocks, g3, a, b


def split_blockable(params, grads, factored, *extra) -> tuple[list[int], list[int]]:
    """Indices of the factored, non-empty tensors the blocked path takes (``blockable`` with their gradient and
    the tensors of ``extra`` lists, skipping None entries), and of the rest."""
    take, rest = [], []
    for i, p in enumerate(params):
        others = [xs[i] for xs in extra if xs[i] is not None]
        ok = factored[i] is not None and p.numel() != 0 and blockable(p, grads[i], *others)
        (take if ok else rest).append(i)
    return take, rest


def _blocked_adafactor(params, grads, row_vars, col_vars, variances, exp_avgs, state_steps, hp):
    beta1 = hp.beta1
    moments = exp_avgs if beta1 is not None else [None] * len(params)
    take, rest = split_blockable(params, grads, row_vars, moments)
    for i in take:
        p, m = params[i], moments[i]
        state_steps[i] += 1
        step = traced_step(state_steps[i])
        lr_t = _step_size(p, step, hp)
        beta2_t = 1.0 - step**hp.decay_rate
        blocks, g3, a, b = blocked_clipped_factors(
            p, grads[i], row_vars[i], col_vars[i], beta2_t, hp.eps1, hp.clip_threshold, lr_t
        )
        p3 = _as_batched(p)
        decay = 1 - hp.weight_decay * lr_t if hp.weight_decay != 0 else None
        m3 = _as_batched(m) if m is not None else None
        low = p.dtype != blocks.dtype
        for k, r0, r1, buf in blocks:
            gc, pc = g3[k, r0:r1], p3[k, r0:r1]
            p32 = blocks.read(pc)
            # the scale a_i b_j of the block as an outer product in cache: broadcasting a column vector over a
            # block is several times slower on CPU than reading one more cached operand
            scale = torch.outer(a[k, r0:r1], b[k], out=buf)
            if m3 is None:
                if decay is not None:
                    p32.mul_(decay)
                p32.addcmul_(scale, blocks.read(gc), value=-1.0)
            else:
                mc = m3[k, r0:r1]
                m32 = blocks.read(mc)
                ema_(m32, scale.mul_(blocks.read(gc)), beta1)
                if decay is not None:
                    p32.mul_(decay)
                p32.sub_(m32)
                copy_back(mc, m32)
            if low:
                pc.copy_(p32)
    run_on(_single_tensor_adafactor, rest, (params, grads, row_vars, col_vars, variances, exp_avgs, state_steps), hp)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_adafactor, "blocked": _blocked_adafactor}


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    lr: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    implementation: Implementation = "auto",
) -> str:
    """Functional Adafactor step (see the module docstring); lists hold ``None`` where a tensor has no such
    state."""
    blocked = all(p.device.type == "cpu" and blockable(p) for p in params)
    implementation = resolve_implementation(
        {"fused": "blocked"}.get(implementation, implementation),
        tuple(_IMPLEMENTATIONS),
        {"blocked": blocked},
        preference=("blocked", "for_loop"),
        owner="adafactor",
    )
    hp = AdafactorHyper(
        lr, eps1, eps2, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step, warmup_init
    )
    _IMPLEMENTATIONS[implementation](params, grads, row_vars, col_vars, variances, exp_avgs, state_steps, hp)
    return implementation


def check_eps_pair(name: str, eps: Any) -> None:
    """Raise ValueError unless ``eps`` is a pair of finite numbers >= 0."""
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"{name} must be a pair (eps1, eps2) of numbers >= 0, got {eps!r}")
    for k, e in enumerate(eps):
        check_nonnegative(f"{name}[{k}]", e)


class Adafactor(QuantizedMomentumLoading, LmoptOptimizer):
    """Adafactor: factored second moment (rows + columns), RMS update clipping, optional relative steps.

    Args:
        params: parameters or param groups.
        lr: the cap of the relative step when ``relative_step=True`` (default 1e-2, as transformers), else the
            learning rate.
        eps: ``(eps1, eps2)``: added to ``g^2`` (default 1e-30), and the floor of ``RMS(p)`` in the parameter
            scale (default 1e-3).
        clip_threshold: the update's RMS is clipped to this (default 1.0).
        decay_rate: ``beta2_t = 1 - t^decay_rate``, in [-1, 0) (default -0.8).
        beta1: first-moment decay, or None (default) to keep no first moment.
        weight_decay: decoupled decay, multiplied by the step size ``lr_t`` (default 0.0).
        scale_parameter: multiply the step by ``max(eps2, RMS(p))`` (default True).
        relative_step: ``rho_t = min(lr, 1/sqrt(t))`` instead of ``lr`` (default True).
        warmup_init: with ``relative_step``, ``rho_t = min(1e-6 t, 1/sqrt(t))`` (default False).
        state_precision: storage of the first moment (needs ``beta1``): ``None`` (default: the parameter's
            dtype), ``"fp32"``, ``"bf16"``, ``"8bit"`` or ``"4bit"`` (blockwise-quantized, signed
            dynamic-exponent map).
        block_size: values per absmax scale of a quantized moment (default None: 256 for 8-bit, 128 for 4-bit;
            a multiple of 16 in [16, 4096]).
        min_quantized_numel: tensors with fewer elements keep an fp32 first moment (default 4096).
        implementation: ``"auto"`` (default), ``"for_loop"`` or ``"blocked"`` (old name ``"fused"``).
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.
        momentum_precision: deprecated alias of ``state_precision``.

    State: ``step``; ``row_var`` + ``col_var`` (>= 2 dims) or ``variance`` (< 2 dims); ``exp_avg`` with
        ``beta1`` (``exp_avg_codes`` + ``exp_avg_scales`` when quantized).

    Example:
        >>> opt = Adafactor(model.parameters())                                     # the paper's schedule
        >>> # fine-tuning: an explicit learning rate
        >>> opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
        >>> # with an 8-bit first moment (~1 B/param of state)
        >>> opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, beta1=0.9, state_precision="8bit")
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018;
    quantized first moment after Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
    and Li et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
    """

    implementations = ("for_loop", "blocked")
    implementation_aliases = {"fused": "blocked"}  # the name before lmopt's one vocabulary

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        *,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
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
        check_range("decay_rate", group["decay_rate"], -1.0, 0.0)
        if group["beta1"] is not None:
            check_range("beta1", group["beta1"], 0.0, 1.0)
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            check_choice(flag, group[flag], (True, False))
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("warmup_init=True needs relative_step=True (it warms up the relative step)")
        validate_momentum_options(group)
        if group["state_precision"] is not None and group["beta1"] is None:
            raise ValueError(
                f"state_precision={group['state_precision']!r} needs beta1 (without beta1 Adafactor keeps "
                "no first moment); set beta1=0.9, or leave state_precision=None"
            )

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        stat_dtype = math_dtype(param.dtype)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        shapes = factored_shapes(tuple(param.shape))
        if shapes is not None:
            state["row_var"] = param.new_zeros(shapes[0], dtype=stat_dtype)
            state["col_var"] = param.new_zeros(shapes[1], dtype=stat_dtype)
        else:
            state["variance"] = torch.zeros_like(param, dtype=stat_dtype, memory_format=torch.preserve_format)
        if group["beta1"] is not None:
            init_momentum(type(self).__name__, group, param, state)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        eps1, eps2 = group["eps"]

        def run(idx: list[int], exp_avgs: list[Tensor | None]) -> str:
            return adafactor(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [states[i].get("row_var") for i in idx],
                [states[i].get("col_var") for i in idx],
                [states[i].get("variance") for i in idx],
                exp_avgs,
                [states[i]["step"] for i in idx],
                lr=traced_lr(group["lr"]),
                eps1=eps1,
                eps2=eps2,
                clip_threshold=group["clip_threshold"],
                decay_rate=group["decay_rate"],
                beta1=group["beta1"],
                weight_decay=group["weight_decay"],
                scale_parameter=group["scale_parameter"],
                relative_step=group["relative_step"],
                warmup_init=group["warmup_init"],
                implementation=group["implementation"],
            )

        self._implementation_used[id(group)] = step_with_momentum(group, params, states, run)

    def __repr__(self) -> str:
        summary = momentum_summary(self.param_groups, list(self.state.values()))
        return super().__repr__() + (f"\n  state: {summary}" if summary else "")


# ------------------------------------------------------------------------------------------------------------
# registry entries
def adafactor_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """``step``, the factors, and with ``beta1`` the first moment at ``momentum_precision`` (codes + scales when
    quantized)."""
    stat = math_dtype(dtype)
    out = [StateTensor("step", (), torch.float32)]
    shapes = factored_shapes(shape)
    if shapes is not None:
        out += [StateTensor("row_var", shapes[0], stat), StateTensor("col_var", shapes[1], stat)]
    else:
        out.append(StateTensor("variance", shape, stat))
    if hyper.get("beta1") is not None:
        out += momentum_state(shape, dtype, hyper)
    return out


SPECS = [
    OptimizerSpec(
        name="adafactor",
        cls=Adafactor,
        summary="factored second moment (rows + columns), near-zero state; explicit lr as HF's 'adafactor'; "
        "beta1 adds a first moment (fp32, or bf16 / 8-bit / 4-bit with momentum_precision)",
        paper="Shazeer & Stern, Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, ICML 2018",
        state=adafactor_state,
        defaults={"lr": 1e-3, "relative_step": False, "scale_parameter": False},
        family="factored",
        aliases={
            "adafactor_relative_step": {"lr": 1e-2, "relative_step": True, "scale_parameter": True},
            "adafactor_warmup_init": {
                "lr": 1e-2,
                "relative_step": True,
                "scale_parameter": True,
                "warmup_init": True,
            },
            "adafactor_momentum": {"beta1": 0.9},
            "adafactor_bf16": {"beta1": 0.9, "state_precision": "bf16"},
            "adafactor8bit": {"beta1": 0.9, "state_precision": "8bit"},
            "adafactor4bit": {"beta1": 0.9, "state_precision": "4bit"},
        },
        state_precisions=STATE_PRECISIONS,
        translation=Translation(
            label="Adafactor paper: relative step (pre-training), explicit lr (fine-tuning)",
            betas="drop",
            pass_eps=False,
            schedule={"pretrain": "inverse_sqrt"},
            lr={"pretrain": 1e-2},
            weight_decay={"pretrain": 0.0},
            optional={
                "pretrain": {"relative_step": False, "scale_parameter": True, "warmup_init": False, "beta1": None},
                "finetune": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
            },
            source="Shazeer & Stern, Adafactor, ICML 2018: pre-training with the relative step "
            "min(1e-2, 1/sqrt(t)) (here lr 1e-2 with lmopt's inverse_sqrt schedule), parameter scaling, "
            "no momentum, no weight decay; fine-tuning with an explicit lr and scale_parameter=False "
            "(transformers' Adafactor docs)",
        ),
        # an explicit learning rate (no relative step, no parameter scaling), so it follows the same warmup +
        # cosine schedule as the others (Shazeer & Stern 2018 section 8; HF's fine-tuning advice)
        # lmopt tune's full grid on this workload (docs/compare.md, "What tuning says about the recipes")
        compare={"lr": 1e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False},
        compare_default=3,
        recommend_tier=2,
        recommend_reason="Adafactor: factored state (Shazeer & Stern 2018)",
    ),
]
