"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

Update rule (Chen et al. 2023, Algorithm 2), for gradient ``g`` (negated when ``maximize``):

.. code-block:: text

    p <- p * (1 - lr * weight_decay)                  (decoupled decay)
    c <- beta1 * m + (1 - beta1) * g                  (interpolation, not stored)
    p <- p - lr * sign(c)
    m <- beta2 * m + (1 - beta2) * g

State per parameter: ``exp_avg`` (``m``, parameter shape and dtype) -- 4 bytes per fp32 parameter, half of
AdamW's. No step counter is kept (the rule does not use one). The math runs in fp32 (fp64 for fp64 tensors).

Every update has the same magnitude ``lr`` per coordinate, so Lion wants a learning rate 3-10x smaller than
AdamW's and a weight decay 3-10x larger to keep ``lr * weight_decay`` the same (the paper's advice,
Section 5); the registry recipe is ``lr=1e-4, weight_decay=0.3`` (for AdamW at 3e-4..1e-3 and 0.1).

Implementations: ``for_loop`` (plain per-tensor reference), ``foreach`` (multi-tensor; GPU and DTensor),
``fused`` (one cache-blocked pass over memory per tensor, see :mod:`lmopt.optim._blocking`), ``auto``
(``fused`` for plain CPU tensors, else ``foreach``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..registry import OptimizerSpec, StateTensor
from ._blocking import as_math, blockable, flat_blocks
from .base import Implementation, LmoptOptimizer, check_betas, check_choice, check_nonnegative, check_positive

__all__ = ["Lion", "lion"]


def _lion_block(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    buf: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    decay: float,
    maximize: bool,
) -> None:
    """One Lion update of same-shaped math-dtype tensors; ``buf`` is scratch of the same shape."""
    if maximize:
        g = torch.neg(g)
    c = torch.lerp(m, g, 1 - beta1, out=buf)
    m.lerp_(g, 1 - beta2)
    c.sign_()
    if decay != 1.0:
        p.mul_(decay)
    p.add_(c, alpha=-lr)


def _single_tensor_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    for p, g, m in zip(params, grads, exp_avgs, strict=False):
        p32, g32, m32 = as_math(p), as_math(g), as_math(m)
        if maximize:
            g32 = -g32
        # lerp, as the other paths (bit-identical interpolation keeps sign(c) identical across paths)
        c = torch.lerp(m32, g32, 1 - beta1)
        m32.lerp_(g32, 1 - beta2)
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        p32.add_(torch.sign(c), alpha=-lr)
        if m32 is not m:
            m.copy_(m32)
        if p32 is not p:
            p.copy_(p32)


def _multi_tensor_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
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
        if weight_decay != 0:
            torch._foreach_mul_(p32, 1 - lr * weight_decay)
        torch._foreach_add_(p32, c, alpha=-lr)
        del c
        for dst, src in ((p_, p32), (m_, m32)):
            pairs = [(d, s) for d, s in zip(dst, src, strict=False) if d is not s]
            if pairs:
                torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def _fused_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    decay = 1 - lr * weight_decay
    rest = []
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=False)):
        if not blockable(p, g, m):
            rest.append(i)
            continue
        pf, gf, mf = p.view(-1), g.view(-1), m.view(-1)
        low = p.dtype not in (torch.float32, torch.float64)
        buf = torch.empty(min(pf.numel(), 1 << 17), dtype=torch.float32 if low else p.dtype, device=p.device)
        for start, stop in flat_blocks(pf.numel()):
            b = buf[: stop - start]
            pc, gc, mc = pf[start:stop], gf[start:stop], mf[start:stop]
            if low:  # low-precision tensors: upcast the block (in cache), write it back after the math
                p32, g32, m32 = pc.float(), gc.float(), mc.float()
                _lion_block(p32, g32, m32, b, lr=lr, beta1=beta1, beta2=beta2, decay=decay, maximize=maximize)
                pc.copy_(p32)
                mc.copy_(m32)
            else:
                _lion_block(pc, gc, mc, b, lr=lr, beta1=beta1, beta2=beta2, decay=decay, maximize=maximize)
    if rest:
        _multi_tensor_lion(
            [params[i] for i in rest],
            [grads[i] for i in rest],
            [exp_avgs[i] for i in rest],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
        )


_IMPLEMENTATIONS = {"for_loop": _single_tensor_lion, "foreach": _multi_tensor_lion, "fused": _fused_lion}


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
    implementation: Implementation = "auto",
) -> str:
    """Functional Lion step over lists of tensors (see the module docstring for the rule); updates in
    place."""
    if implementation == "auto":
        implementation = "fused" if all(p.device.type == "cpu" and blockable(p) for p in params) else "foreach"
    _IMPLEMENTATIONS[implementation](
        params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize
    )
    return implementation


class Lion(LmoptOptimizer):
    """Lion (EvoLved Sign Momentum): ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, one moment of state.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-4; use 3-10x less than AdamW's).
        betas: ``(beta1, beta2)``: interpolation for the update and decay of the momentum (default (0.9,
            0.99)).
        weight_decay: decoupled decay, multiplied by lr (default 0.0; the registry recipe uses 0.3, 3-10x
            AdamW's).
        maximize: ascend instead of descend.
        implementation: ``"auto"`` (default), ``"for_loop"``, ``"foreach"`` or ``"fused"``.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.

    State: ``exp_avg`` (parameter shape and dtype).

    Example:
        >>> opt = Lion(lmopt.param_groups(model, weight_decay=0.3), lr=1e-4)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    """

    implementations = ("for_loop", "foreach", "fused")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, implementation=implementation)
        super().__init__(params, defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_choice("maximize", group["maximize"], (True, False))
        check_choice("implementation", group["implementation"], ("auto", *self.implementations))

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        self._implementation_used[id(group)] = lion(
            params,
            grads,
            [self.state[p]["exp_avg"] for p in params],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            implementation=group["implementation"],
        )


# ------------------------------------------------------------------------------------------------------------
# registry entries
def lion_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [StateTensor("exp_avg", shape, dtype)]


SPECS = [
    OptimizerSpec(
        name="lion",
        cls=Lion,
        summary="sign of interpolated momentum; half of AdamW's state; lr 3-10x below AdamW's",
        paper="Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023",
        state=lion_state,
        defaults={"lr": 1e-4, "weight_decay": 0.3},
        family="sign",
        aliases={"lion_32bit": {}, "lion_torch": {}},
    ),
]
