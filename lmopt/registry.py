"""The optimizer registry: collects every :class:`~lmopt.spec.OptimizerSpec` and builds optimizers by name.

Specs are declared next to their optimizer, in a module-level ``SPECS`` list of a module in
:mod:`lmopt.optim`; this module discovers those modules (no hand-kept list), adds a ``lookahead_<name>`` entry
for every spec with ``lookahead=True``, and serves them to ``create_optimizer``, ``lmopt list``, the memory
planner, recipes, compare, the recommender, the benchmarks and the test database. The data types
(:class:`OptimizerSpec`, :class:`StateTensor`, :data:`REFERENCE_SHAPE`) live in :mod:`lmopt.spec` and are
re-exported here.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .spec import REFERENCE_SHAPE, OptimizerSpec, StateTensor

__all__ = [
    "OptimizerSpec",
    "StateTensor",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "resolve_name",
    "REFERENCE_SHAPE",
]

# ---------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, OptimizerSpec] = {}
#: the per-optimizer names ``state_precision`` had before it was one axis (deprecated aliases)
_LEGACY_PRECISION = ("state_dtype", "momentum_precision")
_ALIASES: dict[str, tuple[str, Mapping[str, Any]]] = {}


#: the listing order of the families (``lmopt list``); families not named here follow, in discovery order
_FAMILY_ORDER = ("adam", "sgd", "factored", "sign", "lion", "second_order", "muon")


def spec_modules() -> list[str]:
    """The modules of :mod:`lmopt.optim` that declare ``SPECS`` (discovered: every public module is looked at)."""
    from . import optim

    found = []
    for info in sorted(pkgutil.iter_modules(optim.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        name = f"{optim.__name__}.{info.name}"
        if hasattr(importlib.import_module(name), "SPECS"):
            found.append(name)
    return found


def _load() -> None:
    if _REGISTRY:
        return
    from .optim.lookahead import lookahead_spec

    specs = [spec for module_name in spec_modules() for spec in importlib.import_module(module_name).SPECS]
    rank = {family: i for i, family in enumerate(_FAMILY_ORDER)}
    # stable sort: discovery (module name) order within a family, AdamW (the reference) first
    specs.sort(key=lambda s: (rank.get(s.family, len(rank)), s.cls.__module__ != "lmopt.optim.adamw"))
    specs += [lookahead_spec(spec) for spec in specs if spec.lookahead]
    for spec in specs:
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
    ``{"k": 5, "alpha": 0.5}``) wraps the result in :class:`lmopt.Lookahead`; ``offload=True`` (implied by the
    ``paged_*`` aliases) builds it with :func:`lmopt.offload`: state and step on the host. ``compile_mode``
    (``"reduce-overhead"``: CUDA graphs) sets torch.compile's mode of the optimizer's compiled steps
    (``implementation="compiled"``, and ``auto`` on CUDA).

    Example:
        >>> opt = lmopt.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
        >>> opt = lmopt.create_optimizer("adamw_torch_fused", model.parameters(), lr=1e-4)

    Raises:
        ValueError: unknown optimizer name (with close matches), or a hyperparameter the optimizer does not
            take (with the list of those it does).
    """
    spec, implied = resolve_name(name)
    hyper = {**spec.defaults, **implied, **hyperparameters}
    if "state_precision" not in hyperparameters and any(k in hyperparameters for k in _LEGACY_PRECISION):
        hyper.pop("state_precision", None)  # a deprecated precision name the caller passed beats the entry's
    use_structural_groups = hyper.pop("no_decay", True)
    lr_multipliers = hyper.pop("lr_multipliers", None)
    lookahead = hyper.pop("lookahead", None)
    offloaded = hyper.pop("offload", False)
    compile_mode = hyper.pop("compile_mode", None)
    if offloaded:  # state and step on the host (the paged_* aliases imply it): lmopt.offload
        from .optim.offload import offload

        if not isinstance(offloaded, bool):
            raise ValueError(f"offload must be True or False, got {offloaded!r}")
        return offload(name, model_or_params, **{**hyperparameters, "offload": False})
    if compile_mode is not None:
        from .optim.base import COMPILE_MODES, LmoptOptimizer

        if not issubclass(spec.cls, LmoptOptimizer) or not spec.cls.compilable:
            raise ValueError(f"compile_mode applies to lmopt optimizers with a compiled step; {spec.name} has none")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {compile_mode!r}")
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
    if compile_mode is not None:
        optimizer.compile_mode = compile_mode
    if lookahead:
        from .optim.lookahead import Lookahead

        options = {} if lookahead is True else dict(lookahead)
        unknown = sorted(set(options) - {"k", "alpha"})
        if unknown:
            raise ValueError(f"lookahead takes True or a dict with 'k' and 'alpha', got keys {unknown}")
        optimizer = Lookahead(optimizer, **options)
    return optimizer
