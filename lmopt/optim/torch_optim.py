"""torch.optim's classical optimizers, registered with lmopt's checks (lmopt does not rewrite their updates).

The registry entries (``sgd``, ``adagrad``, ``rmsprop``, ``radam``, ``nadam`` and their ``lookahead_*``
wrappers) build :class:`SGD`, :class:`Adagrad`, :class:`RMSprop`, :class:`RAdam` and :class:`NAdam`: subclasses
of torch's classes with torch's update, signature, defaults and state dicts (a checkpoint of one loads into the
other), plus the validation lmopt applies to its own optimizers, which is stricter than torch's: every number
finite and within float32's range (torch accepts ``lr=nan``, ``momentum=inf``, ``weight_decay=inf``), ``eps`` a
float32 normal number, ``lr * weight_decay <= 1``, momentum-like coefficients in [0, 1), flags ``True`` /
``False`` (not ``0`` / ``1``), for the constructor, :meth:`add_param_group` and the groups of a loaded state
dict; and ``load_state_dict`` checks every state entry against the state the spec declares
(:mod:`lmopt.optim._state_check`) before anything changes.

Their state is counted exactly as torch allocates it (torch 2.6+, non-capturable, CPU/CUDA), so the memory
planner covers them like lmopt's own optimizers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..spec import OptimizerSpec, StateTensor
from .base import check_common_hyperparameters, check_flag, check_nonnegative, check_range, signature_defaults

__all__ = ["SGD", "Adagrad", "NAdam", "RAdam", "RMSprop"]

#: coefficient -> (low, high, high inclusive) for the torch.optim hyperparameters lmopt checks beyond the shared
_RANGES = {"momentum": (0.0, 1.0, False), "dampening": (0.0, 1.0, True), "alpha": (0.0, 1.0, False)}
_NONNEGATIVE = ("lr_decay", "initial_accumulator_value", "momentum_decay")
#: flags torch also takes as None ("let torch choose")
_OPTIONAL_FLAGS = ("foreach", "fused")
_TORCH_FLAGS = ("capturable", "differentiable", "centered")


def _check_torch_group(group: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    check_common_hyperparameters(group, defaults)
    for key, (low, high, inclusive) in _RANGES.items():
        if key in group:
            check_range(key, group[key], low, high, high_inclusive=inclusive)
    for key in _NONNEGATIVE:
        if key in group:
            check_nonnegative(key, group[key])
    for key in (*_RANGES, *_NONNEGATIVE):  # torch's integer defaults (initial_accumulator_value=0): floats
        if type(group.get(key)) is int:
            group[key] = float(group[key])
    for key in _OPTIONAL_FLAGS:
        if group.get(key) is not None:
            check_flag(key, group[key])
    for key in _TORCH_FLAGS:
        if key in group:
            check_flag(key, group[key])
    if group.get("capturable") and any(p.device.type == "cpu" for p in group.get("params", ())):
        raise ValueError("capturable=True needs CUDA parameters (CUDA graphs); leave it False on CPU")


def _checked(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``base`` with lmopt's checks of hyperparameters and loaded state dicts (see the module docstring)."""
    signature = inspect.signature(base.__init__)

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        hyper = {k: v for k, v in bound.arguments.items() if k not in ("self", "params")}
        _check_torch_group(hyper, signature_defaults(base))  # before torch's checks: theirs are weaker or absent
        base.__init__(self, params, **hyper)
        for group in self.param_groups:
            _check_torch_group(group, signature_defaults(base))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base.add_param_group(self, param_group)
        try:
            _check_torch_group(self.param_groups[-1], signature_defaults(base))
        except Exception:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from ..registry import list_optimizers
        from ._state_check import check_optimizer_state_dict, declared_from_spec

        spec = next(s for s in list_optimizers() if s.cls is type(self))
        checked = check_optimizer_state_dict(
            self, state_dict, declared_from_spec(spec, self), lambda g: _check_torch_group(g, signature_defaults(base))
        )
        before = {k: self.__dict__[k] for k in ("state", "param_groups")}
        try:
            base.load_state_dict(self, checked)
        except Exception:
            self.__dict__.update(before)
            raise

    __init__.__signature__ = signature  # type: ignore[attr-defined]  # the registry reads the accepted names
    load_state_dict.__doc__ = (
        f"torch.optim.{base.__name__}.load_state_dict, after checking the state dict's groups and every state "
        "entry (names, shapes, dtypes, finite values, second moments >= 0); all or nothing.\n\nRaises:\n"
        "    ValueError: what does not fit, naming the parameter and the entry; the optimizer is unchanged."
    )
    namespace = {
        "__init__": __init__,
        "add_param_group": add_param_group,
        "load_state_dict": load_state_dict,
        "__module__": __name__,
        "__qualname__": base.__name__,
        "__doc__": f"{base.__doc__ or ''}\n\nlmopt: torch.optim.{base.__name__} with lmopt's checks "
        "(:mod:`lmopt.optim.torch_optim`).",
    }
    return type(base.__name__, (base,), namespace)


SGD = _checked(torch.optim.SGD)
Adagrad = _checked(torch.optim.Adagrad)
RMSprop = _checked(torch.optim.RMSprop)
RAdam = _checked(torch.optim.RAdam)
NAdam = _checked(torch.optim.NAdam)


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
        SGD,
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
        Adagrad,
        "torch.optim.Adagrad: per-coordinate rates from the sum of squared gradients",
        "Duchi, Hazan & Singer, Adaptive Subgradient Methods, JMLR 2011",
        _adagrad_state,
        "sgd",
    ),
    _entry(
        "rmsprop",
        RMSprop,
        "torch.optim.RMSprop: moving average of squared gradients",
        "Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA 2012",
        _rmsprop_state,
        "sgd",
    ),
    _entry(
        "radam",
        RAdam,
        "torch.optim.RAdam: Adam with variance rectification (no warmup needed)",
        "Liu et al., On the Variance of the Adaptive Learning Rate and Beyond, ICLR 2020",
        _radam_state,
        "adam",
        lookahead=True,
    ),
    _entry(
        "nadam",
        NAdam,
        "torch.optim.NAdam: Adam with Nesterov momentum",
        "Dozat, Incorporating Nesterov Momentum into Adam, ICLR 2016 workshop",
        _nadam_state,
        "adam",
    ),
]
