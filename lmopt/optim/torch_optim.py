"""torch.optim's classical optimizers, registered as they are (lmopt does not rewrite them).

Their state is counted exactly as torch allocates it (torch 2.6+, non-capturable, CPU/CUDA), so the memory
planner covers them like lmopt's own optimizers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..spec import OptimizerSpec, StateTensor


def _scalar(name: str) -> StateTensor:
    return StateTensor(name, (), torch.float32)


def _sgd_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    return [StateTensor("momentum_buffer", shape, dtype)] if hyper.get("momentum", 0) else []


def _adagrad_state(shape, dtype, hyper) -> list[StateTensor]:
    return [_scalar("step"), StateTensor("sum", shape, dtype)]


def _rmsprop_state(shape, dtype, hyper) -> list[StateTensor]:
    out = [_scalar("step"), StateTensor("square_avg", shape, dtype)]
    if hyper.get("momentum", 0) > 0:
        out.append(StateTensor("momentum_buffer", shape, dtype))
    if hyper.get("centered"):
        out.append(StateTensor("grad_avg", shape, dtype))
    return out


def _radam_state(shape, dtype, hyper) -> list[StateTensor]:
    return [_scalar("step"), StateTensor("exp_avg", shape, dtype), StateTensor("exp_avg_sq", shape, dtype)]


def _nadam_state(shape, dtype, hyper) -> list[StateTensor]:
    return [
        _scalar("step"),
        _scalar("mu_product"),
        StateTensor("exp_avg", shape, dtype),
        StateTensor("exp_avg_sq", shape, dtype),
    ]


def _entry(name: str, cls: type, summary: str, paper: str, state: Any, family: str, **extra: Any) -> OptimizerSpec:
    return OptimizerSpec(name=name, cls=cls, summary=summary, paper=paper, state=state, family=family, **extra)


SPECS = [
    _entry(
        "sgd",
        torch.optim.SGD,
        "torch.optim.SGD: plain, momentum (momentum=0.9) or Nesterov (nesterov=True)",
        "Robbins & Monro 1951; Polyak 1964; Sutskever et al., ICML 2013 (Nesterov)",
        _sgd_state,
        "sgd",
        defaults={"lr": 1e-2},
        aliases={"sgd_momentum": {"momentum": 0.9}, "sgd_nesterov": {"momentum": 0.9, "nesterov": True}},
        lookahead=True,
    ),
    _entry(
        "adagrad",
        torch.optim.Adagrad,
        "torch.optim.Adagrad: per-coordinate rates from the sum of squared gradients",
        "Duchi, Hazan & Singer, Adaptive Subgradient Methods, JMLR 2011",
        _adagrad_state,
        "sgd",
    ),
    _entry(
        "rmsprop",
        torch.optim.RMSprop,
        "torch.optim.RMSprop: moving average of squared gradients",
        "Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA 2012",
        _rmsprop_state,
        "sgd",
    ),
    _entry(
        "radam",
        torch.optim.RAdam,
        "torch.optim.RAdam: Adam with variance rectification (no warmup needed)",
        "Liu et al., On the Variance of the Adaptive Learning Rate and Beyond, ICLR 2020",
        _radam_state,
        "adam",
        lookahead=True,
    ),
    _entry(
        "nadam",
        torch.optim.NAdam,
        "torch.optim.NAdam: Adam with Nesterov momentum",
        "Dozat, Incorporating Nesterov Momentum into Adam, ICLR 2016 workshop",
        _nadam_state,
        "adam",
    ),
]
