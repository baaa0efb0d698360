"""Lion: the sign of an interpolated momentum, with decoupled weight decay, at any state precision.

Update rule (Chen et al. 2023, Algorithm 2), for gradient ``g`` (negated when ``maximize``):

.. code-block:: text

    c <- beta1 * m + (1 - beta1) * g                  (interpolation, not stored)
    p <- p - lr * sign(c) - lr * weight_decay * p     (decoupled decay, from the p before the step)
    m <- beta2 * m + (1 - beta2) * g

Cautious masking (``cautious=True``; Liang et al. 2024, C-Optim's ``c_lion.py``, with the normalisation of
:mod:`lmopt.optim._cautious`): ``sign(c)`` is kept where it agrees with ``g`` and rescaled by the kept fraction of
the whole tensor, ``sign(c) * 1[sign(c) * g > 0] / max(mean, 1e-3)``; cautious weight decay
(``cautious_weight_decay=True``; Chen et al. 2025) decays only where that update and ``p`` agree in sign. No
state. The masks need a whole-tensor mean: ``blocked`` takes two passes over a masked tensor (count, then update:
28 B per fp32 parameter instead of 20), and masked groups with 8/4-bit state take the per-tensor rule where
``auto`` would take the kernel (``repr`` says which ran).

State per parameter: ``exp_avg`` (``m``) -- 4 bytes per fp32 parameter, half of AdamW's -- at the group's
``state_precision`` (None: the parameter's dtype; ``"bf16"``; ``"8bit"``: ~1 byte, blockwise-quantized as in
:mod:`lmopt.optim._precision`). No step counter is kept for full-precision state (the rule does not use one);
8/4-bit state and ``param_rounding="stochastic"`` / ``"kahan"`` keep ``step`` (the rounding key) and, for Kahan,
``kahan_comp``. The math runs in fp32 (fp64 for fp64 tensors). :class:`Lion8bit` is Lion with 8-bit state.

Every update has the same magnitude ``lr`` per coordinate, so Lion wants a learning rate 3-10x smaller than
AdamW's and a weight decay 3-10x larger to keep ``lr * weight_decay`` the same (the paper's Section 5); the
registry's translation of AdamW recipes takes the conservative end (lr / 3, weight decay x 3, betas (0.9, 0.99)).

Implementations: ``for_loop`` (:func:`lion_delta` per tensor, the reference at every precision), ``foreach``
(multi-tensor; GPU and DTensor), ``blocked`` (one cache-blocked pass over memory per tensor, see
:mod:`lmopt.optim._dispatch`; the old name ``fused`` still works), ``kernel`` (8/4-bit state: the C / Triton
kernel, bit-identical to ``for_loop``), ``auto`` (``kernel`` for quantized state, ``blocked`` for plain CPU
tensors, else ``foreach``). The faster full-precision paths interpolate with ``lerp`` (one op), the reference
with a multiply and an add (the kernels' order); they agree to rounding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import partialmethod
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import STATE_PRECISIONS, Implementation, OptimizerSpec, StateTensor, Translation
from . import _dispatch
from ._cautious import CAUTIOUS_MIN_FRACTION, cautious_decay_mask, cautious_mask
from ._dispatch import as_math, blockable, flat_blocks, resolve_implementation
from ._impl import foreach_add_scaled_, foreach_copy_back, run_flat_blocks, run_on, traced_lr
from ._precision import ROUNDING_CODES, MomentPrecision, kahan_state, moments_state, validate_state_precision
from .base import LmoptOptimizer, check_flag, constructor_defaults, is_dtensor

__all__ = ["Lion", "Lion8bit", "lion", "lion_delta"]


def lion_delta(
    p32: Tensor,
    g32: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
) -> Tensor:
    """The Lion rule for one tensor (see the module docstring): updates ``exp_avg`` in place (math dtype) and
    returns the parameter's update; the kernels compute the same operations in the same order (without the
    cautious masks, which no kernel computes)."""
    scratch = torch.mul(g32, 1 - beta1)  # one scratch tensor for the temporaries
    direction = torch.mul(exp_avg, beta1).add_(scratch).sign_()
    if cautious:
        direction.mul_(cautious_mask(direction, g32))
    if weight_decay != 0:
        decay = torch.mul(p32, lr * weight_decay, out=scratch)
        if cautious_weight_decay:
            decay.mul_(cautious_decay_mask(direction, p32))
    delta = direction.mul_(-lr)  # -(sign * lr): negation is exact
    if weight_decay != 0:
        delta.sub_(decay)
    exp_avg.mul_(beta2).add_(torch.mul(g32, 1 - beta2, out=scratch))
    return delta


class LionHyper(NamedTuple):
    """The scalar hyperparameters of one Lion step (what every implementation takes)."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool
    cautious: bool = False
    cautious_weight_decay: bool = False


def _lion_block(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    buf: Tensor,
    hp: LionHyper,
    decay: float,
) -> None:
    """One Lion update of same-shaped math-dtype tensors; ``buf`` is scratch of the same shape; ``decay`` is
    ``1 - lr * weight_decay``."""
    lr, beta1, beta2, _weight_decay, maximize, _, _ = hp
    if maximize:
        g = torch.neg(g)
    c = torch.lerp(m, g, 1 - beta1, out=buf)
    m.lerp_(g, 1 - beta2)
    c.sign_()
    if decay != 1.0:
        p.mul_(decay)
    p.add_(c, alpha=-lr)


def _single_tensor_lion(params, grads, exp_avgs, hp):
    lr, beta1, beta2, weight_decay, maximize, cautious, cautious_wd = hp
    masks = dict(cautious=cautious, cautious_weight_decay=cautious_wd)
    for p, g, m in zip(params, grads, exp_avgs, strict=False):
        p32, g32, m32 = as_math(p), as_math(g), as_math(m)
        if maximize:
            g32 = -g32
        p32.add_(lion_delta(p32, g32, m32, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, **masks))
        if m32 is not m:
            m.copy_(m32)
        if p32 is not p:
            p.copy_(p32)


def _multi_tensor_lion(params, grads, exp_avgs, hp):
    lr, beta1, beta2, weight_decay, maximize, cautious, cautious_wd = hp
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for idx in buckets.values():
        p_ = [params[i] for i in idx]
        m_ = [exp_avgs[i] for i in idx]
        p32 = [as_math(t) for t in p_]
        m32 = [as_math(t) for t in m_]
        g32 = [as_math(grads[i]) for i in idx]
        if maximize:
            g32 = torch._foreach_neg(g32)
        c = torch._foreach_lerp(m32, g32, 1 - beta1)
        torch._foreach_lerp_(m32, g32, 1 - beta2)
        torch._foreach_sign_(c)
        if cautious:  # per tensor: the kept fraction is each whole tensor's
            torch._foreach_mul_(c, [cautious_mask(ci, gi) for ci, gi in zip(c, g32, strict=True)])
        if weight_decay != 0 and cautious_wd:
            decay = [pi.mul(cautious_decay_mask(ci, pi)) for pi, ci in zip(p32, c, strict=True)]
            foreach_add_scaled_(p32, decay, -lr * weight_decay)
            del decay
        elif weight_decay != 0:
            torch._foreach_mul_(p32, 1 - lr * weight_decay)
        foreach_add_scaled_(p32, c, -lr)
        del c
        foreach_copy_back((p_, p32), (m_, m32))


def _blocked_lion(params, grads, exp_avgs, hp):
    decay = 1 - hp.lr * hp.weight_decay
    masked = hp.cautious or (hp.cautious_weight_decay and hp.weight_decay != 0)
    rest = []
    scratch: dict[torch.dtype, Tensor] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=False)):
        if not blockable(p, g, m) or (masked and not (p.dtype == g.dtype == m.dtype and p.dtype.itemsize >= 4)):
            rest.append(i)
            continue
        if not masked:
            run_flat_blocks((p, m, g), 2, lambda p, m, g, buf: _lion_block(p, g, m, buf, hp, decay))
            continue
        if p.numel() == 0:
            continue
        size = min(p.numel(), _dispatch.BLOCK_ELEMENTS)
        if p.dtype not in scratch or scratch[p.dtype].shape[1] < size:
            scratch[p.dtype] = torch.empty((3, size), dtype=p.dtype, device=p.device)
        _blocked_masked_lion(p, g, m, hp, scratch[p.dtype])
    run_on(_multi_tensor_lion, rest, (params, grads, exp_avgs), hp)


def _blocked_masked_lion(p: Tensor, g: Tensor, m: Tensor, hp: LionHyper, scratch: Tensor) -> None:
    """Cautious Lion on one fp32/fp64 tensor in two passes over blocks (the kept fraction is a whole-tensor mean):
    count where sign(c) agrees with g, then the foreach rule's operations (the same values); ``scratch``: 3 rows
    of at least one block. 28 B per fp32 parameter from memory."""
    lr, beta1, beta2, weight_decay, maximize, cautious, cautious_wd = hp
    flat = [t.view(-1) for t in (p, g, m)]
    blocks = list(flat_blocks(p.numel()))

    def views(start, stop):
        pb, gb, mb = (t[start:stop] for t in flat)
        gbuf, c, buf = (row[: stop - start] for row in scratch)
        return pb, (torch.neg(gb, out=gbuf) if maximize else gb), mb, c, buf

    kept = 0.0
    if cautious:
        for start, stop in blocks:
            _pb, gb, mb, c, _buf = views(start, stop)
            kept += float(torch.lerp(mb, gb, 1 - beta1, out=c).sign_().mul_(gb).gt_(0).sum())
    fraction = max(kept / p.numel(), CAUTIOUS_MIN_FRACTION)  # mean(mask) of lmopt.optim._cautious
    for start, stop in blocks:
        pb, gb, mb, c, buf = views(start, stop)
        torch.lerp(mb, gb, 1 - beta1, out=c)
        mb.lerp_(gb, 1 - beta2)
        c.sign_()
        if cautious:
            c.mul_(torch.mul(c, gb, out=buf).gt_(0).div_(fraction))
        if weight_decay != 0 and cautious_wd:
            pb.add_(torch.mul(c, pb, out=buf).ge_(0).mul_(pb), alpha=-lr * weight_decay)
        elif weight_decay != 0:
            pb.mul_(1 - lr * weight_decay)
        pb.add_(c, alpha=-lr)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_lion, "foreach": _multi_tensor_lion, "blocked": _blocked_lion}


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    implementation: Implementation = "auto",
) -> str:
    """Functional Lion step over lists of tensors (see the module docstring for the rule); updates in
    place. ``cautious`` / ``cautious_weight_decay``: the masks of the module docstring (``blocked`` takes two
    passes over a masked tensor). Returns the implementation that ran."""
    masked = cautious or (cautious_weight_decay and weight_decay != 0)
    blocked = all(p.device.type == "cpu" and blockable(p) and m.dtype == p.dtype for p, m in zip(params, exp_avgs))
    implementation = resolve_implementation(
        {"fused": "blocked"}.get(implementation, implementation),
        tuple(_IMPLEMENTATIONS),
        {"blocked": blocked},
        owner="cautious Lion" if masked else "Lion",
    )
    hp = LionHyper(lr, beta1, beta2, weight_decay, maximize, cautious, cautious_weight_decay)
    _IMPLEMENTATIONS[implementation](params, grads, exp_avgs, hp)
    return implementation


class Lion(MomentPrecision, LmoptOptimizer):
    """Lion (EvoLved Sign Momentum): ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, one moment of state.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-4; use 3-10x less than AdamW's).
        betas: ``(beta1, beta2)``: interpolation for the update and decay of the momentum (default (0.9,
            0.99)).
        weight_decay: decoupled decay, multiplied by lr (default 0.0; the registry recipe uses 0.3, 3-10x
            AdamW's).
        maximize: ascend instead of descend.
        state_precision: how ``exp_avg`` is stored: None (the parameter's dtype, default), ``"fp32"``,
            ``"bf16"``, ``"8bit"`` or ``"4bit"``; ``block_size`` / ``min_quantized_numel`` as for
            :class:`lmopt.AdamW`.
        param_rounding: how bf16 parameters take the update: ``"nearest"`` (default), ``"stochastic"`` or
            ``"kahan"`` (no effect on fp32 parameters).
        implementation: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"blocked"`` (old name
            ``"fused"``) or ``"kernel"`` (8/4-bit state).
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.
        cautious: mask the update where its sign disagrees with the gradient, rescaled by the kept fraction
            (default False; Liang et al. 2024; registry ``cautious_lion``). The 8/4-bit kernel cannot mask:
            ``"auto"`` takes the per-tensor rule instead and an explicit ``"kernel"`` is refused.
        cautious_weight_decay: decay only where the update and the parameter agree in sign (default False;
            Chen et al. 2025, arXiv:2510.12402).

    State: ``exp_avg``; with quantized state or a rounding mode also ``step`` (and ``kahan_comp``).

    Example:
        >>> opt = Lion(lmopt.param_groups(model, weight_decay=0.3), lr=1e-4)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    """

    implementations = ("for_loop", "foreach", "blocked", "kernel")
    implementation_aliases = {"fused": "blocked"}
    moments = (("exp_avg", "first"),)
    kernel_algorithm = "lion"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        state_precision: str | torch.dtype | None = None,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        param_rounding: str = "nearest",
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        group.setdefault("param_rounding", "nearest")
        validate_state_precision(group)
        quantized = self._quantized_group(group)
        if quantized and group["implementation"] == "blocked":  # Lion8bit's old "fused" was the kernel
            group["implementation"] = "kernel"
        impl = group["implementation"]
        if quantized != (impl == "kernel") and impl not in ("auto", "for_loop", "compiled"):
            need = "'kernel', 'for_loop' or 'auto'" if quantized else "'blocked', 'foreach', 'for_loop' or 'auto'"
            raise ValueError(
                f"implementation={impl!r} does not run state_precision={group['state_precision']!r}; use {need}"
            )
        group.setdefault("cautious", False)
        group.setdefault("cautious_weight_decay", False)
        check_flag("cautious", group["cautious"])
        check_flag("cautious_weight_decay", group["cautious_weight_decay"])
        if _masks(group) and impl == "kernel":
            raise ValueError(
                "implementation='kernel' (lmopt's 8/4-bit kernel) cannot mask updates (the kept fraction is a "
                "whole-tensor mean), which "
                "cautious=True / cautious_weight_decay=True need; use implementation='auto' (it picks "
                "the per-tensor rule) or 'for_loop'"
            )
        if _masks(group) and quantized and any(is_dtensor(p) for p in group["params"]):
            raise NotImplementedError(
                "cautious masking with 8/4-bit state steps each local shard of a DTensor (FSDP2) parameter alone, "
                "so the kept fraction would be a shard's, not the tensor's; use state_precision='bf16' / 'fp32' "
                "with cautious=True under FSDP2"
            )

    def _kernel_applies_to_group(self, group: dict[str, Any]) -> bool:
        return not _masks(group)  # the kernel has no (whole-tensor) masks

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        if _counts_steps(group):
            state["step"] = torch.zeros((), dtype=torch.float32)  # a CPU counter: the stochastic-rounding key
        self._init_moments(group, param, state)
        self._init_rounding(group, param, state)

    def _update(self, group, p32, g32, values, step):
        beta1, beta2 = group["betas"]
        lr, wd = traced_lr(group["lr"]), float(group["weight_decay"])
        masks = dict(cautious=group["cautious"], cautious_weight_decay=group["cautious_weight_decay"])
        return lion_delta(p32, g32, values["exp_avg"], lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, **masks)

    def _kernel_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            weight_decay=float(group["weight_decay"]),
            lr=float(group["lr"]),
            decoupled=True,
            maximize=group["maximize"],
            rounding=ROUNDING_CODES[group["param_rounding"]],
        )

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        impl = group["implementation"]
        if self._quantized_group(group):
            used = self._step_quantized(group, params, grads, impl != "for_loop")
            if impl != "for_loop" and _masks(group):
                used += " (cautious: lmopt's 8/4-bit kernel cannot mask; the per-tensor rule ran)"
        elif impl == "for_loop" or _counts_steps(group):
            used = self._step_per_tensor(group, params, grads)
        else:
            beta1, beta2 = group["betas"]
            used = lion(
                params,
                grads,
                [self.state[p]["exp_avg"] for p in params],
                lr=traced_lr(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                cautious=group["cautious"],
                cautious_weight_decay=group["cautious_weight_decay"],
                implementation=impl,
            )
        self._implementation_used[id(group)] = used

    def __repr__(self) -> str:
        text = super().__repr__()
        if any(self._quantized_group(g) for g in self.param_groups):
            text += f"\n  state: {self.state_summary()}"
        return text


class Lion8bit(Lion):
    """Lion with an 8-bit blockwise-quantized momentum: ~1 byte of state per parameter.

    ``Lion(..., state_precision="8bit")``: same arguments and rule; ``implementation="auto"`` runs lmopt's C
    kernel on CPUs and the Triton kernel on CUDA (``"kernel"``; the old name ``"fused"`` still works).

    Example:
        >>> opt = lmopt.Lion8bit(model.parameters(), lr=1e-4, weight_decay=1.0)

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023; state quantization
    after Dettmers et al. 2022.
    """

    __init__ = partialmethod(Lion.__init__, state_precision="8bit")  # type: ignore[assignment]


def _masks(group: Mapping[str, Any]) -> bool:
    """The group masks its updates (cautious, or cautious weight decay with decay to mask)."""
    return bool(group.get("cautious")) or bool(group.get("cautious_weight_decay") and group.get("weight_decay"))


def _counts_steps(hyper: Mapping[str, Any]) -> bool:
    """Groups (or a spec's hyperparameters) that step through the per-tensor rule with a step counter (the
    rounding key): quantized state or a rounding mode."""
    return hyper.get("state_precision") in ("8bit", "4bit") or hyper.get("param_rounding", "nearest") != "nearest"


# ------------------------------------------------------------------------------------------------------------
# registry entries
def lion_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    step = [StateTensor("step", (), torch.float32)] if _counts_steps(hyper) else []
    return [*step, *moments_state(Lion.moments, shape, dtype, hyper), *kahan_state(shape, dtype, hyper)]


_LION_PAPER = "Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023"
#: one translation for Lion and its low-bit entry. Chen et al. 2023, Section 5: lr 3-10x smaller and weight decay
#: 3-10x larger than AdamW's (lr x wd kept); betas (0.9, 0.99) are Lion's defaults, (0.95, 0.98) the paper's
#: stability fix for large language models. lmopt's recipes take the conservative end (3x) and the defaults.
#: compare's short runs keep the translation's weight decay and betas but not its lr: lmopt tune's full grid picks
#: 3x tuned AdamW's there (docs/compare.md, "What tuning says about the recipes").
_LION_COMPARE = {"lr": 3e-3, "weight_decay": 0.3, "betas": (0.9, 0.99)}
_LION_TRANSLATION = Translation(
    label="Lion paper, Sec. 5: lr / 3, weight decay x 3, betas (0.9, 0.99)",
    lr_factor=1 / 3,
    weight_decay_factor=3.0,
    betas=(0.9, 0.99),
    pass_eps=False,
    source="Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023, Section 5: "
    "lr 3-10x smaller and weight decay 3-10x larger than AdamW's (lr x wd kept), beta1=0.9, "
    "beta2=0.99; lmopt takes the conservative end (3x)",
)

SPECS = [
    OptimizerSpec(
        name="lion",
        cls=Lion,
        summary="sign of interpolated momentum; half of AdamW's state; lr 3-10x below AdamW's",
        paper=_LION_PAPER,
        state=lion_state,
        defaults={"lr": 1e-4, "weight_decay": 0.3},
        family="sign",
        aliases={"lion_32bit": {}, "lion_torch": {}, "paged_lion_32bit": {"offload": True}},
        state_precisions=STATE_PRECISIONS,
        translation=_LION_TRANSLATION,
        compare=_LION_COMPARE,
        compare_default=4,
        recommend_tier=2,
        recommend_reason="Lion: one moment (Chen et al. 2023)",
    ),
    OptimizerSpec(
        name="cautious_lion",
        cls=Lion,
        summary="Lion with cautious masking (sign kept where it agrees with the gradient); no extra state",
        paper=_LION_PAPER + "; Liang et al., Cautious Optimizers, arXiv:2411.16085, 2024",
        state=lion_state,
        defaults={"lr": 1e-4, "weight_decay": 0.3, "cautious": True},
        family="sign",
        aliases={"c_lion": {}, "lion_cautious": {}, "cautious_lion_cwd": {"cautious_weight_decay": True}},
        state_precisions=STATE_PRECISIONS,
        translation=_LION_TRANSLATION,
        compare=_LION_COMPARE,
    ),
    OptimizerSpec(
        name="lion8bit",
        cls=Lion8bit,
        summary="Lion with an 8-bit blockwise-quantized momentum (1 B/param)",
        paper=_LION_PAPER + "; Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022",
        state=lion_state,
        family="sign",
        aliases={"lion_8bit": {}, "paged_lion_8bit": {"offload": True}},
        state_precisions=STATE_PRECISIONS,
        translation=_LION_TRANSLATION,
        compare=_LION_COMPARE,
    ),
]
