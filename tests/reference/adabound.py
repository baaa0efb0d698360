"""AdaBound as written in the paper's official code (Luolc/AdaBound, ``adabound/adabound.py``), an oracle.

A transcription of the algorithm (Luo et al., "Adaptive Gradient Methods with Dynamic Bound of Learning Rate",
ICLR 2019, Algorithm 2), one parameter at a time with the textbook operations: coupled L2 decay, Adam moments,
the per-coordinate rate ``lr * sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v) + eps)`` clipped to
``[final_lr (1 - 1/(gamma t + 1)), final_lr (1 + 1/(gamma t))]`` with ``final_lr`` scaled by ``lr / base_lr``
(so
LR schedulers move the bounds too), and AMSBound's running maximum of ``v``. ``decoupled`` adds the AdaBoundW
variant of the same repository (decay ``p <- p (1 - lr * weight_decay)``).
"""

from __future__ import annotations

import math

import torch


class ReferenceAdaBound(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        final_lr=0.1,
        gamma=1e-3,
        eps=1e-8,
        weight_decay=0.0,
        amsbound=False,
        decoupled=False,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            final_lr=final_lr,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsbound=amsbound,
            decoupled=decoupled,
        )
        super().__init__(params, defaults)
        self.base_lrs = [group["lr"] for group in self.param_groups]

    @torch.no_grad()
    def step(self):
        for group, base_lr in zip(self.param_groups, self.base_lrs, strict=False):
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.clone()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsbound"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                beta1, beta2 = group["betas"]
                state["step"] += 1
                t = state["step"]
                if group["weight_decay"] != 0:
                    if group["decoupled"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    else:
                        grad = grad + group["weight_decay"] * p
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsbound"]:
                    torch.max(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    denom = state["max_exp_avg_sq"].sqrt() + group["eps"]
                else:
                    denom = exp_avg_sq.sqrt() + group["eps"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                final_lr = group["final_lr"] * group["lr"] / base_lr
                lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
                upper = final_lr * (1 + 1 / (group["gamma"] * t))
                rate = torch.full_like(denom, step_size).div(denom).clamp(lower, upper)
                p.add_(-(rate * exp_avg))
