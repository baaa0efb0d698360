"""Cautious masking, shared by every momentum optimizer that offers ``cautious=True``.

Cautious optimizers (Liang et al. 2024, "Cautious Optimizers: Improving Training with One Line of Code",
arXiv:2411.16085) keep only the coordinates of an update ``u`` whose sign agrees with the current gradient
``g`` and rescale the kept ones so the update keeps its average size:

.. code-block:: text

    mask = 1[u * g > 0]
    u    <- u * mask / max(mean(mask), 1e-3)

This is the normalisation of the authors' code (``C-Optim``, ``c_adamw.py``: ``mask.div_(mask.mean()
.clamp_(min=1e-3))``, the one timm adopted), not the paper's first ``numel / (sum + 1)``. The mean is over the
whole tensor: on a sharded DTensor it is taken over every shard (DTensor's ``mean`` reduces across ranks), so
a sharded step equals the unsharded one.

Cautious weight decay (Chen et al. 2025, "Cautious Weight Decay", arXiv:2510.12402) applies decoupled decay only
where the update and the parameter have the same sign (where decay and update both move the parameter
toward zero):

.. code-block:: text

    p <- p - lr * (u + weight_decay * 1[u * p >= 0] * p)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CAUTIOUS_MIN_FRACTION", "apply_cautious_", "cautious_decay_mask", "cautious_mask"]

#: the floor of the kept fraction in the rescaling (C-Optim's ``clamp_(min=1e-3)``)
CAUTIOUS_MIN_FRACTION = 1e-3


def cautious_mask(update: Tensor, grad: Tensor) -> Tensor:
    """The rescaled mask ``1[update * grad > 0] / max(mean, 1e-3)`` in ``update``'s dtype (a new tensor)."""
    mask = torch.mul(update, grad).gt_(0)  # 1.0 / 0.0 in update's dtype: one temporary, not three
    # out of place: on a DTensor the mean is a pending partial value until it is reduced
    return mask.div_(mask.mean().clamp(min=CAUTIOUS_MIN_FRACTION))


def apply_cautious_(update: Tensor, grad: Tensor) -> Tensor:
    """Mask ``update`` in place where its sign disagrees with ``grad`` and rescale the rest; returns it."""
    return update.mul_(cautious_mask(update, grad))


def cautious_decay_mask(update: Tensor, param: Tensor) -> Tensor:
    """``1[update * param >= 0]`` in ``param``'s dtype: where cautious weight decay applies."""
    return (update * param >= 0).to(param.dtype)
