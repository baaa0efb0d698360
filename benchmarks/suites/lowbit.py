"""lmopt AdamW8bit / AdamW4bit / Lion8bit beside torch's fused fp32 AdamW, bitsandbytes and torchao (CPU, ~50M).

All AdamW variants share one algorithm label, so every ratio is to the fastest peer AdamW of the run (torch's
fused fp32 kernel): the issue's target is lmopt's 8-bit and 4-bit AdamW at a ratio <= 1.0.
Bytes per parameter (roofline): fp32 param read + write (8) + gradient read (4) + state read + write:
fp32 AdamW 16, 8-bit 2 x 2 x 1 = 4, 4-bit 2 x 2 x 0.5 = 2, 8-bit Lion 2 (block scales add ~1%).
"""

from __future__ import annotations

import torch
from harness import Case

import lmopt

_HYPER = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
_LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1.0)


def torch_fused(params):
    return torch.optim.AdamW(params, fused=True, **_HYPER)


def lmopt_adamw8bit(params):
    return lmopt.AdamW8bit(params, **_HYPER)


def lmopt_adamw8bit_reference(params):
    return lmopt.AdamW8bit(params, implementation="for_loop", **_HYPER)


def lmopt_adamw4bit(params):
    return lmopt.AdamW4bit(params, **_HYPER)


def lmopt_lion8bit(params):
    return lmopt.Lion8bit(params, **_LION)


def bnb_adamw8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **_HYPER)


def bnb_lion8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.Lion8bit(params, **_LION)


def torchao_adamw8bit(params):
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, **_HYPER)


def torchao_adamw4bit(params):
    from torchao.optim import AdamW4bit

    return AdamW4bit(params, **_HYPER)


def torchao_adamwfp8(params):
    from torchao.optim import AdamWFp8

    return AdamWFp8(params, **_HYPER)


def record_finite_norm(optimizer):
    """What lmopt's gradient clipping does: it computed the global norm anyway and hands it to the optimizer."""
    optimizer.record_grad_norm(torch.tensor(1.0))


CASES = [
    Case("torch.optim.AdamW fused (fp32 state)", "adamw", "torch_fused", peer=True, bytes_per_param=28.0),
    Case(
        "lmopt AdamW8bit",
        "adamw",
        "lmopt_adamw8bit",
        bytes_per_param=16.0,
        note="C kernel; includes the inf/NaN check of the gradients",
    ),
    Case(
        "lmopt AdamW8bit, norm from clipping",
        "adamw",
        "lmopt_adamw8bit",
        prepare="record_finite_norm",
        bytes_per_param=16.0,
        note="global norm recorded by clipping replaces the check",
    ),
    Case("lmopt AdamW4bit", "adamw", "lmopt_adamw4bit", bytes_per_param=14.0),
    Case(
        "lmopt reference path: AdamW8bit for_loop (PyTorch)", "adamw", "lmopt_adamw8bit_reference", bytes_per_param=16.0
    ),
    Case("bitsandbytes AdamW8bit", "adamw", "bnb_adamw8bit", peer=True, bytes_per_param=16.0),
    Case("torchao AdamW8bit", "adamw", "torchao_adamw8bit", peer=True, bytes_per_param=16.0),
    Case("torchao AdamW4bit", "adamw", "torchao_adamw4bit", peer=True, bytes_per_param=14.0),
    Case("torchao AdamWFp8", "adamw", "torchao_adamwfp8", peer=True, bytes_per_param=16.0),
    Case("lmopt Lion8bit", "lion", "lmopt_lion8bit", bytes_per_param=14.0),
    Case("bitsandbytes Lion8bit", "lion", "bnb_lion8bit", peer=True, bytes_per_param=14.0),
]
