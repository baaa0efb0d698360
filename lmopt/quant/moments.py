"""Optimizer moments at a chosen precision: the small helper every EMA-state optimizer can reuse.

An optimizer that keeps an exponential moving average (Adam's ``exp_avg`` / ``exp_avg_sq``, CAME's and
Adafactor's first moment, Lion's momentum) describes each moment with a :class:`MomentFormat` and calls four
functions; the state entries, their registry declaration and the small-tensor rule then agree by construction:

.. code-block:: python

    from lmopt.quant import MomentFormat, init_moment, load_moment, store_moment, moment_state

    fmt = MomentFormat("8bit", "first")                  # signed dynamic-exponent map, blocks of 256
    init_moment(state, "exp_avg", param, fmt)            # in _init_state
    m = load_moment(state, "exp_avg", fmt, param.shape)  # fp32 values (the state tensor itself when fp32)
    m.lerp_(grad, 1 - beta1)
    store_moment(state, "exp_avg", m, fmt)               # quantize back (no-op when m is the state tensor)
    # registry rule: moment_state("exp_avg", shape, dtype, fmt) -> [StateTensor, ...]

State entries: a full-precision moment is one tensor under its own name (``exp_avg``); a quantized one is
``<name>_codes`` (uint8; parameter-shaped for 8 bits, ``ceil(n / 2)`` flat for 4 bits) and ``<name>_scales``
(fp32, one per block). Tensors with fewer than ``min_quantized_numel`` elements (default 4096, as in
bitsandbytes and torchao) keep a full-precision moment (fp32; fp64 for fp64 parameters): their share of
memory is negligible and their blocks would be mostly scale. :func:`moment_summary` reports which did.

Sharded (DTensor, FSDP2) parameters: the same four calls work. A quantized moment is then quantized per local
shard and stored as 1-D DTensors (``<name>_codes`` / ``<name>_scales`` in equal per-shard slots, plus
``<name>_shards``, the number of shards its blocks were computed on; see :mod:`lmopt.quant.sharded`);
``load_moment`` returns a DTensor placed like the parameter and ``store_moment`` takes one. Whether a moment
is quantized depends on the parameter's global size, as unsharded. A full-precision moment is a DTensor like
the parameter. The registry rule (:func:`moment_state`) describes the unsharded layout.

Precisions: ``"fp32"``, ``"bf16"``, ``"8bit"`` (dynamic-exponent maps, Dettmers et al. 2022: signed for
first moments, unsigned for second moments; blocks of 256) and ``"4bit"`` (Li et al. 2023: signed 4-bit
dynamic-exponent map for first moments, zero-point-free linear map for second moments; blocks of 128).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..spec import StateTensor
from .blockwise import QuantizedState, _check_block_size, code_bytes, num_blocks
from .maps import code_map
from .sharded import ShardLayout, is_dtensor, local_quantized, sharded_quantized_zeros

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MomentFormat",
    "check_block_size_option",
    "check_min_quantized_numel",
    "init_moment",
    "is_quantized_entry",
    "load_moment",
    "local_nbytes",
    "moment_state",
    "moment_summary",
    "quantized_view",
    "state_layout",
    "store_moment",
]

Precision = Literal["fp32", "bf16", "8bit", "4bit"]
MomentKind = Literal["first", "second"]

#: default block sizes, chosen by the measurement in docs/low-bit-state.md
DEFAULT_BLOCK_SIZE = {"8bit": 256, "4bit": 128}
_MAPS = {("8bit", "first"): "de8s", ("8bit", "second"): "de8u", ("4bit", "first"): "de4s", ("4bit", "second"): "lin4u"}


@dataclass(frozen=True)
class MomentFormat:
    """How one moment is stored.

    Attributes:
        precision: ``"fp32"``, ``"bf16"``, ``"8bit"`` or ``"4bit"``.
        kind: ``"first"`` (signed values: a signed map) or ``"second"`` (non-negative: an unsigned map).
        block_size: elements per absmax block (default 256 for 8-bit, 128 for 4-bit); a multiple of 16.
        min_quantized_numel: tensors with fewer elements keep a full-precision moment (default 4096).
    """

    precision: Precision
    kind: MomentKind = "first"
    block_size: int | None = None
    min_quantized_numel: int = 4096

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "8bit", "4bit"):
            raise ValueError(f"precision must be one of fp32, bf16, 8bit, 4bit, got {self.precision!r}")
        if self.kind not in ("first", "second"):
            raise ValueError(f"kind must be 'first' or 'second', got {self.kind!r}")
        if self.quantized:
            _check_block_size(self.blocks, 8)
            code_map(self.qmap)  # built now, eagerly: a traced step then reads it as a constant
        m = self.min_quantized_numel
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"min_quantized_numel must be an integer >= 0, got {m!r}")

    @property
    def quantized(self) -> bool:
        return self.precision in ("8bit", "4bit")

    @property
    def blocks(self) -> int:
        """The effective block size."""
        return self.block_size if self.block_size is not None else DEFAULT_BLOCK_SIZE.get(self.precision, 0)

    @property
    def qmap(self) -> str:
        """Name of the code map (see :data:`lmopt.quant.maps.CODE_MAPS`)."""
        return _MAPS[(self.precision, self.kind)]

    @property
    def bits(self) -> int:
        return 8 if self.precision == "8bit" else 4

    def quantizes(self, numel: int) -> bool:
        """True when a tensor of ``numel`` elements is stored quantized under this format."""
        return self.quantized and numel >= max(1, self.min_quantized_numel)

    def full_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """dtype of an unquantized moment for a parameter of ``param_dtype``."""
        if self.precision == "bf16":
            return torch.bfloat16
        return torch.float64 if param_dtype == torch.float64 else torch.float32


def codes_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """8-bit codes keep the parameter's shape (they shard like it); 4-bit codes are flat, two per byte."""
    n = 1
    for s in shape:
        n *= s
    return tuple(shape) if bits == 8 else (code_bytes(n, 4),)


def moment_state(name: str, shape: tuple[int, ...], param_dtype: torch.dtype, fmt: MomentFormat) -> list[StateTensor]:
    """The exact state entries of one moment (for a registry ``state`` rule)."""
    n = 1
    for s in shape:
        n *= s
    if fmt.quantizes(n):
        return [
            StateTensor(f"{name}_codes", codes_shape(shape, fmt.bits), torch.uint8),
            StateTensor(f"{name}_scales", (num_blocks(n, fmt.blocks),), torch.float32),
        ]
    return [StateTensor(name, tuple(shape), fmt.full_dtype(param_dtype))]


def is_quantized_entry(name: Any) -> bool:
    """A state entry of a blockwise-quantized moment: ``<name>_codes`` or ``<name>_scales``."""
    return isinstance(name, str) and name.endswith(("_codes", "_scales"))


def check_block_size_option(value: Any) -> None:
    """Validate an optimizer's ``block_size`` hyperparameter (None: the precision's default)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 4096 or value % 16:
        raise ValueError(f"block_size must be None or a multiple of 16 in [16, 4096], got {value!r}")


def check_min_quantized_numel(value: Any) -> None:
    """Validate an optimizer's ``min_quantized_numel`` hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"min_quantized_numel must be an integer >= 0, got {value!r}")


def init_moment(state: dict[str, Any], name: str, param: Tensor, fmt: MomentFormat) -> None:
    """Create the zero moment ``name`` for ``param`` in ``state`` (codes of zero and zero scales if quantized).

    Raises:
        NotImplementedError: a quantized moment of a DTensor parameter placed other than Shard(0) / Replicate.
    """
    if fmt.quantizes(param.numel()):
        if is_dtensor(param):
            layout = ShardLayout.of(param)
            codes, scales = sharded_quantized_zeros(layout, fmt.qmap, fmt.blocks, device=param.device)
            state[f"{name}_codes"], state[f"{name}_scales"] = codes, scales
            state[f"{name}_shards"] = layout.shards
            return
        q = QuantizedState.zeros(param.shape, fmt.qmap, fmt.blocks, device=param.device)
        state[f"{name}_codes"] = q.codes.view(codes_shape(tuple(param.shape), fmt.bits))
        state[f"{name}_scales"] = q.scales
    else:
        state[name] = torch.zeros_like(param, dtype=fmt.full_dtype(param.dtype), memory_format=torch.contiguous_format)


def state_layout(state: dict[str, Any], name: str, shape: tuple[int, ...] | torch.Size) -> ShardLayout:
    """The shard layout of quantized moment ``name`` of a parameter of global ``shape``: a single shard for
    plain state; for DTensor state, read from the codes' mesh and placements."""
    codes = state[f"{name}_codes"]
    if not is_dtensor(codes):
        return ShardLayout(torch.Size(shape))
    mesh, shards, index = codes.device_mesh, 1, 0
    for dim, pl in enumerate(codes.placements):
        if pl.is_shard():
            shards, index = mesh.size(dim), mesh.get_coordinate()[dim]
    saved = state.get(f"{name}_shards", shards)
    if saved != shards:
        raise ValueError(
            f"{name}: the codes were quantized on {saved} shards but are placed on {shards}; restore state with "
            "lmopt.quant.sharded.reshard_quantized (the low-bit optimizers' load_state_dict does), which "
            "requantizes it"
        )
    return ShardLayout(torch.Size(shape), shards, index, mesh, tuple(codes.placements))


def quantized_view(
    state: dict[str, Any], name: str, fmt: MomentFormat, shape: tuple[int, ...] | torch.Size
) -> QuantizedState | None:
    """The :class:`QuantizedState` over a quantized moment's entries, or None for a full-precision moment.

    ``shape`` is the parameter's (global) shape; for DTensor state the view covers this rank's shard (shape
    ``state_layout(...).local_shape``)."""
    codes = state.get(f"{name}_codes")
    if codes is None:
        return None
    if is_dtensor(codes):
        return local_quantized(codes, state[f"{name}_scales"], state_layout(state, name, shape), fmt.qmap, fmt.blocks)
    return QuantizedState(codes.view(-1), state[f"{name}_scales"], fmt.qmap, fmt.blocks, shape)


def load_moment(
    state: dict[str, Any],
    name: str,
    fmt: MomentFormat,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The moment's values in ``dtype``: the state tensor itself when it already has that dtype (update it in
    place), else a new tensor (write it back with :func:`store_moment`). Sharded quantized state gives a
    DTensor placed like the parameter (``shape`` is the global shape)."""
    q = quantized_view(state, name, fmt, shape)
    if q is not None:
        values = q.dequantize(dtype)
        return state_layout(state, name, shape).wrap_local(values) if is_dtensor(state[f"{name}_codes"]) else values
    t = state[name]
    return t if t.dtype == dtype else t.to(dtype)


def store_moment(state: dict[str, Any], name: str, value: Tensor, fmt: MomentFormat) -> None:
    """Write ``value`` back into the moment (quantizing it when the moment is quantized; sharded state takes a
    DTensor ``value`` and quantizes its local shard).

    Raises:
        ValueError: a plain ``value`` for DTensor state or the reverse (shards and full tensors never mix).
    """
    target = state.get(f"{name}_codes", state.get(name))
    if is_dtensor(target) != is_dtensor(value):
        raise ValueError(
            f"store_moment({name!r}): the state is a {'DTensor' if is_dtensor(target) else 'plain tensor'} but "
            f"the value is a {'DTensor' if is_dtensor(value) else 'plain tensor'}; pass the moment as "
            "load_moment returned it (or work on local shards with lmopt.quant.sharded.local_state)"
        )
    q = quantized_view(state, name, fmt, value.shape)
    if q is not None:
        q.copy_(value.to_local() if is_dtensor(value) else value)
    elif state[name] is not value:
        state[name].copy_(value)


def local_nbytes(t: Tensor) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local piece)."""
    return (t.to_local() if is_dtensor(t) else t).nbytes


def moment_summary(states: list[dict[str, Any]], name: str) -> dict[str, int]:
    """How many tensors keep moment ``name`` quantized vs in full precision, and their state bytes (on this
    rank, for sharded state)."""
    out = {"quantized_tensors": 0, "full_precision_tensors": 0, "quantized_bytes": 0, "full_precision_bytes": 0}
    for state in states:
        if f"{name}_codes" in state:
            out["quantized_tensors"] += 1
            out["quantized_bytes"] += local_nbytes(state[f"{name}_codes"]) + local_nbytes(state[f"{name}_scales"])
        elif name in state:
            out["full_precision_tensors"] += 1
            out["full_precision_bytes"] += local_nbytes(state[name])
    return out
