"""Optimizer state converted between implementations and precisions: switch a running job without a restart.

:func:`convert_state` reads the state of one optimizer, in any of the formats below, as full-precision values
per parameter (``step``, ``exp_avg``, ``exp_avg_sq``, ...: torch's names, which lmopt keeps) and writes them in
the layout another optimizer keeps, quantizing where that optimizer's ``state_precision`` says so:

* torch.optim (``Adam``, ``AdamW``, ... : plain tensors) and lmopt at every precision (``fp32``, ``bf16``,
  ``8bit`` / ``4bit`` codes and scales, :mod:`lmopt.quant.moments`);
* bitsandbytes 8-bit optimizers (``AdamW8bit``, ``Adam8bit``, ``Lion8bit``, ...: ``state1`` / ``state2`` codes
  with ``qmap`` and per-block ``absmax``, or fp32 for small tensors; ``state1`` is the first moment, ``state2``
  the second);
* torchao low-bit optimizers (``AdamW8bit``, ``AdamW4bit``, ...: tensor subclasses that dequantize themselves).

Converting to a lower precision rounds the moments once (what one step of that optimizer does anyway);
converting up is exact. The returned state dict is loaded like any other, through the target's checks:

.. code-block:: python

    sd = torch.load("optimizer.pt", weights_only=True)            # e.g. torch.optim.AdamW's, or bnb's
    opt = lmopt.create_optimizer("adamw8bit", model, lr=3e-4)
    opt.load_state_dict(lmopt.convert_state(sd, opt))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..quant.moments import load_moment, store_moment
from ._precision import moment_format
from ._state_check import NONNEGATIVE_STATE
from .base import LmoptOptimizer

__all__ = ["convert_state"]

_BNB = "__bnb_optimizer_quant_state__"
#: bitsandbytes' state names -> the moments they hold, by position in the target's moments
_BNB_MOMENTS = ("state1", "state2")


def _kind(name: str) -> str:
    return "second" if name in NONNEGATIVE_STATE else "first"


def _bnb_block(numel: int, blocks: int) -> int:
    for size in (64, 128, 256, 512, 1024, 2048, 4096):
        if math.ceil(numel / size) == blocks:
            return size
    raise ValueError(f"bitsandbytes state of {numel} elements with {blocks} absmax blocks: no block size fits")


def _bnb_values(quant: Mapping[str, Any], which: str, shape: torch.Size) -> Tensor:
    codes = quant[which]
    if codes.dtype != torch.uint8:
        return codes.float().reshape(shape)
    index = which[-1]
    qmap, absmax = quant[f"qmap{index}"].float(), quant[f"absmax{index}"].float()
    n = codes.numel()
    block = _bnb_block(n, absmax.numel())
    values = qmap[codes.reshape(-1).long()]
    values = values * absmax.repeat_interleave(block)[:n]
    return values.reshape(shape)


def _decode(where: str, saved: Mapping[str, Any], group: Mapping[str, Any], param: Tensor) -> dict[str, Any]:
    """One parameter's saved state as ``{"step": float, name: fp32 tensor shaped like the parameter}``."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"convert_state: the state of {where} must be a dict, got {type(saved).__name__}")
    out: dict[str, Any] = {}
    shape = param.shape
    for name, value in saved.items():
        if name == "step":
            out["step"] = float(value)
        elif name == _BNB:
            for position, which in enumerate(_BNB_MOMENTS):
                if which in value:
                    out[f"bnb:{position}"] = _bnb_values(value, which, shape)
        elif name.endswith("_codes"):
            base = name[: -len("_codes")]
            fmt = moment_format(group, _kind(base))
            if fmt is None or not fmt.quantized:
                raise ValueError(
                    f"convert_state: {where} holds quantized {base!r} but its group has no low-bit state_precision"
                )
            out[base] = load_moment(saved, base, fmt, shape).reshape(shape)
        elif name.endswith(("_scales", "_shards")):
            continue
        elif hasattr(value, "dequantize") and type(value) is not Tensor:  # torchao's OptimState8bit / 4bit
            out[name] = value.dequantize().float().reshape(shape)
        elif isinstance(value, Tensor):
            out[name] = value.detach().float()
        else:
            out[name] = value
    return out


def _moment_names(target: Optimizer, group: Mapping[str, Any]) -> list[str]:
    moments = getattr(target, "_moments", None)
    if callable(moments):
        return [name for name, _kind in moments(group)]
    return ["exp_avg", "exp_avg_sq"]


def _resolve_bnb(decoded: dict[str, Any], names: list[str]) -> None:
    for key in [k for k in decoded if k.startswith("bnb:")]:
        position = int(key.split(":")[1])
        decoded[names[position] if position < len(names) else key] = decoded.pop(key)


def _same_codes(
    saved: Mapping[str, Any], saved_group: Mapping[str, Any], group: Mapping[str, Any], base: str, state: dict
) -> bool:
    """The source holds ``base`` quantized exactly as the target would (same map and blocks): copy, not requantize
    (a dequantized value does not always requantize to its own code)."""
    codes, scales = saved.get(f"{base}_codes"), saved.get(f"{base}_scales")
    if not isinstance(codes, Tensor) or not isinstance(scales, Tensor):
        return False
    mine, theirs = moment_format(group, _kind(base)), moment_format(saved_group, _kind(base))
    if mine is None or theirs is None or (mine.qmap, mine.blocks) != (theirs.qmap, theirs.blocks):
        return False
    ok = codes.shape == state[f"{base}_codes"].shape and scales.shape == state[f"{base}_scales"].shape
    return ok and codes.dtype == torch.uint8


def _encode(
    where: str,
    target: Optimizer,
    group: dict[str, Any],
    param: Tensor,
    values: dict[str, Any],
    raw: tuple[Mapping[str, Any], Mapping[str, Any]],
) -> dict:
    """The state ``target`` keeps for ``param``, filled with ``values`` (``raw``: the saved state and group)."""
    if not isinstance(target, LmoptOptimizer):  # torch.optim's layout: the values in the parameter's dtype
        return {
            name: (torch.tensor(v, dtype=torch.float32) if name == "step" else v.to(param.dtype).clone())
            if isinstance(v, (Tensor, float))
            else v
            for name, v in values.items()
        }
    state: dict[str, Any] = {}
    target._init_state(group, param, state)
    used = {"step"}
    for name in list(state):
        if name.endswith(("_scales", "_shards")) or name == "step":
            continue
        base = name[: -len("_codes")] if name.endswith("_codes") else name
        if base not in values:
            raise ValueError(
                f"convert_state: {type(target).__name__} keeps {base!r} for {where}, which the source state does "
                f"not have (it has {sorted(values)}); convert between optimizers of the same algorithm"
            )
        value = values[base]
        if value.numel() != param.numel():
            raise ValueError(
                f"convert_state: {base!r} of {where} has {value.numel()} elements, the parameter {param.numel()}"
            )
        used.add(base)
        if name.endswith("_codes") and _same_codes(raw[0], raw[1], group, base, state):
            state[name].copy_(raw[0][name])
            state[f"{base}_scales"].copy_(raw[0][f"{base}_scales"])
        elif name.endswith("_codes"):
            store_moment(state, base, value.reshape(param.shape).to(param.device), moment_format(group, _kind(base)))
        else:
            state[name].copy_(value.reshape(state[name].shape))
    if "step" in state:
        if "step" not in values:
            raise ValueError(
                f"convert_state: {type(target).__name__} keeps a step counter for {where} and the source keeps none "
                "(e.g. full-precision Lion); pass step= (the number of steps taken)"
            )
        state["step"] = torch.full_like(state["step"], values["step"])
    dropped = sorted(set(values) - used)
    if dropped:
        raise ValueError(
            f"convert_state: the source state of {where} has {dropped}, which {type(target).__name__} does not keep "
            "(e.g. AMSGrad's max_exp_avg_sq into AdamW); build the target with the same options"
        )
    return state


def convert_state(
    source: Mapping[str, Any] | Optimizer, target: Optimizer, *, step: int | None = None
) -> dict[str, Any]:
    """The state of ``source`` as a state dict for ``target`` (see the module docstring for the formats).

    Args:
        source: a state dict (``optimizer.state_dict()``, or one loaded with ``torch.load``) or an optimizer, of
            torch.optim, lmopt (any ``state_precision``), bitsandbytes or torchao, over the same parameters in
            the same order as ``target``.
        target: the optimizer to continue with, built over the same parameters (its groups and hyperparameters
            are kept: the returned state dict carries the target's own ``param_groups``).
        step: the step count to record where the source keeps no counter and the target does (full-precision
            Lion into 8-bit Lion); ignored otherwise.

    Returns:
        A state dict to pass to ``target.load_state_dict`` (which checks it like any other).

    Raises:
        ValueError: the parameter counts differ, or a moment the target keeps is missing from the source (or
            the source has one the target would drop), naming the parameter.

    Example:
        >>> opt = lmopt.create_optimizer("adamw4bit", model, lr=3e-4)
        >>> opt.load_state_dict(lmopt.convert_state(torch.load("torch_adamw.pt", weights_only=True), opt))
    """
    sd = source.state_dict() if isinstance(source, Optimizer) else source
    if not isinstance(sd, Mapping) or not isinstance(sd.get("param_groups"), (list, tuple)):
        raise ValueError("convert_state: source must be an optimizer or a state dict with 'state' and 'param_groups'")
    saved_groups = sd["param_groups"]
    keys = [(key, g) for g in saved_groups for key in g["params"]]
    params = [(p, g) for g in target.param_groups for p in g["params"]]
    if len(keys) != len(params):
        raise ValueError(
            f"convert_state: the source has {len(keys)} parameters, the target {len(params)}; build the target over "
            "the same parameters in the same order"
        )
    out = target.state_dict()
    target_keys = [key for g in out["param_groups"] for key in g["params"]]
    state = {}
    for (key, saved_group), (param, group), target_key in zip(keys, params, target_keys):
        saved = sd.get("state", {}).get(key)
        if not saved:
            continue
        where = f"parameter {key!r} (shape {tuple(param.shape)})"
        values = _decode(where, saved, saved_group, param)
        if "step" not in values and step is not None:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"convert_state: step must be an int >= 0, got {step!r}")
            values["step"] = float(step)
        _resolve_bnb(values, _moment_names(target, group))
        state[target_key] = _encode(where, target, group, param, values, (saved, saved_group))
    out["state"] = state
    return out
