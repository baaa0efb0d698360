"""State dicts checked before they are loaded: nothing corrupted or hostile reaches a kernel.

``load_state_dict`` of every lmopt optimizer (and of the torch.optim classes :func:`lmopt.create_optimizer`
builds, through a load pre-hook) runs :func:`check_optimizer_state_dict` first. It checks, before anything of
the optimizer changes:

* the structure: ``state`` a mapping, ``param_groups`` a list with as many groups as the optimizer, each with as
  many parameters; every state key one of the saved groups' parameter keys;
* the groups' hyperparameters, with the optimizer's own validation (the same checks as the constructor). Keys
  the saved groups lack (a torch.optim checkpoint has none of lmopt's ``implementation``, ``state_precision``,
  ...) are filled from the optimizer's current groups;
* every parameter's state against the state the optimizer declares for that parameter (lmopt optimizers: what
  ``_init_state`` creates for it, built on fake tensors without memory; torch.optim classes: the registry
  spec's ``state`` rule): the same entry names, shapes and dtypes; quantized codes uint8 and scales of the
  declared dtype (their layout may differ only where the loader re-blocks them: another sharding); every
  floating value finite; second-moment statistics (``exp_avg_sq``, Adafactor's factors, ...) >= 0; ``step``
  finite and >= 0.

A failure raises ValueError naming the parameter and the entry; the optimizer is unchanged. A group whose saved
state covers some of its parameters but not all loads with a warning (the others start from fresh state).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..quant.sharded import is_dtensor

__all__ = ["NONNEGATIVE_STATE", "check_optimizer_state_dict", "declared_from_spec"]

#: state entries that are sums or averages of squares (never negative in a state the optimizer wrote)
NONNEGATIVE_STATE = frozenset(
    {
        "exp_avg_sq",
        "max_exp_avg_sq",
        "row_var",
        "col_var",
        "res_row_var",
        "res_col_var",
        "sum",
        "square_avg",
    }
)

#: entry name -> (shape, dtype) for a tensor, or the Python type of a plain value
Declared = Mapping[str, "tuple[tuple[int, ...], torch.dtype] | type"]
#: ``declare(group, param) -> (required entries, optional entries)`` (optional: a wrapper's, e.g. Lookahead's
#: ``slow_param``, present once it has been created)
DeclareFn = Callable[[dict[str, Any], Tensor], "tuple[Declared, Declared]"]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _local(value: Tensor) -> Tensor:
    return value.to_local() if is_dtensor(value) else value


def _check_values(where: str, name: str, value: Tensor) -> None:
    local = _local(value)
    if not (local.is_floating_point() and local.numel()):
        return
    if not bool(torch.isfinite(local).all()):
        raise ValueError(f"{where}: state entry '{name}' holds inf or NaN; the checkpoint is corrupted")
    if name in NONNEGATIVE_STATE and bool((local < 0).any()):
        raise ValueError(
            f"{where}: state entry '{name}' has negative values, which a sum of squares cannot have; the checkpoint "
            "is corrupted"
        )


def _check_step(where: str, value: Any) -> None:
    number = value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{where}: 'step' must be a number or a one-element tensor, got {_describe(value)}")
        number = _local(value).item()
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"{where}: 'step' must be a number, got {_describe(value)}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: 'step' must be finite and >= 0, got {number}")


def check_param_state(
    where: str,
    saved: Any,
    declared: Declared,
    reblockable: bool,
    optional: Declared | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """Check one parameter's saved state against what the optimizer declares for it.

    Args:
        where: names the parameter in errors.
        saved: the saved state of that parameter.
        declared: entry name -> ``(shape, dtype)`` (tensors) or a Python type (plain values).
        optional: entries declared the same way that may be absent.
        reblockable: quantized entries may be saved in another block layout (the loader re-blocks them) where
            the parameter or the saved entry is sharded (``sharded``: the parameter is a DTensor).

    Returns:
        the state to load: ``saved`` with a number ``step`` given the declared tensor form.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where}: the saved state must be a dict of entries, got {_describe(saved)}")
    bad = [k for k in saved if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{where}: state entry names must be strings, got {bad[:3]!r}")
    shards = {k for k in saved if k.endswith("_shards")}  # per-moment shard counts of sharded quantized state
    optional = {k: v for k, v in (optional or {}).items() if k in saved}
    declared = {**declared, **optional}
    names = set(saved) - shards
    if names != set(declared):
        missing, extra = sorted(set(declared) - names), sorted(names - set(declared))
        detail = "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if part
        )
        hint = (
            " (saved with another state_precision? convert it with lmopt.convert_state)"
            if any(n.endswith("_codes") for n in (*missing, *extra))
            else ""
        )
        raise ValueError(
            f"{where}: the saved state does not match this optimizer's state for the parameter: {detail}{hint}"
        )
    out = dict(saved)
    for name in shards:
        value = saved[name]
        count = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: state entry '{name}' must be a shard count >= 1, got {_describe(value)}")
    for name, want in declared.items():
        value = saved[name]
        if name == "step":
            _check_step(where, value)
            if isinstance(want, tuple) and not isinstance(value, Tensor):
                out[name] = torch.tensor(float(value), dtype=want[1])
            continue
        if not isinstance(want, tuple):  # a plain value
            if isinstance(value, Tensor) or not isinstance(value, want):
                raise ValueError(f"{where}: state entry '{name}' must be a {want.__name__}, got {_describe(value)}")
            continue
        shape, dtype = want
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: state entry '{name}' must be a tensor, got {_describe(value)}")
        if value.dtype != dtype:
            raise ValueError(
                f"{where}: state entry '{name}' is {value.dtype}, this optimizer keeps {dtype} (shape {shape}); "
                "convert the state with lmopt.convert_state or build the optimizer with the saved state_precision"
            )
        quantized = name.endswith(("_codes", "_scales"))
        relaid = (
            quantized and reblockable and (sharded or is_dtensor(value) or f"{name.rsplit('_', 1)[0]}_shards" in saved)
        )
        if tuple(value.shape) != tuple(shape) and not relaid:
            raise ValueError(
                f"{where}: state entry '{name}' has shape {tuple(value.shape)}, this optimizer keeps {tuple(shape)} "
                "for the parameter (a checkpoint of another model, or of parameters in another order?)"
            )
        if name.endswith("_scales"):
            if not bool(torch.isfinite(_local(value)).all()) or bool((_local(value) < 0).any()):
                raise ValueError(
                    f"{where}: state entry '{name}' must hold finite scales >= 0; the checkpoint is corrupted"
                )
        elif not quantized:
            _check_values(where, name, value)
    return out


def _describe_declared(state: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: ((tuple(v.shape), v.dtype) if isinstance(v, Tensor) else type(v))
        for k, v in state.items()
        if not k.endswith("_shards")
    }


def declared_by_init(optimizer: Any) -> DeclareFn:
    """The state an lmopt optimizer's ``_init_state`` creates for a parameter (built on fake tensors: no
    memory; on real ones where fake tensors cannot follow)."""

    optional = {name: None for name in getattr(optimizer, "wrapper_state", ())}

    def declare(group: dict[str, Any], param: Tensor) -> Declared:
        scratch: dict[str, Any] = {}
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                optimizer._init_state(group, param, scratch)
        except Exception:  # noqa: BLE001 - fall back to real tensors, freed at once
            scratch = {}
            with torch.no_grad():
                optimizer._init_state(group, param, scratch)
        return _describe_declared(scratch), {name: (tuple(param.shape), param.dtype) for name in optional}

    return declare


def declared_from_spec(spec: Any, optimizer: Any) -> DeclareFn:
    """The state a registry spec's ``state`` rule declares for a parameter under a group's hyperparameters."""

    def declare(group: dict[str, Any], param: Tensor) -> Declared:
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        declared = {t.name: (tuple(t.shape), t.dtype) for t in spec.state_tensors(param.shape, param.dtype, **hyper)}
        return declared, {name: (tuple(param.shape), param.dtype) for name in getattr(optimizer, "wrapper_state", ())}

    return declare


def _warn_dropped(owner: str, keyed: Mapping[Any, tuple[int, Tensor, Any]], state: Mapping[Any, Any]) -> None:
    """Warn when some parameters of a group have saved state and others none: those start from fresh state
    (torch's convention, right for parameters that never had a gradient; wrong for a state dict that lost
    entries)."""
    by_group: dict[int, list[Any]] = {}
    for key, (gi, _p, _group) in keyed.items():
        by_group.setdefault(gi, []).append(key)
    for gi, keys in sorted(by_group.items()):
        missing = [k for k in keys if not state.get(k)]
        if missing and len(missing) < len(keys):
            warnings.warn(
                f"{owner}.load_state_dict: param_groups[{gi}] has saved state for {len(keys) - len(missing)} of its "
                f"{len(keys)} parameters; {missing[:4]}{'...' if len(missing) > 4 else ''} start from fresh state "
                "(right for parameters that never had a gradient; otherwise the state dict lost entries)",
                stacklevel=4,
            )


def check_optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: Any,
    declare: DeclareFn,
    validate_group: Callable[[dict[str, Any]], None],
    *,
    reblockable: bool = False,
) -> dict[str, Any]:
    """Check ``state_dict`` for ``optimizer`` (see the module docstring) and return the state dict to load: groups
    completed from the current groups and normalized by ``validate_group``, ``step`` numbers as tensors.

    Raises:
        ValueError: what is wrong, naming the group, the parameter and the entry; the optimizer is unchanged.
    """
    owner = type(optimizer).__name__
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{owner}.load_state_dict needs a dict with 'state' and 'param_groups', got {_describe(state_dict)}"
        )
    state = state_dict.get("state", {})
    groups = state_dict.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(groups, (list, tuple)):
        raise ValueError(f"{owner}.load_state_dict: 'state' must be a dict and 'param_groups' a list")
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{owner}.load_state_dict: the state dict has {len(groups)} param groups, this optimizer "
            f"{len(optimizer.param_groups)}; build the optimizer with the same parameter groups as the saved run"
        )
    keyed: dict[Any, tuple[int, Tensor, dict[str, Any]]] = {}
    checked_groups = []
    for gi, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{owner}.load_state_dict: param_groups[{gi}] must be a dict with a 'params' list")
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"{owner}.load_state_dict: param_groups[{gi}] holds {len(saved['params'])} parameters in the state "
                f"dict and {len(current['params'])} in this optimizer; build it with the saved run's parameters"
            )
        group = {k: v for k, v in current.items() if k not in ("params", "param_names")}
        group.update({k: copy.copy(v) for k, v in saved.items() if k not in ("params", "param_names")})
        group["params"] = current["params"]
        try:
            validate_group(group)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{owner}.load_state_dict: param_groups[{gi}]: {err}") from None
        normalized = {k: v for k, v in group.items() if k != "params"}
        normalized["params"] = list(saved["params"])
        if "param_names" in saved:
            normalized["param_names"] = saved["param_names"]
        checked_groups.append(normalized)
        for i, (key, p) in enumerate(zip(saved["params"], current["params"])):
            try:
                hash(key)
            except TypeError:
                raise ValueError(f"{owner}.load_state_dict: param_groups[{gi}]['params'][{i}] is not a key") from None
            keyed[key] = (gi, p, group)
    checked_state = {}
    for key, values in state.items():
        try:
            hit = keyed.get(key)
        except TypeError:
            hit = None
        if hit is None:
            raise ValueError(
                f"{owner}.load_state_dict: state for {key!r}, which is not one of the saved groups' parameters "
                f"({list(keyed)[:4]}{'...' if len(keyed) > 4 else ''}); the state dict is malformed"
            )
        gi, p, group = hit
        where = f"{owner}.load_state_dict: state of parameter {key!r} (param_groups[{gi}], shape {tuple(p.shape)})"
        required, optional = declare(group, p)
        checked_state[key] = check_param_state(where, values, required, reblockable, optional, is_dtensor(p))
    _warn_dropped(owner, keyed, checked_state)
    out = dict(state_dict)
    out["state"] = checked_state
    out["param_groups"] = checked_groups
    return out
