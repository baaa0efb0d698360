"""NorMuon as the authors' code computes it (Li et al. 2025, "NorMuon: Making Muon more efficient and
scalable", arXiv:2510.05491; github.com/zichongli5/NorMuon, ``normuon.py``: ``normuon_update`` and
``SingleDeviceNorMuon``), transcribed with three parameters the authors fix: the Newton-Schulz dtype (bf16
there; fp32 here, as bf16 matmuls are very slow on CPUs), the orthogonaliser (Keller Jordan's quintic there;
Polar Express selectable) and the lr scaling (``"original"``, theirs: ``sqrt(max(1, A / B))``; or Moonlight's
``"match_rms_adamw"``, lmopt's default).

Per matrix: momentum (Nesterov), Newton-Schulz, then per row the second moment of the orthogonalised update,
division by its root (+1e-10), rescaling to the pre-normalisation Frobenius norm, the lr scale, decoupled weight
decay where the parameter had a gradient. One change (commented in ``zeropower_via_newtonschulz5``): the quintic
iteration is torch.optim.Muon's form (tests/reference/muon.py), as lmopt's Muon.
"""

from __future__ import annotations

import math

import torch

from .muon import newton_schulz
from .polar_express import polar_express


def zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32):
    # The authors copy Keller Jordan's quintic (``X / (||X|| + 1e-7)``, ``B = b A + c A @ A``, ``X = a X + B @ X``).
    # Here it is torch.optim.Muon's form of the same iteration (tests/reference/muon.py: the norm floored with
    # clamp(min=1e-7), the products as addmm), the one lmopt's Muon is checked against: in fp32 the two forms differ
    # by rounding that the quintic's slope (3.4 per iteration) amplifies ~500x over five iterations, so the oracle
    # takes torch's and checks NorMuon's own steps, which follow exactly.
    return newton_schulz(G, (3.4445, -4.7750, 2.0315), steps, 1e-7, dtype)


def normuon_update(
    grad,
    momentum,
    second_momentum,
    beta=0.95,
    beta2=0.95,
    ns_steps=5,
    nesterov=True,
    dtype=torch.float32,
    polar=False,
    adjust_lr_fn="original",
):
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp_(momentum, beta) if nesterov else momentum
    original_shape = None
    if update.ndim == 4:  # for the case of conv filters
        original_shape = update.shape
        update = update.reshape(update.size(0), -1)
    if polar:
        update = polar_express(update, ns_steps, dtype)
    else:
        update = zeropower_via_newtonschulz5(update, steps=ns_steps, dtype=dtype)
    if original_shape is not None:
        update = update.reshape(original_shape)
    # ------------- NorMuon added -------------
    update = update.to(second_momentum.dtype)
    vnorm = update.norm(dim=(-2, -1), keepdim=True)
    v_mean = torch.mean(update * update, dim=-1, keepdim=True)
    second_momentum.lerp_(v_mean, 1 - beta2)
    step_size = 1 / second_momentum.sqrt().add_(1e-10)
    update.mul_(step_size)
    vnorm_new = update.norm(dim=(-2, -1), keepdim=True)
    update.mul_(vnorm / (vnorm_new.add_(1e-10)))  # keeps the update norm the same as before the normalisation
    # -----------------------------------------
    if adjust_lr_fn == "original":
        update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    elif adjust_lr_fn == "match_rms_adamw":
        update *= 0.2 * math.sqrt(max(grad.size(-2), grad.size(-1)))
    return update


class ReferenceNorMuon(torch.optim.Optimizer):
    """``SingleDeviceNorMuon`` with the parameters above (second moment in fp32, fp64 for fp64 parameters)."""

    def __init__(
        self,
        params,
        lr=0.02,
        weight_decay=0,
        momentum=0.95,
        beta2=0.95,
        nesterov=True,
        ns_steps=5,
        ns_dtype=torch.float32,
        polar=False,
        adjust_lr_fn="original",
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            beta2=beta2,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            polar=polar,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["second_momentum_buffer"] = torch.zeros_like(p[..., 0:1], dtype=dtype)
                update = normuon_update(
                    p.grad.clone(),
                    state["momentum_buffer"],
                    state["second_momentum_buffer"],
                    beta=group["momentum"],
                    beta2=group["beta2"],
                    ns_steps=group["ns_steps"],
                    nesterov=group["nesterov"],
                    dtype=group["ns_dtype"],
                    polar=group["polar"],
                    adjust_lr_fn=group["adjust_lr_fn"],
                )
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.reshape(p.shape).to(p.dtype), alpha=-group["lr"])
