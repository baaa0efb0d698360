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


SPECS = [
    OptimizerSpec(
        name="sgd",
        cls=torch.optim.SGD,
        summary="torch.optim.SGD: plain, momentum (momentum=0.9) or Nesterov (nesterov=True)",
        paper="Robbins & Monro 1951; Polyak 1964; Sutskever et al., ICML 2013 (Nesterov)",
        state=_sgd_state,
        defaults={"lr": 1e-2},
        family="sgd",
        aliases={"sgd_momentum": {"momentum": 0.9}, "sgd_nesterov": {"momentum": 0.9, "nesterov": True}},
        lookahead=True,
    ),
    OptimizerSpec(
        name="adagrad",
        cls=torch.optim.Adagrad,
        summary="torch.optim.Adagrad: per-coordinate rates from the sum of squared gradients",
        paper="Duchi, Hazan & Singer, Adaptive Subgradient Methods, JMLR 2011",
        state=_adagrad_state,
        family="sgd",
    ),
    OptimizerSpec(
        name="rmsprop",
        cls=torch.optim.RMSprop,
        summary="torch.optim.RMSprop: moving average of squared gradients",
        paper="Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA 2012",
        state=_rmsprop_state,
        family="sgd",
    ),
    OptimizerSpec(
        name="radam",
        cls=torch.optim.RAdam,
        summary="torch.optim.RAdam: Adam with variance rectification (no warmup needed)",
        paper="Liu et al., On the Variance of the Adaptive Learning Rate and Beyond, ICLR 2020",
        state=_radam_state,
        family="adam",
        lookahead=True,
    ),
    OptimizerSpec(
        name="nadam",
        cls=torch.optim.NAdam,
        summary="torch.optim.NAdam: Adam with Nesterov momentum",
        paper="Dozat, Incorporating Nesterov Momentum into Adam, ICLR 2016 workshop",
        state=_nadam_state,
        family="adam",
    ),
]
