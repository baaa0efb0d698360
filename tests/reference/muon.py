"""Muon as torch.optim.Muon computes it (torch 2.13, ``torch/optim/_muon.py``), with the Newton-Schulz dtype as a
parameter: an oracle that runs in fp32 (bf16 matmuls are ~1000x slower on CPUs without bf16 units).

With ``ns_dtype=torch.bfloat16`` it is torch's algorithm operation for operation; the generic tests use fp32 and
``tests/test_schedule_free_muon.py`` checks lmopt against torch.optim.Muon itself in bf16.

Beyond torch: ``polar=True`` orthogonalises with the Polar Express authors' function (tests/reference/
polar_express.py), and ``cautious=True`` masks the orthogonalised update with C-Optim's mask
(``mask = (u * g > 0)``, ``mask /= mask.mean().clamp(min=1e-3)``, C-Optim's ``c_adamw.py``), applied to the update
that is added to the weights; ``cautious_weight_decay=True`` decays only where ``u * p >= 0`` (Chen et al. 2025).
"""

from __future__ import annotations

import math

import torch

from .polar_express import polar_express


def newton_schulz(grad, coefficients, steps, eps, dtype):
    a, b, c = coefficients
    x = grad.to(dtype)
    if x is grad:
        x = x.clone()
    if grad.size(0) > grad.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x


class ReferenceMuon(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=(3.4445, -4.7750, 2.0315),
        eps=1e-7,
        ns_steps=5,
        adjust_lr_fn=None,
        ns_dtype=torch.float32,
        polar=False,
        cautious=False,
        cautious_weight_decay=False,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            polar=polar,
            cautious=cautious,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if group["polar"]:
                    update = polar_express(update, group["ns_steps"], group["ns_dtype"])
                else:
                    update = newton_schulz(
                        update, group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_dtype"]
                    )
                update = update.to(p.dtype)
                if group["cautious"]:
                    mask = (update * p.grad > 0).to(update.dtype)
                    mask.div_(mask.mean().clamp_(min=1e-3))
                    update = update * mask
                rows, cols = p.shape[:2]
                if group["adjust_lr_fn"] in (None, "original"):
                    ratio = math.sqrt(max(1, rows / cols))
                elif group["adjust_lr_fn"] == "match_rms_adamw":
                    ratio = 0.2 * math.sqrt(max(rows, cols))
                else:
                    ratio = 1.0
                if group["cautious_weight_decay"]:
                    p.sub_(p * (update * p >= 0), alpha=group["lr"] * group["weight_decay"])
                else:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * ratio)
