"""The optimizer registry: one :class:`OptimizerSpec` per optimizer, read by everything else.

``create_optimizer``, ``lmopt list``, the memory planner, the benchmarks and the test database all read the same
entries. An entry says how to build the optimizer, its default hyperparameters, the exact state it keeps per
parameter (as :class:`StateTensor` shapes and dtypes, so memory can be planned to the byte), its paper and its
aliases (including the names Hugging Face ``TrainingArguments(optim=...)`` uses).

Specs are declared next to their optimizer, in a module-level ``SPECS`` list; :data:`SPEC_MODULES` names the
modules to collect them from.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "OptimizerSpec",
    "StateTensor",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "resolve_name",
    "REFERENCE_SHAPE",
]

#: modules holding ``SPECS`` lists, in the order ``lmopt list`` shows them
SPEC_MODULES: tuple[str, ...] = (
    "lmopt.optim.adamw",
    "lmopt.optim.stable_adamw",
    "lmopt.optim.ademamix",
    "lmopt.optim.torch_optim",
    "lmopt.optim.adafactor",
    "lmopt.optim.came",
    "lmopt.optim.adam_mini",
    "lmopt.optim.lion",
    "lmopt.optim.sophia",
    "lmopt.optim.schedule_free",
    "lmopt.optim.muon",
    "lmopt.optim.adabound",
    "lmopt.optim.lookahead",
    "lmopt.optim.lowbit",
)

#: the shape used to quote "state bytes per parameter" (a large hidden matrix; small tensors differ)
REFERENCE_SHAPE: tuple[int, ...] = (4096, 4096)


@dataclass(frozen=True)
class StateTensor:
    """One tensor an optimizer keeps for one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


StateRule = Callable[[tuple[int, ...], torch.dtype, Mapping[str, Any]], list[StateTensor]]


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry.

    Attributes:
        name: canonical registry name (lower case).
        cls: the optimizer class (a torch.optim.Optimizer).
        summary: one line on what it is for.
        paper: reference (authors, title, venue/year).
        state: rule giving the exact state tensors for a parameter of a shape and dtype under the effective
            hyperparameters (class defaults, overridden by ``defaults``, overridden by the user's).
        defaults: hyperparameters this entry sets on top of the class's own defaults.
        aliases: other names, each with the hyperparameters it implies (e.g. ``"adamw_torch_fused"`` ->
            ``{"implementation": "fused"}``).
        family: "adam", "sgd", ... for grouping in listings.
        per_parameter: the update of a parameter needs only its own gradient (so gradient release works).
        accepts_model: the constructor wants the model itself (e.g. partitions found from module structure).
    """

    name: str
    cls: type[Optimizer]
    summary: str
    paper: str
    state: StateRule
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    family: str = "other"
    per_parameter: bool = True
    accepts_model: bool = False

    def hyperparameters(self, **overrides: Any) -> dict[str, Any]:
        """Effective hyperparameters: the class's defaults, then this entry's, then ``overrides``."""
        out = {
            k: p.default
            for k, p in inspect.signature(self.cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ("self",)
        }
        out.update(self.defaults)
        out.update(overrides)
        return out

    def state_tensors(
        self, shape: Iterable[int], dtype: torch.dtype = torch.float32, **hyperparameters: Any
    ) -> list[StateTensor]:
        """The exact state tensors for one parameter of ``shape`` and ``dtype``."""
        return self.state(tuple(int(s) for s in shape), dtype, self.hyperparameters(**hyperparameters))

    def state_bytes(self, shape: Iterable[int], dtype: torch.dtype = torch.float32, **hyperparameters: Any) -> int:
        """Bytes of state for one parameter of ``shape`` and ``dtype``."""
        return sum(t.nbytes for t in self.state_tensors(shape, dtype, **hyperparameters))

    def bytes_per_parameter(
        self, shape: Iterable[int] = REFERENCE_SHAPE, dtype: torch.dtype = torch.float32, **hyperparameters: Any
    ) -> float:
        """State bytes divided by parameter count for one tensor of ``shape`` (default a 4096 x 4096 matrix)."""
        shape = tuple(shape)
        return self.state_bytes(shape, dtype, **hyperparameters) / max(1, math.prod(shape))


# ---------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, tuple[str, Mapping[str, Any]]] = {}


def _load() -> None:
    if _REGISTRY:
        return
    for module_name in SPEC_MODULES:
        for spec in importlib.import_module(module_name).SPECS:
            _register(spec)


def _register(spec: OptimizerSpec) -> None:
    for name in (spec.name, *spec.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise RuntimeError(f"optimizer name {name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    for alias, implied in spec.aliases.items():
        _ALIASES[alias] = (spec.name, dict(implied))


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_name(name: str) -> tuple[OptimizerSpec, dict[str, Any]]:
    """The spec a name or alias refers to, and the hyperparameters the alias implies.

    Raises:
        ValueError: unknown name, listing the closest registered names.
    """
    _load()
    if not isinstance(name, str):
        raise ValueError(f"optimizer name must be a string, got {type(name).__name__}")
    key = _normalize(name)
    if key in _REGISTRY:
        return _REGISTRY[key], {}
    if key in _ALIASES:
        canonical, implied = _ALIASES[key]
        return _REGISTRY[canonical], dict(implied)
    known = sorted([*_REGISTRY, *_ALIASES])
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown optimizer {name!r}.{hint} `lmopt list` shows all {len(_REGISTRY)} optimizers.")


def get_spec(name: str) -> OptimizerSpec:
    """The registry entry for a name or alias."""
    return resolve_name(name)[0]


def list_optimizers() -> list[OptimizerSpec]:
    """Every registered optimizer, in registry order."""
    _load()
    return list(_REGISTRY.values())


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **hyperparameters: Any,
) -> Optimizer:
    """Build a registered optimizer by name or alias.

    Given an ``nn.Module``, the parameters are split with :func:`lmopt.param_groups` (no weight decay for biases,
    norms and embeddings); ``weight_decay`` and ``lr_multipliers`` go to that split and ``no_decay=False``
    turns it off. Given parameters or param groups, they are used as they are. ``lookahead=True`` (or
    ``{"k": 5, "alpha": 0.5}``) wraps the result in :class:`lmopt.Lookahead`.

    Example:
        >>> opt = lmopt.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
        >>> opt = lmopt.create_optimizer("adamw_torch_fused", model.parameters(), lr=1e-4)

    Raises:
        ValueError: unknown optimizer name (with close matches), or a hyperparameter the optimizer does not
            take (with the list of those it does).
    """
    spec, implied = resolve_name(name)
    hyper = {**spec.defaults, **implied, **hyperparameters}
    use_structural_groups = hyper.pop("no_decay", True)
    lr_multipliers = hyper.pop("lr_multipliers", None)
    lookahead = hyper.pop("lookahead", None)
    accepted = {k for k in inspect.signature(spec.cls.__init__).parameters if k not in ("self", "params")}
    unknown = sorted(set(hyper) - accepted - {"model"})
    if unknown:
        raise ValueError(
            f"{spec.name} does not take {', '.join(map(repr, unknown))}; it takes: {', '.join(sorted(accepted))}"
        )
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        if use_structural_groups or lr_multipliers:
            from .param_groups import param_groups

            params: Any = param_groups(
                model,
                weight_decay=hyper.get("weight_decay", spec.hyperparameters().get("weight_decay", 0.0)),
                lr_multipliers=lr_multipliers,
                base_lr=hyper.get("lr", spec.hyperparameters().get("lr")),
                decay_only_matrices=use_structural_groups,
            )
        else:
            params = list(model.parameters())
        if spec.accepts_model:
            hyper["model"] = model
    else:
        if lr_multipliers:
            raise ValueError("lr_multipliers needs a model (names come from named_parameters); pass the model")
        params = model_or_params
    optimizer = spec.cls(params, **hyper)
    if lookahead:
        from .optim.lookahead import Lookahead

        options = {} if lookahead is True else dict(lookahead)
        unknown = sorted(set(options) - {"k", "alpha"})
        if unknown:
            raise ValueError(f"lookahead takes True or a dict with 'k' and 'alpha', got keys {unknown}")
        optimizer = Lookahead(optimizer, **options)
    return optimizer
