"""One dispatch for every optimizer: :func:`resolve_implementation` and the cache-blocking helpers.

The implementation vocabulary is :data:`lmopt.spec.IMPLEMENTATIONS` (``for_loop``, ``foreach``, ``fused``,
``blocked``, ``kernel``, ``compiled``). An optimizer class lists the ones it has (``implementations``, the plain
reference first) and, where measurement says a path that applies is not the fastest, the order ``auto``
tries them in (``auto_preference``). :func:`resolve_implementation` is the one rule that turns ``"auto"`` into
a path; every step and the memory planner call it.

Cache blocking (``blocked``): an elementwise update written as a chain of torch ops reads and writes every
tensor once per op. Running the whole chain on one block of :data:`BLOCK_ELEMENTS` elements before moving to
the next keeps the block's operands in cache between the ops, so memory sees about one read of every input and
one write of every output -- the single pass a fused kernel makes, with ordinary torch ops (torch's own
vectorised, multi-threaded loops). The block size trades per-op Python overhead (more blocks) against cache fit;
it was chosen by measurement (docs/architecture.md, ``benchmarks/block_size.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..quant.sharded import is_dtensor
from ..spec import IMPLEMENTATIONS

__all__ = [
    "BLOCK_ELEMENTS",
    "as_math",
    "blockable",
    "blocked_applies",
    "flat_blocks",
    "math_dtype",
    "resolve_implementation",
    "row_blocks",
    "split_blocks",
]

#: elements per block of a cache-blocked pass (2^18 fp32 elements = 1 MiB per operand; benchmarks/results/block_size.md:
#: fastest for 4 of the 6 blocked paths, within 12% for the other two); ``LMOPT_BLOCK_ELEMENTS``
#: overrides it for measurements (benchmarks/block_size.py)
BLOCK_ELEMENTS = int(os.environ.get("LMOPT_BLOCK_ELEMENTS", 1 << 18))


#: what ``auto`` picks from while torch.compile traces a step (docs/compile.md)
_COMPILE_FRIENDLY = ("foreach", "for_loop")


def resolve_implementation(
    requested: str,
    available: Sequence[str],
    applies: Mapping[str, bool] | None = None,
    *,
    preference: Sequence[str] = IMPLEMENTATIONS,
    owner: str = "this optimizer",
) -> str:
    """The implementation a step runs.

    Args:
        requested: ``"auto"``, a name from ``available``, or ``"compiled"`` (inside the optimizer's compiled step:
            resolved as ``"auto"`` is while tracing).
        available: the implementations the optimizer has.
        applies: for the names whose applicability depends on the tensors (``fused``, ``blocked``, ``kernel``),
            whether they apply to this step; a name left out applies.
        preference: the order ``auto`` tries (default: kernel, fused, blocked, compiled, foreach, for_loop);
            while ``torch.compile`` traces the step only ``foreach`` and ``for_loop`` are tried.
        owner: named in errors.

    Returns:
        ``requested`` when it applies; for ``"auto"`` the first name of ``preference`` that is available and
        applies (the plain reference path when none does).

    Raises:
        ValueError: an explicit request that does not apply here, naming the argument and the alternatives.
    """
    applies = applies or {}
    if requested == "compiled":
        # lmopt's optimizers run a "compiled" group through torch.compile of their step (LmoptOptimizer.step): inside
        # the trace it means the paths dynamo traces into one graph, chosen as under "auto"
        if not torch.compiler.is_compiling():
            raise ValueError(
                f"implementation='compiled' for {owner} runs through the optimizer's step (which compiles it); "
                "a functional step called directly takes 'auto' or one of "
                f"{list(available)} (wrap the call in torch.compile yourself)"
            )
        requested = "auto"
    if requested != "auto":
        if requested not in available:
            raise ValueError(f"implementation must be one of {['auto', *available]} for {owner}, got {requested!r}")
        if not applies.get(requested, True):
            usable = [name for name in available if applies.get(name, True)]
            raise ValueError(
                f"implementation={requested!r} does not apply to these tensors for {owner}; use "
                f"implementation='auto' or one of {usable}"
            )
        return requested
    if torch.compiler.is_compiling():
        # under torch.compile: the paths dynamo traces into one graph (torch's fused kernels take the lr as a
        # Python scalar and break functionalization; the C kernel is a ctypes call; blocked loops unroll)
        preference = [name for name in preference if name in _COMPILE_FRIENDLY]
    for name in preference:
        if name in available and applies.get(name, True):
            return name
    return available[0]


# ---------------------------------------------------------------------------------------------------------------
# cache blocking
def blockable(*tensors: Tensor) -> bool:
    """True when the tensors can be walked as flat views: plain (non-DTensor), contiguous, same device."""
    first = tensors[0]
    return all(
        not is_dtensor(t) and t.is_contiguous() and t.device == first.device and not t.is_sparse for t in tensors
    )


def blocked_applies(tensors: Sequence[Tensor]) -> bool:
    """``blocked`` runs on plain contiguous CPU tensors (on GPUs the many small launches would dominate)."""
    return all(t.device.type == "cpu" and not is_dtensor(t) and t.is_contiguous() for t in tensors)


def flat_blocks(numel: int, block: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks covering ``numel`` elements."""
    block = BLOCK_ELEMENTS if block is None else block
    for start in range(0, numel, block):
        yield start, min(numel, start + block)


def row_blocks(rows: int, cols: int, block: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of a ``rows x cols`` matrix holding about ``block`` elements each."""
    block = BLOCK_ELEMENTS if block is None else block
    step = max(1, block // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


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
        for start, end in flat_blocks(n, block):
            for dst, flat in zip(out, flats, strict=False):
                dst.append(flat[start:end])
            source.append(i)
    return out, source


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_math(t: Tensor) -> Tensor:
    """``t`` itself when already in its math dtype, else an upcast copy."""
    dtype = math_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)
