"""Generated bad inputs for every spec of the test database (tests/test_fuzz.py and tests/fuzz_state_worker.py).

Three generators, each a table a new optimizer inherits through its :class:`tests.optim_db.OptimSpec`:

* :data:`BAD_VALUES`: values that no numeric, flag or tuple hyperparameter may silently take (NaN, inf, strings,
  lists, bools for numbers, ints for bools, 2**70, 1e39, denormals, None, wrong-length tuples), tried on every
  hyperparameter of every entry's signature;
* :data:`LAYOUTS`: parameters and gradients in the memory layouts users produce (a strided view, a transposed
  parameter or gradient, an expanded stride-0 gradient, channels_last, 0-d, 0-size), run beside the same values
  in plain contiguous tensors;
* :data:`MUTATIONS`: ways a saved state dict gets corrupted or forged (truncated, transposed, reshaped, swapped,
  re-typed, grown, negated, NaN / inf, entries dropped, added or renamed, groups broken, steps negative, quantized
  codes and scales damaged), each applied to a real state dict of the entry.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lmopt.optim._state_check import NONNEGATIVE_STATE

# ------------------------------------------------------------------------------------------------ hyperparameters
#: (label, value) pairs tried on every hyperparameter (a value equal to the default, by type too, is skipped)
BAD_VALUES: list[tuple[str, Any]] = [
    ("nan", float("nan")),
    ("inf", float("inf")),
    ("-inf", float("-inf")),
    ("negative", -1.0),
    ("string", "x"),
    ("list", [0.1]),
    ("int 2**70", 2**70),
    ("1e39", 1e39),
    ("denormal", 1e-45),
    ("bool", True),
    ("int 1", 1),
    ("None", None),
    ("5-tuple", (0.5,) * 5),
]

#: signature arguments that are not hyperparameters
NOT_HYPERPARAMETERS = frozenset({"params", "model", "param_names"})


def hyperparameter_cases(
    defaults: dict[str, Any], skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, str, Any]]:
    """``(key, label, value)`` for every hyperparameter and bad value."""
    for key, default in defaults.items():
        if key in NOT_HYPERPARAMETERS or key in skip:
            continue
        for label, value in BAD_VALUES:
            if type(value) is type(default) and value == default:
                continue
            yield key, label, value


def names_argument(message: str, key: str) -> bool:
    """An error message names ``key`` (case-insensitive: torch's "Nesterov momentum requires ..." names it)."""
    return key.lower() in message.lower()


def all_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ------------------------------------------------------------------------------------------------------- layouts
class LayoutCase:
    """One layout: ``param()`` builds the parameter (in its layout), ``grad(p, k)`` the k-th step's gradient (in its
    layout), ``plain(t)`` the same values as a plain contiguous tensor (0-d: a 1-element vector)."""

    def __init__(
        self,
        name: str,
        param: Callable[[], Tensor],
        grad: Callable[[tuple[int, ...], int], Tensor] | None = None,
        plain_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda s: s,
    ) -> None:
        self.name, self._param, self._grad, self._plain_shape = name, param, grad, plain_shape

    def param(self, plain: bool) -> nn.Parameter:
        p = self._param()
        if plain:
            return nn.Parameter(p.detach().reshape(self._plain_shape(tuple(p.shape))).contiguous().clone())
        return nn.Parameter(p.detach())  # detach keeps the layout: a strided view stays one

    def grad(self, p: Tensor, k: int, plain: bool, shape: tuple[int, ...]) -> Tensor:
        g = self._grad(shape, k) if self._grad is not None else _randn(shape, 100 + k)
        if plain:
            return g.reshape(tuple(p.shape)).contiguous().clone()
        return g


def _randn(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _expanded(shape: tuple[int, ...], k: int) -> Tensor:
    return _randn((1, *shape[1:]), 200 + k).expand(shape)


def _transposed(shape: tuple[int, ...], k: int) -> Tensor:
    return _randn(shape[::-1], 300 + k).t()


LAYOUTS: dict[str, LayoutCase] = {
    case.name: case
    for case in [
        LayoutCase("strided_param", lambda: _randn((8, 24), 1)[:, ::2]),
        LayoutCase("transposed_param", lambda: _randn((12, 8), 2).t()),
        LayoutCase("transposed_grad", lambda: _randn((8, 12), 3), _transposed),
        LayoutCase("expanded_grad", lambda: _randn((8, 12), 4), _expanded),
        LayoutCase("channels_last", lambda: _randn((4, 3, 2, 5), 5).to(memory_format=torch.channels_last)),
        LayoutCase("zero_dim", lambda: _randn((), 6), plain_shape=lambda s: (1,)),
        LayoutCase("zero_size", lambda: torch.zeros(0, 5)),
    ]
}


class LayoutModel(nn.Module):
    """The parameter under test beside a plain matrix and bias (so Muon, Adam-mini, ... have their usual kinds)."""

    def __init__(self, p: nn.Parameter) -> None:
        super().__init__()
        self.w = p
        self.matrix = nn.Parameter(_randn((6, 5), 7))
        self.bias = nn.Parameter(_randn((5,), 8))


def run_layout(
    make: Callable[[nn.Module], torch.optim.Optimizer], case: LayoutCase, plain: bool, steps: int = 5
) -> tuple[Tensor, torch.optim.Optimizer]:
    """``steps`` optimizer steps of the layout's parameter (and the two plain ones); the parameter at the end, in
    the layout's shape, and the optimizer."""
    model = LayoutModel(case.param(plain))
    shape = tuple(case.param(False).shape)
    opt = make(model)
    for k in range(steps):
        model.w.grad = case.grad(model.w, k, plain, shape)
        model.matrix.grad = _randn((6, 5), 400 + k)
        model.bias.grad = _randn((5,), 500 + k)
        opt.step()
    return model.w.detach().reshape(shape).clone(), opt


# ----------------------------------------------------------------------------------------------------- mutations
Mutation = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def _tensor_entries(sd: dict[str, Any]) -> list[tuple[Any, str, Tensor]]:
    """``(param key, entry name, tensor)`` of every non-scalar state tensor, largest first."""
    out = [
        (key, name, value)
        for key, values in sd["state"].items()
        if isinstance(values, dict)
        for name, value in values.items()
        if isinstance(value, Tensor) and value.ndim > 0 and value.numel() > 1
    ]
    return sorted(out, key=lambda e: -e[2].numel())


def _edit_entry(pick: Callable[[str, Tensor], bool], change: Callable[[Tensor], Tensor | None]) -> Mutation:
    def mutate(sd: dict[str, Any]) -> dict[str, Any] | None:
        for key, name, value in _tensor_entries(sd):
            if pick(name, value):
                new = change(value)
                if new is None:
                    continue
                out = copy.deepcopy(sd)
                out["state"][key][name] = new
                return out
        return None

    return mutate


def _floating(name: str, value: Tensor) -> bool:
    return value.is_floating_point()


def _any(name: str, value: Tensor) -> bool:
    return True


def _with_nan(value: Tensor, fill: float) -> Tensor:
    out = value.clone()
    out.view(-1)[0] = fill
    return out


def _transpose(value: Tensor) -> Tensor | None:
    if value.ndim == 2 and value.shape[0] != value.shape[1]:
        return value.t().contiguous()
    return None


def _flat(value: Tensor) -> Tensor | None:
    return value.reshape(-1).clone() if value.ndim > 1 else value.reshape(1, -1).clone()


def _bigger(value: Tensor) -> Tensor:
    return torch.cat([value, torch.zeros_like(value[:1])])


def _swapped(sd: dict[str, Any]) -> dict[str, Any] | None:
    keyed = [
        (k, v) for k, v in sd["state"].items() if isinstance(v, dict) and any(isinstance(x, Tensor) for x in v.values())
    ]
    for i, (k1, v1) in enumerate(keyed):
        for k2, v2 in keyed[i + 1 :]:
            s1 = {n: tuple(t.shape) for n, t in v1.items() if isinstance(t, Tensor)}
            s2 = {n: tuple(t.shape) for n, t in v2.items() if isinstance(t, Tensor)}
            if s1 != s2:
                out = copy.deepcopy(sd)
                out["state"][k1], out["state"][k2] = out["state"][k2], out["state"][k1]
                return out
    return None


def _first_state(edit: Callable[[dict[str, Any], Any], None]) -> Mutation:
    """A mutation of the first parameter's non-empty state: ``edit(state, key)`` changes a copy in place."""

    def mutate(sd: dict[str, Any]) -> dict[str, Any] | None:
        key = next((k for k, v in sd["state"].items() if isinstance(v, dict) and v), None)
        if key is None:
            return None
        out = copy.deepcopy(sd)
        edit(out["state"], key)
        return out

    return mutate


_drop_entry = _first_state(lambda state, key: state[key].pop(sorted(state[key])[-1]))
_extra_entry = _first_state(lambda state, key: state[key].__setitem__("bogus", torch.zeros(3)))
_string_key = _first_state(lambda state, key: state.__setitem__("weight", state.pop(key)))
_state_not_dict = _first_state(lambda state, key: state.__setitem__(key, [1, 2, 3]))


def _edit_step(value: Any) -> Mutation:
    def mutate(sd: dict[str, Any]) -> dict[str, Any] | None:
        for key, values in sd["state"].items():
            if isinstance(values, dict) and "step" in values:
                out = copy.deepcopy(sd)
                out["state"][key]["step"] = value() if callable(value) else value
                return out
        return None

    return mutate


def _edit_group(name: str, value: Any) -> Mutation:
    def mutate(sd: dict[str, Any]) -> dict[str, Any] | None:
        if name not in sd["param_groups"][0]:
            return None
        out = copy.deepcopy(sd)
        out["param_groups"][0][name] = value
        return out

    return mutate


def _betas_out_of_range(sd: dict[str, Any]) -> dict[str, Any] | None:
    betas = sd["param_groups"][0].get("betas")
    if not isinstance(betas, (tuple, list)):
        return None
    out = copy.deepcopy(sd)
    out["param_groups"][0]["betas"] = (2.0, *betas[1:])
    return out


def _quantized(suffix: str, change: Callable[[Tensor], Tensor]) -> Mutation:
    def mutate(sd: dict[str, Any]) -> dict[str, Any] | None:
        for key, values in sd["state"].items():
            for name, value in values.items() if isinstance(values, dict) else ():
                if name.endswith(suffix) and isinstance(value, Tensor) and value.numel() > 1:
                    out = copy.deepcopy(sd)
                    out["state"][key][name] = change(value)
                    return out
        return None

    return mutate


def _structure(change: Callable[[dict[str, Any]], Any]) -> Mutation:
    def mutate(sd: dict[str, Any]) -> Any:
        out = copy.deepcopy(sd)
        return change(out)

    return mutate


def _drop_params(sd: dict[str, Any]) -> dict[str, Any]:
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    return sd


def _extra_group(sd: dict[str, Any]) -> dict[str, Any]:
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    return sd


def _negative_skipped(sd: dict[str, Any]) -> dict[str, Any] | None:
    if "lmopt" not in sd:
        return None
    sd["lmopt"]["skipped_steps"] = -1
    return sd


def _without_groups(sd: dict[str, Any]) -> dict[str, Any]:
    sd.pop("param_groups")
    return sd


#: name -> mutation (None where it does not apply to the entry's state dict); each must be refused at load
MUTATIONS: dict[str, Mutation] = {
    "truncated": _edit_entry(_any, lambda v: v.reshape(-1)[:-1].clone()),
    "transposed": _edit_entry(_any, _transpose),
    "reshaped": _edit_entry(_any, _flat),
    "bigger": _edit_entry(_any, _bigger),
    "swapped": _swapped,
    "dtype_float16": _edit_entry(_floating, lambda v: v.to(torch.float16) if v.dtype != torch.float16 else None),
    "dtype_float64": _edit_entry(_floating, lambda v: v.to(torch.float64) if v.dtype != torch.float64 else None),
    "dtype_bool": _edit_entry(_any, lambda v: v.bool()),
    "dtype_int64": _edit_entry(_any, lambda v: v.long()),
    "negative_second_moment": _edit_entry(lambda n, v: n in NONNEGATIVE_STATE, lambda v: -(v.abs() + 1)),
    "nan_value": _edit_entry(_floating, lambda v: _with_nan(v, float("nan"))),
    "inf_value": _edit_entry(_floating, lambda v: _with_nan(v, float("inf"))),
    "dropped_entry": _drop_entry,
    "extra_entry": _extra_entry,
    "string_key": _string_key,
    "state_not_a_dict": _state_not_dict,
    "step_negative": _edit_step(lambda: torch.tensor(-5.0)),
    "step_nan": _edit_step(lambda: torch.tensor(float("nan"))),
    "step_string": _edit_step("five"),
    "group_lr_nan": _edit_group("lr", float("nan")),
    "group_lr_string": _edit_group("lr", "x"),
    "group_weight_decay_inf": _edit_group("weight_decay", float("inf")),
    "group_eps_negative": _edit_group("eps", -1.0),
    "group_betas_out_of_range": _betas_out_of_range,
    "group_lookahead_alpha_nan": _edit_group("lookahead_alpha", float("nan")),
    "group_lookahead_k_zero": _edit_group("lookahead_k", 0),
    "group_momentum_inf": _edit_group("momentum", float("inf")),
    "codes_truncated": _quantized("_codes", lambda v: v.reshape(-1)[:-1].clone()),
    "codes_float": _quantized("_codes", lambda v: v.float()),
    "scales_negative": _quantized("_scales", lambda v: -(v.abs() + 1)),
    "scales_nan": _quantized("_scales", lambda v: _with_nan(v, float("nan"))),
    "group_params_dropped": _structure(_drop_params),
    "extra_group": _structure(_extra_group),
    "no_param_groups": _structure(_without_groups),
    "not_a_dict": lambda sd: [sd],
    "skipped_steps_negative": _structure(_negative_skipped),
}


def snapshot(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Everything a failed load must leave as it was: parameters, state (values, dtypes) and groups."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {
        i: {n: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for n, v in optimizer.state[p].items()}
        for i, p in enumerate(q for g in optimizer.param_groups for q in g["params"])
        if p in optimizer.state
    }
    return [p.detach().clone() for p in model.parameters()], state, repr(groups)


def _bits(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def same(a: Any, b: Any) -> bool:
    """Bit-identical snapshots (dtypes, shapes and every byte; NaN payloads included)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
