"""Write the checkpoints that tests/test_architecture.py loads: optimizer state dicts saved by lmopt before the
spec / dispatch / state-precision redesign (commit e8cb91b), and the parameters three more steps produce.

Run with the old code on the path (a worktree of e8cb91b):
    PYTHONPATH=/path/to/old/lmopt python tests/data/make_legacy_checkpoints.py tests/data/legacy_state.pt
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

import lmopt

#: name -> (constructor, keyword arguments); the constructors and names as they were then
CASES = {
    "adamw_bf16_state": (lambda ps, **kw: lmopt.AdamW(ps, **kw), {"lr": 1e-2, "state_dtype": "bf16"}),
    "adamw8bit": (lambda ps, **kw: lmopt.AdamW8bit(ps, **kw), {"lr": 1e-2, "betas": (0.9, 0.95)}),
    "adamw8bit_fused": (lambda ps, **kw: lmopt.AdamW8bit(ps, **kw), {"lr": 1e-2, "implementation": "fused"}),
    "adamw4bit": (lambda ps, **kw: lmopt.AdamW4bit(ps, **kw), {"lr": 1e-2}),
    "lion8bit": (lambda ps, **kw: lmopt.Lion8bit(ps, **kw), {"lr": 1e-3, "weight_decay": 0.1}),
    "lion_fused": (lambda ps, **kw: lmopt.Lion(ps, **kw), {"lr": 1e-3, "implementation": "fused"}),
    "came8bit": (lambda ps, **kw: lmopt.CAME(ps, **kw), {"lr": 1e-3, "momentum_precision": "8bit"}),
    "adafactor_bf16": (
        lambda ps, **kw: lmopt.Adafactor(ps, **kw),
        {"lr": 1e-3, "relative_step": False, "beta1": 0.9, "momentum_precision": "bf16"},
    ),
    "muon_batched": (lambda ps, **kw: lmopt.Muon(ps, **kw), {"lr": 1e-2, "implementation": "batched"}),
}


def model() -> nn.Module:
    torch.manual_seed(0)  # a 64 x 80 matrix (5120 elements: quantized) and small tensors (fp32 state)
    return nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 64, generator=g), torch.randn(16, 4, generator=g)


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        (net(x) - y).pow(2).mean().backward()
        opt.step()


def main(path: str) -> None:
    out = {"lmopt_commit": "e8cb91b", "cases": {}}
    for name, (build, kw) in CASES.items():
        net = model()
        opt = build(list(net.parameters()), **kw)
        train(net, opt, range(4))
        saved_model = {k: v.clone() for k, v in net.state_dict().items()}
        saved_opt = copy.deepcopy(opt.state_dict())  # the live state moves on below
        train(net, opt, range(4, 7))
        out["cases"][name] = {
            "model": saved_model,
            "optimizer": saved_opt,
            "after": {k: v.clone() for k, v in net.state_dict().items()},
        }
    torch.save(out, path)


if __name__ == "__main__":
    main(sys.argv[1])
