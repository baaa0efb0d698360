"""Distributed Muon: each FSDP2-sharded matrix orthogonalised whole, on one owner rank.

Under FSDP2 a Muon matrix is a ``Shard(0)`` DTensor: every rank holds a block of rows. Running Newton-Schulz on
the DTensor itself works (DTensor inserts collectives into every matmul of every iteration: ``distributed=
"dtensor"``), but it moves the matrix, or its Gram matrix, several times per iteration and every rank does every
matrix's work. The owner-rank path (``distributed="owner"``, the default; as Moonlight's distributed Muon and
microsoft/dion do) moves each matrix twice per step:

1. owners: matrices are sorted by Newton-Schulz cost (``rows * cols * min(rows, cols)``), largest first, and
   each goes to the least loaded rank (ties: the lowest rank), the same on every rank;
2. gather: every rank sends its rows of the momentum-updated matrix (in the Newton-Schulz dtype; NorMuon's
   per-row second moment rides along in the same message) to the matrix's owner, all asynchronously;
3. the owner runs Newton-Schulz (or Polar Express) and NorMuon's normalisation on the full matrix, exactly
   the single-process computation, and scatters the rows back asynchronously, so each rank computes its
   matrices while the others' messages travel;
4. each rank applies the cautious mask (its kept fraction summed over ranks in one all-reduce for all
   matrices), weight decay and the update to its own rows.

3-D expert weights orthogonalised per matrix and sharded over experts need no communication: each rank
orthogonalises its own experts. The result equals the unsharded run (full-matrix Newton-Schulz, never
per-shard). :data:`COMM_BYTES` counts the bytes this rank sends (``benchmarks/muon_distributed.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .base import is_dtensor

__all__ = [
    "COMM_BYTES",
    "assign_owners",
    "global_cautious_fractions",
    "orthogonalize_on_owners",
    "owner_eligible",
    "sharded_zeros_like_rows",
]

#: bytes this process has sent in the owner-rank path (gathers, scatters, the cautious all-reduce), by kind
COMM_BYTES: dict[str, int] = {"gather": 0, "scatter": 0, "all_reduce": 0}


def _is_shard0(placements: Any) -> bool:
    from torch.distributed.tensor import Shard

    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0


def owner_eligible(param: Tensor, buf: Tensor, second: Tensor | None) -> bool:
    """A DTensor on a 1-D mesh, ``Shard(0)``, with its state sharded the same way (FSDP2's layout)."""
    if not (is_dtensor(param) and dist.is_available() and dist.is_initialized()):
        return False
    if param.device_mesh.ndim != 1 or not _is_shard0(param.placements):
        return False
    if not is_dtensor(buf) or not _is_shard0(buf.placements):
        return False
    return second is None or (is_dtensor(second) and _is_shard0(second.placements))


def sharded_zeros_like_rows(param: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros of global ``shape`` (per-row statistics of ``param``) as a DTensor laid out like ``param``: its
    ``Shard(0)`` rows split as the parameter's rows are; other shardings replicate it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = param.device_mesh
    placements = tuple(p if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in param.placements)
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = torch.zeros(local_shape, dtype=dtype, device=param.to_local().device)
    stride = tuple(math.prod(shape[k + 1 :]) for k in range(len(shape)))
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def assign_owners(costs: list[float], world_size: int) -> tuple[list[int], list[int]]:
    """``(order, owner)``: indices largest cost first (stable), and each index's rank (least loaded first)."""
    order = sorted(range(len(costs)), key=lambda k: -costs[k])
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for k in order:
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[k] = r
        load[r] += costs[k]
    return order, owner


def _local_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of this rank's rows under ``Shard(0)`` (torch.chunk's split, as DTensor)."""
    chunk = -(-rows // world_size)
    start = min(rank * chunk, rows)
    return start, min(chunk, rows - start)


def orthogonalize_on_owners(
    params: list[Tensor], updates: list[Tensor], seconds: list[Tensor] | None, hp: Any, keys: list[int]
) -> dict[int, Tensor]:
    """The orthogonalised (NorMuon-normalised) update of every ``Shard(0)`` DTensor parameter, as plain tensors
    of each rank's local rows, keyed by ``keys``; NorMuon's second moments (``seconds``) are updated in place."""
    from .muon import _resolve_ns_dtype, matrix_shape, orthogonalize

    out: dict[int, Tensor] = {}
    matrices: dict[Any, list[int]] = {}
    for j, p in enumerate(params):
        shape = matrix_shape(p.shape, hp.matrix_3d)
        dtype = _resolve_ns_dtype(hp.ns_dtype, p.device)
        if len(shape) == 3:  # experts sharded over dim 0: each rank orthogonalises its own, no communication
            local = updates[j].to_local().reshape(-1, *shape[1:])
            v = seconds[j].to_local() if seconds is not None else None
            out[keys[j]] = orthogonalize(local, v, hp, dtype) if local.numel() else local.to(dtype)
            continue
        matrices.setdefault(id(p.device_mesh), []).append(j)
    for group_idx in matrices.values():
        out.update(_gather_orthogonalize_scatter(params, updates, seconds, hp, keys, group_idx))
    return out


def _gather_orthogonalize_scatter(params, updates, seconds, hp, keys, idx: list[int]) -> dict[int, Tensor]:
    from .muon import _resolve_ns_dtype, matrix_shape, orthogonalize

    mesh = params[idx[0]].device_mesh
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shapes = [matrix_shape(params[j].shape, hp.matrix_3d) for j in idx]
    order, owner = assign_owners([r * c * min(r, c) for r, c in shapes], world)
    plans = []
    for k in order:
        j = idx[k]
        rows, cols = shapes[k]
        dtype = _resolve_ns_dtype(hp.ns_dtype, params[j].device)
        v = seconds[j].to_local() if seconds is not None else None
        pack = dtype if v is None else torch.promote_types(dtype, v.dtype)
        width = cols + (0 if v is None else 1)
        chunk = -(-rows // world)
        _, count = _local_rows(rows, world, rank)
        device = updates[j].to_local().device
        send = torch.zeros(chunk, width, dtype=pack, device=device)
        send[:count, :cols] = updates[j].to_local().reshape(count, cols)
        if v is not None:
            send[:count, cols:] = v.reshape(count, 1)
        dst = dist.get_global_rank(group, owner[k])
        pieces = [torch.empty_like(send) for _ in range(world)] if rank == owner[k] else None
        work = dist.gather(send, pieces, dst=dst, group=group, async_op=True)
        if rank != owner[k]:
            COMM_BYTES["gather"] += send.numel() * send.element_size()
        plans.append((k, j, rows, cols, dtype, v, pack, width, chunk, count, dst, pieces, work, send))
    pending = []
    for k, j, rows, cols, dtype, v, pack, width, chunk, count, dst, pieces, work, send in plans:
        recv = torch.empty(chunk, width, dtype=pack, device=send.device)
        if rank == owner[k]:
            work.wait()
            full = torch.cat(pieces)[:rows]
            second = full[:, cols:].to(v.dtype) if v is not None else None
            ortho = orthogonalize(full[:, :cols], second, hp, dtype)
            packed = torch.zeros(chunk * world, width, dtype=pack, device=send.device)
            packed[:rows, :cols] = ortho
            if second is not None:
                packed[:rows, cols:] = second
            outgoing = list(packed.split(chunk))
            COMM_BYTES["scatter"] += (world - 1) * chunk * width * packed.element_size()
            pending.append(
                (
                    j,
                    cols,
                    dtype,
                    v,
                    count,
                    recv,
                    dist.scatter(recv, outgoing, src=dst, group=group, async_op=True),
                    work,
                )
            )
        else:
            pending.append(
                (j, cols, dtype, v, count, recv, dist.scatter(recv, None, src=dst, group=group, async_op=True), work)
            )
    out: dict[int, Tensor] = {}
    for j, cols, _dtype, v, count, recv, scatter_work, gather_work in pending:
        scatter_work.wait()
        gather_work.wait()
        if v is not None:
            v.copy_(recv[:count, cols:].reshape(v.shape))
        out[keys[j]] = recv[:count, :cols]  # the Newton-Schulz dtype (NorMuon: its statistics dtype)
    return out


def global_cautious_fractions(
    params: list[Tensor], grads: list[Tensor], orthos: dict[int, Tensor], local: set[int]
) -> dict[int, Tensor]:
    """The cautious mask's kept fraction ``max(mean(1[O * G > 0]), 1e-3)`` of each sharded parameter in
    ``local`` (``orthos``: its local rows), the counts summed over ranks in one all-reduce per mesh."""
    from ._cautious import CAUTIOUS_MIN_FRACTION

    out: dict[int, Tensor] = {}
    by_mesh: dict[int, list[int]] = {}
    for i in sorted(local):
        by_mesh.setdefault(id(params[i].device_mesh), []).append(i)
    for idx in by_mesh.values():
        group = params[idx[0]].device_mesh.get_group()
        counts = []
        for i in idx:
            g = grads[i].to_local()
            o = orthos[i].reshape(g.shape)
            counts.append((o * g > 0).sum(dtype=torch.float64))
        total = torch.stack(counts)
        dist.all_reduce(total, group=group)
        COMM_BYTES["all_reduce"] += total.numel() * total.element_size()
        for i, count in zip(idx, total, strict=True):
            fraction = (count / params[i].numel()).to(orthos[i].dtype)
            out[i] = fraction.clamp(min=CAUTIOUS_MIN_FRACTION)
    return out
