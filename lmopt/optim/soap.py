"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioners (Vyas et al. 2024).

Update rule for a matrix parameter ``W`` with gradient ``G`` (negated when ``maximize``), the authors' algorithm
(github.com/nikhilvyas/SOAP, ``soap.py``), step ``t`` counted from the second step on:

.. code-block:: text

    step 1 (statistics only, no update):
        L <- (1 - b_s) G G^T          R <- (1 - b_s) G^T G        (b_s = shampoo_beta, default betas[1])
        Q_L, Q_R <- eigenvectors of L, R (torch.linalg.eigh), by decreasing eigenvalue
    every later step, t = 1, 2, ...:
        G' = Q_L^T G Q_R                                            (the gradient in the eigenbasis)
        m  <- b1 m + (1 - b1) G'          v <- b2 v + (1 - b2) G'^2 (exp_avg, exp_avg_sq: in the eigenbasis)
        U  = Q_L (m / (sqrt(v) + eps)) Q_R^T                        (Adam's direction, back in W's space)
        U <- U * 1[U * G > 0] / max(mean(1[U * G > 0]), 1e-3)       (cautious=True only)
        U <- U / (1e-30 + rms(U))                                   (normalize_grads=True only)
        W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * U               (correct_bias=False: W - lr * U)
        W <- W - lr * weight_decay * W                              (decoupled, after the update, as the authors)
             cautious_weight_decay=True: W <- W - lr * weight_decay * 1[U * W >= 0] * W (Chen et al. 2025)
        L <- b_s L + (1 - b_s) G G^T      R <- b_s R + (1 - b_s) G^T G
        if t % precondition_frequency == 0 (one power iteration + QR, the authors' refresh):
            for Q, P in (Q_L, L), (Q_R, R):
                order = argsort(diag(Q^T P Q), descending);  v's axis of Q permuted by order;  Q <- QR(P Q[:, order]).Q
            m <- Q_L_new^T (Q_L_old m Q_R_old^T) Q_R_new                (the first moment follows the new basis)

A tensor of any rank gets one preconditioner per dimension (``GG_k`` = the sum over every other dimension of
``G G^T`` along dimension ``k``). A dimension larger than ``max_precond_dim`` gets none (the identity: Adam along
that dimension). ``merge_dims=True`` first merges consecutive dimensions while their product stays <=
``max_precond_dim`` (so a small matrix becomes one vector with one preconditioner). 1-D tensors (biases, norms)
are preconditioned only with ``precondition_1d=True``; scalars and empty tensors never: plain Adam (their first
step still only starts the statistics, as for every tensor).

State per parameter (torch-style keys): ``step`` (fp32 scalar on the CPU: steps taken, the first included),
``exp_avg``, ``exp_avg_sq`` (the parameter's shape, in the eigenbasis; ``state_precision``: None = the parameter's
dtype, ``"fp32"``, ``"bf16"``), and for each preconditioned dimension ``k`` of size ``d_k`` (after merging)
``GG_k`` (the Shampoo statistic, ``L`` = ``GG_0`` and ``R`` = ``GG_1`` for a matrix) and ``Q_k`` (its eigenbasis),
``d_k x d_k`` each, at ``preconditioner_precision`` (None: fp32, fp64 for fp64 parameters; ``"bf16"`` halves
them). The math always runs in fp32 (fp64 for fp64 parameters). For an ``m x n`` matrix: ``8 m n + 8 (m^2 + n^2)``
bytes in fp32.

Differences from the authors' code, all on purpose: the first moment is rotated only when the basis changes (the
authors rotate it back and forth with the same basis at every other step, which is the identity up to rounding);
the statistics and bases take the parameter's math dtype (the authors keep them in fp32 and cast fp64 to fp32);
``cautious``, ``maximize`` and ``preconditioner_precision`` are lmopt's; ``data_format="channels_last"`` is not
offered (4-D tensors are preconditioned in their own dimension order).

FSDP2 (DTensor parameters): the gradient and the moments are gathered (``full_tensor``), the step runs on the
full tensors exactly as unsharded, and each rank keeps its shard of the moments and of the parameter; the
statistics and bases are full (replicated) plain tensors on every rank, computed identically on each. The
result equals the unsharded run; the matrix work is repeated on every rank (not yet split by owner).

Implementations: ``for_loop`` (the default: one tensor at a time, the authors' ``tensordot`` rotations; the
reference) and ``foreach`` (matrices of one shape stacked in runs of at most :data:`BATCH_ELEMENTS` elements and
rotated with batched matmuls, the bases of one size refreshed by one batched eigh / QR, the elementwise Adam steps
as multi-tensor ops); they agree to rounding. ``auto`` is ``for_loop``: on CPUs the two run at the same speed
(benchmarks/results/step_speed_soap_interleaved.md; the matrix products dominate) and the per-tensor path holds the
temporaries of one tensor at a time; ``foreach`` is for many small matrices where per-call overhead counts.

Reference: Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving and Stabilizing
Shampoo using Adam", arXiv:2409.11321, 2024 (ICLR 2025).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..spec import OptimizerSpec, StateTensor, Translation
from ._cautious import apply_cautious_, cautious_decay_mask
from ._dispatch import math_dtype, resolve_implementation
from ._impl import add_scaled_, traced_lr
from .base import LmoptOptimizer, check_choice, check_flag, check_range, constructor_defaults, is_dtensor

__all__ = ["SOAP", "soap", "soap_layout"]

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# layout: which dimensions get a preconditioner
def _merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: consecutive dimensions multiplied together while the product stays <=
    ``max_precond_dim`` (a dimension larger than that stays alone)."""
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@functools.lru_cache(maxsize=4096)
def soap_layout(
    shape: tuple[int, ...], merge_dims: bool, max_precond_dim: int, precondition_1d: bool
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``(shape the math sees, whether each of its dimensions has a preconditioner)`` for a parameter of
    ``shape`` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) == 0 or len(shape) == 0:
        return shape, (False,) * len(shape)
    if len(shape) == 1:
        return shape, (precondition_1d and shape[0] <= max_precond_dim,)
    if merge_dims:
        shape = _merged_shape(shape, max_precond_dim)
    return shape, tuple(size <= max_precond_dim for size in shape)


def _moment_dtype(dtype: torch.dtype, precision: str | None) -> torch.dtype:
    return dtype if precision is None else _PRECISIONS[precision]


def _preconditioner_dtype(dtype: torch.dtype, precision: str | None) -> torch.dtype:
    return math_dtype(dtype) if precision is None else _PRECISIONS[precision]


# --------------------------------------------------------------------------------------------------------------
# the math on one tensor (math dtype, plain tensors)
class SOAPHyper(NamedTuple):
    """The scalar hyperparameters of one SOAP step (what every implementation takes)."""

    lr: float
    beta1: float
    beta2: float
    shampoo_beta: float
    eps: float
    weight_decay: float
    precondition_frequency: int
    normalize_grads: bool
    correct_bias: bool
    cautious: bool
    maximize: bool
    cautious_weight_decay: bool = False


def _rotate(x: Tensor, bases: list[Tensor | None], back: bool) -> Tensor:
    """``x`` (the merged shape) with every dimension ``k`` multiplied by ``Q_k^T`` (``back``: by ``Q_k``); a
    dimension without a basis is left as is. The authors' ``project`` / ``project_back`` (tensordot, cycling the
    dimensions)."""
    for q in bases:
        if q is not None:
            x = torch.tensordot(x, q, dims=[[0], [1 if back else 0]])
        else:
            x = x.permute(*range(1, x.ndim), 0)
    return x


def _accumulate(g: Tensor, statistics: list[Tensor | None], shampoo_beta: float) -> None:
    """``GG_k <- shampoo_beta GG_k + (1 - shampoo_beta) (G G^T along k)`` for every preconditioned ``k``."""
    for k, gg in enumerate(statistics):
        if gg is None:
            continue
        others = [*chain(range(k), range(k + 1, g.ndim))]
        gg.lerp_(torch.tensordot(g, g, dims=[others, others]), 1 - shampoo_beta)


def _eigenbasis(gg: Tensor) -> Tensor:
    """Eigenvectors of ``gg`` by decreasing eigenvalue (the authors' first decomposition; fp64 if eigh fails)."""
    eye = torch.eye(gg.shape[-1], dtype=gg.dtype, device=gg.device)
    try:
        _, q = torch.linalg.eigh(gg + 1e-30 * eye)
    except torch.linalg.LinAlgError:  # ill-conditioned in fp32: the authors retry in fp64
        wide = gg.double()
        if not bool(torch.isfinite(wide).all()):  # an overflowed statistic (huge gradients): Adam's basis
            return eye.expand_as(gg).clone()
        try:
            _, q = torch.linalg.eigh(wide + 1e-30 * eye.double())
        except torch.linalg.LinAlgError:  # entries near fp64's range: the eigenvectors of gg / max|gg|
            scale = wide.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
            _, q = torch.linalg.eigh(wide / scale + 1e-30 * eye.double())
        q = q.to(gg.dtype)
    return torch.flip(q, [-1])


def _refresh(gg: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """One power iteration and a QR (the authors' ``get_orthogonal_matrix_QR``) for one basis (or a batch of
    them, leading dimension): returns the new basis and the column order applied to the old one (decreasing
    estimated eigenvalue), by which ``exp_avg_sq`` is permuted along that dimension."""
    estimated = torch.diagonal(q.mT @ gg @ q, dim1=-2, dim2=-1)
    order = torch.argsort(estimated, dim=-1, descending=True)
    if q.ndim == 2:
        q = q[:, order]
    else:
        q = torch.gather(q, -1, order.unsqueeze(-2).expand_as(q))
    new, _ = torch.linalg.qr(gg @ q)
    return new, order


def soap_tensor(
    p: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    statistics: list[Tensor | None],
    bases: list[Tensor | None],
    *,
    step: int,
    hp: SOAPHyper,
) -> None:
    """One SOAP step of one tensor (the rule of the module docstring), in place; every tensor is in the math
    dtype; ``g``, ``exp_avg``, ``exp_avg_sq`` have the merged shape (``p`` its own); ``step`` counts the steps
    taken before this one (0: this step only starts the statistics)."""
    if step == 0:
        _accumulate(g, statistics, hp.shampoo_beta)
        for k, gg in enumerate(statistics):
            if gg is not None:
                bases[k].copy_(_eigenbasis(gg))  # type: ignore[union-attr]
        return
    t = step  # Adam's step: the first one only gathered statistics
    projected = _rotate(g, bases, back=False)
    exp_avg.mul_(hp.beta1).add_(projected, alpha=1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).add_(projected.square(), alpha=1 - hp.beta2)
    denom = exp_avg_sq.sqrt().add_(hp.eps)
    step_size = hp.lr
    if hp.correct_bias:
        step_size = step_size * (1 - hp.beta2**t) ** 0.5 / (1 - hp.beta1**t)
    update = _rotate(exp_avg / denom, bases, back=True).reshape(p.shape)
    if hp.cautious:
        apply_cautious_(update, g.reshape(p.shape))
    if hp.normalize_grads:
        update = update / (1e-30 + torch.mean(update**2) ** 0.5)
    p.add_(update, alpha=-step_size)
    if hp.weight_decay > 0:
        decayed = p * cautious_decay_mask(update, p) if hp.cautious_weight_decay else p
        add_scaled_(p, decayed, -hp.lr * hp.weight_decay)
    _accumulate(g, statistics, hp.shampoo_beta)
    if t % hp.precondition_frequency == 0 and any(q is not None for q in bases):
        original = _rotate(exp_avg, bases, back=True)  # the first moment in W's space, by the old basis
        for k, (gg, q) in enumerate(zip(statistics, bases, strict=True)):
            if gg is None:
                continue
            new, order = _refresh(gg, q)  # type: ignore[arg-type]
            exp_avg_sq.copy_(exp_avg_sq.index_select(k, order))
            q.copy_(new)  # type: ignore[union-attr]
        exp_avg.copy_(_rotate(original, bases, back=False))


# --------------------------------------------------------------------------------------------------------------
# implementations over lists of tensors
class _Entry(NamedTuple):
    """One tensor's operands for a step, every tensor in the math dtype (plain; full tensors for DTensors)."""

    p: Tensor
    g: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    statistics: list[Tensor | None]
    bases: list[Tensor | None]
    shape: tuple[int, ...]  # the merged shape
    step: int


def _single_tensor_soap(entries: list[_Entry], hp: SOAPHyper) -> None:
    for e in entries:
        if e.p.numel() == 0:
            continue
        g = e.g.reshape(e.shape)
        if hp.maximize:
            g = -g
        soap_tensor(
            e.p,
            g,
            e.exp_avg.view(e.shape),
            e.exp_avg_sq.view(e.shape),
            e.statistics,
            e.bases,
            step=e.step,
            hp=hp,
        )


def _stacked(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _batched_rotate(x: Tensor, left: Tensor | None, right: Tensor | None, back: bool) -> Tensor:
    """``Q_L^T X Q_R`` (``back``: ``Q_L X Q_R^T``) for a batch of matrices ``x`` (B, m, n)."""
    if left is not None:
        x = torch.matmul(left if back else left.mT, x)
    if right is not None:
        x = torch.matmul(x, right.mT if back else right)
    return x


def _foreach_soap(entries: list[_Entry], hp: SOAPHyper) -> None:
    """Matrices (merged shape of two dimensions) batched by shape: the rotations and statistics as batched
    matmuls, the refresh as one batched eigh / QR per basis size, the Adam moments as multi-tensor ops. Everything
    else (other ranks, empty tensors) steps through the per-tensor rule."""
    batches: dict[tuple, list[_Entry]] = defaultdict(list)
    rest = []
    for e in entries:
        if e.p.numel() == 0:
            continue
        if len(e.shape) == 2:
            flags = tuple(q is not None for q in e.bases)
            batches[(e.shape, flags, e.p.dtype, e.p.device, e.step)].append(e)
        else:
            rest.append(e)
    _single_tensor_soap(rest, hp)
    for (shape, (has_left, has_right), _dtype, _device, t), batch in _chunks(batches):
        g = _stacked([e.g.reshape(shape) for e in batch])
        if hp.maximize:
            g = g.neg()
        if t == 0:  # the first step only starts the statistics and their eigenbases
            _batched_accumulate(g, batch, hp, has_left, has_right)
            for k, present in enumerate((has_left, has_right)):
                if present:
                    fresh = _eigenbasis(_stacked([e.statistics[k] for e in batch]))  # type: ignore[misc]
                    torch._foreach_copy_([e.bases[k] for e in batch], list(fresh.unbind(0)))  # type: ignore[misc]
            continue
        left = _stacked([e.bases[0] for e in batch]) if has_left else None  # type: ignore[misc]
        right = _stacked([e.bases[1] for e in batch]) if has_right else None  # type: ignore[misc]
        projected = list(_batched_rotate(g, left, right, back=False).unbind(0))
        exp_avgs = [e.exp_avg.view(shape) for e in batch]
        exp_avg_sqs = [e.exp_avg_sq.view(shape) for e in batch]
        torch._foreach_mul_(exp_avgs, hp.beta1)
        torch._foreach_add_(exp_avgs, projected, alpha=1 - hp.beta1)
        torch._foreach_mul_(exp_avg_sqs, hp.beta2)
        torch._foreach_add_(exp_avg_sqs, torch._foreach_mul(projected, projected), alpha=1 - hp.beta2)
        del projected
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, hp.eps)
        ratio = _stacked(torch._foreach_div(exp_avgs, denom))
        del denom
        update = _batched_rotate(ratio, left, right, back=True)
        del ratio
        step_size = hp.lr
        if hp.correct_bias:
            step_size = step_size * (1 - hp.beta2**t) ** 0.5 / (1 - hp.beta1**t)
        updates = [u.reshape(e.p.shape) for u, e in zip(update.unbind(0), batch, strict=True)]
        if hp.cautious:
            for u, gi in zip(updates, g.unbind(0), strict=True):
                apply_cautious_(u, gi.reshape(u.shape))
        if hp.normalize_grads:
            updates = [u / (1e-30 + torch.mean(u**2) ** 0.5) for u in updates]
        params = [e.p for e in batch]
        torch._foreach_add_(params, updates, alpha=-step_size)
        if hp.weight_decay > 0:
            decayed = params
            if hp.cautious_weight_decay:
                decayed = [p * cautious_decay_mask(u, p) for p, u in zip(params, updates, strict=True)]
            torch._foreach_add_(params, decayed, alpha=-hp.lr * hp.weight_decay)
            del decayed
        del update, updates
        _batched_accumulate(g, batch, hp, has_left, has_right)
        if t % hp.precondition_frequency == 0 and (has_left or has_right):
            original = _batched_rotate(_stacked(exp_avgs), left, right, back=True)
            squares = _stacked(exp_avg_sqs)
            new_bases = []
            for k, present in enumerate((has_left, has_right)):
                if not present:
                    new_bases.append(None)
                    continue
                old = left if k == 0 else right
                new, order = _refresh(_stacked([e.statistics[k] for e in batch]), old)  # type: ignore[misc,arg-type]
                index = order.unsqueeze(-1) if k == 0 else order.unsqueeze(-2)  # rows of v, or its columns
                squares = torch.gather(squares, 1 + k, index.expand_as(squares))
                torch._foreach_copy_([e.bases[k] for e in batch], list(new.unbind(0)))  # type: ignore[misc]
                new_bases.append(new)
            torch._foreach_copy_(exp_avg_sqs, list(squares.unbind(0)))
            rotated = _batched_rotate(original, new_bases[0], new_bases[1], back=False)
            torch._foreach_copy_(exp_avgs, list(rotated.unbind(0)))


#: elements of one batch of stacked matrices (a few fp32 temporaries of this size are alive at once): large
#: matrices run one per batch, small ones many
BATCH_ELEMENTS = 1 << 24


def _chunks(batches: Mapping[tuple, list[_Entry]]) -> Iterable[tuple[tuple, list[_Entry]]]:
    """Each batch split into runs of at most :data:`BATCH_ELEMENTS` elements (at least one matrix each)."""
    for key, batch in batches.items():
        per = max(1, BATCH_ELEMENTS // max(1, math.prod(key[0])))
        for start in range(0, len(batch), per):
            yield key, batch[start : start + per]


def _batched_accumulate(g: Tensor, batch: list[_Entry], hp: SOAPHyper, has_left: bool, has_right: bool) -> None:
    if has_left:
        torch._foreach_lerp_(
            [e.statistics[0] for e in batch],  # type: ignore[misc]
            list(torch.matmul(g, g.mT).unbind(0)),
            1 - hp.shampoo_beta,
        )
    if has_right:
        torch._foreach_lerp_(
            [e.statistics[1] for e in batch],  # type: ignore[misc]
            list(torch.matmul(g.mT, g).unbind(0)),
            1 - hp.shampoo_beta,
        )


_IMPLEMENTATIONS = {"for_loop": _single_tensor_soap, "foreach": _foreach_soap}


def soap(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    statistics: list[list[Tensor | None]],
    bases: list[list[Tensor | None]],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    cautious: bool = False,
    maximize: bool = False,
    cautious_weight_decay: bool = False,
    implementation: str = "auto",
) -> str:
    """Functional SOAP step over plain tensors (see the module docstring), in place.

    ``statistics[i]`` / ``bases[i]`` hold tensor ``i``'s ``GG_k`` / ``Q_k`` per dimension of its merged shape
    (:func:`soap_layout`), None where a dimension has no preconditioner; ``steps[i]`` is the steps it has taken
    before this one. Parameters and moments of low precision are stepped through fp32 copies. Returns the
    implementation that ran.
    """
    implementation = resolve_implementation(implementation, tuple(_IMPLEMENTATIONS), owner="SOAP")
    hp = SOAPHyper(
        lr,
        beta1,
        beta2,
        beta2 if shampoo_beta is None else shampoo_beta,
        eps,
        weight_decay,
        precondition_frequency,
        normalize_grads,
        correct_bias,
        cautious,
        maximize,
        cautious_weight_decay,
    )
    entries, write_back = [], []
    for i, p in enumerate(params):
        dtype = math_dtype(p.dtype)
        originals = [p, exp_avgs[i], exp_avg_sqs[i], *(t for t in statistics[i] if t is not None)]
        originals += [t for t in bases[i] if t is not None]
        cast = [t if t.dtype == dtype else t.to(dtype) for t in originals]
        write_back += [(a, b) for a, b in zip(originals, cast, strict=True) if a is not b]
        it = iter(cast[3:])
        stats = [next(it) if t is not None else None for t in statistics[i]]
        qs = [next(it) if t is not None else None for t in bases[i]]
        shape, _ = soap_layout(tuple(p.shape), merge_dims, max_precond_dim, precondition_1d)
        entries.append(_Entry(cast[0], grads[i].to(dtype), cast[1], cast[2], stats, qs, shape, steps[i]))
    _IMPLEMENTATIONS[implementation](entries, hp)
    for original, value in write_back:
        original.copy_(value)
    return implementation


# --------------------------------------------------------------------------------------------------------------
# the optimizer
def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_dtensor(t) else t


class SOAP(LmoptOptimizer):
    """SOAP: Adam in the eigenbasis of Shampoo's preconditioners, refreshed every ``precondition_frequency``
    steps (see the module docstring for the rule).

    Args:
        params: parameters or param groups.
        lr: learning rate (default 3e-3, the authors').
        betas: Adam's ``(beta1, beta2)`` (default (0.95, 0.95), the authors').
        shampoo_beta: decay of the Shampoo statistics ``GG_k`` (default None: ``betas[1]``; the authors' -1).
        eps: added to ``sqrt(exp_avg_sq)`` (default 1e-8).
        weight_decay: decoupled decay, multiplied by lr, applied after the update (default 0.01).
        precondition_frequency: steps between eigenbasis refreshes (default 10).
        max_precond_dim: dimensions larger than this get no preconditioner (Adam along them; default 10000,
            which leaves most vocabulary dimensions out).
        merge_dims: merge consecutive dimensions while their product stays <= ``max_precond_dim`` (default
            False).
        precondition_1d: precondition 1-D tensors too (default False: plain Adam for them).
        normalize_grads: divide each tensor's update by its RMS (default False; the authors: helps at large
            ``precondition_frequency``, hurts at small).
        correct_bias: Adam's bias correction (default True).
        cautious: mask the update where its sign disagrees with the gradient, rescaled by the kept fraction
            (Liang et al. 2024; :mod:`lmopt.optim._cautious`; default False).
        cautious_weight_decay: decay only where the update and the parameter have the same sign (Chen et al.
            2025, "Cautious Weight Decay"; applied after the update, as SOAP's decay; default False).
        maximize: ascend instead of descend.
        state_precision: dtype of ``exp_avg`` / ``exp_avg_sq``: None (the parameter's, default), ``"fp32"`` or
            ``"bf16"``.
        preconditioner_precision: dtype of ``GG_k`` / ``Q_k``: None (fp32; fp64 for fp64 parameters; default),
            ``"fp32"`` or ``"bf16"`` (half the memory; the eigen-decompositions still run in fp32).
        implementation: ``"auto"`` (= ``"for_loop"``), ``"for_loop"`` or ``"foreach"`` (batched by shape).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State: ``step``, ``exp_avg``, ``exp_avg_sq`` and ``GG_k`` / ``Q_k`` for each preconditioned dimension ``k``.

    Example:
        >>> opt = lmopt.SOAP(lmopt.param_groups(model, weight_decay=0.01), lr=3e-3)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321, 2024.
    """

    implementations = ("for_loop", "foreach")
    auto_preference = ("for_loop", "foreach")  # measured: equal speed on CPU, fewer temporaries

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        state_precision: str | None = None,
        preconditioner_precision: str | None = None,
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        beta = group["shampoo_beta"]
        if beta is not None:
            check_range("shampoo_beta", beta, 0.0, 1.0)
        for name in ("precondition_frequency", "max_precond_dim"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        group.setdefault("cautious_weight_decay", False)  # groups saved before the option
        flags = ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias", "cautious", "maximize")
        for name in (*flags, "cautious_weight_decay"):
            check_flag(name, group[name])
        check_choice("state_precision", group["state_precision"], (None, "fp32", "bf16"))
        check_choice("preconditioner_precision", group["preconditioner_precision"], (None, "fp32", "bf16"))

    def _layout(self, group: Mapping[str, Any], param: Tensor) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return soap_layout(tuple(param.shape), group["merge_dims"], group["max_precond_dim"], group["precondition_1d"])

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        moment = _moment_dtype(param.dtype, group["state_precision"])
        for name in ("exp_avg", "exp_avg_sq"):  # contiguous: the math views them in the merged shape
            state[name] = torch.zeros_like(param, dtype=moment, memory_format=torch.contiguous_format)
        shape, flags = self._layout(group, param)
        precond = _preconditioner_dtype(param.dtype, group["preconditioner_precision"])
        for k, (size, present) in enumerate(zip(shape, flags, strict=True)):
            if present:  # plain tensors on every rank, also for DTensor parameters (full-matrix statistics)
                state[f"GG_{k}"] = torch.zeros((size, size), dtype=precond, device=param.device)
                state[f"Q_{k}"] = torch.zeros((size, size), dtype=precond, device=param.device)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        sharded = [is_dtensor(p) for p in params]
        full_params, full_grads, exp_avgs, exp_avg_sqs, statistics, bases, steps = [], [], [], [], [], [], []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            _, flags = self._layout(group, p)
            full_params.append(_full(p))  # DTensors: gathered copies, their shards written back below
            full_grads.append(_full(g))
            exp_avgs.append(_full(state["exp_avg"]))
            exp_avg_sqs.append(_full(state["exp_avg_sq"]))
            statistics.append([state[f"GG_{k}"] if present else None for k, present in enumerate(flags)])
            bases.append([state[f"Q_{k}"] if present else None for k, present in enumerate(flags)])
            steps.append(int(state["step"].item()))
        used = soap(
            full_params,
            full_grads,
            exp_avgs,
            exp_avg_sqs,
            statistics,
            bases,
            steps,
            lr=traced_lr(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            shampoo_beta=group["shampoo_beta"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            precondition_frequency=group["precondition_frequency"],
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            normalize_grads=group["normalize_grads"],
            correct_bias=group["correct_bias"],
            cautious=group["cautious"],
            cautious_weight_decay=group["cautious_weight_decay"],
            maximize=group["maximize"],
            implementation=group["implementation"],
        )
        for i, (p, dtensor) in enumerate(zip(params, sharded, strict=True)):
            state = self.state[p]
            state["step"].add_(1)
            if dtensor:  # each rank keeps its shard of the full-tensor results
                _copy_shard(p, full_params[i])
                _copy_shard(state["exp_avg"], exp_avgs[i])
                _copy_shard(state["exp_avg_sq"], exp_avg_sqs[i])
        self._implementation_used[id(group)] = used


def _copy_shard(target: Tensor, full: Tensor) -> None:
    """Write this rank's part of ``full`` into the DTensor ``target`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    target.copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None))


# --------------------------------------------------------------------------------------------------------------
# registry entries
def soap_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """``step``, the two moments (the parameter's shape) and ``GG_k`` / ``Q_k`` per preconditioned dimension of
    the merged shape, at their dtypes (see the module docstring)."""
    moment = _moment_dtype(dtype, hyper.get("state_precision"))
    precond = _preconditioner_dtype(dtype, hyper.get("preconditioner_precision"))
    merged, flags = soap_layout(
        tuple(shape),
        bool(hyper.get("merge_dims", False)),
        int(hyper.get("max_precond_dim", 10000)),
        bool(hyper.get("precondition_1d", False)),
    )
    out = [
        StateTensor("step", (), torch.float32),
        StateTensor("exp_avg", shape, moment),
        StateTensor("exp_avg_sq", shape, moment),
    ]
    for k, (size, present) in enumerate(zip(merged, flags, strict=True)):
        if present:
            out += [StateTensor(f"GG_{k}", (size, size), precond), StateTensor(f"Q_{k}", (size, size), precond)]
    return out


_SOAP_PAPER = "Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, arXiv:2409.11321, 2024"

SPECS = [
    OptimizerSpec(
        name="soap",
        cls=SOAP,
        summary="Adam in the eigenbasis of Shampoo's preconditioners; 8 B/param + 8 (m^2 + n^2) B per m x n matrix",
        paper=_SOAP_PAPER,
        state=soap_state,
        family="shampoo",
        aliases={"cautious_soap": {"cautious": True}, "c_soap": {"cautious": True}},
        translation=Translation(
            label="SOAP paper: AdamW's lr and weight decay, betas (0.95, 0.95), precondition_frequency 10",
            betas=(0.95, 0.95),
            source="Vyas et al. 2024, Section 6 / Appendix: SOAP runs at AdamW's tuned learning rate and weight "
            "decay, betas (0.95, 0.95), shampoo_beta = beta2, eigenbasis refreshed every 10 steps; the authors' "
            "defaults",
        ),
        # lmopt compare, small model, 120 steps (docs/optimizers-soap.md): validation loss 2.559 at lr 1e-2,
        # 2.728 at 3e-2 (3e-3 trails AdamW on the tiny model); AdamW 2.799 at its 3e-3, 2.762 at 1e-2
        compare={"lr": 1e-2, "weight_decay": 0.1, "betas": (0.95, 0.95)},
        compare_default=9,
        recommend_tier=0,
        recommend_reason="SOAP: fewer steps than AdamW (Vyas et al. 2024) for 8 (m^2 + n^2) B more per matrix",
    ),
]
