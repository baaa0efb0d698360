"""Lookahead as written in the paper (Zhang et al. 2019, Algorithm 1), an oracle around any torch optimizer.

The slow weights are kept in a plain list, copied from the parameters at construction; every ``k`` inner steps
``phi <- phi + alpha (theta - phi)`` and ``theta <- phi``, one parameter at a time.
"""

from __future__ import annotations

import torch


class ReferenceLookahead:
    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        self.inner, self.k, self.alpha, self.count = inner, k, alpha, 0
        self.params = [p for g in inner.param_groups for p in g["params"]]
        self.slow = [p.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.count += 1
        if self.count % self.k == 0:
            for p, s in zip(self.params, self.slow, strict=False):
                s.add_(self.alpha * (p - s))
                p.copy_(s)
