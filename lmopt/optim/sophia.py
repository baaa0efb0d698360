"""Sophia: clipped, diagonally preconditioned momentum, with a Hessian estimate refreshed every k steps.

Update rule (Liu et al. 2023, Algorithm 3), for gradient ``g_t`` (negated when ``maximize``) at step ``t``:

.. code-block:: text

    m <- beta1 * m + (1 - beta1) * g
    every k steps (update_hessian):  h <- beta2 * h + (1 - beta2) * h_hat
    p <- p * (1 - lr * weight_decay)                                (decoupled decay)
    p <- p - lr * clip(m / max(rho * h, eps), 1)                    (clip(x, 1) = x clamped to [-1, 1])

with one of the paper's two diagonal Hessian estimators ``h_hat`` (Algorithms 1 and 2):

* **Hutchinson** (``estimator="hutchinson"``): ``h_hat = u * (H u)`` for a random ``u`` (standard normal, or
  Rademacher with ``hessian_distribution="rademacher"``), ``H u`` a Hessian-vector product by double
  backward through the loss the closure returns;
* **Gauss-Newton-Bartlett** (``estimator="gnb"``): ``h_hat = B * g_hat * g_hat``, ``g_hat`` the gradient of
the
  loss on labels *sampled from the model's own output distribution* (the closure computes it, e.g. with
  :func:`sampled_label_loss`), ``B`` the number of examples (tokens) that loss averages over.

Coordinates where ``h`` is tiny or negative fall back to a sign-momentum step of size ``lr`` (the clip).

The refresh is an explicit call that leaves ``.grad`` untouched (estimators use ``torch.autograd.grad``).
A training loop (the ``hessian_due()`` check before ``step()`` refreshes at steps 1, k+1, 2k+1, ... as the
paper does)::

    opt = lmopt.Sophia(model.parameters(), lr=2e-4, rho=0.05, estimator="gnb", update_period=10)
    for x, y in loader:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if opt.hessian_due():
            opt.update_hessian(lambda: sampled_label_loss(model(x)), batch_size=y.numel())
        opt.step()
        opt.zero_grad(set_to_none=True)

With ``estimator="hutchinson"`` the closure recomputes the training loss itself:
``opt.update_hessian(lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))``.

State per parameter: ``step`` (fp32 scalar), ``exp_avg`` and ``hessian`` (parameter shape and dtype):
8 bytes per fp32 parameter, as AdamW. The math runs in fp32 (fp64 for fp64 tensors).

Implementations: ``for_loop`` (plain per-tensor reference), ``foreach`` (multi-tensor), ``blocked`` (one
cache-blocked pass per tensor, :mod:`lmopt.optim._dispatch`); ``auto`` picks ``blocked`` for plain CPU tensors,
else ``foreach``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import OptimizerSpec, StateTensor
from ._dispatch import as_math, blockable, resolve_implementation
from ._impl import foreach_copy_back, run_flat_blocks, run_on, traced_lr
from .base import (
    Implementation,
    LmoptOptimizer,
    NonFiniteGradientError,
    check_choice,
    check_positive,
    constructor_defaults,
)

__all__ = ["Sophia", "sampled_label_loss", "sophia"]


def sampled_label_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` (``(..., vocab)``) against labels sampled from ``softmax(logits)``.

    The gradient of this loss is the ``g_hat`` of Sophia's Gauss-Newton-Bartlett estimator (the labels are
    sampled without gradient; the mean is over every position, so pass ``batch_size=`` the number of
    positions).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(flat.float(), dim=-1), 1).squeeze(-1)
    return F.cross_entropy(flat, labels)


# ------------------------------------------------------------------------------------------------------------
# the step (the Hessian EMA is refreshed separately, in Sophia.update_hessian)
class SophiaHyper(NamedTuple):
    """The scalar hyperparameters of one Sophia step (what every implementation takes)."""

    lr: float
    beta1: float
    rho: float
    eps: float
    weight_decay: float
    maximize: bool


def _sophia_block(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    h: Tensor,
    buf: Tensor,
    hp: SophiaHyper,
    decay: float,
) -> None:
    """One Sophia update of same-shaped math-dtype tensors; ``buf`` is scratch of the same shape; ``decay`` is
    ``1 - lr * weight_decay``."""
    lr, beta1, rho, eps, _weight_decay, maximize = hp
    if maximize:
        g = torch.neg(g)
    m.lerp_(g, 1 - beta1)
    ratio = torch.mul(h, rho, out=buf).clamp_(min=eps)
    torch.div(m, ratio, out=ratio).clamp_(-1.0, 1.0)
    if decay != 1.0:
        p.mul_(decay)
    p.add_(ratio, alpha=-lr)


def _single_tensor_sophia(params, grads, exp_avgs, hessians, state_steps, hp):
    lr, beta1, rho, eps, weight_decay, maximize = hp
    for p, g, m, h, step in zip(params, grads, exp_avgs, hessians, state_steps, strict=False):
        step += 1
        p32, g32, m32, h32 = as_math(p), as_math(g), as_math(m), as_math(h)
        if maximize:
            g32 = -g32
        m32.mul_(beta1).add_(g32, alpha=1 - beta1)
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        ratio = (m32 / torch.clamp(rho * h32, min=eps)).clamp(-1.0, 1.0)
        p32.add_(ratio, alpha=-lr)
        if m32 is not m:
            m.copy_(m32)
        if p32 is not p:
            p.copy_(p32)


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, state_steps, hp):
    lr, beta1, rho, eps, weight_decay, maximize = hp
    torch._foreach_add_(state_steps, 1)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for idx in buckets.values():
        p_ = [params[i] for i in idx]
        m_ = [exp_avgs[i] for i in idx]
        p32, m32 = [as_math(t) for t in p_], [as_math(t) for t in m_]
        h32 = [as_math(hessians[i]) for i in idx]
        g32 = [as_math(grads[i]) for i in idx]
        if maximize:
            g32 = torch._foreach_neg(g32)
        torch._foreach_lerp_(m32, g32, 1 - beta1)
        denom = torch._foreach_mul(h32, rho)
        torch._foreach_clamp_min_(denom, eps)
        ratio = torch._foreach_div(m32, denom)
        del denom
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        if weight_decay != 0:
            torch._foreach_mul_(p32, 1 - lr * weight_decay)
        if isinstance(lr, Tensor):  # a tensor lr in a traced step: as an operand (alpha takes Python numbers)
            torch._foreach_mul_(ratio, -lr)
            torch._foreach_add_(p32, ratio)
        else:
            torch._foreach_add_(p32, ratio, alpha=-lr)
        del ratio
        foreach_copy_back((p_, p32), (m_, m32))


def _blocked_sophia(params, grads, exp_avgs, hessians, state_steps, hp):
    decay = 1 - hp.lr * hp.weight_decay
    rest = []
    for i, (p, g, m, h) in enumerate(zip(params, grads, exp_avgs, hessians, strict=False)):
        if not blockable(p, g, m, h):
            rest.append(i)
            continue
        state_steps[i] += 1
        run_flat_blocks((p, m, g, h), 2, lambda p, m, g, h, buf: _sophia_block(p, g, m, h, buf, hp, decay))
    run_on(_multi_tensor_sophia, rest, (params, grads, exp_avgs, hessians, state_steps), hp)


_IMPLEMENTATIONS = {
    "for_loop": _single_tensor_sophia,
    "foreach": _multi_tensor_sophia,
    "blocked": _blocked_sophia,
}


def sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    implementation: Implementation = "auto",
) -> str:
    """Functional Sophia step (momentum and clipped preconditioned update; ``hessians`` are only read).

    Returns the implementation that ran (what ``"auto"`` chose).
    """
    blocked = all(p.device.type == "cpu" and blockable(p) for p in params)
    implementation = resolve_implementation(
        {"fused": "blocked"}.get(implementation, implementation),
        tuple(_IMPLEMENTATIONS),
        {"blocked": blocked},
        preference=("blocked", "foreach"),
        owner="sophia",
    )
    hp = SophiaHyper(lr, beta1, rho, eps, weight_decay, maximize)
    _IMPLEMENTATIONS[implementation](params, grads, exp_avgs, hessians, state_steps, hp)
    return implementation


class Sophia(LmoptOptimizer):
    """Sophia: ``p -= lr * clip(m / max(rho * h, eps), 1)`` with ``h`` a diagonal Hessian EMA refreshed by
    :meth:`update_hessian` every ``update_period`` steps (see the module docstring for the loop).

    Args:
        params: parameters or param groups.
        lr: learning rate; also the largest per-coordinate step (default 1e-4).
        betas: ``(beta1, beta2)``: momentum decay and Hessian-EMA decay per refresh (default (0.965, 0.99)).
        rho: the clipping scale ``gamma`` of the paper (default 0.04).
        eps: floor of the denominator ``rho * h`` (default 1e-15).
        weight_decay: decoupled decay, multiplied by lr (default 0.1).
        update_period: ``k``, steps between Hessian refreshes; :meth:`hessian_due` follows it (default 10).
        estimator: ``"gnb"`` (Gauss-Newton-Bartlett, default; SophiaG) or ``"hutchinson"`` (SophiaH).
        hessian_distribution: probe vectors of the Hutchinson estimator, ``"gaussian"`` (default, the paper's)
            or ``"rademacher"``.
        maximize: ascend instead of descend.
        implementation: ``"auto"`` (default), ``"for_loop"``, ``"foreach"`` or ``"blocked"`` (old name ``"fused"``).
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.

    State: ``step`` (fp32 scalar), ``exp_avg``, ``hessian`` (parameter shape and dtype).

    Example:
        >>> opt = Sophia(model.parameters(), lr=2e-4, estimator="hutchinson")
        >>> loss = loss_fn(model(x), y); loss.backward()
        >>> if opt.hessian_due(): opt.update_hessian(lambda: loss_fn(model(x), y))
        >>> opt.step(); opt.zero_grad()

    Reference: Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", ICLR 2024 (arXiv:2305.14342).
    """

    implementations = ("for_loop", "foreach", "blocked")
    implementation_aliases = {"fused": "blocked"}  # the name before lmopt's one vocabulary

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-15,
        weight_decay: float = 0.1,
        *,
        update_period: int = 10,
        estimator: str = "gnb",
        hessian_distribution: str = "gaussian",
        maximize: bool = False,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        if isinstance(update_period, bool) or not isinstance(update_period, int) or update_period < 1:
            raise ValueError(f"update_period must be an integer >= 1, got {update_period!r}")
        check_choice("estimator", estimator, ("gnb", "hutchinson"))
        check_choice("hessian_distribution", hessian_distribution, ("gaussian", "rademacher"))
        self.update_period = update_period
        self.estimator = estimator
        self.hessian_distribution = hessian_distribution
        #: Hessian refreshes skipped for a non-finite estimate (``nonfinite="skip"``)
        self.skipped_hessian_updates = 0
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("rho", group["rho"])

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        beta1, _beta2 = group["betas"]
        self._implementation_used[id(group)] = sophia(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["hessian"] for s in states],
            [s["step"] for s in states],
            lr=traced_lr(group["lr"]),
            beta1=beta1,
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            implementation=group["implementation"],
        )

    # -- the Hessian refresh ---------------------------------------------------------------------------------
    def steps_taken(self) -> int:
        """Steps applied so far (the largest ``step`` over the parameters; 0 before the first)."""
        steps = [int(s["step"]) for s in self.state.values() if "step" in s]
        return max(steps, default=0)

    def hessian_due(self) -> bool:
        """True when the coming step is one the paper refreshes ``h`` at: steps 1, k+1, 2k+1, ...."""
        return self.steps_taken() % self.update_period == 0

    def _trainable(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def update_hessian(self, closure: Callable[[], Tensor], *, batch_size: int | None = None) -> Tensor:
        """Refresh the Hessian EMA: ``h <- beta2 * h + (1 - beta2) * h_hat`` for every trainable parameter.

        Args:
            closure: recomputes a loss with its autograd graph (called under ``torch.enable_grad()``): the
                training loss for ``estimator="hutchinson"``; the loss on labels sampled from the model
                (:func:`sampled_label_loss`) for ``estimator="gnb"``.
            batch_size: ``B`` of the GNB estimator, the number of examples (tokens) the closure's loss
                averages
                over (required for ``"gnb"``, ignored by Hutchinson).

        Returns:
            The closure's loss (detached). ``.grad`` of the parameters is not touched.

        A non-finite estimate (inf/NaN anywhere) follows the optimizer's ``nonfinite`` policy, as a step does: no
        Hessian changes, and ``"raise"`` raises :class:`~lmopt.optim.base.NonFiniteGradientError` naming the
        parameter while ``"skip"`` counts the refresh in :attr:`skipped_hessian_updates`.

        Raises:
            ValueError: ``batch_size`` missing or not a positive integer for the GNB estimator.
            NonFiniteGradientError: a non-finite estimate under ``nonfinite="raise"``.
        """
        if self.estimator == "gnb" and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be a positive integer for estimator='gnb' (the number of examples "
                f"or tokens the sampled-label loss averages over), got {batch_size!r}"
            )
        pairs = self._trainable()
        params = [p for _g, p in pairs]
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError("closure must return a scalar loss tensor that requires grad")
            create_graph = self.estimator == "hutchinson"
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
            used = [i for i, g in enumerate(grads) if g is not None]
            if self.estimator == "hutchinson":
                probes = [self._probe(params[i]) for i in used]
                hvps = torch.autograd.grad(
                    [grads[i] for i in used],
                    [params[i] for i in used],
                    grad_outputs=probes,
                    allow_unused=True,
                )
                estimates = {
                    i: (z * hz if hz is not None else torch.zeros_like(z))
                    for i, z, hz in zip(used, probes, hvps, strict=False)
                }
            else:
                estimates = {i: grads[i].detach().square().mul_(batch_size) for i in used}
        if self.check_finite:  # the non-finite policy of the step applies to the Hessian refresh too
            bad = next((i for i, h_hat in estimates.items() if not bool(torch.isfinite(h_hat).all())), None)
            if bad is not None:
                gi, index = next(
                    (gi, k)
                    for gi, g in enumerate(self.param_groups)
                    for k, q in enumerate(g["params"])
                    if q is pairs[bad][1]
                )
                if self.nonfinite == "raise":
                    raise NonFiniteGradientError(
                        f"non-finite Hessian estimate for {self._param_name(gi, index)}; the Hessian EMA was not "
                        "updated. Check the closure's loss, or construct the optimizer with nonfinite='skip' to "
                        "skip such refreshes"
                    )
                self.skipped_hessian_updates += 1
                return loss.detach()
        for i, h_hat in estimates.items():
            group, p = pairs[i]
            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, p, state)
            h = state["hessian"]
            h.lerp_(h_hat.to(h.dtype), 1 - group["betas"][1])
        return loss.detach()

    def _probe(self, p: Tensor) -> Tensor:
        if self.hessian_distribution == "rademacher":
            return torch.randint_like(p, 0, 2).mul_(2).sub_(1)
        return torch.randn_like(p)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["lmopt"]["sophia"] = {
            "update_period": self.update_period,
            "estimator": self.estimator,
            "hessian_distribution": self.hessian_distribution,
            "skipped_hessian_updates": self.skipped_hessian_updates,
        }
        return sd

    def _load_checked_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("lmopt", {}).get("sophia", {})
        skipped = saved.get("skipped_hessian_updates", 0) if isinstance(saved, Mapping) else None
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(
                f"Sophia.load_state_dict: lmopt.sophia.skipped_hessian_updates must be an int >= 0, got {skipped!r}"
            )
        super()._load_checked_state_dict(state_dict)
        self.skipped_hessian_updates = skipped


# ------------------------------------------------------------------------------------------------------------
# registry entries
def sophia_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [
        StateTensor("step", (), torch.float32),
        StateTensor("exp_avg", shape, dtype),
        StateTensor("hessian", shape, dtype),
    ]


_PAPER = (
    "Liu, Li, Hall, Liang & Ma, Sophia: A Scalable Stochastic Second-order Optimizer for Language Model "
    "Pre-training, ICLR 2024"
)

SPECS = [
    OptimizerSpec(
        name="sophia",
        cls=Sophia,
        summary="clipped diagonal-Hessian preconditioned momentum; update_hessian(closure) every k steps",
        paper=_PAPER,
        state=sophia_state,
        family="second_order",
        aliases={"sophiag": {"estimator": "gnb"}, "sophiah": {"estimator": "hutchinson"}},
    ),
]
