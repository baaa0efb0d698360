"""Muon for the hidden matrices and AdamW for everything else, in one optimizer object.

Update rule for a 2-D hidden weight ``W`` of shape ``(A, B)`` (Jordan et al. 2024; the form of
``torch.optim.Muon``), gradient ``G``:

.. code-block:: text

    M <- momentum * M + (1 - momentum) * G                     (momentum_buffer)
    U  = (1 - momentum) * G + momentum * M   if nesterov, else M
    O  = NewtonSchulz_{a,b,c}^{ns_steps}(U / max(||U||_F, eps))  (approximately U V^T of U's SVD)
    W <- W * (1 - lr * weight_decay)
    W <- W - lr * s(A, B) * O

    s = 0.2 * sqrt(max(A, B))    adjust_lr_fn="match_rms_adamw" (Moonlight, the default here): the update has
                                 the RMS of an AdamW update, so Muon shares AdamW's lr and weight decay
    s = sqrt(max(1, A / B))      adjust_lr_fn="original" (Keller Jordan's scaling, torch.optim.Muon's default)

Each Newton-Schulz iteration is ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, run on the wide orientation
of
the matrix. Every other parameter (embeddings, the output head, norms, biases, other vectors) gets AdamW with
the
same ``lr`` and ``weight_decay`` (from its group), ``adamw_betas`` and ``adamw_eps``.

Routing: given ``model=`` (``lmopt.create_optimizer("muon", model)`` passes it), parameters whose role in
:func:`lmopt.classify_parameters` is ``"matrix"`` go to Muon and the rest to AdamW; given only parameters,
every
tensor with two or more dimensions goes to Muon (pass the model, or set ``"use_muon"`` in your param groups,
to keep
embeddings and the head on AdamW). Tensors with more than two dimensions (convolutions) are orthogonalised as
``(shape[0], prod(shape[1:]))`` matrices. Each group of the optimizer carries ``use_muon`` (True / False); the
groups you pass are split in two when they mix both kinds.

Reference: Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024
(kellerjordan.github.io/posts/muon); Liu et al., "Muon is Scalable for LLM Training" (Moonlight),
arXiv:2502.16982, 2025.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..param_groups import classify_parameters
from ..spec import OptimizerSpec, StateTensor, Translation
from ._dispatch import resolve_implementation
from .adamw import adam_state, adamw
from .base import (
    LmoptOptimizer,
    check_betas,
    check_choice,
    check_positive,
    check_range,
    is_dtensor,
)

__all__ = ["Muon", "muon", "zeropower_via_newton_schulz"]

#: Keller Jordan's quintic coefficients (maximal slope at zero), as in torch.optim.Muon
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _resolve_ns_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    # bf16 matmuls are fast on GPUs; on CPUs without bf16 units they are far slower than fp32
    if ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _NS_DTYPES[ns_dtype]


def zeropower_via_newton_schulz(
    update: Tensor,
    *,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Approximately orthogonalise a matrix, or a batch of matrices of one shape (leading batch dimension).

    Returns a new tensor of ``dtype`` and ``update``'s shape, close to ``U V^T`` of ``update = U S V^T`` (the
    quintic iteration leaves singular values in roughly [0.7, 1.2], which does not hurt training). With
    ``dtype=torch.bfloat16`` the sequence of operations is torch.optim.Muon's.
    """
    a, b, c = ns_coefficients
    x = update.to(dtype)  # a copy when the dtype changes; the in-place division below must not touch `update`
    if x is update:
        x = x.clone()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    # Frobenius norm over the matrix (a reduction: on DTensors it stays a DTensor, never .to_local())
    if x.ndim == 2:
        x.div_(x.norm().clamp(min=eps))
        for _ in range(ns_steps):
            gram = x @ x.T
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, gram_update, x, beta=a)
    else:
        x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(ns_steps):
            gram = x @ x.mT
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str, shape: tuple[int, ...]) -> float:
    """The learning rate Muon applies to a matrix of ``shape`` (rows, columns of the orthogonalised one)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr


def _momentum_update(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    buf.lerp_(grad.to(buf.dtype), 1 - momentum)
    return grad.lerp(buf.to(grad.dtype), momentum) if nesterov else buf


def _apply(param: Tensor, ortho: Tensor, lr: float, weight_decay: float, scaled_lr: float) -> None:
    ortho = ortho.reshape(param.shape)
    if param.dtype in (torch.float32, torch.float64):
        param.mul_(1 - lr * weight_decay)
        param.add_(ortho, alpha=-scaled_lr)
    else:  # low-precision parameters: one rounding per step
        p32 = param.float().mul_(1 - lr * weight_decay).add_(ortho, alpha=-scaled_lr)
        param.copy_(p32)


class MuonHyper(NamedTuple):
    """The scalar hyperparameters of one Muon step (what every implementation takes)."""

    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_coefficients: tuple[float, float, float]
    ns_steps: int
    eps: float
    adjust_lr_fn: str
    ns_dtype: str

    def newton_schulz(self) -> dict[str, Any]:
        """The keywords of :func:`zeropower_via_newton_schulz`, less ``dtype``."""
        return dict(ns_coefficients=self.ns_coefficients, ns_steps=self.ns_steps, eps=self.eps)


def _single_tensor_muon(params, grads, bufs, hp: MuonHyper):
    for p, g, buf in zip(params, grads, bufs, strict=False):
        if p.numel() == 0:
            continue
        update = _momentum_update(g, buf, hp.momentum, hp.nesterov)
        matrix = update.reshape(update.shape[0], -1)
        ortho = zeropower_via_newton_schulz(
            matrix, **hp.newton_schulz(), dtype=_resolve_ns_dtype(hp.ns_dtype, p.device)
        )
        _apply(p, ortho, hp.lr, hp.weight_decay, adjusted_lr(hp.lr, hp.adjust_lr_fn, tuple(matrix.shape)))


def _foreach_muon(params, grads, bufs, hp: MuonHyper):
    # momentum with foreach ops, then one batched Newton-Schulz per (shape, device, dtype): fewer, larger
    # matmuls
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    by_dtype: dict[tuple, list[int]] = defaultdict(list)
    for i in live:
        by_dtype[(grads[i].dtype, bufs[i].dtype)].append(i)
    updates: dict[int, Tensor] = {}
    for (gdtype, bdtype), idx in by_dtype.items():
        g = [grads[i] for i in idx]
        b = [bufs[i] for i in idx]
        torch._foreach_lerp_(b, g if gdtype == bdtype else [x.to(bdtype) for x in g], 1 - hp.momentum)
        if hp.nesterov:
            u = torch._foreach_lerp(g, b if gdtype == bdtype else [x.to(gdtype) for x in b], hp.momentum)
        else:
            u = b
        updates.update(zip(idx, u, strict=False))
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i in live:
        p = params[i]
        batches[(p.shape[0], math.prod(p.shape[1:]), p.device, updates[i].dtype, is_dtensor(p))].append(i)
    for (rows, cols, device, _dtype, dtensor), idx in batches.items():
        dtype = _resolve_ns_dtype(hp.ns_dtype, device)
        scaled = adjusted_lr(hp.lr, hp.adjust_lr_fn, (rows, cols))
        if len(idx) == 1 or dtensor:  # DTensors: keep each matrix a DTensor, no stacking of shards
            orthos = [
                zeropower_via_newton_schulz(updates[i].reshape(rows, cols), **hp.newton_schulz(), dtype=dtype)
                for i in idx
            ]
        else:
            stacked = torch.stack([updates[i].reshape(rows, cols).to(dtype) for i in idx])
            orthos = zeropower_via_newton_schulz(stacked, **hp.newton_schulz(), dtype=dtype).unbind(0)
        ps = [params[i] for i in idx]
        if all(p.dtype in (torch.float32, torch.float64) for p in ps):
            if hp.weight_decay != 0:
                torch._foreach_mul_(ps, 1 - hp.lr * hp.weight_decay)
            torch._foreach_add_(
                ps, [o.reshape(p.shape).to(p.dtype) for o, p in zip(orthos, ps, strict=False)], alpha=-scaled
            )
        else:
            for p, o in zip(ps, orthos, strict=False):
                _apply(p, o, hp.lr, hp.weight_decay, scaled)


_IMPLEMENTATIONS = {"for_loop": _single_tensor_muon, "foreach": _foreach_muon}


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr_fn: str = "match_rms_adamw",
    ns_dtype: str = "auto",
    implementation: str = "auto",
) -> None:
    """Functional Muon step over matrices (see the module docstring); updates params and buffers in place."""
    implementation = resolve_implementation(
        {"batched": "foreach"}.get(implementation, implementation), tuple(_IMPLEMENTATIONS), owner="Muon"
    )
    hp = MuonHyper(lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn, ns_dtype)
    _IMPLEMENTATIONS[implementation](params, grads, momentum_buffers, hp)


def _split_groups(params: Any, model: nn.Module | None) -> list[dict[str, Any]]:
    """The user's groups, each split into a Muon part and an AdamW part (empty parts dropped)."""
    params = list(params)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    roles = {id(info.param): info.role for info in classify_parameters(model)} if model is not None else None
    out: list[dict[str, Any]] = []
    for group in groups:
        tensors = list(group["params"])
        if "use_muon" in group:
            out.append({**group, "params": tensors})
            continue
        names = group.get("param_names")
        parts: dict[bool, dict[str, list]] = {
            True: {"params": [], "names": []},
            False: {"params": [], "names": []},
        }
        for i, p in enumerate(tensors):
            if roles is not None:
                use = roles.get(id(p)) == "matrix" and p.ndim >= 2
            else:
                use = p.ndim >= 2
            parts[use]["params"].append(p)
            if names is not None:
                parts[use]["names"].append(names[i])
        for use in (True, False):
            if parts[use]["params"]:
                g = {**group, "params": parts[use]["params"], "use_muon": use}
                if names is not None:
                    g["param_names"] = parts[use]["names"]
                out.append(g)
    return out


class Muon(LmoptOptimizer):
    """Muon (orthogonalised momentum) for hidden matrices and AdamW for the other parameters, in one
    optimizer.

    Args:
        params: parameters or param groups; groups may set ``use_muon`` to choose the update explicitly.
        lr: learning rate shared by both updates (default 1e-3; with Moonlight's scaling, AdamW's lr).
        weight_decay: decoupled decay shared by both (default 0.1, as torch.optim.Muon and Moonlight).
        momentum: Muon momentum (default 0.95).
        nesterov: Nesterov momentum for Muon (default True).
        ns_coefficients: quintic Newton-Schulz coefficients (default (3.4445, -4.7750, 2.0315)).
        ns_steps: Newton-Schulz iterations (default 5).
        eps: floor of the Frobenius norm before the iterations (default 1e-7).
        adjust_lr_fn: ``"match_rms_adamw"`` (default: Moonlight's ``0.2 * sqrt(max(A, B))``), ``"original"``
            (``sqrt(max(1, A / B))``) or ``"none"``.
        adamw_betas: AdamW's betas for the non-matrix parameters (default (0.9, 0.95)).
        adamw_eps: AdamW's eps (default 1e-8).
        ns_dtype: dtype of the Newton-Schulz iterations: ``"auto"`` (default: bf16 on CUDA, fp32 elsewhere,
            since CPUs without bf16 units run bf16 matmuls far slower), ``"bf16"`` (torch.optim.Muon) or
            ``"fp32"``.
        model: the model, to route by role (embeddings and the output head to AdamW); ``create_optimizer``
            passes it.
        implementation: ``"auto"`` (= ``"foreach"``, old name ``"batched"``: momentum with foreach ops, one
            batched Newton-Schulz per matrix shape) or ``"for_loop"`` (one matrix at a time, torch.optim.Muon's order).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: Muon matrices keep ``momentum_buffer`` (the parameter's dtype: 4 bytes per fp32
    parameter); AdamW parameters keep ``step``, ``exp_avg`` and ``exp_avg_sq``.

    Example:
        >>> opt = lmopt.create_optimizer("muon", model, lr=3e-4, weight_decay=0.1)   # routes by role
        >>> print(opt)   # shows which groups use Muon and which AdamW

    Reference: Jordan et al. 2024 (kellerjordan.github.io/posts/muon); Liu et al., "Muon is Scalable for LLM
    Training", arXiv:2502.16982.
    """

    implementations = ("for_loop", "foreach")
    implementation_aliases = {"batched": "foreach"}  # the name before lmopt's one vocabulary

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str = "match_rms_adamw",
        *,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: str = "auto",
        model: nn.Module | None = None,
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or None, got {type(model).__name__}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients) if isinstance(ns_coefficients, (list, tuple)) else ns_coefficients,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            ns_dtype=ns_dtype,
            implementation=implementation,
        )
        super().__init__(_split_groups(params, model), defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"ns_coefficients must be a tuple of 3 numbers, got {coefficients!r}")
        for i, value in enumerate(coefficients):
            check_range(f"ns_coefficients[{i}]", value, -1e6, 1e6)
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"ns_steps must be an integer in [1, 100), got {steps!r}")
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ("match_rms_adamw", "original", "none"))
        check_betas("adamw_betas", group["adamw_betas"])
        check_positive("adamw_eps", group["adamw_eps"])
        check_choice("ns_dtype", group["ns_dtype"], ("auto", "bf16", "fp32"))
        group.setdefault("use_muon", False)
        check_choice("use_muon", group["use_muon"], (True, False))
        if group["use_muon"]:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"use_muon=True needs tensors with 2 or more dimensions, got shape "
                        f"{tuple(p.shape)}; put vectors in a group with use_muon=False"
                    )

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        if group["use_muon"]:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        else:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        lr = float(group["lr"])
        if group["use_muon"]:
            muon(
                params,
                grads,
                [s["momentum_buffer"] for s in states],
                lr=lr,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=tuple(group["ns_coefficients"]),
                ns_steps=group["ns_steps"],
                eps=group["eps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                ns_dtype=group["ns_dtype"],
                implementation=group["implementation"],
            )
        else:
            beta1, beta2 = group["adamw_betas"]
            adamw(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=group["adamw_eps"],
                weight_decay=group["weight_decay"],
            )

    def __repr__(self) -> str:
        lines = [f"Muon (nonfinite={self.nonfinite!r}, skipped_steps={self.skipped_steps})"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            kind = "Muon" if group["use_muon"] else "AdamW"
            name = f" {group['name']!r}" if "name" in group else ""
            lines.append(
                f"  group {i}{name} -> {kind}: {len(group['params'])} tensors, {n:,} parameters, "
                f"lr={group['lr']:g}, weight_decay={group['weight_decay']:g}"
            )
        return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# registry entry
def _muon_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """Muon matrices: one momentum buffer; the rest: AdamW's state. ``role`` (from classify_parameters), when
    given, routes like the model-aware optimizer (embeddings and the head are AdamW's); else by dimension."""
    role = hyper.get("role")
    use_muon = hyper.get("use_muon", len(shape) >= 2 if role is None else role == "matrix" and len(shape) >= 2)
    if use_muon:
        return [StateTensor("momentum_buffer", shape, dtype)]
    return adam_state(shape, dtype, {})


SPECS = [
    OptimizerSpec(
        name="muon",
        cls=Muon,
        summary="Muon (Newton-Schulz orthogonalised momentum) for hidden matrices + AdamW for the rest",
        paper="Jordan et al., Muon, 2024; Liu et al., Muon is Scalable for LLM Training, arXiv:2502.16982",
        state=_muon_state,
        family="muon",
        accepts_model=True,
        aliases={"moonlight_muon": {"adjust_lr_fn": "match_rms_adamw"}},
        lookahead=True,
        translation=Translation(
            betas="optional",  # betas/eps of Muon's AdamW part: passed only if the constructor names them so
            label="Moonlight paper: as AdamW with 0.2 sqrt(max(m, n)) scaling; momentum 0.95",
            optional={"pretrain": {"momentum": 0.95}, "finetune": {"momentum": 0.95}},
            source="Liu et al., Muon is Scalable for LLM Training (Moonlight), 2025: with the "
            "0.2 sqrt(max(m, n)) update scaling Muon shares AdamW's lr and weight decay; "
            "momentum 0.95 (Jordan et al. 2024)",
        ),
        # with Moonlight's RMS matching Muon reuses AdamW's lr and weight decay; its non-matrix parameters use
        # AdamW
        compare={"lr": 3e-3, "weight_decay": 0.1},
        compare_default=8,
    ),
]
