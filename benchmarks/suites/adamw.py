"""lmopt AdamW (each implementation path) beside torch.optim.AdamW foreach and fused (fp32, ~50M parameters)."""

from __future__ import annotations

import torch
from harness import Case

import lmopt

_HYPER = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def torch_fused(params):
    return torch.optim.AdamW(params, fused=True, **_HYPER)


def torch_foreach(params):
    return torch.optim.AdamW(params, foreach=True, **_HYPER)


def torch_for_loop(params):
    return torch.optim.AdamW(params, foreach=False, **_HYPER)


def lmopt_default(params):
    return lmopt.AdamW(params, **_HYPER)


def lmopt_fused(params):
    return lmopt.AdamW(params, implementation="fused", **_HYPER)


def lmopt_foreach(params):
    return lmopt.AdamW(params, implementation="foreach", **_HYPER)


def lmopt_for_loop(params):
    return lmopt.AdamW(params, implementation="for_loop", **_HYPER)


def lmopt_unchecked(params):
    return lmopt.AdamW(params, check_finite=False, **_HYPER)


def lmopt_bf16_state(params):
    return lmopt.AdamW(params, state_precision="bf16", **_HYPER)


def record_finite_norm(optimizer):
    """What lmopt's gradient clipping does: it computed the global norm anyway, and hands it to the optimizer."""
    optimizer.record_grad_norm(torch.tensor(1.0))


CASES = [
    Case("torch.optim.AdamW fused", "adamw", "torch_fused", peer=True),
    Case("torch.optim.AdamW foreach", "adamw", "torch_foreach", peer=True),
    Case("torch.optim.AdamW for-loop", "adamw", "torch_for_loop", peer=True),
    Case(
        "lmopt AdamW default (auto, checks grads)",
        "adamw",
        "lmopt_default",
        note="auto = fused + one read of the grads for the inf/NaN check",
    ),
    Case(
        "lmopt AdamW default, norm from clipping",
        "adamw",
        "lmopt_default",
        prepare="record_finite_norm",
        note="global norm recorded by clipping replaces the check",
    ),
    Case("lmopt AdamW check_finite=False", "adamw", "lmopt_unchecked"),
    Case("lmopt AdamW fused", "adamw", "lmopt_fused"),
    Case("lmopt AdamW foreach", "adamw", "lmopt_foreach"),
    Case("lmopt AdamW for_loop", "adamw", "lmopt_for_loop"),
    Case(
        "lmopt AdamW bf16 state (foreach)",
        "adamw",
        "lmopt_bf16_state",
        bytes_per_param=20.0,
        note="moments in bf16: 4 B/param of state",
    ),
]
