"""Blockwise-quantized state of sharded (DTensor, FSDP2) tensors: blocks per local shard, padded Shard(0) storage.

**Blocks per shard.** The codes and block scales of a DTensor parameter are computed from its local shard
(``param.to_local()``), blocks counted from the start of the shard, so a block never straddles a shard boundary
and a step needs no communication: the C kernel and the PyTorch path run on plain local tensors. The block
layout therefore depends on the sharding: where shard boundaries are not multiples of ``block_size`` the blocks
(and so the rounding of the moments) differ from those of the same tensor unsharded. Where they are (or the
tensor is not sharded), sharded and unsharded state are bit-identical.

Supported placements: ``Shard(0)`` (FSDP2's ``fully_shard``) on at most one mesh dimension and ``Replicate()``
on the others (HSDP). A tensor with ``R`` rows sharded ``S`` ways is split like ``torch.chunk`` (FSDP2's rule):
shard ``k`` holds rows ``[k * c, min((k + 1) * c, R))`` with ``c = ceil(R / S)``, so trailing shards may be
shorter or empty. Other placements (``Shard(1)`` tensor parallelism, strided or partial placements) raise
:class:`NotImplementedError` for quantized state.

**Storage.** Each quantized moment is two 1-D DTensors on the parameter's mesh, placed ``Shard(0)`` on the mesh
dimension where the parameter is sharded and ``Replicate()`` elsewhere: ``<name>_codes`` (uint8) and
``<name>_scales`` (fp32). Every shard gets an equal *slot* sized for a full chunk of ``c`` rows
(``code_bytes(c * row_numel)`` bytes and ``ceil(c * row_numel / block_size)`` scales); a shorter shard uses the
start of its slot and leaves the rest zero. The global tensors (``S`` slots) are thus evenly sharded, valid
DTensors whose local pieces follow ``torch.chunk``: ``full_tensor()``, ``redistribute``,
``torch.distributed.checkpoint`` and ``get_optimizer_state_dict(full_state_dict=True)`` all see the layout as
it is. (Uneven local sizes declared through ``DTensor.from_local(shape=...)`` would not: DTensor's collectives
and checkpoint planner assume ``torch.chunk`` sizes.) The padding costs nothing at the peak: ranks with full
chunks, which set the per-rank memory, have no padding. Next to them ``<name>_shards`` (a Python int, the same
on every rank) records ``S``: the slot layout is a function of the parameter's shape, ``S`` and the block size,
so a state dict says which layout its codes have, and :func:`reshard_quantized` converts between layouts.

**Resharding.** Loading state saved with ``S`` shards into a run with ``S'`` shards (another world size, or an
unsharded run: ``S' = 1``): where each new block is a saved block (same ``S``, or all shard boundaries of both
layouts on block boundaries) codes and scales are copied, bit-exact; otherwise the saved blocks overlapping
each new shard are dequantized and quantized into the new blocks: one more rounding of the moments (each value
moves by at most half a code gap of its new block's absmax).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .blockwise import QuantizedState, code_bytes, dequantize_blockwise, num_blocks, quantize_blockwise
from .maps import code_map

__all__ = [
    "ShardLayout",
    "is_dtensor",
    "local_quantized",
    "local_state",
    "reshard_quantized",
    "sharded_quantized_zeros",
    "to_layout_of",
]


def is_dtensor(t: Any) -> bool:
    """True for a torch.distributed DTensor (FSDP2 parameters and their state)."""
    return type(t).__name__ == "DTensor"


def _placement_kind(placement: Any) -> str:
    from torch.distributed.tensor import Replicate, Shard

    if type(placement) is Shard and placement.dim == 0:
        return "shard0"
    if type(placement) is Replicate:
        return "replicate"
    return "other"


@dataclass(frozen=True)
class ShardLayout:
    """How a tensor's flat elements split into dim-0 shards, and which one this rank holds.

    Attributes:
        shape: the global (unsharded) shape.
        shards: number of dim-0 shards ``S`` (1: not sharded).
        index: this rank's shard, ``0 <= index < S``.
        mesh: the DeviceMesh (None for a plain tensor).
        placements: the tensor's placements (``Shard(0)`` / ``Replicate()``; empty for a plain tensor).
    """

    shape: torch.Size
    shards: int = 1
    index: int = 0
    mesh: Any = None
    placements: tuple = ()

    @staticmethod
    def unsupported_reason(t: Tensor) -> str | None:
        """Why the placements of DTensor ``t`` cannot hold per-shard quantized state (None: they can)."""
        kinds = [_placement_kind(pl) for pl in t.placements]
        if "other" in kinds or kinds.count("shard0") > 1:
            return (
                f"placements {tuple(t.placements)} are not supported for quantized state (supported: Shard(0) on "
                "at most one mesh dimension and Replicate() on the others, as fully_shard / HSDP place parameters)"
            )
        return None

    @classmethod
    def of(cls, t: Tensor) -> ShardLayout:
        """The layout of ``t``: a DTensor's dim-0 sharding on this rank, or a single shard for a plain tensor.

        Raises:
            NotImplementedError: a DTensor with placements other than Shard(0) / Replicate (see the module doc).
        """
        if not is_dtensor(t):
            return cls(torch.Size(t.shape))
        reason = cls.unsupported_reason(t)
        if reason is not None:
            raise NotImplementedError(reason)
        mesh = t.device_mesh
        shards, index = 1, 0
        for dim, pl in enumerate(t.placements):
            if _placement_kind(pl) == "shard0":
                coordinate = mesh.get_coordinate()
                if coordinate is None:
                    raise NotImplementedError("this rank is not part of the parameter's device mesh")
                shards, index = mesh.size(dim), coordinate[dim]
        layout = cls(torch.Size(t.shape), shards, index, mesh, tuple(t.placements))
        local = t.to_local()
        if tuple(local.shape) != layout.local_shape:  # e.g. a DTensor built with uneven from_local(shape=...)
            raise NotImplementedError(
                f"the local shard has shape {tuple(local.shape)}, expected {layout.local_shape} (torch.chunk "
                "sizes, as fully_shard places parameters); per-shard quantized state needs that split"
            )
        return layout

    def with_shards(self, shards: int, index: int = 0) -> ShardLayout:
        """The same tensor split ``shards`` ways (no mesh: for describing a saved layout)."""
        return ShardLayout(self.shape, shards, index)

    # -- geometry --------------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) else 1

    @property
    def chunk_rows(self) -> int:
        return -(-self.rows // self.shards)

    @property
    def capacity(self) -> int:
        """Elements of a full shard (the slot size)."""
        return self.chunk_rows * self.row_numel

    def shard_rows(self, k: int) -> int:
        return max(0, min(self.chunk_rows, self.rows - k * self.chunk_rows))

    def shard_numel(self, k: int) -> int:
        return self.shard_rows(k) * self.row_numel

    def shard_offset(self, k: int) -> int:
        """Flat index (in the global tensor) of shard ``k``'s first element."""
        return min(k * self.chunk_rows, self.rows) * self.row_numel

    @property
    def local_numel(self) -> int:
        return self.shard_numel(self.index)

    @property
    def local_offset(self) -> int:
        return self.shard_offset(self.index)

    @property
    def local_shape(self) -> tuple[int, ...]:
        if not len(self.shape):
            return ()
        return (self.shard_rows(self.index), *self.shape[1:])

    def slot_sizes(self, bits: int, block_size: int) -> tuple[int, int]:
        """(code bytes, scales) of one shard's slot."""
        return code_bytes(self.capacity, bits), num_blocks(self.capacity, block_size)

    # -- building state DTensors -----------------------------------------------------------------------------
    def state_placements(self) -> tuple:
        """Placements of 1-D state: Shard(0) where the tensor is sharded on dim 0, Replicate elsewhere."""
        from torch.distributed.tensor import Replicate, Shard

        return tuple(Shard(0) if _placement_kind(pl) == "shard0" else Replicate() for pl in self.placements)

    def wrap_slot(self, local: Tensor) -> Tensor:
        """A 1-D DTensor of ``S`` equal slots from this rank's slot ``local`` (a plain tensor for no mesh)."""
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor

        total = local.numel() * self.shards
        return DTensor.from_local(
            local, self.mesh, self.state_placements(), run_check=False, shape=(total,), stride=(1,)
        )

    def wrap_local(self, local: Tensor) -> Tensor:
        """A DTensor shaped and placed like the parameter from this rank's (parameter-shaped) local tensor."""
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local.reshape(self.local_shape),
            self.mesh,
            self.placements,
            run_check=False,
            shape=self.shape,
            stride=_contiguous_stride(self.shape),
        )


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _zero_code(qmap: str) -> int:
    return code_map(qmap).zero_code


def sharded_quantized_zeros(
    layout: ShardLayout, qmap: str, block_size: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Codes and scales of a zero moment for this rank's shard, in slots (DTensors when ``layout`` has a mesh).

    The shard's codes are those of :meth:`QuantizedState.zeros` for its ``local_numel`` elements; the rest of
    the slot is zero bytes and zero scales.
    """
    bits = code_map(qmap).bits
    slot_codes, slot_scales = layout.slot_sizes(bits, block_size)
    codes = torch.zeros(slot_codes, dtype=torch.uint8, device=device)
    scales = torch.zeros(slot_scales, dtype=torch.float32, device=device)
    n = layout.local_numel
    if n:
        q = QuantizedState.zeros((n,), qmap, block_size, device=device)
        codes[: q.codes.numel()] = q.codes
    return layout.wrap_slot(codes), layout.wrap_slot(scales)


def local_quantized(codes: Tensor, scales: Tensor, layout: ShardLayout, qmap: str, block_size: int) -> QuantizedState:
    """The :class:`QuantizedState` of this rank's shard: views into the used start of its slot (shape
    ``layout.local_shape``)."""
    bits = code_map(qmap).bits
    n = layout.local_numel
    c = codes.to_local() if is_dtensor(codes) else codes
    s = scales.to_local() if is_dtensor(scales) else scales
    return QuantizedState(
        c.reshape(-1)[: code_bytes(n, bits)], s[: num_blocks(n, block_size)], qmap, block_size, layout.local_shape
    )


def local_state(state: Mapping[str, Any], layout: ShardLayout, formats: Mapping[str, Any]) -> dict[str, Any]:
    """A per-step view of a sharded parameter's state on this rank: every DTensor entry as its local tensor,
    and each quantized moment of ``formats`` (moment name -> :class:`~lmopt.quant.moments.MomentFormat`)
    trimmed to the used start of its slot, so the plain-tensor helpers and kernels apply unchanged. Entries
    are views: in-place updates reach the state."""
    out = {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}
    for name, fmt in formats.items():
        if f"{name}_codes" in out:
            q = local_quantized(out[f"{name}_codes"], out[f"{name}_scales"], layout, fmt.qmap, fmt.blocks)
            out[f"{name}_codes"], out[f"{name}_scales"] = q.codes, q.scales
    return out


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def reshard_quantized(
    codes: Tensor,
    scales: Tensor,
    saved_shards: int,
    layout: ShardLayout,
    qmap: str,
    block_size: int,
) -> tuple[Tensor, Tensor, bool]:
    """Codes and scales for ``layout`` (this rank's slot; DTensors when it has a mesh) from a saved quantized
    moment laid out in ``saved_shards`` slots; returns ``(codes, scales, requantized)``.

    ``codes`` / ``scales`` are the saved global tensors, plain or DTensor (a DTensor is used as its local slot
    when it is already laid out and placed like ``layout`` (no communication), else gathered with
    ``full_tensor()``). An unsharded moment is ``saved_shards=1`` (8-bit codes in the parameter's shape are
    flattened). Where every block of this rank's shard is a saved block (the same number of shards, or shard
    boundaries on block boundaries) codes and scales are copied; otherwise this rank's elements are
    dequantized and requantized into the new blocks (see the module doc); ``requantized`` says which.

    Raises:
        ValueError: the saved tensors do not have the sizes that layout and block size imply.
    """
    bits = code_map(qmap).bits
    saved = layout.with_shards(saved_shards)
    saved_codes, saved_scales = saved.slot_sizes(bits, block_size)
    slot_codes, slot_scales = layout.slot_sizes(bits, block_size)
    if codes.numel() != saved_shards * saved_codes or scales.numel() != saved_shards * saved_scales:
        raise ValueError(
            f"saved quantized state of a {tuple(layout.shape)} tensor has {codes.numel()} code bytes and "
            f"{scales.numel()} scales; {saved_shards} shard(s) with block_size={block_size} and {bits}-bit codes "
            f"imply {saved_shards * saved_codes} and {saved_shards * saved_scales} (was the state saved with "
            "another block_size or precision?)"
        )
    if saved_shards == layout.shards:
        if (
            is_dtensor(codes)
            and layout.mesh is not None
            and tuple(codes.placements) == layout.state_placements()
            and codes.to_local().numel() == slot_codes
            and scales.to_local().numel() == slot_scales
        ):
            local_codes, local_scales = codes.to_local(), scales.to_local()  # shares the loaded storage
        else:
            k = layout.index
            local_codes = _full(codes).reshape(-1)[k * slot_codes : (k + 1) * slot_codes].clone()
            local_scales = _full(scales).reshape(-1)[k * slot_scales : (k + 1) * slot_scales].clone()
        return layout.wrap_slot(local_codes), layout.wrap_slot(local_scales), False
    full_codes, full_scales = _full(codes).reshape(-1), _full(scales).reshape(-1)
    start, n = layout.local_offset, layout.local_numel
    pieces = []  # (saved shard, its first element, its size, [a, b) = the overlap with this rank's elements)
    for k in range(saved_shards):
        lo, m = saved.shard_offset(k), saved.shard_numel(k)
        a, b = max(lo, start), min(lo + m, start + n)
        if a < b:
            pieces.append((k, lo, m, a, b))
    local_codes = torch.zeros(slot_codes, dtype=torch.uint8, device=full_codes.device)
    local_scales = torch.zeros(slot_scales, dtype=torch.float32, device=full_codes.device)
    per_byte = 8 // bits
    aligned = all(
        (a - start) % block_size == 0
        and (a - lo) % block_size == 0
        and ((b - a) % block_size == 0 or (b == start + n and b == lo + m))
        for _, lo, _, a, b in pieces
    )
    if aligned:  # every new block is a saved block: copy codes and scales (bit-exact)
        for k, lo, _, a, b in pieces:
            src = k * saved_codes + (a - lo) // per_byte
            length = -(-(b - a) // per_byte)
            dst = (a - start) // per_byte
            local_codes[dst : dst + length] = full_codes[src : src + length]
            src = k * saved_scales + (a - lo) // block_size
            length = num_blocks(b - a, block_size)
            dst = (a - start) // block_size
            local_scales[dst : dst + length] = full_scales[src : src + length]
        return layout.wrap_slot(local_codes), layout.wrap_slot(local_scales), False
    # requantize: dequantize the saved shards overlapping this rank's elements, quantize them into new blocks
    values = torch.zeros(n, dtype=torch.float32, device=full_codes.device)
    for k, lo, m, a, b in pieces:
        shard = dequantize_blockwise(
            full_codes[k * saved_codes : k * saved_codes + code_bytes(m, bits)],
            full_scales[k * saved_scales : k * saved_scales + num_blocks(m, block_size)],
            qmap,
            block_size,
            (m,),
        )
        values[a - start : b - start] = shard[a - lo : b - lo]
    if n:
        quantize_blockwise(
            values,
            qmap,
            block_size,
            codes=local_codes[: code_bytes(n, bits)],
            scales=local_scales[: num_blocks(n, block_size)],
        )
    return layout.wrap_slot(local_codes), layout.wrap_slot(local_scales), True


def to_layout_of(value: Tensor, param: Tensor) -> Tensor:
    """A parameter-shaped state tensor (a full-precision moment, a Kahan buffer) in the form of ``param``:
    a plain tensor becomes this rank's piece as a DTensor placed like ``param`` (no communication), a DTensor
    for a plain parameter is gathered; anything else is returned as is (``step`` scalars, matching DTensors)."""
    if is_dtensor(param) and not is_dtensor(value) and value.dim() and tuple(value.shape) == tuple(param.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    if not is_dtensor(param) and is_dtensor(value):
        return value.full_tensor().to(param.device)
    return value
