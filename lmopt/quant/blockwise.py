"""Blockwise quantization with a per-block absmax scale (Dettmers et al. 2022), and the quantized-state view.

A tensor of ``n`` elements is flattened and cut into blocks of ``block_size`` consecutive elements (the last block
may be shorter). Each block stores its absmax ``s`` (fp32) and, per element, the code of ``x / s`` in a
:class:`~lmopt.quant.maps.CodeMap` (one byte per element for 8-bit maps; two elements per byte for 4-bit maps,
the even element in the low nibble). Dequantization is ``value[code] * s``. Quantizing a block whose absmax is
``s`` moves each element by at most half the gap between the two map values around ``x / s``, times ``s``.

Storage is two plain tensors, kept as separate optimizer-state entries (``<key>_codes`` uint8 and
``<key>_scales`` fp32), so a state dict holds only ordinary tensors: it round-trips through ``torch.save`` and
``torch.load(weights_only=True)`` unchanged and without registering any class. :class:`QuantizedState` is a
light view over such a pair (no copy) with ``dequantize`` / ``copy_`` / ``narrow`` / ``view``.

Sharding (FSDP2): blocks are counted from the start of the tensor being quantized, so quantizing each local
shard on its own gives blocks that never straddle a shard boundary; a block-aligned ``narrow`` of a
:class:`QuantizedState` is again a valid quantized state that shares storage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .maps import CodeMap, code_map

__all__ = [
    "QuantizedState",
    "dequantize_blockwise",
    "num_blocks",
    "pack_nibbles",
    "quantize_blockwise",
    "unpack_nibbles",
]


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks (scales) for ``numel`` elements."""
    return -(-numel // block_size)


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of codes for ``numel`` elements at ``bits`` per element."""
    return numel if bits == 8 else (numel + 1) // 2


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (any integer dtype, values < 16) two per byte; element ``2i`` in the low nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``numel`` codes as uint8."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


def _check_block_size(block_size: int, bits: int) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not 16 <= block_size <= 4096
        or (block_size % 16)
    ):
        raise ValueError(f"block_size must be a multiple of 16 in [16, 4096], got {block_size!r}")


def _block_absmax(flat: Tensor, block_size: int) -> Tensor:
    n = flat.numel()
    full = (n // block_size) * block_size
    parts = []
    if full:
        parts.append(flat[:full].view(-1, block_size).abs().amax(dim=1))
    if n > full:
        parts.append(flat[full:].abs().amax().reshape(1))
    return torch.cat(parts) if parts else flat.new_zeros(0)


def _expand(scales: Tensor, n: int, block_size: int) -> Tensor:
    return scales.repeat_interleave(block_size)[:n]


def quantize_blockwise(
    x: Tensor,
    qmap: CodeMap | str,
    block_size: int,
    *,
    codes: Tensor | None = None,
    scales: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (any float dtype and shape) blockwise; returns ``(codes, scales)``.

    ``codes`` is uint8 with ``n`` elements (8-bit maps) or ``ceil(n / 2)`` (4-bit maps), flat; ``scales`` is fp32
    with ``ceil(n / block_size)`` elements. When ``codes`` / ``scales`` are given they are written in place.

    Raises:
        ValueError: ``x`` holds inf or NaN (a block's scale would be undefined), or a bad ``block_size``. While
            ``torch.compile`` traces a step nothing is read on the host: a non-finite block gets a NaN scale
            instead (it reads back NaN, as the eager optimizers store an overflowed moment).
    """
    cm = code_map(qmap) if isinstance(qmap, str) else qmap
    _check_block_size(block_size, cm.bits)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    chunk = _chunk(block_size)
    traced = torch.compiler.is_compiling()
    if not traced:  # checked before anything is written (a traced step reads nothing on the host)
        for start in range(0, n, chunk):
            if not bool(torch.isfinite(flat[start : start + chunk]).all()):
                raise ValueError("quantize_blockwise: input holds inf or NaN; blockwise scales need finite values")
    code_count = n if cm.bits == 8 else (n + 1) // 2
    out_codes = torch.empty(code_count, dtype=torch.uint8, device=flat.device) if codes is None else codes.view(-1)
    out_scales = (
        torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=flat.device) if scales is None else scales
    )
    # chunk by chunk (whole blocks), so the temporaries stay a few MiB whatever the tensor's size
    for start in range(0, n, chunk):
        piece = flat[start : start + chunk].to(torch.float32)
        m = piece.numel()
        if traced:
            # one padded (blocks, block_size) view (zeros leave every absmax as it is): Inductor (torch 2.13, CPU)
            # miscompiles the tail block of the cat / repeat_interleave form below, giving it a zero scale
            blocks = torch.nn.functional.pad(piece, (0, num_blocks(m, block_size) * block_size - m))
            blocks = blocks.view(-1, block_size)
            absmax = blocks.abs().amax(dim=1)
            # no host check in a traced step: a non-finite block gets a NaN scale (it reads back NaN)
            absmax = torch.where(torch.isfinite(absmax), absmax, torch.full_like(absmax, float("nan")))
            inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
            normalized = (blocks * inverse[:, None]).view(-1)[:m].clamp_(-1.0, 1.0)
        else:
            absmax = _block_absmax(piece, block_size)
            inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
            normalized = (piece * _expand(inverse, m, block_size)).clamp_(-1.0, 1.0)
        idx = cm.encode(normalized)
        first_block = start // block_size
        out_scales[first_block : first_block + absmax.numel()].copy_(absmax)
        if cm.bits == 8:
            out_codes[start : start + m].copy_(idx)
        else:  # chunks start at even elements (blocks are multiples of 16)
            out_codes[start // 2 : start // 2 + (m + 1) // 2].copy_(pack_nibbles(idx))
    return (out_codes if codes is None else codes), out_scales


def _chunk(block_size: int) -> int:
    """Elements per chunk of the reference quantizer: whole blocks, about 2**20 elements."""
    return max(1, (1 << 20) // block_size) * block_size


def dequantize_blockwise(
    codes: Tensor,
    scales: Tensor,
    qmap: CodeMap | str,
    block_size: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Values of a blockwise-quantized tensor, in ``shape`` and ``dtype`` (a new tensor)."""
    cm = code_map(qmap) if isinstance(qmap, str) else qmap
    n = math.prod(shape)
    flat_codes = codes.reshape(-1)
    values = cm.on(codes.device)[0]
    out = torch.empty(n, dtype=dtype, device=codes.device)
    chunk = _chunk(block_size)
    traced = torch.compiler.is_compiling()
    for start in range(0, n, chunk):  # chunked like quantize_blockwise: small temporaries
        m = min(chunk, n - start)
        if cm.bits == 8:
            idx = flat_codes[start : start + m]
        else:
            idx = unpack_nibbles(flat_codes[start // 2 : start // 2 + (m + 1) // 2], m)
        first_block = start // block_size
        count = num_blocks(m, block_size)
        block_scales = scales[first_block : first_block + count]
        decoded = values[idx.to(torch.int64)]
        if traced:  # a padded (blocks, block_size) view: see quantize_blockwise (Inductor and repeat_interleave)
            blocks = torch.nn.functional.pad(decoded, (0, count * block_size - m)).view(count, block_size)
            out[start : start + m].copy_((blocks * block_scales[:, None]).view(-1)[:m])
        else:
            out[start : start + m].copy_(decoded * _expand(block_scales, m, block_size))
    return out.reshape(shape)


class QuantizedState:
    """A view over one blockwise-quantized tensor: codes, scales, code map, block size and logical shape.

    The codes and scales are ordinary tensors (usually optimizer-state entries); this object only interprets
    them and never copies. It is what :mod:`lmopt.quant.moments` hands out for a quantized moment.

    Example:
        >>> q = QuantizedState.zeros((1024, 64), "de8s", block_size=256)
        >>> q.copy_(torch.randn(1024, 64))
        >>> (q.dequantize() - x).abs().max()      # <= half a code gap times each block's absmax
    """

    __slots__ = ("codes", "scales", "qmap", "block_size", "shape")

    def __init__(
        self, codes: Tensor, scales: Tensor, qmap: CodeMap | str, block_size: int, shape: tuple[int, ...] | torch.Size
    ) -> None:
        self.qmap = code_map(qmap) if isinstance(qmap, str) else qmap
        _check_block_size(block_size, self.qmap.bits)
        self.shape = torch.Size(shape)
        n = self.shape.numel()
        if codes.dtype != torch.uint8 or codes.numel() != code_bytes(n, self.qmap.bits):
            raise ValueError(
                f"codes must be uint8 with {code_bytes(n, self.qmap.bits)} elements for shape "
                f"{tuple(self.shape)}, got {codes.dtype} with {codes.numel()}"
            )
        if scales.dtype != torch.float32 or scales.numel() != num_blocks(n, block_size):
            raise ValueError(
                f"scales must be fp32 with {num_blocks(n, block_size)} elements, got {scales.dtype} "
                f"with {scales.numel()}"
            )
        self.codes, self.scales, self.block_size = codes, scales, block_size

    @classmethod
    def zeros(
        cls,
        shape: tuple[int, ...] | torch.Size,
        qmap: CodeMap | str,
        block_size: int,
        device: torch.device | str | None = None,
    ) -> QuantizedState:
        """A quantized tensor of zeros (codes of 0.0; scales 0)."""
        cm = code_map(qmap) if isinstance(qmap, str) else qmap
        n = torch.Size(shape).numel()
        zero_code = cm.zero_code
        byte = zero_code if cm.bits == 8 else zero_code | (zero_code << 4)
        codes = torch.full((code_bytes(n, cm.bits),), byte, dtype=torch.uint8, device=device)
        if cm.bits == 4 and n % 2:
            codes[-1] = zero_code  # the unused high nibble stays 0, as pack_nibbles writes it
        return cls(codes, torch.zeros(num_blocks(n, block_size), device=device), cm, block_size, shape)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_blockwise(self.codes, self.scales, self.qmap, self.block_size, self.shape, dtype)

    def copy_(self, x: Tensor) -> QuantizedState:
        """Quantize ``x`` (same number of elements) into this state, in place."""
        if x.numel() != self.numel:
            raise ValueError(f"copy_: expected {self.numel} elements, got {x.numel()}")
        quantize_blockwise(x, self.qmap, self.block_size, codes=self.codes, scales=self.scales)
        return self

    def view(self, *shape: int) -> QuantizedState:
        """The same storage with another logical shape (same number of elements)."""
        size = torch.Size(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        if size.numel() != self.numel:
            raise ValueError(f"view: shape {tuple(size)} has {size.numel()} elements, expected {self.numel}")
        return QuantizedState(self.codes, self.scales, self.qmap, self.block_size, size)

    def narrow(self, start: int, length: int) -> QuantizedState:
        """Elements ``[start, start + length)`` of the flattened tensor, sharing storage.

        ``start`` must be a multiple of ``block_size`` and the slice must end on a block boundary or at the
        end (blocks are never split: that is what makes per-shard quantization exact).
        """
        end = start + length
        b = self.block_size
        if start < 0 or length < 0 or end > self.numel or start % b or (end % b and end != self.numel):
            raise ValueError(f"narrow({start}, {length}) must cover whole blocks of {b} within {self.numel}")
        per_byte = 1 if self.qmap.bits == 8 else 2
        codes = self.codes[start // per_byte : -(-end // per_byte)]
        scales = self.scales[start // b : num_blocks(end, b)]
        return QuantizedState(codes, scales, self.qmap, b, (length,))

    def __repr__(self) -> str:
        return (
            f"QuantizedState(shape={tuple(self.shape)}, map={self.qmap.name}, bits={self.qmap.bits}, "
            f"block_size={self.block_size}, bytes={self.nbytes})"
        )
