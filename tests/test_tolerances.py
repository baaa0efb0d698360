"""The precision-derived tolerance (tests/tolerances.py) checked by perturbation, in one process: runs that differ
only as another machine's would -- sums in another order (the batch permuted, each gradient nudged by an fp32
ulp at random, so bf16 moments round to the other neighbour where they sit near a rounding boundary) -- stay
within it, and real bugs -- a wrong beta, a missing bias correction -- fall outside it."""

from __future__ import annotations

import pytest
import torch

import lmopt

from .optim_db import make_batch, make_model
from .tolerances import moment_precision, roundtrip_tol, trajectory_tol, within

STEPS = 6
NUMEL = sum(p.numel() for p in make_model().parameters())


def _run(name: str, kw: dict, *, perturb: bool = False, flip_bf16: bool = False, lr_factor=None):
    """Parameters after STEPS steps and each parameter's largest one-step change. ``perturb``: the batch in
    another order and every gradient nudged by one fp32 ulp (up or down at random); ``flip_bf16``: after every
    step half the elements of every bf16 state tensor moved to their bf16 neighbour (another rounding, at every
    element at once: more than another machine's reduction order does); ``lr_factor(t)`` scales the learning
    rate of step t (a bias-correction bug, as an lr schedule)."""
    model = make_model()
    optimizer = lmopt.create_optimizer(name, list(model.parameters()), **kw)
    base_lr = [g["lr"] for g in optimizer.param_groups]
    noise = torch.Generator().manual_seed(5)
    updates = [0.0] * len(list(model.parameters()))
    for t in range(1, STEPS + 1):
        x, y = make_batch(seed=10 + t)
        if perturb:
            order = torch.randperm(len(x), generator=noise)
            x, y = x[order], y[order]
        optimizer.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        if perturb:
            for p in model.parameters():
                sign = torch.randint(0, 2, p.grad.shape, generator=noise).float() * 2 - 1
                p.grad.mul_(1 + sign * 2.0**-23)
        if lr_factor is not None:
            for group, lr in zip(optimizer.param_groups, base_lr):
                group["lr"] = lr * lr_factor(t)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        if flip_bf16:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
                        up = torch.rand(value.shape, generator=noise) < 0.5
                        towards = torch.where(up, torch.inf, -torch.inf).to(torch.bfloat16)
                        neighbour = torch.nextafter(value, towards)
                        value.copy_(torch.where(torch.rand(value.shape, generator=noise) < 0.5, neighbour, value))
        for i, (p, b) in enumerate(zip(model.parameters(), before)):
            updates[i] = max(updates[i], float((p.detach() - b).abs().max()))
    return [p.detach().clone() for p in model.parameters()], updates


def _per_param(run, reference):
    (params, _), (ref, updates) = run, reference
    return [[float((a - b).abs().max()), float(b.abs().max()), u] for a, b, u in zip(params, ref, updates)]


CASES = {
    # name: (hyperparameters, the same with a wrong beta)
    "adamw": ({"lr": 1e-3, "betas": (0.9, 0.999)}, {"lr": 1e-3, "betas": (0.8, 0.999)}),
    "adamw_bf16": ({"lr": 1e-3, "betas": (0.9, 0.999)}, {"lr": 1e-3, "betas": (0.8, 0.999)}),
    "came_bf16": ({"lr": 1e-3}, {"lr": 1e-3, "betas": (0.9, 0.999, 0.999)}),
    "adafactor_bf16": ({}, {"beta1": 0.8}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tolerance_covers_another_machine_and_catches_bugs(name):
    kw, wrong_beta = CASES[name]
    precision = moment_precision(name, kw)
    reference = _run(name, kw)

    def ratio(run) -> float:
        return within(_per_param(run, reference), precision=precision, steps=STEPS, n=NUMEL)[1]

    assert ratio(_run(name, kw, perturb=True)) < 1.0  # another machine's reduction order: inside
    if precision == "bf16":  # the other bf16 neighbour at half the elements, every step: inside
        assert ratio(_run(name, kw, flip_bf16=True)) < 1.0
    assert ratio(_run(name, wrong_beta)) > 1.0  # a wrong beta: outside
    if name.startswith("adamw"):  # a missing bias correction = lr * (1 - b1^t) / sqrt(1 - b2^t): outside
        b1, b2 = kw["betas"]
        assert ratio(_run(name, kw, lr_factor=lambda t: (1 - b1**t) / (1 - b2**t) ** 0.5)) > 1.0


def test_tolerance_is_not_this_machines_number():
    """The rule depends on precision, steps, the update size and the reduction length only."""
    fp32 = trajectory_tol(precision="fp32", steps=6, max_update=1e-3, scale=1.0, n=400)
    bf16 = trajectory_tol(precision="bf16", steps=6, max_update=1e-3, scale=1.0, n=400)
    assert fp32 < 1e-5 < bf16 < 1e-3
    assert roundtrip_tol("bf16", "first") == 2.0**-8 and roundtrip_tol("fp32", "first") == 0.0
