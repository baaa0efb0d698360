"""lmopt's low-bit optimizers against bitsandbytes and torchao on the same inputs, over 200 steps.

Tolerance (documented in docs/low-bit-state.md): the largest parameter difference, relative to the largest
parameter magnitude, after 200 steps of a small MLP regression. Same maps and blocks as the peer, so the
trajectories differ only where the implementations round differently (bitsandbytes' CPU path and torchao
compute the update with other fp32 operation orders and torchao rounds codes by argmin), and those rare
one-code differences are averaged out by the EMA. As a yardstick the test also checks that the distance to the
peer is far below the distance between the 8-bit (or 4-bit) run and an fp32 AdamW run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmopt

STEPS = 200
TOLERANCE = {"bnb_adamw8bit": 2e-3, "torchao_adamw8bit": 2e-3, "torchao_adamw4bit": 5e-3}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # the first layer has 8192 weights: quantized by every library (threshold 4096); the rest stays fp32
    return nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(128, 8, generator=g)
    for _ in range(STEPS):
        x = torch.randn(64, 128, generator=g)
        y = torch.tanh(x @ w / 8)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return model


def _distance(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        worst = max(worst, ((p - q).abs().max() / q.abs().max()).item())
    return worst


HYPER = {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}


def _fp32_run() -> nn.Module:
    model = _model()
    return _train(model, torch.optim.AdamW(model.parameters(), **HYPER))


def test_dynamic_maps_equal_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    from lmopt.quant import dynamic_exponent_map

    assert torch.equal(dynamic_exponent_map(signed=True, exponent_bits=7, total_bits=8),
                       functional.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_exponent_map(signed=False, exponent_bits=7, total_bits=8),
                       functional.create_dynamic_map(signed=False))
    four = functional.create_dynamic_map(True, 3, 4)  # padded with zeros to 256 entries by bitsandbytes
    assert torch.equal(dynamic_exponent_map(signed=True, exponent_bits=3, total_bits=4),
                       torch.cat([four[four < 0], torch.zeros(1), four[four > 0]]))


def test_adamw8bit_tracks_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs = _model(), _model()
    _train(ours, lmopt.AdamW8bit(ours.parameters(), **HYPER))
    _train(theirs, bnb.optim.AdamW8bit(theirs.parameters(), **HYPER))
    gap = _distance(ours, theirs)
    assert gap < TOLERANCE["bnb_adamw8bit"], gap
    assert gap < 0.5 * _distance(ours, _fp32_run())


@pytest.mark.parametrize(("name", "cls"), [("torchao_adamw8bit", "AdamW8bit"), ("torchao_adamw4bit", "AdamW4bit")])
def test_tracks_torchao(name, cls):
    optim = pytest.importorskip("torchao.optim")
    ours, theirs = _model(), _model()
    _train(ours, getattr(lmopt, cls)(ours.parameters(), **HYPER))
    _train(theirs, getattr(optim, cls)(theirs.parameters(), **HYPER))
    gap = _distance(ours, theirs)
    assert gap < TOLERANCE[name], gap
    assert gap < 0.5 * _distance(ours, _fp32_run())
