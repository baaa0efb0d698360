"""The first moment of the factored optimizers (CAME, Adafactor) at a chosen precision: ``momentum_precision``.

CAME's and Adafactor's first moment ``m`` (state ``exp_avg``) is an exponential moving average of the
(clipped, preconditioned) update, the one state tensor of those optimizers that is as large as the parameter:
their second-moment statistics are factored (rows + columns) and stay fp32. An EMA tolerates blockwise
quantization between steps (Dettmers et al. 2022; Li et al. 2023), so ``momentum_precision`` keeps it at

* ``None`` (default): the parameter's dtype -- what these optimizers always did;
* ``"fp32"``: fp32 (fp64 for fp64 parameters), whatever the parameter dtype;
* ``"bf16"``: bf16 (2 B/param), the update math still in fp32;
* ``"8bit"``: 8-bit codes of the signed dynamic-exponent map with one fp32 absmax per ``block_size`` values
  (default 256): 1 + 4/256 B/param;
* ``"4bit"``: 4-bit codes of the signed 4-bit dynamic-exponent map, two per byte, one fp32 absmax per
  ``block_size`` values (default 128): 0.5 + 4/128 B/param.

Quantized tensors are stored as ``exp_avg_codes`` (uint8; parameter-shaped for 8 bits, flat ``ceil(n / 2)``
for 4 bits) and ``exp_avg_scales`` (fp32, one per block); tensors with fewer than ``min_quantized_numel``
elements (default 4096) keep an fp32 ``exp_avg`` (see :mod:`lmopt.quant.moments`). A step of a quantized tensor
is: dequantize ``m`` to fp32, run the optimizer's unchanged fp32 update on it (the parameter moves by the
*unquantized* new moment), quantize ``m`` back -- one tensor at a time, so the fp32 temporaries are those of the
largest tensor, never of the model.

DTensor (FSDP2) parameters cannot have quantized state yet: :func:`quantized_state_supported` is the one place
that says so (``"fp32"`` and ``"bf16"`` work on DTensors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..quant.blockwise import num_blocks
from ..quant.moments import (
    MomentFormat,
    init_moment,
    load_moment,
    moment_state,
    moment_summary,
    quantized_view,
    store_moment,
)
from ..quant.sharded import ShardLayout
from ..spec import StateTensor
from ._dispatch import math_dtype
from ._precision import moment_format, normalize_state_precision, reshard_loaded_state, validate_state_precision
from .base import is_dtensor

__all__ = [
    "MOMENTUM_PRECISIONS",
    "QuantizedMomentumLoading",
    "init_momentum",
    "momentum_format",
    "momentum_state",
    "momentum_summary",
    "normalize_momentum_precision",
    "quantized_state_supported",
    "step_with_momentum",
    "validate_momentum_options",
]

#: the values ``momentum_precision`` takes (None: the parameter's dtype)
MOMENTUM_PRECISIONS: tuple[str | None, ...] = (None, "fp32", "bf16", "8bit", "4bit")
_NAME = "exp_avg"


class QuantizedMomentumLoading:
    """Mixin for optimizers whose first moment may be quantized (CAME, Adafactor): a state dict saved with
    another sharding (another world size, FSDP2 <-> unsharded) is re-blocked after loading, as the low-bit Adam
    family does (:func:`lmopt.optim._precision.reshard_loaded_state`)."""

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()  # type: ignore[misc]
        self._reshard_loaded_state()

    def _reshard_loaded_state(self) -> None:
        reshard_loaded_state(self, lambda group: [(_NAME, momentum_format(group))])


def normalize_momentum_precision(value: Any) -> str | None:
    """``None``, ``"fp32"``, ``"bf16"``, ``"8bit"`` or ``"4bit"`` (torch.float32 / torch.bfloat16 are named).

    Raises:
        ValueError: any other value, naming ``momentum_precision`` and the allowed values.
    """
    return normalize_state_precision(value, "momentum_precision")


def validate_momentum_options(group: dict[str, Any]) -> None:
    """Check (and normalize) a param group's ``state_precision`` (or its deprecated alias
    ``momentum_precision``), ``block_size`` and ``min_quantized_numel``."""
    validate_state_precision(group, legacy="momentum_precision")


def momentum_format(hyper: Mapping[str, Any]) -> MomentFormat | None:
    """The :class:`MomentFormat` of the first moment, or None to keep it in the parameter's dtype.

    ``hyper`` is a param group or a registry entry's effective hyperparameters (groups restored from
    checkpoints written before this option have none of its keys: the parameter's dtype, as then)."""
    return moment_format(hyper, "first")


def quantized_state_supported(param: Tensor) -> bool:
    """Whether ``param`` can keep quantized state: plain tensors, and DTensor (FSDP2) parameters sharded on
    dim 0 or replicated, whose codes and scales are built per local shard (:mod:`lmopt.quant.sharded`)."""
    return not is_dtensor(param) or ShardLayout.unsupported_reason(param) is None


def init_momentum(optimizer: str, group: Mapping[str, Any], param: Tensor, state: dict[str, Any]) -> None:
    """Create the zero first moment of ``param`` in ``state`` at the group's ``momentum_precision``.

    Raises:
        NotImplementedError: a quantized first moment for a DTensor (FSDP2) parameter.
    """
    fmt = momentum_format(group)
    if fmt is None:
        state[_NAME] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return
    if fmt.quantizes(param.numel()) and not quantized_state_supported(param):
        raise NotImplementedError(
            f"{optimizer} cannot quantize the state of this DTensor parameter "
            f"({ShardLayout.unsupported_reason(param)}; momentum_precision={fmt.precision!r}, a tensor of "
            f"{param.numel()} elements): shard it on dim 0 (FSDP2's default), or use momentum_precision='bf16' "
            "(2 B/param) or 'fp32'"
        )
    init_moment(state, _NAME, param, fmt)


def momentum_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """The exact state entries of the first moment (for a registry ``state`` rule)."""
    fmt = momentum_format(hyper)
    if fmt is None:
        return [StateTensor(_NAME, shape, dtype)]
    return moment_state(_NAME, shape, dtype, fmt)


def step_with_momentum(
    group: Mapping[str, Any],
    params: list[Tensor],
    states: list[dict[str, Any]],
    run: Callable[[list[int], list[Tensor | None]], str],
) -> str:
    """Run an optimizer's functional step with its first moments at the group's precision.

    ``run(indices, exp_avgs)`` steps ``params[i]`` for ``i`` in ``indices`` with the given first moments (a
    list aligned with ``indices``; None where a tensor keeps none) and returns the implementation it used. It is
    called once for every tensor whose moment is a plain tensor (the state tensor itself, updated in place, its
    dtype handled by the functional as ever), then once per tensor with a quantized moment: dequantize it to
    the math dtype, run the unchanged update on it, quantize it back.

    Returns:
        what the last call of ``run`` reports.
    """
    fmt = momentum_format(group)
    quantized = [i for i, s in enumerate(states) if f"{_NAME}_codes" in s]
    plain = [i for i, s in enumerate(states) if f"{_NAME}_codes" not in s]
    if quantized and (fmt is None or not fmt.quantized):  # checked before anything moves
        raise RuntimeError(
            "a param group's state_precision was changed to "
            f"{group.get('state_precision')!r} after its quantized first moments were created; keep the "
            "precision a group's state was created with"
        )
    used = ""
    if plain:
        used = run(plain, [states[i].get(_NAME) for i in plain])
    for i in quantized:
        assert fmt is not None
        m = load_moment(states[i], _NAME, fmt, params[i].shape, math_dtype(params[i].dtype))
        used = run([i], [m])
        _store(states[i], m, fmt)
    return used


def _store(state: dict[str, Any], m: Tensor, fmt: MomentFormat) -> None:
    """Quantize ``m`` back into ``state``. A non-finite ``m`` (finite gradients whose update overflowed the math
    dtype) has no blockwise code: its blocks get a NaN scale, so the moment reads back non-finite there, as a
    full-precision moment would be, instead of the step failing halfway (the parameter is already updated)."""
    try:
        store_moment(state, _NAME, m, fmt)
        return
    except ValueError:
        bad = ~torch.isfinite(m.reshape(-1))
        if not bool(bad.any()):
            raise
    store_moment(state, _NAME, torch.where(bad.view(m.shape), 0.0, m), fmt)
    n, block = bad.numel(), fmt.blocks
    padded = torch.cat([bad, bad.new_zeros(num_blocks(n, block) * block - n)])
    q = quantized_view(state, _NAME, fmt, m.shape)
    assert q is not None
    q.scales[padded.view(-1, block).any(dim=1)] = float("nan")


def momentum_summary(groups: Iterable[Mapping[str, Any]], states: Iterable[dict[str, Any]]) -> str | None:
    """One line on the quantized first moments (None when no group quantizes it)."""
    precisions = sorted({str(g.get("momentum_precision")) for g in groups if momentum_format(g) is not None})
    if not any(p in ("8bit", "4bit") for p in precisions):
        return None
    s = moment_summary(list(states), _NAME)
    return (
        f"first moment ({'/'.join(precisions)}): {s['quantized_tensors']} tensors quantized "
        f"({s['quantized_bytes']:,} B), {s['full_precision_tensors']} small tensors in full precision "
        f"({s['full_precision_bytes']:,} B)"
    )
