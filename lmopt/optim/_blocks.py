"""Cache blocking for elementwise optimizers on CPU.

An elementwise update written as a chain of torch ops reads and writes every tensor once per op. Applying the
same chain to blocks of a few hundred thousand elements keeps the block's tensors in cache between the ops, so
memory sees about one read of each input and one write of each output per step. :func:`split_blocks` cuts
aligned
lists of tensors into aligned lists of flat views; a per-tensor kernel then runs on the views unchanged.
"""

from __future__ import annotations

from torch import Tensor

from .base import is_dtensor

__all__ = ["BLOCK_ELEMENTS", "blocked_applies", "split_blocks"]

#: elements per block: ~5 fp32 tensors of 1 MB each fit the L2/L3 caches of current server CPUs
BLOCK_ELEMENTS = 1 << 18


def blocked_applies(tensors: list[Tensor]) -> bool:
    """Flat views need plain contiguous CPU tensors (on GPUs the many small launches would dominate)."""
    return all(t.device.type == "cpu" and not is_dtensor(t) and t.is_contiguous() for t in tensors)


def split_blocks(lists: list[list[Tensor]], block: int | None = None) -> tuple[list[list[Tensor]], list[int]]:
    """Aligned lists of tensors -> aligned lists of flat block views, and each block's source index.

    Every list must hold tensors of the same numel at each index; written tensors must be contiguous (their
    blocks are views). A non-contiguous read-only tensor (a gradient) is flattened by a copy.
    """
    block = BLOCK_ELEMENTS if block is None else block
    out: list[list[Tensor]] = [[] for _ in lists]
    source: list[int] = []
    for i in range(len(lists[0])):
        n = lists[0][i].numel()
        flats = [lst[i].reshape(-1) for lst in lists]
        for start in range(0, n, block):
            end = min(n, start + block)
            for dst, flat in zip(out, flats, strict=False):
                dst.append(flat[start:end])
            source.append(i)
    return out, source
