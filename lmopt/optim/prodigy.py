"""Prodigy: Adam whose step size ``d`` is estimated from the run itself (learning-rate free).

Update rule (Mishchenko & Defazio 2023, Algorithm 4, in the form of the authors' ``prodigyopt`` package), one
step ``k`` over every parameter ``x`` of every group, gradient ``g`` (plus ``weight_decay * x`` when
``decouple=False``), with ``lr`` the group's learning rate (default 1.0: a multiplier of ``d``) and
``bc = sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` when ``use_bias_correction`` (else 1):

.. code-block:: text

    dlr   = d * lr * bc
    r     = beta3 * r + (d / d0) * dlr * <g, x0 - x>                  (over all parameters: d_numerator)
    m     = beta1 * m + d * (1 - beta1) * g                           (exp_avg)
    v     = beta2 * v + d^2 * (1 - beta2) * g^2                       (exp_avg_sq)
    s     = beta3 * s + (d / d0) * (d if safeguard_warmup else dlr) * g
    d_hat = d_coef * r / sum(|s|)                                     (sum over all parameters)
    d     = max(d, d_hat) at the first growth; d_max = max(d_max, d_hat); d = min(d_max, d * growth_rate)
    x    <- x - weight_decay * dlr * x                                (decouple=True)
    x    <- x - dlr * m / (sqrt(v) + d * eps)                         (beta1 = 0: x - dlr * d * g / (...))

``beta3`` defaults to ``sqrt(beta2)``; ``x0`` is the parameter when its state was created (``p0``). The estimate
``d`` is one number for the whole optimizer: the numerator and ``sum(|s|)`` run over every parameter of every
group, and under FSDP2 over every shard (the local sums of DTensor parameters are reduced over their mesh, so a
sharded run estimates the same ``d`` as an unsharded one, up to the order of the sum). When nothing has a
gradient signal yet (``sum(|s|) == 0``) no parameter moves; the moments are still updated, as in
``prodigyopt``. The math runs in fp32 (fp64 for fp64 tensors); the state is kept in the parameter's dtype.

Learning rate and schedules: ``lr`` multiplies the estimated ``d`` (keep 1.0; 0.5 or 2.0 are the usual tweaks,
``d_coef`` is the preferred knob). A torch LR scheduler scales ``lr`` as usual, so it scales ``d * lr``: the
authors recommend cosine annealing with Prodigy, and a warmup lowers the early steps and, through ``dlr`` in
``r`` and ``s``, the early estimate (``safeguard_warmup=True`` removes ``lr`` from ``s``'s increment for that).
``prodigyopt`` refuses groups whose ``lr`` differs from the largest (except 0); lmopt gives each group its own
``dlr = d * lr_group * bc`` in its updates and its share of ``r`` and ``s``, which is ``prodigyopt`` exactly
wherever ``prodigyopt`` runs, and makes per-group LR multipliers (``lmopt.param_groups``) work. A group with
``lr=0`` is left alone (``prodigyopt`` still applies its decoupled weight decay with the other groups' step).

Checkpoints: ``d``, ``d_max``, ``d_numerator``, ``d_hat``, ``d_denom`` and the step count ``k`` live in every param
group (Python floats and an int, as in ``prodigyopt``; group 0's are the ones read), so ``state_dict`` carries them
and a resumed run continues bit for bit.

Memory per parameter: ``exp_avg`` (unless ``beta1 == 0``), ``exp_avg_sq``, ``s`` and ``p0``: 4 tensors of the
parameter's size (16 bytes per fp32 parameter, twice AdamW's), plus a ``step`` counter. ``slice_p > 1`` keeps
``s`` and ``p0`` for every ``slice_p``-th element only (the package's approximation; plain tensors only). With
``slice_p=1`` lmopt keeps ``s`` and ``p0`` in the parameter's shape (``prodigyopt``: flattened), so they shard
like the parameter, and keeps ``p0`` in full even for an all-zero parameter (``prodigyopt`` stores a 0-d zero
then), so the state is what the planner declares.

Implementations: ``for_loop`` (the reference, the package's operations per tensor), ``blocked`` (both passes
cache-blocked: one pass over memory for the moments and sums, one for the update; with ``slice_p > 1`` the
strided statistics take the per-tensor path), ``auto`` (``for_loop``: measured faster than the blocked pass
on a 2-vCPU AVX2 machine, see ``benchmarks/suites/prodigy_apollo.py``).

Reference: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024
(arXiv:2306.06101); the ``prodigyopt`` package (github.com/konstmish/prodigy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..spec import Implementation, OptimizerSpec, StateTensor, Translation
from ._dispatch import blockable, blocked_applies, flat_blocks, math_dtype, resolve_implementation
from ._impl import reduce_over_mesh
from .base import (
    LmoptOptimizer,
    _as_float,
    check_flag,
    check_positive,
    check_range,
    constructor_defaults,
    is_dtensor,
)

__all__ = ["Prodigy", "prodigy_state"]

#: the largest d0 and d_coef accepted (typical: d0 1e-6, d_coef 0.1 .. 10)
_D_MAX = 1e3
_FP32_MAX = float(torch.finfo(torch.float32).max)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


class _Phase1(NamedTuple):
    """Scalars of the first pass (moments, ``s``, and the two sums) for one group."""

    beta1: float
    beta2: float
    m_scale: float  # d * (1 - beta1)
    v_scale: float  # d^2 * (1 - beta2)
    s_decay: float  # beta3
    s_scale: float  # (d / d0) * (d or dlr)
    num_scale: float  # (d / d0) * dlr
    coupled_decay: float  # weight_decay when decouple=False, else 0


class _Phase3(NamedTuple):
    """Scalars of the update pass for one group."""

    dlr: float
    eps_d: float  # d * eps
    decoupled_decay: float  # weight_decay * dlr when decouple=True, else 0
    d: float


# ---------------------------------------------------------------------------------------------------- for_loop
def _phase1_tensor(p: Tensor, g: Tensor, p0: Tensor, s: Tensor, m: Tensor | None, v: Tensor, hp: _Phase1, slice_p: int):
    """The first pass over one tensor (math dtype, local shards), in prodigyopt's order of operations; returns
    ``(<g, p0 - p>, sum |s|)`` as 0-d tensors."""
    if hp.coupled_decay != 0:
        g = g.add(p, alpha=hp.coupled_decay)
    if slice_p == 1:
        numerator = torch.dot(g.reshape(-1), (p0 - p).reshape(-1))
        sliced = g
    else:
        sliced = g.reshape(-1)[::slice_p]
        numerator = torch.dot(sliced, p0 - p.reshape(-1)[::slice_p])
    if m is not None:
        m.mul_(hp.beta1).add_(g, alpha=hp.m_scale)
    v.mul_(hp.beta2).addcmul_(g, g, value=hp.v_scale)
    s.mul_(hp.s_decay).add_(sliced, alpha=hp.s_scale)
    return numerator, s.abs().sum()


def _phase3_tensor(p: Tensor, g: Tensor, m: Tensor | None, v: Tensor, hp: _Phase3, coupled_decay: float) -> None:
    denom = v.sqrt().add_(hp.eps_d)
    if hp.decoupled_decay != 0:
        p.add_(p, alpha=-hp.decoupled_decay)
    if m is not None:
        p.addcdiv_(m, denom, value=-hp.dlr)
    else:
        if coupled_decay != 0:  # prodigyopt adds the coupled decay into the gradient in place
            g = g.add(p, alpha=coupled_decay)
        p.addcdiv_(g, denom, value=-hp.dlr * hp.d)


# ------------------------------------------------------------------------------------------------------ blocked
def _phase1_blocked(p: Tensor, g: Tensor, p0: Tensor, s: Tensor, m: Tensor | None, v: Tensor, hp: _Phase1):
    """The first pass on cache-sized blocks of one contiguous tensor (fp32/fp64, ``slice_p == 1``)."""
    flats = [t.view(-1) for t in (p, p0, s, v)]
    fp, fp0, fs, fv = flats
    fg = g.reshape(-1)
    fm = m.view(-1) if m is not None else None
    n = fp.numel()
    buf = torch.empty(min(n, 1 << 18), dtype=p.dtype, device=p.device)
    nums, dens = [], []
    for start, stop in flat_blocks(n):
        bp, bg, bs, bv = fp[start:stop], fg[start:stop], fs[start:stop], fv[start:stop]
        tmp = buf[: stop - start]
        if hp.coupled_decay != 0:
            bg = torch.add(bg, bp, alpha=hp.coupled_decay)
        torch.sub(fp0[start:stop], bp, out=tmp)
        nums.append(torch.dot(bg, tmp))
        if fm is not None:
            fm[start:stop].mul_(hp.beta1).add_(bg, alpha=hp.m_scale)
        bv.mul_(hp.beta2).addcmul_(bg, bg, value=hp.v_scale)
        bs.mul_(hp.s_decay).add_(bg, alpha=hp.s_scale)
        dens.append(torch.abs(bs, out=tmp).sum())
    return torch.stack(nums).sum(), torch.stack(dens).sum()


def _phase3_blocked(p: Tensor, g: Tensor, m: Tensor | None, v: Tensor, hp: _Phase3, coupled_decay: float) -> None:
    fp, fv = p.view(-1), v.view(-1)
    fm = m.view(-1) if m is not None else None
    fg = g.reshape(-1)
    n = fp.numel()
    buf = torch.empty(min(n, 1 << 18), dtype=p.dtype, device=p.device)
    for start, stop in flat_blocks(n):
        bp = fp[start:stop]
        denom = torch.sqrt(fv[start:stop], out=buf[: stop - start]).add_(hp.eps_d)
        if hp.decoupled_decay != 0:
            bp.add_(bp, alpha=-hp.decoupled_decay)
        if fm is not None:
            bp.addcdiv_(fm[start:stop], denom, value=-hp.dlr)
        else:
            bg = fg[start:stop]
            if coupled_decay != 0:
                bg = torch.add(bg, bp, alpha=coupled_decay)
            bp.addcdiv_(bg, denom, value=-hp.dlr * hp.d)


def _upcast(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    return t if t.dtype == math_dtype(t.dtype) else t.to(math_dtype(t.dtype))


def _store(low: Tensor | None, exact: Tensor | None) -> None:
    if low is not None and exact is not low:
        low.copy_(exact)


class Prodigy(LmoptOptimizer):
    """Prodigy: Adam with a step size ``d`` estimated during training; ``lr`` (default 1.0) multiplies it.

    Args:
        params: parameters or param groups (the estimate ``d`` is shared by all groups).
        lr: multiplier of the estimated step size (default 1.0; keep it, or use ``d_coef``); a scheduler scales
            it, hence ``d * lr``.
        betas: Adam's ``(beta1, beta2)`` (default (0.9, 0.999)); ``beta1 = 0`` keeps no ``exp_avg``.
        beta3: decay of the estimate's running sums (default None: ``sqrt(beta2)``).
        eps: added to ``sqrt(v)`` after scaling by ``d`` (default 1e-8).
        weight_decay: weight decay (default 0.0), decoupled (AdamW style, multiplied by ``d * lr``) unless
            ``decouple=False`` (L2: added to the gradient).
        decouple: decoupled weight decay (default True).
        use_bias_correction: Adam's bias correction in the step size (default False).
        safeguard_warmup: leave ``lr`` out of ``s``'s increment, so a warmup does not inflate ``d`` (default
            False).
        d0: initial estimate (default 1e-6; rarely needs changing).
        d_coef: multiplies the estimate (default 1.0; the preferred knob: 0.5 .. 2.0).
        growth_rate: largest factor ``d`` may grow by per step (default inf; e.g. 1.02 warms up).
        fsdp_in_use: parameters are local shards that are not DTensors (FSDP1-style flat parameters): the sums
            are all-reduced over the default process group (auto-detected for ``_fsdp_flattened`` parameters).
            Not needed for FSDP2 / DTensor parameters, whose sums are reduced over their mesh anyway.
        slice_p: keep ``s`` and ``p0`` for every ``slice_p``-th element only (default 1: exact Prodigy; ~11 is the
            package's memory-saving approximation; plain tensors only).
        implementation: ``"auto"`` (default), ``"for_loop"`` or ``"blocked"``.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: ``step``, ``s``, ``p0``, ``exp_avg`` (when ``beta1 > 0``), ``exp_avg_sq``; per group:
    ``d``, ``d_max``, ``d_numerator``, ``d_hat``, ``d_denom``, ``k``.

    Example:
        >>> opt = lmopt.Prodigy(model.parameters(), weight_decay=0.01)   # no learning rate to tune
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)   # scales d * lr

    Reference: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024.
    """

    #: no implementation="compiled": its step-size estimate d is read on the host every step (docs/compile.md)
    compilable = False

    implementations = ("for_loop", "blocked")
    #: measured (benchmarks/results/step_speed_prodigy_apollo.md, 2 AMD EPYC vCPUs): the per-tensor path is faster
    #: than the blocked pass here, so auto runs it; ``implementation="blocked"`` still selects the blocked pass
    auto_preference = ("for_loop", "blocked")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        fsdp_in_use: bool = False,
        slice_p: int = 1,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    # -- validation --------------------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        if group.get("beta3") is not None:
            check_range("beta3", group["beta3"], 0.0, 1.0)
            group["beta3"] = float(group["beta3"])
        for flag in ("decouple", "use_bias_correction", "safeguard_warmup", "fsdp_in_use"):
            check_flag(flag, group[flag])
        # d^2 scales the second moment: beyond ~1e19 it overflows float32; estimates are distances (d0 ~ 1e-6)
        check_positive("d0", group["d0"])
        check_range("d0", group["d0"], 0.0, _D_MAX, high_inclusive=True)
        check_positive("d_coef", group["d_coef"])
        check_range("d_coef", group["d_coef"], 0.0, _D_MAX, high_inclusive=True)
        growth = group["growth_rate"]
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not (growth >= 1.0):
            raise ValueError(
                f"growth_rate must be a number >= 1 (or inf, the default: no limit), got {growth!r}; it bounds how "
                "fast d may grow per step (e.g. 1.02)"
            )
        group["growth_rate"] = float(growth)
        slice_p = group["slice_p"]
        if isinstance(slice_p, bool) or not isinstance(slice_p, int) or not 1 <= slice_p <= 2**31:
            raise ValueError(f"slice_p must be an int >= 1 (1: exact Prodigy; ~11 saves memory), got {slice_p!r}")
        if slice_p > 1 and any(is_dtensor(p) for p in group["params"]):
            raise ValueError(
                "slice_p > 1 is not supported for DTensor (FSDP2) parameters (a shard's slice would not be the full "
                "tensor's); use slice_p=1"
            )
        group["d0"] = float(group["d0"])
        for key, value in (("d", group["d0"]), ("d_max", group["d0"]), ("d_numerator", 0.0), ("d_hat", 0.0)):
            group.setdefault(key, value)
        group.setdefault("d_denom", 0.0)
        group.setdefault("k", 0)
        for key in ("d", "d_max"):
            check_positive(key, group[key])
            group[key] = float(group[key])
        for key in ("d_numerator", "d_hat", "d_denom"):
            group[key] = _as_float(key, group[key])
        k = group["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k (Prodigy's step count in the param group) must be an int >= 0, got {k!r}")

    # -- state ---------------------------------------------------------------------------------------------------
    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        slice_p = group["slice_p"]
        if slice_p == 1:
            state["s"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["p0"] = param.detach().clone()
        else:
            state["s"] = torch.zeros_like(param.detach().reshape(-1)[::slice_p])
            state["p0"] = param.detach().reshape(-1)[::slice_p].clone()
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    # -- the step ------------------------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError("Prodigy steps every group at once (_step_groups)")

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        tensors = [t for p in params for t in (p, *self.state[p].values()) if t.ndim or t.numel() > 1]
        applies = blocked_applies(tensors) and all(blockable(p) for p in params)
        return resolve_implementation(
            group["implementation"],
            self.implementations,
            {"blocked": applies},
            preference=self.auto_preference,
            owner="Prodigy",
        )

    def _step_groups(self, collected) -> None:
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k = first["k"]
        d, d_max, d0_first = first["d"], first["d_max"], first["d0"]
        d_before = d  # the first pass and the update's dlr use the estimate of the previous step
        if not d * d < _FP32_MAX:  # d^2 scales the second moment's increment: refuse before anything changes
            raise FloatingPointError(
                f"Prodigy's step-size estimate d={d:.3g} has grown beyond what float32 holds squared; nothing was "
                "changed. The objective may be unbounded along the gradient (d grows without limit): set growth_rate "
                "(e.g. 1.02), lower d_coef, or check the loss"
            )
        bias_correction = (
            math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        )
        lr_max = max(float(g["lr"]) for g in self.param_groups)
        fsdp_in_use = first["fsdp_in_use"]

        todo = []  # (group, params, grads, implementation)
        numerators: list[Tensor] = []
        denominators: list[Tensor] = []
        sharded: dict[Any, list[Tensor]] = {}  # (mesh, placements) -> [numerator, denominator] local sums
        for _gi, group, params, grads, _idx in collected:  # every check before anything changes
            if not params:
                continue
            for p in params:
                if len(self.state[p]) == 0:
                    self._init_state(group, p, self.state[p])
                fsdp_in_use = fsdp_in_use or hasattr(p, "_fsdp_flattened")
            todo.append((group, params, grads, self._implementation(group, params)))
        for group, params, grads, impl in todo:
            self._implementation_used[id(group)] = impl
            group_lr = float(group["lr"])
            if group_lr == 0.0:
                continue
            dlr = d * group_lr * bias_correction
            d0 = group["d0"]
            decay = float(group["weight_decay"])
            hp = _Phase1(
                beta1=beta1,
                beta2=beta2,
                m_scale=d * (1 - beta1),
                v_scale=d * d * (1 - beta2),
                s_decay=beta3,
                s_scale=(d / d0) * (d if group["safeguard_warmup"] else dlr),
                num_scale=(d / d0) * dlr,
                coupled_decay=0.0 if group["decouple"] else decay,
            )
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                m = state.get("exp_avg")
                lp, lg, lp0, ls, lm, lv = (
                    _local(t) if t is not None else None
                    for t in (p, g, state["p0"], state["s"], m, state["exp_avg_sq"])
                )
                if lp.numel() == 0:
                    continue
                p32, g32, p032, s32, m32, v32 = (_upcast(t) for t in (lp, lg, lp0, ls, lm, lv))
                if impl == "blocked" and group["slice_p"] == 1:
                    num, den = _phase1_blocked(p32, g32, p032, s32, m32, v32, hp)
                else:
                    num, den = _phase1_tensor(p32, g32, p032, s32, m32, v32, hp, group["slice_p"])
                for low, exact in ((ls, s32), (lm, m32), (lv, v32)):
                    _store(low, exact)
                num = num.to(torch.float64) * hp.num_scale
                den = den.to(torch.float64)
                if is_dtensor(p):
                    key = (p.device_mesh, tuple(p.placements))
                    acc = sharded.setdefault(key, [])
                    acc.append(torch.stack((num, den)))
                else:
                    numerators.append(num)
                    denominators.append(den)

        # the two sums over every parameter (and every shard)
        totals = torch.zeros(2, dtype=torch.float64)
        if numerators:
            totals += torch.stack((torch.stack(numerators).sum(), torch.stack(denominators).sum())).cpu()
        for (mesh, placements), parts in sharded.items():
            totals += reduce_over_mesh(torch.stack(parts).sum(0), mesh, placements).cpu()
        if fsdp_in_use and dist.is_available() and dist.is_initialized():
            device = next((p.device for _g, ps, _gr, _i in todo for p in ps), torch.device("cpu"))
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            reduced = totals.to(device)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            totals = reduced.cpu()
        delta_numerator, d_denom = (float(x) for x in totals.tolist())
        if d_denom == 0.0:  # no gradient signal yet (or every lr is 0): nothing moves, as in prodigyopt
            return
        d_numerator = first["d_numerator"] * beta3 + delta_numerator
        d_hat = d
        if lr_max > 0.0:
            d_hat = first["d_coef"] * d_numerator / d_denom
            if d == d0_first:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * first["growth_rate"])

        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)
        for group, params, grads, impl in todo:
            group_lr = float(group["lr"])
            dlr = d_before * group_lr * bias_correction
            decay = float(group["weight_decay"])
            hp = _Phase3(
                dlr=dlr,
                eps_d=d * float(group["eps"]),
                decoupled_decay=decay * dlr if group["decouple"] else 0.0,
                d=d,
            )
            coupled = 0.0 if group["decouple"] else decay
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                state["step"] += 1
                if group_lr == 0.0:
                    continue
                lp, lg, lm, lv = (
                    _local(t) if t is not None else None for t in (p, g, state.get("exp_avg"), state["exp_avg_sq"])
                )
                if lp.numel() == 0:
                    continue
                p32, g32, m32, v32 = (_upcast(t) for t in (lp, lg, lm, lv))
                if impl == "blocked":
                    _phase3_blocked(p32, g32, m32, v32, hp, coupled)
                else:
                    _phase3_tensor(p32, g32, m32, v32, hp, coupled)
                _store(lp, p32)
        for group in self.param_groups:
            group["k"] = group["k"] + 1


# ------------------------------------------------------------------------------------------------------------
# registry entry
def prodigy_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """``step``; ``s`` and ``p0`` (the parameter's shape, or every ``slice_p``-th element); the two moments
    (``exp_avg`` only when ``beta1 > 0``), all in the parameter's dtype."""
    slice_p = int(hyper.get("slice_p", 1))
    numel = math.prod(shape)
    sliced = shape if slice_p == 1 else ((numel + slice_p - 1) // slice_p,)
    beta1 = hyper.get("betas", (0.9, 0.999))[0]
    moments = [StateTensor("exp_avg", shape, dtype)] if beta1 > 0 else []
    return [
        StateTensor("step", (), torch.float32),
        StateTensor("s", sliced, dtype),
        StateTensor("p0", sliced, dtype),
        *moments,
        StateTensor("exp_avg_sq", shape, dtype),
    ]


SPECS = [
    OptimizerSpec(
        name="prodigy",
        cls=Prodigy,
        summary="learning-rate free Adam: the step size d is estimated during training (lr=1 multiplies it)",
        paper="Mishchenko & Defazio, Prodigy: An Expeditiously Adaptive Parameter-Free Learner, ICML 2024 "
        "(arXiv:2306.06101)",
        state=prodigy_state,
        family="adam",
        per_parameter=False,  # d is estimated from every parameter: no gradient release
        aliases={"prodigyopt": {}, "prodigy_adamw": {}},
        translation=Translation(
            label="Prodigy paper: lr = 1 (d is estimated), betas and weight decay as AdamW",
            lr={"pretrain": 1.0, "finetune": 1.0},
            source="Mishchenko & Defazio 2023 / the prodigyopt README: leave lr at 1.0 (it multiplies the "
            "estimated step size d), keep AdamW's betas and decoupled weight decay, use a cosine schedule",
        ),
        # learning-rate free: lr 1 and AdamW's compare betas and weight decay
        compare={"lr": 1.0, "betas": (0.9, 0.95), "weight_decay": 0.1},
        lookahead=False,
    ),
]
