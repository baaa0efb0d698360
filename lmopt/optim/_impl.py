"""Small pieces the optimizers' private implementations share (per-tensor upcasts, EMAs, running an
implementation on a subset of the tensors, the flat cache-blocked walk).

Each family passes its scalar hyperparameters to its implementations as one ``NamedTuple`` (``AdamHyper``,
``LionHyper``, ...), built once by the public functional entry point; the helpers here take it through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _dispatch
from ._dispatch import flat_blocks

__all__ = [
    "add_scaled_",
    "copy_back",
    "ema_",
    "foreach_add_scaled_",
    "foreach_copy_back",
    "reduce_over_mesh",
    "run_flat_blocks",
    "run_on",
    "scalar_min",
    "scalar_sqrt",
    "traced_lr",
    "traced_step",
    "upcast",
]


def upcast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` itself when it is already ``dtype``, else a copy in ``dtype`` (to be copied back when done)."""
    return t if t.dtype == dtype else t.to(dtype)


def copy_back(low: Tensor, exact: Tensor) -> None:
    """Store the math-dtype ``exact`` into ``low`` when ``exact`` is an upcast copy of it."""
    if exact is not low:
        low.copy_(exact)


def ema_(stat: Tensor, value: Tensor, beta: float | Tensor) -> Tensor:
    """``stat <- beta * stat + (1 - beta) * value``, in place (``beta`` a float, or a 0-d tensor in a traced
    step)."""
    if isinstance(beta, Tensor):
        return stat.mul_(beta).add_(value * (1 - beta))
    return stat.mul_(beta).add_(value, alpha=1 - beta)


# ---------------------------------------------------------------------------------------------------------------
# scalars of a step: Python floats eagerly, 0-d tensors while torch.compile traces (docs/compile.md)
def traced_step(step: Tensor) -> float | Tensor:
    """A step counter as the scalar math takes it: a float eagerly (one host read), the 0-d tensor itself while
    ``torch.compile`` traces the step (reading it would break the graph; as tensor ops the bias corrections stay
    in the graph, torch's capturable formulation)."""
    return step if torch.compiler.is_compiling() else float(step)


def traced_lr(lr: Any) -> float | Tensor:
    """A group's lr: a float, except a tensor lr while torch.compile traces (reading it is a graph break; a tensor
    lr is what keeps Inductor from recompiling when a scheduler changes it, as in torch.optim)."""
    return lr if isinstance(lr, Tensor) and torch.compiler.is_compiling() else float(lr)


def add_scaled_(t: Tensor, u: Tensor, scale: float | Tensor) -> Tensor:
    """``t += scale * u`` in place: ``alpha=scale`` for a float, a product for a 0-d tensor (a traced step's lr;
    ``alpha`` takes Python numbers only)."""
    if isinstance(scale, Tensor):
        return t.add_(u * scale)
    return t.add_(u, alpha=scale)


def foreach_add_scaled_(ts: list[Tensor], us: list[Tensor], scale: float | Tensor) -> None:
    """:func:`add_scaled_` over lists (one foreach op)."""
    if isinstance(scale, Tensor):
        torch._foreach_add_(ts, torch._foreach_mul(us, scale))
    else:
        torch._foreach_add_(ts, us, alpha=scale)


def scalar_sqrt(x: float | Tensor) -> float | Tensor:
    """``sqrt`` of a step scalar (``math.sqrt`` for a float, bit-identical to the eager path)."""
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def scalar_min(a: float | Tensor, b: float | Tensor) -> float | Tensor:
    """``min`` of two step scalars, either of which may be a 0-d tensor in a traced step."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def run_on(fn: Callable[..., None], idx: list[int], lists: Sequence[list], hp: tuple) -> None:
    """``fn`` (an implementation) on the entries ``idx`` of each of ``lists``, with hyperparameters ``hp``."""
    if idx:
        fn(*[[xs[i] for i in idx] for xs in lists], hp)


def run_flat_blocks(tensors: Sequence[Tensor], written: int, block: Callable[..., None]) -> None:
    """``block(*chunks, buf)`` on consecutive cache-sized chunks of same-shaped contiguous ``tensors`` (``buf``:
    scratch of a chunk's size). Low-precision tensors (not fp32/fp64) are upcast to fp32 chunk by chunk and the
    first ``written`` of them stored back after each call."""
    flat = [t.view(-1) for t in tensors]
    first = tensors[0]
    numel = flat[0].numel()
    low = first.dtype not in (torch.float32, torch.float64)
    buf = torch.empty(
        min(numel, _dispatch.BLOCK_ELEMENTS), dtype=torch.float32 if low else first.dtype, device=first.device
    )
    for start, stop in flat_blocks(numel):
        chunks = [f[start:stop] for f in flat]
        if low:  # upcast the chunk (in cache), write it back after the math
            exact = [c.float() for c in chunks]
            block(*exact, buf[: stop - start])
            for c, e in zip(chunks[:written], exact[:written], strict=True):
                c.copy_(e)
        else:
            block(*chunks, buf[: stop - start])


def foreach_copy_back(*pairs: tuple[list[Tensor], list[Tensor]]) -> None:
    """For each ``(dst, src)`` pair of lists: store the upcast copies of ``src`` into ``dst`` (one foreach
    copy; entries that are the tensor itself are skipped)."""
    for dst, src in pairs:
        todo = [(d, s) for d, s in zip(dst, src, strict=False) if d is not s]
        if todo:
            torch._foreach_copy_([d for d, _ in todo], [s for _, s in todo])


def reduce_over_mesh(local: Tensor, mesh: Any, placements: tuple[Any, ...]) -> Tensor:
    """The sum over the shards of a value computed from local shards of DTensors placed ``placements`` on ``mesh``
    (summed over the sharded mesh dimensions, not the replicated ones): a plain tensor, the same on every rank.
    Used for the sums an update needs over a whole sharded tensor (Prodigy's estimate, APOLLO's projections)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    partial = [Partial() if isinstance(pl, Shard) else Replicate() for pl in placements]
    if not any(isinstance(pl, Partial) for pl in partial):
        return local
    return DTensor.from_local(local, mesh, partial, run_check=False).full_tensor()
