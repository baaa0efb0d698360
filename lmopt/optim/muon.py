"""Muon (and NorMuon) for the hidden matrices and AdamW for everything else, in one optimizer object.

Update rule for a 2-D hidden weight ``W`` of shape ``(A, B)`` (Jordan et al. 2024; the form of
``torch.optim.Muon``), gradient ``G``:

.. code-block:: text

    M <- momentum * M + (1 - momentum) * G                     (momentum_buffer)
    U  = (1 - momentum) * G + momentum * M   if nesterov, else M
    O  = NewtonSchulz^{ns_steps}(U / max(||U||_F, eps))        (approximately U V^T of U's SVD)
    O  = NorMuon(O)                                            (NorMuon only, below)
    O  = O * 1[O * G > 0] / max(mean(1[O * G > 0]), 1e-3)      (cautious=True only)
    W <- W * (1 - lr * weight_decay)                           (cautious_weight_decay: where O * W >= 0)
    W <- W - lr * s(A, B) * O

    s = 0.2 * sqrt(max(A, B))    adjust_lr_fn="match_rms_adamw" (Moonlight, the default here): the update has
                                 the RMS of an AdamW update, so Muon shares AdamW's lr and weight decay
    s = sqrt(max(1, A / B))      adjust_lr_fn="original" (Keller Jordan's scaling, torch.optim.Muon's default)

Each Newton-Schulz iteration is ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, run on the wide orientation
of the matrix. ``ns_coefficients`` chooses ``(a, b, c)``:

* a triple, used at every iteration (default Keller Jordan's quintic ``(3.4445, -4.7750, 2.0315)``, as
  ``torch.optim.Muon``);
* ``"polar_express"``: the per-iteration optimal coefficients of Polar Express (Amsel, Persson, Musco, Gower
  2025, arXiv:2505.16932), as the authors' code applies them: the published table for degree 5, ``l = 1e-3``,
  each iteration but the last divided by the safety factor 1.01 (``a / 1.01, b / 1.01^3, c / 1.01^5``), the
  last repeated beyond the table, and the input scaled by ``1 / (1.01 ||U||_F + eps)``;
* a sequence of triples: one per iteration, the last repeated.

NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable", arXiv:2510.05491; class
:class:`NorMuon`, registry ``normuon``) normalises the orthogonalised update per neuron (row) with a second
moment, then restores its Frobenius norm (the authors' code):

.. code-block:: text

    V <- beta2 * V + (1 - beta2) * mean_j(O_ij^2)              (second_momentum_buffer, one per row)
    O' = O / (sqrt(V) + 1e-10)
    O  = O' * ||O||_F / (||O'||_F + 1e-10)

Every other parameter (embeddings, the output head, norms, biases, other vectors) gets AdamW with the same
``lr`` and ``weight_decay`` (from its group), ``adamw_betas`` and ``adamw_eps``.

Shapes: 2-D weights are one matrix. 3-D weights (batched experts, ``(E, A, B)``) are ``E`` matrices of shape
``(A, B)``, each orthogonalised (and NorMuon-normalised, and lr-scaled) on its own (``matrix_3d="per_matrix"``,
the default; ``"flatten"`` treats them as one ``(E, A * B)`` matrix, as convolutions). Tensors with more than
three dimensions (convolutions) are ``(shape[0], prod(shape[1:]))`` matrices; given ``model=``, the weights of
convolution modules (``nn.Conv1d`` included) are always flattened.

Routing: given ``model=`` (``lmopt.create_optimizer("muon", model)`` passes it), parameters whose role in
:func:`lmopt.classify_parameters` is ``"matrix"`` go to Muon and the rest to AdamW; given only parameters,
every tensor with two or more dimensions goes to Muon (pass the model, or set ``"use_muon"`` in your param
groups, to keep embeddings and the head on AdamW). Each group carries ``use_muon`` (True / False); the groups
you pass are split in two when they mix both kinds.

FSDP2 (``distributed="owner"``, the default): each ``Shard(0)`` DTensor matrix is orthogonalised on one owner
rank (the shards of the momentum-updated matrix gathered there, Newton-Schulz on the full matrix, the result
scattered back; owners assigned largest matrix first to the least loaded rank), asynchronously, so ranks work on
their matrices while the others' shards travel; 3-D expert weights sharded over experts orthogonalise locally
with no communication. ``distributed="dtensor"`` runs the iterations on the DTensors themselves (DTensor's
implicit collectives in every matmul). Both equal the unsharded run (lmopt/optim/_muon_distributed.py).

Reference: Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024
(kellerjordan.github.io/posts/muon); Liu et al., "Muon is Scalable for LLM Training" (Moonlight),
arXiv:2502.16982, 2025; Amsel et al., "The Polar Express", arXiv:2505.16932, 2025; Li et al., "NorMuon",
arXiv:2510.05491, 2025; Liang et al., "Cautious Optimizers", arXiv:2411.16085, 2024.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..param_groups import classify_parameters
from ..spec import OptimizerSpec, StateTensor, Translation
from ._cautious import CAUTIOUS_MIN_FRACTION, apply_cautious_, cautious_decay_mask
from ._dispatch import math_dtype, resolve_implementation
from ._impl import traced_lr
from .adamw import adam_state, adamw
from .base import (
    LmoptOptimizer,
    check_betas,
    check_choice,
    check_flag,
    check_positive,
    check_range,
    is_dtensor,
)

__all__ = [
    "NS_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "Muon",
    "NorMuon",
    "coefficient_schedule",
    "muon",
    "normuon",
    "zeropower_via_newton_schulz",
]

#: Keller Jordan's quintic coefficients (maximal slope at zero), as in torch.optim.Muon
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: Polar Express's published degree-5 coefficients (Amsel et al. 2025, l = 1e-3), before the safety factor; the
#: last one is the limit (subsequent iterations equal it numerically)
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
#: the authors' safety factor: the input is divided by 1.01 ||X||_F and each polynomial but the last by 1.01
POLAR_EXPRESS_SAFETY = 1.01
#: NorMuon's floor in the row normalisation and the norm restoration (the authors' code)
NORMUON_EPS = 1e-10
_NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_MATRIX_3D = ("per_matrix", "flatten")
_DISTRIBUTED = ("owner", "dtensor")

Coefficients = tuple[float, float, float] | Sequence[tuple[float, float, float]] | str


def _resolve_ns_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    # bf16 matmuls are fast on GPUs; on CPUs without bf16 units they are far slower than fp32
    if ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _NS_DTYPES[ns_dtype]


def coefficient_schedule(
    ns_coefficients: Coefficients, ns_steps: int
) -> tuple[list[tuple[float, float, float]], float]:
    """The ``(a, b, c)`` of each of ``ns_steps`` iterations and the factor on ``||X||_F`` in the normalisation.

    A triple repeats; ``"polar_express"`` is the authors' table with their safety factor (1.01 on the norm, and
    ``a / 1.01, b / 1.01^3, c / 1.01^5`` on every polynomial but the last); a sequence of triples is used in
    order, its last one repeated.
    """
    if isinstance(ns_coefficients, str):
        if ns_coefficients != "polar_express":
            raise ValueError(
                f"ns_coefficients must be a triple, a list of triples or 'polar_express', got {ns_coefficients!r}"
            )
        s = POLAR_EXPRESS_SAFETY
        table = [(a / s, b / s**3, c / s**5) for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:-1]]
        table.append(POLAR_EXPRESS_COEFFICIENTS[-1])
        scale = s
    elif len(ns_coefficients) == 3 and all(isinstance(v, (int, float)) for v in ns_coefficients):
        table = [tuple(float(v) for v in ns_coefficients)]  # type: ignore[list-item]
        scale = 1.0
    else:
        table = [tuple(float(v) for v in abc) for abc in ns_coefficients]  # type: ignore[misc]
        scale = 1.0
    return [table[min(i, len(table) - 1)] for i in range(ns_steps)], scale  # type: ignore[misc]


def zeropower_via_newton_schulz(
    update: Tensor,
    *,
    ns_coefficients: Coefficients = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Approximately orthogonalise a matrix, or a batch of matrices of one shape (leading batch dimension).

    Returns a new tensor of ``dtype`` and ``update``'s shape, close to ``U V^T`` of ``update = U S V^T`` (the
    quintic iteration leaves singular values in roughly [0.7, 1.2], which does not hurt training; Polar Express
    converges to 1). With ``dtype=torch.bfloat16`` and the default coefficients the sequence of operations is
    torch.optim.Muon's. The input is scaled by ``1 / max(||U||_F, eps)`` (quintic and explicit coefficients, as
    torch) or ``1 / (1.01 ||U||_F + eps)`` (``"polar_express"``, as the authors' code).
    """
    schedule, scale = coefficient_schedule(ns_coefficients, ns_steps)
    x = update.to(dtype)  # a copy when the dtype changes; the in-place division below must not touch `update`
    if x is update:
        x = x.clone()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    # Frobenius norm over the matrix (a reduction: on DTensors it stays a DTensor, never .to_local())
    norm = x.norm() if x.ndim == 2 else torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x.div_(norm.clamp(min=eps) if scale == 1.0 else norm.mul(scale).add(eps))  # out of place: DTensor partials
    if x.ndim == 2:
        for a, b, c in schedule:
            gram = x @ x.T
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, gram_update, x, beta=a)
    else:
        for a, b, c in schedule:
            gram = x @ x.mT
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


def normuon_normalize(ortho: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon's neuron-wise normalisation of an orthogonalised matrix (or batch, ``(..., A, B)``).

    ``second_moment`` (``(..., A, 1)``) is updated in place with the mean square of each row; the result is
    ``ortho`` divided by its root and rescaled to ``ortho``'s Frobenius norm (per matrix), a new tensor in
    ``second_moment``'s dtype (fp32; fp64 for fp64 parameters).
    """
    o = ortho.to(second_moment.dtype)
    norm = torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)
    second_moment.lerp_(_like_param(o.square().mean(dim=-1, keepdim=True), second_moment), 1 - beta2)
    o = o / second_moment.sqrt().add_(NORMUON_EPS)
    # out of place on the norms: on DTensors they are pending partial values
    return o.mul_(norm / torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True).add(NORMUON_EPS))


def matrix_shape(shape: Sequence[int], matrix_3d: str = "per_matrix") -> tuple[int, ...]:
    """The shape Muon orthogonalises a parameter of ``shape`` as: ``(A, B)``, or ``(E, A, B)`` for a batch of
    3-D expert matrices (``matrix_3d="per_matrix"``); others flatten to ``(shape[0], prod(shape[1:]))``."""
    shape = tuple(shape)
    if len(shape) == 3 and matrix_3d == "per_matrix":
        return shape
    return (shape[0], math.prod(shape[1:]))


def adjusted_lr(lr: float, adjust_lr_fn: str, shape: tuple[int, ...]) -> float:
    """The learning rate Muon applies to a matrix of ``shape`` (rows, columns of the orthogonalised one; a
    3-D ``(E, A, B)`` shape is ``E`` matrices of ``(A, B)``)."""
    rows, cols = (shape[-2], shape[-1]) if len(shape) == 3 else (shape[0], math.prod(shape[1:]))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr


def _momentum_update(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    buf.lerp_(grad.to(buf.dtype), 1 - momentum)
    return grad.lerp(buf.to(grad.dtype), momentum) if nesterov else buf


class MuonHyper(NamedTuple):
    """The scalar hyperparameters of one Muon step (what every implementation takes)."""

    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_coefficients: Coefficients
    ns_steps: int
    eps: float
    adjust_lr_fn: str
    ns_dtype: str
    beta2: float | None = None  # NorMuon's second-moment decay (None: plain Muon)
    cautious: bool = False
    cautious_weight_decay: bool = False
    matrix_3d: str = "per_matrix"
    distributed: str = "owner"

    def newton_schulz(self) -> dict[str, Any]:
        """The keywords of :func:`zeropower_via_newton_schulz`, less ``dtype``."""
        return dict(ns_coefficients=self.ns_coefficients, ns_steps=self.ns_steps, eps=self.eps)


def orthogonalize(matrix: Tensor, second_moment: Tensor | None, hp: MuonHyper, dtype: torch.dtype) -> Tensor:
    """The matrix-level part of the step: Newton-Schulz on ``matrix`` (2-D, or a batch ``(k, A, B)``), then
    NorMuon's normalisation where ``second_moment`` is given (updated in place; shape ``matrix.shape[:-1] +
    (1,)``). Returns a new tensor of ``dtype`` (NorMuon: of ``second_moment``'s dtype)."""
    ortho = zeropower_via_newton_schulz(matrix, **hp.newton_schulz(), dtype=dtype)
    if second_moment is not None:
        ortho = normuon_normalize(ortho, second_moment, hp.beta2)  # type: ignore[arg-type]
    return ortho


def cautious_fraction(update: Tensor, grad: Tensor) -> Tensor:
    """``max(mean(1[update * grad > 0]), 1e-3)`` (C-Optim's normalisation; a DTensor reduces over shards)."""
    return (update * grad > 0).to(update.dtype).mean().clamp(min=CAUTIOUS_MIN_FRACTION)


def finish_update(
    param: Tensor,
    grad: Tensor,
    ortho: Tensor,
    hp: MuonHyper,
    scaled_lr: float,
    kept_fraction: Tensor | None = None,
) -> None:
    """The tensor-level part of the step: the cautious mask (``kept_fraction``: its mean, when the caller
    reduced it across shards), the (cautious) weight decay and the update, in one rounding for low-precision
    parameters. ``ortho`` has ``param``'s number of elements."""
    ortho = ortho.reshape(param.shape)
    if hp.cautious:  # the mask and its mean in the parameter's math dtype (fp64 for fp64 parameters)
        ortho = ortho.to(math_dtype(param.dtype))
        if kept_fraction is None and not is_dtensor(ortho):
            ortho = apply_cautious_(ortho, grad)  # ortho is this step's own (a new tensor, or a slice of one)
        else:  # a local shard (its fraction reduced across ranks) or a DTensor (out-of-place on the partial mean)
            fraction = cautious_fraction(ortho, grad) if kept_fraction is None else kept_fraction
            ortho = ortho * (ortho * grad > 0).to(ortho.dtype).div_(fraction)
    work = param if param.dtype in (torch.float32, torch.float64) else param.float()
    if hp.weight_decay != 0:
        if hp.cautious_weight_decay:
            decay = cautious_decay_mask(ortho, work).mul_(-hp.lr * hp.weight_decay)
            work.addcmul_(work, decay)
        else:
            work.mul_(1 - hp.lr * hp.weight_decay)
    if isinstance(scaled_lr, Tensor):  # a tensor lr in a traced step: an operand (alpha takes Python numbers)
        work.sub_(ortho.to(work.dtype) * scaled_lr)
    else:
        work.add_(ortho.to(work.dtype), alpha=-scaled_lr)
    if work is not param:  # low-precision parameters: one rounding per step
        param.copy_(work)


def _like_param(ortho: Tensor, param: Tensor) -> Tensor:
    """A DTensor result laid out as its parameter (DTensor's matmuls may leave a small matrix replicated)."""
    if is_dtensor(ortho) and tuple(ortho.placements) != tuple(param.placements):
        return ortho.redistribute(param.device_mesh, param.placements)
    return ortho


def _matrix(update: Tensor, hp: MuonHyper) -> Tensor:
    return update.reshape(matrix_shape(update.shape, hp.matrix_3d))


def _owner_split(params, bufs, second, hp: MuonHyper, live: list[int]) -> tuple[list[int], list[int]]:
    """Indices the owner-rank path takes (FSDP2 Shard(0) DTensors) and the others."""
    if hp.distributed != "owner" or not any(is_dtensor(params[i]) for i in live):
        return [], live
    from ._muon_distributed import owner_eligible

    owned = [i for i in live if owner_eligible(params[i], bufs[i], second[i] if second else None)]
    taken = set(owned)
    return owned, [i for i in live if i not in taken]


def _finish_all(params, grads, orthos: dict[int, Tensor], hp: MuonHyper, scaled: dict[int, float], local):
    """``finish_update`` for every entry; ``local``: indices whose tensors are local shards of DTensors (their
    cautious fractions are reduced across ranks in one collective)."""
    fractions: dict[int, Tensor] = {}
    if hp.cautious and local:
        from ._muon_distributed import global_cautious_fractions

        fractions = global_cautious_fractions(params, grads, orthos, local)
    for i, ortho in orthos.items():
        p, g = (params[i].to_local(), grads[i].to_local()) if i in local else (params[i], grads[i])
        finish_update(p, g, ortho, hp, scaled[i], fractions.get(i))


def _single_tensor_muon(params, grads, bufs, second, hp: MuonHyper):
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    updates = {i: _momentum_update(grads[i], bufs[i], hp.momentum, hp.nesterov) for i in live}
    owned, rest = _owner_split(params, bufs, second, hp, live)
    orthos: dict[int, Tensor] = {}
    scaled: dict[int, float] = {}
    for i in rest:
        matrix = _matrix(updates[i], hp)
        dtype = _resolve_ns_dtype(hp.ns_dtype, params[i].device)
        orthos[i] = _like_param(orthogonalize(matrix, second[i] if second else None, hp, dtype), params[i])
        scaled[i] = adjusted_lr(hp.lr, hp.adjust_lr_fn, tuple(matrix.shape))
    local = _owned_orthos(params, grads, updates, bufs, second, hp, owned, orthos, scaled)
    _finish_all(params, grads, orthos, hp, scaled, local)


def _owned_orthos(params, grads, updates, bufs, second, hp, owned, orthos, scaled) -> set[int]:
    if not owned:
        return set()
    from ._muon_distributed import orthogonalize_on_owners

    for i in owned:
        scaled[i] = adjusted_lr(hp.lr, hp.adjust_lr_fn, matrix_shape(params[i].shape, hp.matrix_3d))
    orthos.update(
        orthogonalize_on_owners(
            [params[i] for i in owned],
            [updates[i] for i in owned],
            [second[i] for i in owned] if second else None,
            hp,
            owned,
        )
    )
    return set(owned)


def _foreach_muon(params, grads, bufs, second, hp: MuonHyper):
    # momentum with foreach ops, then one batched Newton-Schulz per (matrix shape, device, dtype): fewer, larger
    # matmuls (3-D expert weights join the batch as their E matrices)
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
    owned, rest = _owner_split(params, bufs, second, hp, live)
    orthos: dict[int, Tensor] = {}
    scaled: dict[int, float] = {}
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i in rest:
        shape = matrix_shape(params[i].shape, hp.matrix_3d)
        batches[(shape[-2], shape[-1], params[i].device, updates[i].dtype, is_dtensor(params[i]))].append(i)
    for (rows, cols, device, _dtype, dtensor), idx in batches.items():
        dtype = _resolve_ns_dtype(hp.ns_dtype, device)
        for i in idx:
            scaled[i] = adjusted_lr(hp.lr, hp.adjust_lr_fn, (rows, cols))
        if dtensor or (len(idx) == 1 and params[idx[0]].ndim == 2):
            # DTensors: each matrix stays a DTensor, no stacking of shards; a lone matrix: torch's 2-D order
            for i in idx:
                ortho = orthogonalize(_matrix(updates[i], hp), second[i] if second else None, hp, dtype)
                orthos[i] = _like_param(ortho, params[i])
            continue
        mats = [updates[i].reshape(-1, rows, cols).to(dtype) for i in idx]
        counts = [m.shape[0] for m in mats]
        stacked_v = torch.cat([second[i].reshape(-1, rows, 1) for i in idx]) if second else None
        ortho = orthogonalize(torch.cat(mats), stacked_v, hp, dtype)
        start = 0
        for i, n in zip(idx, counts, strict=True):
            orthos[i] = ortho[start : start + n]
            if second:
                second[i].copy_(stacked_v[start : start + n].reshape(second[i].shape))  # type: ignore[index]
            start += n
    local = _owned_orthos(params, grads, updates, bufs, second, hp, owned, orthos, scaled)
    plain = not (hp.cautious or hp.cautious_weight_decay or local)
    if plain and all(params[i].dtype in (torch.float32, torch.float64) for i in orthos):
        # the common case in foreach ops: decay, then one add per matrix shape (one lr scale; keyed by the
        # shape, not the scale: under torch.compile the lr, hence the scale, is symbolic)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i in orthos:
            by_shape[matrix_shape(params[i].shape, hp.matrix_3d)[-2:]].append(i)
        for idx in by_shape.values():
            scale = scaled[idx[0]]
            ps = [params[i] for i in idx]
            if hp.weight_decay != 0:
                torch._foreach_mul_(ps, 1 - hp.lr * hp.weight_decay)
            steps = [orthos[i].reshape(params[i].shape).to(params[i].dtype) for i in idx]
            if isinstance(scale, Tensor):  # a tensor lr in a traced step: an operand, not alpha
                torch._foreach_add_(ps, torch._foreach_mul(steps, -scale))
            else:
                torch._foreach_add_(ps, steps, alpha=-scale)
        return
    _finish_all(params, grads, orthos, hp, scaled, local)


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
    ns_coefficients: Coefficients = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr_fn: str = "match_rms_adamw",
    ns_dtype: str = "auto",
    second_momentum_buffers: list[Tensor] | None = None,
    beta2: float = 0.95,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    matrix_3d: str = "per_matrix",
    distributed: str = "owner",
    implementation: str = "auto",
) -> None:
    """Functional Muon step over matrices (see the module docstring); updates params and buffers in place.

    With ``second_momentum_buffers`` (one ``matrix_shape[:-1] + (1,)`` tensor per parameter) it is NorMuon's
    step, with ``beta2`` their decay.
    """
    implementation = resolve_implementation(
        {"batched": "foreach"}.get(implementation, implementation), tuple(_IMPLEMENTATIONS), owner="Muon"
    )
    hp = MuonHyper(
        lr,
        weight_decay,
        momentum,
        nesterov,
        ns_coefficients,
        ns_steps,
        eps,
        adjust_lr_fn,
        ns_dtype,
        beta2 if second_momentum_buffers is not None else None,
        cautious,
        cautious_weight_decay,
        matrix_3d,
        distributed,
    )
    _IMPLEMENTATIONS[implementation](params, grads, momentum_buffers, second_momentum_buffers, hp)


def normuon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    second_momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    beta2: float,
    nesterov: bool = True,
    **kwargs: Any,
) -> None:
    """Functional NorMuon step (see the module docstring): :func:`muon` with per-row second moments."""
    muon(
        params,
        grads,
        momentum_buffers,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        second_momentum_buffers=second_momentum_buffers,
        beta2=beta2,
        **kwargs,
    )


def _flattened_modules(model: nn.Module) -> set[int]:
    """Parameters of convolution modules: their weights are always one flattened matrix."""
    return {
        id(p) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters(recurse=False)
    }


def _split_groups(params: Any, model: nn.Module | None) -> list[dict[str, Any]]:
    """The user's groups, each split into a Muon part and an AdamW part (empty parts dropped); with the model,
    3-D convolution weights get a Muon part of their own with ``matrix_3d="flatten"``."""
    params = list(params)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    roles = {id(info.param): info.role for info in classify_parameters(model)} if model is not None else None
    convs = _flattened_modules(model) if model is not None else set()
    out: list[dict[str, Any]] = []
    for group in groups:
        tensors = list(group["params"])
        if "use_muon" in group:
            out.append({**group, "params": tensors})
            continue
        names = group.get("param_names")
        parts: dict[str, dict[str, list]] = {k: {"params": [], "names": []} for k in ("muon", "conv", "adamw")}
        for i, p in enumerate(tensors):
            if roles is not None:
                use = roles.get(id(p)) == "matrix" and p.ndim >= 2
            else:
                use = p.ndim >= 2
            kind = ("conv" if id(p) in convs and p.ndim == 3 else "muon") if use else "adamw"
            parts[kind]["params"].append(p)
            if names is not None:
                parts[kind]["names"].append(names[i])
        for kind in ("muon", "conv", "adamw"):
            if parts[kind]["params"]:
                g = {**group, "params": parts[kind]["params"], "use_muon": kind != "adamw"}
                if kind == "conv":
                    g["matrix_3d"] = "flatten"
                if names is not None:
                    g["param_names"] = parts[kind]["names"]
                out.append(g)
    return out


def _check_coefficients(coefficients: Any) -> None:
    if isinstance(coefficients, str):
        check_choice("ns_coefficients", coefficients, ("polar_express",))
        return
    message = (
        "ns_coefficients must be a tuple of 3 numbers (a, b, c), a list of such tuples (one per iteration) or "
        f"'polar_express', got {coefficients!r}"
    )
    if not isinstance(coefficients, (tuple, list)) or not coefficients:
        raise ValueError(message)
    triples = [coefficients] if all(not isinstance(v, (tuple, list)) for v in coefficients) else coefficients
    for k, abc in enumerate(triples):
        if not isinstance(abc, (tuple, list)) or len(abc) != 3:
            raise ValueError(message)
        for i, value in enumerate(abc):
            name = (
                f"ns_coefficients[{i}]" if len(triples) == 1 and abc is coefficients else f"ns_coefficients[{k}][{i}]"
            )
            check_range(name, value, -1e6, 1e6)


def _as_coefficients(value: Any) -> Any:
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple) and value and isinstance(value[0], (list, tuple)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


class Muon(LmoptOptimizer):
    """Muon (orthogonalised momentum) for hidden matrices and AdamW for the other parameters, in one
    optimizer.

    Args:
        params: parameters or param groups; groups may set ``use_muon`` to choose the update explicitly.
        lr: learning rate shared by both updates (default 1e-3; with Moonlight's scaling, AdamW's lr).
        weight_decay: decoupled decay shared by both (default 0.1, as torch.optim.Muon and Moonlight).
        momentum: Muon momentum (default 0.95).
        nesterov: Nesterov momentum for Muon (default True).
        ns_coefficients: Newton-Schulz coefficients: a triple for every iteration (default Keller Jordan's
            quintic (3.4445, -4.7750, 2.0315), torch.optim.Muon's), ``"polar_express"`` (Amsel et al. 2025:
            per-iteration optimal coefficients with the authors' 1.01 safety factor) or a list of triples.
        ns_steps: Newton-Schulz iterations (default 5).
        eps: floor of the Frobenius norm before the iterations (default 1e-7).
        adjust_lr_fn: ``"match_rms_adamw"`` (default: Moonlight's ``0.2 * sqrt(max(A, B))``), ``"original"``
            (``sqrt(max(1, A / B))``) or ``"none"``.
        adamw_betas: AdamW's betas for the non-matrix parameters (default (0.9, 0.95)).
        adamw_eps: AdamW's eps (default 1e-8).
        ns_dtype: dtype of the Newton-Schulz iterations: ``"auto"`` (default: bf16 on CUDA, fp32 elsewhere,
            since CPUs without bf16 units run bf16 matmuls far slower), ``"bf16"`` (torch.optim.Muon) or
            ``"fp32"``.
        cautious: mask the orthogonalised update where its sign disagrees with the gradient, rescaled by the
            kept fraction (Liang et al. 2024, C-Optim's normalisation; default False).
        cautious_weight_decay: decay only where update and parameter agree in sign (Chen et al. 2025;
            default False).
        matrix_3d: 3-D weights as ``E`` matrices (``"per_matrix"``, default: batched experts) or one flattened
            matrix (``"flatten"``).
        distributed: FSDP2 ``Shard(0)`` matrices: ``"owner"`` (default: gathered on one owner rank, orthogonalised
            whole, scattered back) or ``"dtensor"`` (DTensor's implicit collectives in every matmul).
        model: the model, to route by role (embeddings and the output head to AdamW); ``create_optimizer``
            passes it.
        implementation: ``"auto"`` (= ``"foreach"``, old name ``"batched"``: momentum with foreach ops, one
            batched Newton-Schulz per matrix shape) or ``"for_loop"`` (one matrix at a time, torch.optim.Muon's
            order).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    State per parameter: Muon matrices keep ``momentum_buffer`` (the parameter's dtype: 4 bytes per fp32
    parameter); AdamW parameters keep ``step``, ``exp_avg`` and ``exp_avg_sq``.

    Example:
        >>> opt = lmopt.create_optimizer("muon", model, lr=3e-4, weight_decay=0.1)   # routes by role
        >>> opt = lmopt.create_optimizer("muon", model, ns_coefficients="polar_express", cautious=True)
        >>> print(opt)   # shows which groups use Muon and which AdamW

    Reference: Jordan et al. 2024 (kellerjordan.github.io/posts/muon); Liu et al., "Muon is Scalable for LLM
    Training", arXiv:2502.16982; Amsel et al., "The Polar Express", arXiv:2505.16932.
    """

    implementations = ("for_loop", "foreach")
    implementation_aliases = {"batched": "foreach"}  # the name before lmopt's one vocabulary
    #: NorMuon's per-row second moment (set by :class:`NorMuon`)
    _normuon = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Coefficients = NS_COEFFICIENTS,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str = "match_rms_adamw",
        *,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: str = "auto",
        cautious: bool = False,
        cautious_weight_decay: bool = False,
        matrix_3d: str = "per_matrix",
        distributed: str = "owner",
        model: nn.Module | None = None,
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
        **extra: Any,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if extra and not self._normuon:
            raise TypeError(f"Muon got unexpected keyword arguments {sorted(extra)}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=_as_coefficients(ns_coefficients),
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            ns_dtype=ns_dtype,
            cautious=cautious,
            cautious_weight_decay=cautious_weight_decay,
            matrix_3d=matrix_3d,
            distributed=distributed,
            implementation=implementation,
            **extra,
        )
        super().__init__(_split_groups(params, model), defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
        group["ns_coefficients"] = _as_coefficients(group["ns_coefficients"])
        _check_coefficients(group["ns_coefficients"])
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"ns_steps must be an integer in [1, 100), got {steps!r}")
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ("match_rms_adamw", "original", "none"))
        check_betas("adamw_betas", group["adamw_betas"])
        check_positive("adamw_eps", group["adamw_eps"])
        check_choice("ns_dtype", group["ns_dtype"], ("auto", "bf16", "fp32"))
        check_flag("cautious", group["cautious"])
        check_flag("cautious_weight_decay", group["cautious_weight_decay"])
        check_choice("matrix_3d", group["matrix_3d"], _MATRIX_3D)
        check_choice("distributed", group["distributed"], _DISTRIBUTED)
        if self._normuon:
            check_range("beta2", group["beta2"], 0.0, 1.0)
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
            if self._normuon:
                state["second_momentum_buffer"] = _second_moment_zeros(param, group["matrix_3d"])
        else:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        lr = traced_lr(group["lr"])
        if group["use_muon"]:
            muon(
                params,
                grads,
                [s["momentum_buffer"] for s in states],
                lr=lr,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                ns_steps=group["ns_steps"],
                eps=group["eps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                ns_dtype=group["ns_dtype"],
                second_momentum_buffers=[s["second_momentum_buffer"] for s in states] if self._normuon else None,
                beta2=group.get("beta2", 0.95),
                cautious=group["cautious"],
                cautious_weight_decay=group["cautious_weight_decay"],
                matrix_3d=group["matrix_3d"],
                distributed=group["distributed"],
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
        lines = [f"{type(self).__name__} (nonfinite={self.nonfinite!r}, skipped_steps={self.skipped_steps})"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            kind = ("NorMuon" if self._normuon else "Muon") if group["use_muon"] else "AdamW"
            name = f" {group['name']!r}" if "name" in group else ""
            lines.append(
                f"  group {i}{name} -> {kind}: {len(group['params'])} tensors, {n:,} parameters, "
                f"lr={group['lr']:g}, weight_decay={group['weight_decay']:g}"
            )
        return "\n".join(lines)


def second_moment_shape(shape: Sequence[int], matrix_3d: str = "per_matrix") -> tuple[int, ...]:
    """NorMuon's per-row second moment for a parameter of ``shape``: ``(A, 1)``, or ``(E, A, 1)`` for 3-D
    expert weights orthogonalised per matrix, ``(shape[0], 1)`` for flattened ones."""
    return (*matrix_shape(shape, matrix_3d)[:-1], 1)


def _second_moment_zeros(param: Tensor, matrix_3d: str) -> Tensor:
    shape = second_moment_shape(param.shape, matrix_3d)
    dtype = math_dtype(param.dtype)
    if is_dtensor(param):
        from ._muon_distributed import sharded_zeros_like_rows

        return sharded_zeros_like_rows(param, shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=param.device)


class NorMuon(Muon):
    """NorMuon: Muon with a neuron-wise (per-row) second-moment normalisation after the orthogonalisation, and
    AdamW for the other parameters, in one optimizer (Li et al. 2025, arXiv:2510.05491).

    Update (see the module docstring): Muon's momentum and Newton-Schulz, then per row ``i`` of the orthogonalised
    ``O``: ``V_i <- beta2 V_i + (1 - beta2) mean_j O_ij^2``, ``O' = O / (sqrt(V) + 1e-10)``, rescaled to ``O``'s
    Frobenius norm, then Muon's lr scaling and decoupled weight decay.

    Args:
        beta2: decay of the per-row second moment (default 0.95, the authors').
        adjust_lr_fn: ``"match_rms_adamw"`` (default: Moonlight's ``0.2 sqrt(max(A, B))`` on the norm-restored
            update, so NorMuon shares AdamW's lr and weight decay; the paper's ``0.2 sqrt(AB) / ||O'||_F``
            equals it where ``||O||_F = sqrt(min(A, B))``), ``"original"`` (the authors' code:
            ``sqrt(max(1, A / B))``, with their lr 0.02) or ``"none"``.
        everything else: as :class:`Muon`.

    State per Muon matrix: ``momentum_buffer`` (the parameter's shape and dtype) and ``second_momentum_buffer``
    (``(A, 1)``, or ``(E, A, 1)`` for 3-D experts; fp32, fp64 for fp64 parameters): ``4 + 4 / B`` bytes per fp32
    parameter. AdamW parameters keep AdamW's state.

    Example:
        >>> opt = lmopt.create_optimizer("normuon", model, lr=3e-4, weight_decay=0.1)

    Reference: Li, Liu, Liang, Chen, Zhao, "NorMuon: Making Muon more efficient and scalable", arXiv:2510.05491
    (code: github.com/zichongli5/NorMuon).
    """

    _normuon = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        beta2: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Coefficients = NS_COEFFICIENTS,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str = "match_rms_adamw",
        *,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: str = "auto",
        cautious: bool = False,
        cautious_weight_decay: bool = False,
        matrix_3d: str = "per_matrix",
        distributed: str = "owner",
        model: nn.Module | None = None,
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            params,
            lr,
            weight_decay,
            momentum,
            nesterov,
            ns_coefficients,
            ns_steps,
            eps,
            adjust_lr_fn,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            ns_dtype=ns_dtype,
            cautious=cautious,
            cautious_weight_decay=cautious_weight_decay,
            matrix_3d=matrix_3d,
            distributed=distributed,
            model=model,
            implementation=implementation,
            nonfinite=nonfinite,
            check_finite=check_finite,
            beta2=beta2,
        )


# -----------------------------------------------------------------------------------------------------------
# registry entries
def _uses_muon(shape: tuple[int, ...], hyper: Mapping[str, Any]) -> bool:
    role = hyper.get("role")
    return hyper.get("use_muon", len(shape) >= 2 if role is None else role == "matrix" and len(shape) >= 2)


def _muon_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """Muon matrices: one momentum buffer; the rest: AdamW's state. ``role`` (from classify_parameters), when
    given, routes like the model-aware optimizer (embeddings and the head are AdamW's); else by dimension."""
    if _uses_muon(shape, hyper):
        return [StateTensor("momentum_buffer", shape, dtype)]
    return adam_state(shape, dtype, {})


def _normuon_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """NorMuon matrices: Muon's momentum buffer and a per-row second moment (fp32; fp64 for fp64)."""
    if _uses_muon(shape, hyper):
        rows = second_moment_shape(shape, hyper.get("matrix_3d", "per_matrix"))
        return [
            StateTensor("momentum_buffer", shape, dtype),
            StateTensor("second_momentum_buffer", rows, math_dtype(dtype)),
        ]
    return adam_state(shape, dtype, {})


_MUON_TRANSLATION = Translation(
    betas="optional",  # betas/eps of Muon's AdamW part: passed only if the constructor names them so
    label="Moonlight paper: as AdamW with 0.2 sqrt(max(m, n)) scaling; momentum 0.95",
    optional={"pretrain": {"momentum": 0.95}, "finetune": {"momentum": 0.95}},
    source="Liu et al., Muon is Scalable for LLM Training (Moonlight), 2025: with the "
    "0.2 sqrt(max(m, n)) update scaling Muon shares AdamW's lr and weight decay; "
    "momentum 0.95 (Jordan et al. 2024)",
)

SPECS = [
    OptimizerSpec(
        name="muon",
        cls=Muon,
        summary="Muon (Newton-Schulz orthogonalised momentum) for hidden matrices + AdamW for the rest",
        paper="Jordan et al., Muon, 2024; Liu et al., Muon is Scalable for LLM Training, arXiv:2502.16982",
        state=_muon_state,
        family="muon",
        accepts_model=True,
        aliases={
            "moonlight_muon": {"adjust_lr_fn": "match_rms_adamw"},
            "muon_polar_express": {"ns_coefficients": "polar_express"},
            "cautious_muon": {"cautious": True},
        },
        lookahead=True,
        translation=_MUON_TRANSLATION,
        # Moonlight's RMS matching lets Muon's recipes reuse AdamW's lr (its non-matrix parameters use AdamW); on
        # this short workload lmopt tune's full grid picks 15x tuned AdamW's (docs/compare.md, "What tuning says
        # about the recipes")
        compare={"lr": 1.5e-2, "weight_decay": 0.1},
        compare_default=8,
    ),
    OptimizerSpec(
        name="normuon",
        cls=NorMuon,
        summary="NorMuon: Muon + neuron-wise second-moment normalisation (Muon's state + one float per row)",
        paper="Li et al., NorMuon: Making Muon more efficient and scalable, arXiv:2510.05491, 2025",
        state=_normuon_state,
        family="muon",
        accepts_model=True,
        aliases={"normuon_polar_express": {"ns_coefficients": "polar_express"}},
        translation=Translation(
            betas="optional",
            label="NorMuon paper: as Muon (AdamW-matched 0.2 RMS scaling); momentum 0.95, beta2 0.95",
            optional={
                "pretrain": {"momentum": 0.95, "beta2": 0.95},
                "finetune": {"momentum": 0.95, "beta2": 0.95},
            },
            source="Li et al., NorMuon, 2025: the update is rescaled to AdamW's RMS (0.2), so NorMuon shares "
            "AdamW's lr and weight decay as Moonlight's Muon does; momentum 0.95, beta2 0.95 (the authors' code)",
        ),
        compare={"lr": 3e-3, "weight_decay": 0.1},
    ),
]
