"""Cache-blocked passes for the ``fused`` CPU implementations of lmopt's elementwise optimizers.

An optimizer update written as a sequence of whole-tensor ops reads and writes every operand once per op, so a
five-op update moves memory five times. The ``fused`` paths instead walk each tensor in blocks of
:data:`BLOCK_ELEMENTS` elements and run the whole sequence on one block before moving to the next: the block's
operands stay in the CPU cache between ops, and main memory sees about one read of every input and one write
of every output -- the single pass a fused kernel makes, written with ordinary torch ops (so it runs wherever
torch runs, with torch's own vectorised, multi-threaded loops).

The block size trades per-op Python overhead (more blocks) against cache fit (bigger blocks): 2^17 fp32
elements is 512 KiB per operand, four or five operands stay within a few MiB of last-level cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .base import is_dtensor

#: elements per block of a cache-blocked pass
BLOCK_ELEMENTS = 1 << 17


def blockable(*tensors: Tensor) -> bool:
    """True when the tensors can be walked as flat views: plain (non-DTensor), contiguous, same device."""
    first = tensors[0]
    return all(
        not is_dtensor(t) and t.is_contiguous() and t.device == first.device and not t.is_sparse for t in tensors
    )


def flat_blocks(numel: int, block: int = BLOCK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks covering ``numel`` elements."""
    for start in range(0, numel, block):
        yield start, min(numel, start + block)


def row_blocks(rows: int, cols: int, block: int = BLOCK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of a ``rows x cols`` matrix holding about ``block`` elements each."""
    step = max(1, block // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_math(t: Tensor) -> Tensor:
    """``t`` itself when already in its math dtype, else an upcast copy."""
    dtype = math_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)
