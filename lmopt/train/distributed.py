"""The few collectives lmopt's training loop needs under torchrun (FSDP2 or DDP), and ZeRO-1 for any optimizer.

Every rank must take the same decision at the same step (skip, stop, raise, end of data, a callback's stop), or
the next collective hangs. The loop therefore agrees on each decision with one small all-reduce before acting on
it, and reduces what it reports (the loss, token counts, monitor statistics) so that every rank sees the same
numbers; only rank 0 logs them.

* :func:`is_distributed`: torch.distributed is initialised with more than one process;
* :func:`is_main_process`: rank 0 (or a single process), the one that logs;
* :func:`all_reduce_sum`: one fp64 all-reduce of a few numbers;
* :func:`agree`: True on every rank when any rank says True;
* :func:`local_part`: a tensor's local data and how many ranks hold a copy of it (a sharded sum divided by it
  and all-reduced counts each element once: FSDP2's ``Shard`` placements once, DDP's replicas once);
* :func:`zero_optimizer`: a registry optimizer inside ``torch.distributed.optim.ZeroRedundancyOptimizer``
  (optimizer state partitioned across DDP ranks), or a clear error naming why that optimizer cannot be.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ZERO_UNSUPPORTED",
    "agree",
    "all_reduce_sum",
    "is_distributed",
    "is_main_process",
    "local_part",
    "zero_optimizer",
]


def is_distributed() -> bool:
    """torch.distributed is available, initialised, and the default group has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0 of the default group, or a single process: the one that logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _collective_device() -> torch.device:
    # gloo reduces CPU tensors; nccl needs this rank's GPU
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float | Tensor]) -> list[float]:
    """Sum ``values`` over all ranks in one fp64 all-reduce (a single process returns them unchanged)."""
    if not is_distributed():
        return [float(v) for v in values]
    device = _collective_device()
    buffer = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


def agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce; a single process: ``flag``)."""
    if not is_distributed():
        return bool(flag)
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def local_part(tensor: Tensor) -> tuple[Tensor, int]:
    """``(local data, copies)``: a DTensor's local shard and the number of ranks holding each of its elements
    (the product of its mesh's non-``Shard`` dimensions); a plain tensor is taken to be replicated on every rank
    (DDP), so ``copies`` is the world size. Summing ``local.sum() / copies`` over all ranks counts every element
    once."""
    world = dist.get_world_size() if is_distributed() else 1
    to_local = getattr(tensor, "to_local", None)
    if to_local is None:
        return tensor, world
    mesh = tensor.device_mesh
    copies = world // max(1, mesh.size())  # ranks outside the mesh's span (none for the usual full mesh)
    for dim, placement in enumerate(tensor.placements):
        if not placement.is_shard():
            copies *= mesh.size(dim)
    return to_local(), max(1, copies)


#: why an optimizer cannot run inside ZeroRedundancyOptimizer, by the property that rules it out
ZERO_UNSUPPORTED = {
    "accepts_model": (
        "it routes parameters by the model's structure (heads, roles), which a rank's partition of whole "
        "parameters does not carry; shard it with FSDP2 (fully_shard) instead"
    ),
    "per_parameter": (
        "its state or update is not per parameter (a wrapper, or one step across all parameters), so a rank "
        "holding only part of the parameters cannot run it; shard it with FSDP2 (fully_shard) instead"
    ),
    "closure": (
        "its step needs a closure or a second backward (Hessian estimate), which ZeroRedundancyOptimizer does not "
        "forward to every rank; shard it with FSDP2 (fully_shard) instead"
    ),
}

#: families whose step needs more than the gradient (Sophia's Hessian estimate through update_hessian)
_CLOSURE_FAMILIES = frozenset({"second_order"})


def zero_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | nn.Module,
    *,
    process_group: Any = None,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """A registry optimizer with its state partitioned across DDP ranks (ZeRO-1): ``ZeroRedundancyOptimizer``.

    Each rank keeps the state of a partition of the (whole) parameters, steps them, and broadcasts them to the
    other ranks after the step, so the optimizer state per rank falls by the world size. Use it with a
    ``DistributedDataParallel`` model; the result equals the plain DDP run (tests/test_zero.py).

    Optimizers that need the model's structure (Adam-mini's heads, Muon's routing), whose state is not per
    parameter (Lookahead and Schedule-Free wrappers) or whose step needs a closure (Sophia) are refused with a
    ``ValueError`` that names why (:data:`ZERO_UNSUPPORTED`); FSDP2 (``fully_shard``) shards them instead.

    Args:
        name: a registry name or alias (``lmopt list``).
        params: the parameters (or a module, whose parameters are taken). Parameter groups are passed on.
        process_group: the group the state is partitioned over (default: the default group).
        **hyperparameters: as for :func:`lmopt.create_optimizer`.

    Example:
        >>> model = DistributedDataParallel(model)
        >>> optimizer = lmopt.train.zero_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from ..registry import create_optimizer, resolve_name

    spec, alias_defaults = resolve_name(name)
    if spec.accepts_model:
        reason = "accepts_model"
    elif not spec.per_parameter:
        reason = "per_parameter"
    elif spec.family in _CLOSURE_FAMILIES:
        reason = "closure"
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"{name!r} cannot run inside ZeroRedundancyOptimizer: {ZERO_UNSUPPORTED[reason]}")
    if "lookahead" in hyperparameters:
        raise ValueError(f"lookahead cannot run inside ZeroRedundancyOptimizer: {ZERO_UNSUPPORTED['per_parameter']}")
    if isinstance(params, nn.Module):
        from ..param_groups import param_groups

        # as create_optimizer does with a model: no weight decay for biases, norms and embeddings
        decay = hyperparameters.get("weight_decay", spec.hyperparameters().get("weight_decay", 0.0))
        params = param_groups(params, weight_decay=decay)
    params = list(params)
    if not params:
        raise ValueError("zero_optimizer needs at least one parameter")
    return ZeroRedundancyOptimizer(
        params,
        optimizer_class=functools.partial(create_optimizer, name),
        process_group=process_group,
        **hyperparameters,
    )
