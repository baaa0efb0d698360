"""A slow, paper-faithful Sophia, used only as a test oracle.

Written from Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (ICLR 2024, arXiv:2305.14342): Algorithm 1 (Hutchinson), Algorithm 2 (Gauss-Newton-Bartlett) and
Algorithm 3 (Sophia), one tensor at a time, each line of the paper one line here:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t
    if t mod k = 1:  h_hat_t = Estimator(theta_t);  h_t = beta2 h_{t-k} + (1 - beta2) h_hat_t
    else:            h_t = h_{t-1}
    theta_t = theta_t - eta_t lambda theta_t
    theta_{t+1} = theta_t - eta_t clip(m_t / max(gamma h_t, eps), 1)

Hutchinson: u ~ N(0, I) (or Rademacher), h_hat = u * grad(<grad L, u>).  GNB: y_hat sampled from the model,
g_hat = grad L(y_hat), h_hat = B g_hat * g_hat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ReferenceSophia:
    """Paper-faithful Sophia with the same refresh API as ``lmopt.Sophia`` (``hessian_due`` /
    ``update_hessian``)."""

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas=(0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-15,
        weight_decay: float = 0.1,
        *,
        update_period: int = 10,
        estimator: str = "gnb",
        hessian_distribution: str = "gaussian",
        maximize: bool = False,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.rho, self.eps, self.weight_decay = lr, betas, rho, eps, weight_decay
        self.update_period, self.estimator = update_period, estimator
        self.hessian_distribution, self.maximize = hessian_distribution, maximize
        self.t = 0
        self.m = {id(p): torch.zeros_like(p) for p in self.params}
        self.h = {id(p): torch.zeros_like(p) for p in self.params}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def hessian_due(self) -> bool:
        return self.t % self.update_period == 0  # the coming step t+1 satisfies (t+1) mod k = 1

    def update_hessian(self, closure: Callable[[], Tensor], *, batch_size: int | None = None) -> None:
        beta2 = self.betas[1]
        loss = closure()
        if self.estimator == "hutchinson":
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            used = [(p, g) for p, g in zip(self.params, grads, strict=False) if g is not None]
            us = []
            for p, _g in used:
                if self.hessian_distribution == "rademacher":
                    us.append(torch.randint_like(p, 0, 2) * 2 - 1)
                else:
                    us.append(torch.randn_like(p))
            hus = torch.autograd.grad([g for _p, g in used], [p for p, _g in used], grad_outputs=us, allow_unused=True)
            for (p, _g), u, hu in zip(used, us, hus, strict=False):
                h_hat = u * hu if hu is not None else torch.zeros_like(p)
                self.h[id(p)] = beta2 * self.h[id(p)] + (1 - beta2) * h_hat.detach()
        else:
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for p, g_hat in zip(self.params, grads, strict=False):
                if g_hat is None:
                    continue
                h_hat = batch_size * g_hat * g_hat
                self.h[id(p)] = beta2 * self.h[id(p)] + (1 - beta2) * h_hat

    @torch.no_grad()
    def step(self) -> None:
        beta1 = self.betas[0]
        self.t += 1
        for p in self.params:
            if p.grad is None:
                continue
            g = -p.grad if self.maximize else p.grad
            m = beta1 * self.m[id(p)] + (1 - beta1) * g
            self.m[id(p)] = m
            h = self.h[id(p)]
            p.mul_(1 - self.lr * self.weight_decay)
            denominator = torch.maximum(self.rho * h, torch.full_like(h, self.eps))
            p.sub_(self.lr * torch.clamp(m / denominator, -1.0, 1.0))
