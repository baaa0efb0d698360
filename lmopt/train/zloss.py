"""z-loss (PaLM): a penalty on the log of the softmax normaliser that keeps output logits from drifting.

``z_loss = weight * mean(log(Z)^2)``, ``log Z = logsumexp(logits)`` over the vocabulary, for every token that
counts (``mask``). PaLM uses ``weight = 1e-4`` "to encourage the softmax normalizer log(Z) to be close to 0,
which we found increases the stability of training" (Chowdhery et al., "PaLM: Scaling Language Modeling with
Pathways", 2022, Section 5); Falcon used the same weight.

Example:
    >>> loss, parts = cross_entropy_with_z_loss(logits, labels, z_loss_weight=1e-4)
    >>> parts["cross_entropy"], parts["z_loss"]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["cross_entropy_with_z_loss", "z_loss"]


def _check_weight(weight: float) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"z_loss_weight must be a number >= 0 (PaLM: 1e-4), got {weight!r}")


def z_loss(logits: Tensor, *, weight: float = 1e-4, mask: Tensor | None = None) -> Tensor:
    """``weight * mean(logsumexp(logits, -1)^2)`` over the positions where ``mask`` is True (fp32 math).

    Args:
        logits: ``(..., vocab)``.
        weight: the coefficient (default 1e-4, PaLM's).
        mask: boolean ``(...)`` of positions that count (default: all). An all-False mask gives 0.
    """
    _check_weight(weight)
    log_z = torch.logsumexp(logits.float(), dim=-1)
    squared = log_z.square()
    if mask is None:
        return weight * squared.mean()
    if mask.shape != log_z.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must match the logits without the vocabulary dimension "
            f"{tuple(log_z.shape)}"
        )
    mask = mask.to(torch.bool)
    count = mask.sum().clamp_min(1)
    return weight * (squared * mask).sum() / count


def cross_entropy_with_z_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    z_loss_weight: float = 1e-4,
    ignore_index: int = -100,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token cross-entropy plus z-loss over the same tokens; returns ``(total, {"cross_entropy", "z_loss"})``.

    ``logits`` is ``(..., vocab)`` and ``targets`` ``(...)``, already aligned (shift them for next-token
    prediction before calling). Tokens equal to ``ignore_index`` count in neither term.
    """
    _check_weight(z_loss_weight)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    ce = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=ignore_index)
    if z_loss_weight == 0:
        z = torch.zeros((), dtype=ce.dtype, device=ce.device)
    else:
        z = z_loss(flat_logits, weight=z_loss_weight, mask=flat_targets != ignore_index)
    return ce + z, {"cross_entropy": ce.detach(), "z_loss": z.detach()}
