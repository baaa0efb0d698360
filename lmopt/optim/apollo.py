"""APOLLO and APOLLO-mini: AdamW's moments on a random low-rank projection of the gradient, used only to scale
the full gradient channel by channel (or tensor-wide): AdamW-like steps at about SGD's memory.

Update rule (Zhu et al. 2024, Algorithm 1, in the form of the authors' ``apollo-torch`` package) for a 2-D weight
``W`` of shape ``(m, n)``, gradient ``G``, step ``t`` (counted from 1), projection ``P`` of rank ``r`` with
i.i.d. ``N(0, 1/r)`` entries, regenerated every ``update_proj_gap`` steps from a seed:

.. code-block:: text

    R  = G P^T        (P: r x n, R: m x r)  where m >= n ("right"; proj_type="std")
    R  = P^T G        (P: m x r, R: r x n)  where m <  n ("left")
    M  = beta1 * M + (1 - beta1) * R;   V = beta2 * V + (1 - beta2) * R^2      (exp_avg, exp_avg_sq: r-sized)
    N  = M / (sqrt(V) + eps)
    s  = ||N||_rank / (||R||_rank + 1e-8)   per channel (scale_type="channel": per row for "right", per
         column for "left"; norms over the rank dimension), or ||N|| / (||R|| + 1e-8) (scale_type="tensor")
    S  = G * s
    S  = S / (max(||S|| / (prev + 1e-8), 1.01) / 1.01);  prev = ||S||   (Fira's norm-growth limiter, from the
         second step; disable_nl=True turns it off)
    W <- W - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * sqrt(scale) * S    (scale_front=True: sqrt(scale)
         multiplies S before the limiter)
    W <- W - lr * weight_decay * W                                       (after the update, as apollo-torch)

Every other parameter gets the same AdamW (``apollo-torch``'s: bias correction in the step size, ``eps`` outside
the root, decay after the update). APOLLO-mini is rank 1, tensor-wise scaling and ``scale=128``.

Which parameters are projected: each group carries ``use_apollo``; given ``model=`` (``create_optimizer`` passes
it) the 2-D tensors whose role in :func:`lmopt.classify_parameters` is ``"matrix"`` (attention and MLP weights;
embeddings and the output head stay on AdamW, as in the authors' training scripts); given only parameters,
every 2-D tensor. Groups you pass are split in two when they mix both kinds; groups that set ``use_apollo`` are
kept as they are (``use_apollo=True`` needs 2-D tensors).

The projection: ``P`` is never stored. Its seed is (``seed``: a Python int in the state): a parameter's 1-based
position in the optimizer's parameters at first, then ``apollo-torch``'s ``next_seed`` at every regeneration;
``P`` is drawn from a CPU (or the parameter's device's) ``torch.Generator`` seeded with it, in fp32, exactly as
``apollo-torch`` draws it, so both produce the same matrices. ``cache_projection=True`` keeps ``P`` in the state
(``proj``, ``r`` times the projected dimension) instead of drawing it again each step: faster on CPUs, where the
draw costs about half the projection's matmul, at that much more memory.

Memory per projected ``(m, n)`` matrix (``m >= n``): ``2 m r`` moments + 3 scalars (``step``, ``scaled_grad``,
the seed) -- ``2 r / n`` of AdamW's ``2 m n``; rank 1 (APOLLO-mini) is ``2 m`` numbers, less than SGD with
momentum's ``m n``. ``lmopt plan`` counts it exactly (docs/optimizers-prodigy-apollo.md has the figures).

FSDP2: the projection of a sharded matrix is the full matrix's (rows sharded, ``Shard(0)``): for the "right"
projection each shard projects its own rows (``P`` is ``r x n``, whole on every rank) and keeps its rows of the
moments; for the "left" one each shard multiplies by its rows of ``P`` and the partial products are summed over
the mesh (the moments, ``r x n``, are replicated); the norms of the limiter and of tensor-wise scaling are
reduced over the mesh. Parameters sharded on another dimension are refused.

Differences from ``apollo-torch``: with ``proj_type`` "left"/"right"/"reverse_std" and channel scaling the package
takes the norms over a fixed dimension that is not the rank one (a shape error, or wrong channels); lmopt always
scales the channels of the unprojected dimension. bf16 parameters run the math in fp32 (the package: in bf16).

Reference: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025 (arXiv:2412.05270); the
``apollo-torch`` package (github.com/zhuhanqing/APOLLO); Chen et al., "Fira", arXiv:2410.01623 (the limiter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..param_groups import classify_parameters
from ..spec import Implementation, OptimizerSpec, StateTensor, Translation
from ._dispatch import blocked_applies, math_dtype, resolve_implementation, row_blocks
from ._impl import reduce_over_mesh
from .base import (
    LmoptOptimizer,
    check_choice,
    check_flag,
    check_positive,
    check_range,
    constructor_defaults,
    is_dtensor,
)

__all__ = ["APOLLO", "APOLLOMini", "apollo_state", "next_seed"]

#: apollo-torch's advance of the seed generator per regeneration
_SEED_ADVANCE = 0xF
_PROJ_TYPES = ("std", "reverse_std", "left", "right")


def next_seed(seed: int, advance: int = _SEED_ADVANCE) -> int:
    """The seed of the next projection (``apollo-torch``'s ``next_seed``): the ``advance``-th int64 drawn from a
    CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=generator)[-1])


def projection_side(shape: tuple[int, ...], proj_type: str) -> str:
    """``"right"`` (``R = G P^T``, rows kept) or ``"left"`` (``R = P^T G``, columns kept) for a matrix shape."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def projected_shape(shape: tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    """The shape of the projected gradient (and of the moments)."""
    return (shape[0], rank) if projection_side(shape, proj_type) == "right" else (rank, shape[1])


def projection_shape(shape: tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    """The shape of ``P``."""
    return (rank, shape[1]) if projection_side(shape, proj_type) == "right" else (shape[0], rank)


def draw_projection(
    shape: tuple[int, ...], rank: int, proj_type: str, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``P`` for a matrix of ``shape``: ``randn / sqrt(rank)`` drawn in fp32 from a generator on ``device``
    seeded with ``seed`` (apollo-torch's ``stable_randn``), then cast to ``dtype``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = projection_shape(shape, rank, proj_type)
    proj = torch.randn(size, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)
    return proj if dtype == torch.float32 else proj.to(dtype)


def _split_groups(params: Any, model: nn.Module | None) -> list[dict[str, Any]]:
    """The user's groups, each split into a projected part and an AdamW part (empty parts dropped)."""
    params = list(params)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    roles = {id(info.param): info.role for info in classify_parameters(model)} if model is not None else None
    out: list[dict[str, Any]] = []
    for group in groups:
        tensors = list(group["params"])
        if "use_apollo" in group:
            out.append({**group, "params": tensors})
            continue
        names = group.get("param_names")
        parts: dict[bool, dict[str, list]] = {True: {"params": [], "names": []}, False: {"params": [], "names": []}}
        for i, p in enumerate(tensors):
            use = p.ndim == 2 and (roles is None or roles.get(id(p)) == "matrix")
            parts[use]["params"].append(p)
            if names is not None:
                parts[use]["names"].append(names[i])
        for use in (True, False):
            if parts[use]["params"]:
                g = {**group, "params": parts[use]["params"], "use_apollo": use}
                if names is not None:
                    g["param_names"] = parts[use]["names"]
                out.append(g)
    return out


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def _row_offset(p: Tensor) -> int:
    """The first global row of this rank's shard of a DTensor parameter."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0])


def _check_placements(p: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise NotImplementedError(
                f"APOLLO projects DTensor matrices sharded on rows (Shard(0), FSDP2's default) or replicated; got "
                f"placements {tuple(p.placements)} for a parameter of shape {tuple(p.shape)}. Shard it on dim 0"
            )


class APOLLO(LmoptOptimizer):
    """APOLLO: AdamW-like steps from moments kept on a random rank-``rank`` projection of each matrix's gradient.

    Args:
        params: parameters or param groups; groups may set ``use_apollo`` to choose the update explicitly.
        lr: learning rate (default 1e-3; the authors pre-train with 1e-2).
        betas: Adam's ``(beta1, beta2)`` (default (0.9, 0.999)).
        eps: added to ``sqrt(V)`` (default 1e-6, apollo-torch's).
        weight_decay: decoupled, applied after the update (default 0.0).
        rank: rank of the projection (default 128, Hugging Face Trainer's; the authors suggest 256 for 1B-7B
            models, a quarter of the hidden size in general; 1 for APOLLO-mini).
        update_proj_gap: steps between new projections (default 200).
        scale: the update is multiplied by ``sqrt(scale)`` (default 1.0; 128 for APOLLO-mini).
        scale_type: ``"channel"`` (default) or ``"tensor"`` (APOLLO-mini).
        proj_type: ``"std"`` (default: project the smaller dimension), ``"reverse_std"``, ``"left"`` or
            ``"right"``.
        proj: ``"random"`` (the only projection; apollo-torch's SVD one is GaLore's).
        scale_front: apply ``sqrt(scale)`` before the norm-growth limiter (default False).
        disable_nl: turn the norm-growth limiter off (default False).
        correct_bias: Adam's bias correction in the step size (default True).
        cache_projection: keep each ``P`` in the state between regenerations instead of drawing it every step
            (default False: the seed only, the paper's memory).
        model: the model, to project only the hidden matrices (``create_optimizer`` passes it).
        implementation: ``"auto"`` (default: ``"blocked"`` for plain fp32/fp64 CPU matrices, else
            ``"for_loop"``), ``"for_loop"`` (apollo-torch's operations, the reference) or ``"blocked"`` (the
            scaled gradient is never materialised: the limiter's norm from the gradient's row / column norms, the
            update and the decay in one cache-blocked pass over rows).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: projected matrices keep ``step``, ``seed`` (int), ``exp_avg`` and ``exp_avg_sq``
    (projected shape), ``scaled_grad`` (the limiter's last norm; not with ``disable_nl``) and, with
    ``cache_projection``, ``proj``; the others ``step``, ``exp_avg`` and ``exp_avg_sq``.

    Example:
        >>> opt = lmopt.create_optimizer("apollo_adamw", model, lr=1e-2, rank=256)   # hidden matrices projected
        >>> opt = lmopt.create_optimizer("apollo_mini", model, lr=1e-2)              # rank 1, tensor-wise

    Reference: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025 (arXiv:2412.05270).
    """

    #: no implementation="compiled": its projections come from a seeded torch.Generator (docs/compile.md)
    compilable = False

    implementations = ("for_loop", "blocked")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        scale_type: str = "channel",
        proj_type: str = "std",
        proj: str = "random",
        scale_front: bool = False,
        disable_nl: bool = False,
        correct_bias: bool = True,
        cache_projection: bool = False,
        model: nn.Module | None = None,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or None, got {type(model).__name__}")
        defaults = constructor_defaults(locals())
        defaults.pop("model")
        super().__init__(_split_groups(params, model), defaults, nonfinite=nonfinite, check_finite=check_finite)

    # -- validation ----------------------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        for key in ("rank", "update_proj_gap"):
            value = group[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        check_positive("scale", group["scale"])
        check_range("scale", group["scale"], 0.0, 1e12, high_inclusive=True)
        check_choice("scale_type", group["scale_type"], ("channel", "tensor"))
        check_choice("proj_type", group["proj_type"], _PROJ_TYPES)
        check_choice("proj", group["proj"], ("random",))
        for flag in ("scale_front", "disable_nl", "correct_bias", "cache_projection"):
            check_flag(flag, group[flag])
        group.setdefault("use_apollo", False)
        check_choice("use_apollo", group["use_apollo"], (True, False))
        if group["use_apollo"]:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"use_apollo=True needs 2-D matrices, got shape {tuple(p.shape)}; put other tensors in a "
                        "group with use_apollo=False (AdamW)"
                    )
                if is_dtensor(p):
                    _check_placements(p)

    # -- state ---------------------------------------------------------------------------------------------------
    def _initial_seed(self, param: Tensor) -> int:
        """apollo-torch's first seed: the parameter's 1-based position among all the optimizer's parameters."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p is param:
                    return index
        raise KeyError("parameter not in this optimizer")

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        if not group["use_apollo"]:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            return
        state["seed"] = self._initial_seed(param)
        shape = tuple(param.shape)
        rank, proj_type = group["rank"], group["proj_type"]
        low = projected_shape(shape, rank, proj_type)
        state["exp_avg"] = _low_rank_zeros(param, low, projection_side(shape, proj_type), param.dtype)
        state["exp_avg_sq"] = _low_rank_zeros(param, low, projection_side(shape, proj_type), param.dtype)
        if not group["disable_nl"]:
            state["scaled_grad"] = torch.zeros((), dtype=math_dtype(param.dtype), device=param.device)
        if group["cache_projection"]:
            state["proj"] = torch.zeros(
                projection_shape(shape, rank, proj_type), dtype=math_dtype(param.dtype), device=param.device
            )

    # -- the step ------------------------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        impl = "for_loop"
        if group["use_apollo"]:
            locals_ = [_local(p) for p in params]
            applies = blocked_applies(locals_) and all(t.dtype in (torch.float32, torch.float64) for t in locals_)
            impl = resolve_implementation(
                group["implementation"], self.implementations, {"blocked": applies}, owner=type(self).__name__
            )
        self._implementation_used[id(group)] = impl
        for p, g in zip(params, grads, strict=True):
            if p.numel() == 0:
                self.state[p]["step"] += 1
                continue
            if group["use_apollo"]:
                self._step_projected(group, p, g, self.state[p], impl == "blocked")
            else:
                self._step_adamw(group, p, g, self.state[p])

    def _step_size(self, group: dict[str, Any], step: int) -> float:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        if group["correct_bias"]:
            return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return lr

    def _step_adamw(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = int(state["step"].item())
        lp, lg, lm, lv = (_local(t) for t in (p, g, state["exp_avg"], state["exp_avg_sq"]))
        p32, g32, m32, v32 = (_upcast(t) for t in (lp, lg, lm, lv))
        m32.mul_(beta1).add_(g32, alpha=1.0 - beta1)
        v32.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        update = m32 / v32.sqrt().add_(group["eps"])
        p32.add_(update, alpha=-self._step_size(group, step))
        if group["weight_decay"] > 0.0:
            p32.add_(p32, alpha=-float(group["lr"]) * group["weight_decay"])
        for low, exact in ((lp, p32), (lm, m32), (lv, v32)):
            if exact is not low:
                low.copy_(exact)

    def _projection(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], step: int) -> Tensor:
        """``P`` of this step (full matrix; math dtype), advancing the seed at a regeneration step."""
        shape, rank, proj_type = tuple(p.shape), group["rank"], group["proj_type"]
        dtype = math_dtype(p.dtype)
        regenerate = step % group["update_proj_gap"] == 0
        if step > 0 and regenerate:
            state["seed"] = next_seed(state["seed"])
        if group["cache_projection"]:
            if regenerate or step == 0:  # else the loaded (or last drawn) projection
                state["proj"].copy_(draw_projection(shape, rank, proj_type, state["seed"], p.device, dtype))
            return state["proj"]
        return draw_projection(shape, rank, proj_type, state["seed"], p.device, dtype)

    def _step_projected(
        self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], blocked: bool = False
    ) -> None:
        beta1, beta2 = group["betas"]
        step = int(state["step"].item())  # before this step (apollo-torch's ``iter``)
        side = projection_side(tuple(p.shape), group["proj_type"])
        proj = self._projection(group, p, state, step)
        sharded = is_dtensor(p)
        lp, lg, lm, lv = (_local(t) for t in (p, g, state["exp_avg"], state["exp_avg_sq"]))
        p32, g32, m32, v32 = (_upcast(t) for t in (lp, lg, lm, lv))
        if side == "right":
            low = g32 @ proj.t()  # a shard's rows project on their own
        else:
            if sharded:  # this shard's rows of P; the partial products are summed over the mesh
                start = _row_offset(p)
                proj = proj[start : start + lg.shape[0]]
            low = proj.t() @ g32
            if sharded:
                low = reduce_over_mesh(low, p.device_mesh, tuple(p.placements))
        state["step"] += 1
        m32.mul_(beta1).add_(low, alpha=1.0 - beta1)
        v32.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        normalized = m32 / v32.sqrt().add_(group["eps"])
        step_size = self._step_size(group, step + 1)
        # rows sharded: the projected rows (side "right") are sharded too; "left" ones are whole on every rank
        low_sharded = sharded and side == "right"
        if group["scale_type"] == "channel":
            dim = 1 if side == "right" else 0
            factor = torch.linalg.vector_norm(normalized, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + 1e-8)
            if side == "right":
                factor = factor.unsqueeze(1)
        else:
            factor = _norm(normalized, p, low_sharded) / (_norm(low, p, low_sharded) + 1e-8)
        root_scale = math.sqrt(group["scale"])
        if blocked:
            self._apply_blocked(group, p, g32, p32, factor, side, state, step, step_size, root_scale)
            for low_t, exact in ((lm, m32), (lv, v32)):
                if exact is not low_t:
                    low_t.copy_(exact)
            return
        scaled = g32 * factor
        if group["scale_front"]:
            scaled *= root_scale
        if not group["disable_nl"]:
            norm = _norm(scaled, p, sharded)
            if step > 0:
                limiter = torch.clamp(norm / (state["scaled_grad"] + 1e-8), min=1.01) / 1.01
                scaled = scaled / limiter
                state["scaled_grad"].copy_(norm / limiter)
            else:
                state["scaled_grad"].copy_(norm)
        if not group["scale_front"]:
            scaled *= root_scale
        p32.add_(scaled, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p32.add_(p32, alpha=-float(group["lr"]) * group["weight_decay"])
        for low_t, exact in ((lp, p32), (lm, m32), (lv, v32)):
            if exact is not low_t:
                low_t.copy_(exact)

    def _apply_blocked(self, group, p, g32, p32, factor, side, state, step, step_size, root_scale) -> None:
        """The update ``p <- (p - step_size * c * g) * (1 - lr * weight_decay)`` with ``c = factor * sqrt(scale) /
        limiter`` in one cache-blocked pass over rows (fp32/fp64 contiguous ``p``), without materialising the
        scaled gradient: the limiter's norm ``||g * factor||`` comes from the gradient's row (or column) norms."""
        if not group["disable_nl"]:
            if factor.ndim == 0:
                square = factor.square() * g32.square().sum()
            elif side == "right":  # per row
                square = (factor.squeeze(1).square() * g32.square().sum(dim=1)).sum()
            else:  # per column
                square = (factor.square() * g32.square().sum(dim=0)).sum()
            if is_dtensor(p):
                square = reduce_over_mesh(square, p.device_mesh, tuple(p.placements))
            norm = square.sqrt()
            if group["scale_front"]:
                norm = norm * root_scale
            if step > 0:
                limiter = torch.clamp(norm / (state["scaled_grad"] + 1e-8), min=1.01) / 1.01
                state["scaled_grad"].copy_(norm / limiter)
                factor = factor / limiter
            else:
                state["scaled_grad"].copy_(norm)
        coefficient = factor * (-step_size * root_scale)
        decay = 1.0 - float(group["lr"]) * group["weight_decay"] if group["weight_decay"] > 0.0 else 1.0
        rows, cols = p32.shape
        for start, stop in row_blocks(rows, cols):
            block = p32[start:stop]
            c = coefficient[start:stop] if coefficient.ndim == 2 else coefficient  # per row, or broadcast
            block.addcmul_(g32[start:stop], c)
            if decay != 1.0:
                block.mul_(decay)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (nonfinite={self.nonfinite!r}, skipped_steps={self.skipped_steps})"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            kind = (
                f"APOLLO rank {group['rank']}, {group['scale_type']}-wise, scale {group['scale']:g}"
                if group["use_apollo"]
                else "AdamW"
            )
            lines.append(
                f"  group {i} -> {kind}: {len(group['params'])} tensors, {n:,} parameters, lr={group['lr']:g}, "
                f"weight_decay={group['weight_decay']:g}"
            )
        return "\n".join(lines)


class APOLLOMini(APOLLO):
    """APOLLO-mini: rank 1, tensor-wise scaling, ``scale=128`` -- two numbers per matrix row of state.

    Same arguments as :class:`APOLLO` with those defaults.

    Reference: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, Section 4.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int = 1,
        update_proj_gap: int = 200,
        scale: float = 128.0,
        scale_type: str = "tensor",
        proj_type: str = "std",
        proj: str = "random",
        scale_front: bool = False,
        disable_nl: bool = False,
        correct_bias: bool = True,
        cache_projection: bool = False,
        model: nn.Module | None = None,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        arguments = constructor_defaults(locals())
        super().__init__(params, **arguments, nonfinite=nonfinite, check_finite=check_finite)


def _upcast(t: Tensor) -> Tensor:
    return t if t.dtype == math_dtype(t.dtype) else t.to(math_dtype(t.dtype))


def _norm(local: Tensor, p: Tensor, sharded: bool) -> Tensor:
    """The 2-norm of a tensor whose pieces are spread over the mesh of ``p`` (``sharded``) or whole here."""
    if not sharded:
        return torch.linalg.vector_norm(local)
    square = reduce_over_mesh(local.square().sum(), p.device_mesh, tuple(p.placements))
    return square.sqrt()


def _low_rank_zeros(param: Tensor, shape: tuple[int, int], side: str, dtype: torch.dtype) -> Tensor:
    """Zero moments of the projected shape; for a DTensor parameter a DTensor: rows sharded like the parameter
    ("right") or replicated ("left")."""
    if not is_dtensor(param):
        return torch.zeros(shape, dtype=dtype, device=param.device)
    from torch.distributed.tensor import DTensor, Replicate

    mesh, placements = param.device_mesh, tuple(param.placements)
    if side == "right":
        local_rows = param.to_local().shape[0]
        local = torch.zeros((local_rows, shape[1]), dtype=dtype, device=param.to_local().device)
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=(shape[1], 1))
    local = torch.zeros(shape, dtype=dtype, device=param.to_local().device)
    return DTensor.from_local(local, mesh, [Replicate()] * len(placements), run_check=False)


# ------------------------------------------------------------------------------------------------------------
# registry entries
def apollo_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """Projected matrices: ``step``, the two moments of the projected shape, ``scaled_grad`` (unless
    ``disable_nl``), ``proj`` (with ``cache_projection``); the seed is a Python int. Others: AdamW's three."""
    role = hyper.get("role")
    use = hyper.get("use_apollo", len(shape) == 2 and (role is None or role == "matrix"))
    step = StateTensor("step", (), torch.float32)
    if not use:
        return [step, StateTensor("exp_avg", shape, dtype), StateTensor("exp_avg_sq", shape, dtype)]
    rank, proj_type = int(hyper.get("rank", 128)), hyper.get("proj_type", "std")
    low = projected_shape(shape, rank, proj_type)
    out = [step, StateTensor("exp_avg", low, dtype), StateTensor("exp_avg_sq", low, dtype)]
    if not hyper.get("disable_nl", False):
        out.append(StateTensor("scaled_grad", (), math_dtype(dtype)))
    if hyper.get("cache_projection", False):
        out.append(StateTensor("proj", projection_shape(shape, rank, proj_type), math_dtype(dtype)))
    return out


def planned_projection(param: Any, architecture: Any) -> Mapping[str, Any]:
    """The planner's view of the routing (the spec's ``structure_state``): the hidden matrices (role
    ``"matrix"``) are projected, embeddings, the head and vectors are AdamW's -- what ``create_optimizer`` with
    the model does."""
    return {"use_apollo": len(param.shape) == 2 and param.role == "matrix"}


_APOLLO_PAPER = "Zhu et al., APOLLO: SGD-like Memory, AdamW-level Performance, MLSys 2025 (arXiv:2412.05270)"
_APOLLO_TRANSLATION = Translation(
    label="APOLLO paper: as AdamW (lr, betas, weight decay)",
    source="Zhu et al. 2024: APOLLO replaces AdamW at its hyperparameters (the paper pre-trains both at the "
    "same learning rates); rank and scale are APOLLO's own (rank 128 as Hugging Face Trainer, scale 1; "
    "APOLLO-mini rank 1, scale 128)",
)

SPECS = [
    OptimizerSpec(
        name="apollo_adamw",
        cls=APOLLO,
        summary="APOLLO: AdamW moments on a random rank-r projection scale the gradient per channel (~SGD memory)",
        paper=_APOLLO_PAPER,
        state=apollo_state,
        family="adam",
        accepts_model=True,
        structure_state=planned_projection,
        aliases={"apollo": {}, "apollo_adamw_layerwise": {}},
        translation=_APOLLO_TRANSLATION,
        # AdamW's compare hyperparameters; rank a quarter of compare's default model width (128), the paper's ratio
        compare={"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "rank": 32},
    ),
    OptimizerSpec(
        name="apollo_mini",
        cls=APOLLOMini,
        summary="APOLLO-mini: rank-1 projection, tensor-wise scaling, scale 128 (less state than SGD momentum)",
        paper=_APOLLO_PAPER,
        state=apollo_state,
        family="adam",
        accepts_model=True,
        structure_state=planned_projection,
        aliases={"apollo_mini_adamw": {}},
        translation=_APOLLO_TRANSLATION,
        compare={"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
    ),
]
