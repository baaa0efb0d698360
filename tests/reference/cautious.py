"""Reference cautious optimizers, transcribed for the tests (slow, per tensor, plain torch ops).

Sources:

* AdamW: C-Optim (kyleliang919/C-Optim, Liang et al. 2024, arXiv:2411.16085), ``c_adamw.py``,
  ``c_adamw_update_foreach_async`` (the default path of its ``AdamW``): torch's AdamW moments and denominator
  ``sqrt(v) / sqrt(1 - beta2^t) + eps``, decoupled decay ``p *= 1 - lr * wd`` from the pre-step parameter, and the
  update ``(m * mask) / denom * lr / (1 - beta1^t) / max(mean(mask), 1e-3)`` with ``mask = 1[m * g > 0]``.
* Lion: C-Optim's ``c_lion.py`` ``update_fn``: ``p *= 1 - lr * wd``; ``u = sign(beta1 * m + (1 - beta1) * g)``;
  ``p -= lr * u * mask``; ``m = beta2 * m + (1 - beta2) * g``. Its mask normalisation is the paper's first
  ``numel / (sum + 1)``; the one used here is ``1 / max(mean(mask), 1e-3)`` of ``c_adamw.py`` (and timm), the
  definition lmopt implements (lmopt/optim/_cautious.py).
* AdEMAMix: the rule of Pagliardini et al. 2024 (Algorithm 1, bitsandbytes' form: no bias correction of the
  slow EMA), with the cautious mask on the whole update ``m1_hat + alpha * m2`` (the paper's definition: the
  update, masked where it disagrees with the gradient). pytorch_optimizer's ``AdEMAMix(cautious=True)`` masks
  only ``m1`` and normalises by ``numel / (sum + 1)``, so it is not an oracle for this definition.
* Cautious weight decay (Chen et al. 2025, arXiv:2510.12402, Algorithm 1): ``p -= lr * (u + wd * 1[u * p >= 0] * p)``
  with ``u`` the (masked) update direction, the decay evaluated at the pre-step parameter.

These take ``maximize=False`` only (the tests' variants); masks are computed from the gradient as given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def _mask(update: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """C-Optim's ``mask = (update * grad > 0)`` and its normaliser ``mean(mask).clamp(min=1e-3)``."""
    mask = (update * grad > 0).to(grad.dtype)
    return mask, mask.mean().clamp(min=1e-3)


def _decay(p: Tensor, u: Tensor, lr: float, wd: float, cautious_wd: bool) -> None:
    """Decoupled decay of the pre-step ``p``, masked to ``1[u * p >= 0]`` where cautious."""
    if wd == 0:
        return
    if cautious_wd:
        p.sub_(p * (u * p >= 0).to(p.dtype) * (lr * wd))
    else:
        p.mul_(1 - lr * wd)


class ReferenceCautiousAdamW(torch.optim.Optimizer):
    """C-Optim's cautious AdamW (see the module docstring), optionally with cautious weight decay."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        cautious: bool = True,
        cautious_weight_decay: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious=cautious,
                        cautious_weight_decay=cautious_weight_decay)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.lerp_(g * g, 1 - beta2)
                denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
                if group["cautious"]:
                    mask, mean = _mask(m, g)
                    direction = m * mask / mean
                else:
                    direction = m.clone()
                _decay(p, direction, lr, wd, group["cautious_weight_decay"])
                p.sub_(direction / denom * (lr / (1 - beta1**t)))


class ReferenceCautiousLion(torch.optim.Optimizer):
    """C-Optim's cautious Lion (see the module docstring), optionally with cautious weight decay."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        cautious: bool = True,
        cautious_weight_decay: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, cautious=cautious,
                        cautious_weight_decay=cautious_weight_decay)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = (m * beta1 + g * (1 - beta1)).sign_()
                if group["cautious"]:
                    mask, mean = _mask(update, g)
                    update = update * mask / mean
                _decay(p, update, lr, wd, group["cautious_weight_decay"])
                p.sub_(update * lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)


class ReferenceCautiousAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (no alpha / beta3 warmup) with the cautious mask on the whole update (module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        cautious: bool = True,
        cautious_weight_decay: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay, cautious=cautious,
                        cautious_weight_decay=cautious_weight_decay)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2, beta3), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m1"], state["m2"], state["nu"] = (torch.zeros_like(p) for _ in range(3))
                state["step"] += 1
                t = state["step"]
                m1, m2, nu = state["m1"], state["m2"], state["nu"]
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                m2.mul_(beta3).add_(g, alpha=1 - beta3)
                nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                direction = m1 / (1 - beta1**t) + group["alpha"] * m2
                if group["cautious"]:
                    mask, mean = _mask(direction, g)
                    direction = direction * mask / mean
                denom = nu.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
                _decay(p, direction, lr, wd, group["cautious_weight_decay"])
                p.sub_(direction / denom * lr)
