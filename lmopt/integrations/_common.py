"""Framework-free pieces: Schedule-Free detection, the eval-mode context manager, the Trainer optimizer factory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["LmoptOptimizerFactory", "eval_mode", "hf_optimizer", "is_schedule_free", "schedule_free_optimizers"]

_WRAPPER_ATTRS = ("optimizer", "_optimizer", "inner", "base_optimizer")


def is_schedule_free(optimizer: Any) -> bool:
    """True for an optimizer with Schedule-Free modes: callable ``train()`` / ``eval()`` and ``mode``."""
    return (
        callable(getattr(optimizer, "train", None))
        and callable(getattr(optimizer, "eval", None))
        and getattr(optimizer, "mode", None) in ("train", "eval")
    )


def _unwrap(optimizer: Any) -> Any | None:
    """The Schedule-Free optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, lmopt's ``Lookahead``), or None."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if is_schedule_free(optimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = next(
            (getattr(optimizer, a) for a in _WRAPPER_ATTRS if getattr(optimizer, a, None) is not None), None
        )
    return None


def schedule_free_optimizers(optimizers: Any) -> list[Any]:
    """The Schedule-Free optimizers in ``optimizers`` (one optimizer, possibly wrapped, or an iterable of them)."""
    if optimizers is None:
        return []
    items = optimizers if isinstance(optimizers, (list, tuple, set)) else [optimizers]
    found = []
    for item in items:
        inner = _unwrap(item)
        if inner is not None and all(inner is not f for f in found):
            found.append(inner)
    return found


@contextmanager
def eval_mode(optimizers: Any, model: nn.Module | None = None) -> Iterator[list[Any]]:
    """Parameters at Schedule-Free's averaged point ``x`` inside the block; the previous modes restored after.

    ``optimizers`` is one optimizer or several, possibly wrapped (accelerate, Lightning, Lookahead); those without
    Schedule-Free modes are left alone, so the block is safe around any optimizer. With ``model``, the model is
    put in ``eval()`` too and its training flag restored. Use it around evaluation and around every save (model
    weights and optimizer state together, so a resume finds ``x`` with the optimizer in eval mode).

    Example (accelerate):
        >>> with lmopt.integrations.eval_mode(optimizer, model):
        ...     accelerator.save_state("ckpt")          # weights saved are x; training continues on y after
    """
    found = schedule_free_optimizers(optimizers)
    previous = [opt.mode for opt in found]
    was_training = model.training if model is not None else False
    for opt in found:
        opt.eval()
    if model is not None:
        model.eval()
    try:
        yield found
    finally:
        for opt, mode in zip(found, previous, strict=True):
            opt.train() if mode == "train" else opt.eval()
        if model is not None:
            model.train(was_training)


class LmoptOptimizerFactory:
    """Trainer's optimizer factory protocol (``factory()(model, **kwargs)``) building a registry optimizer.

    Not a ``torch.optim.Optimizer`` subclass on purpose: transformers treats such a class as a factory and hands
    it the model instead of its own two weight-decay groups, so lmopt's structural split
    (:func:`lmopt.param_groups`) and Muon's routing (embeddings and head to AdamW) are kept.
    """

    def __call__(self, model: nn.Module, *, name: str, **hyperparameters: Any) -> Optimizer:
        from ..registry import create_optimizer

        return create_optimizer(name, model, **hyperparameters)


def hf_optimizer(name: str, **hyperparameters: Any) -> tuple[type[LmoptOptimizerFactory], dict[str, Any]]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    The optimizer is built with :func:`lmopt.create_optimizer` from the model Trainer trains (its PEFT or wrapped
    model included): no decay for embeddings, norms and biases; for Muon, 2-D hidden matrices to Muon and
    embeddings and the output head to AdamW. Trainer's ``weight_decay`` / ``learning_rate`` arguments are not
    read; pass them here. The scheduler still comes from ``TrainingArguments``.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                   optimizer_cls_and_kwargs=hf_optimizer("muon", lr=0.02, weight_decay=0.1))
    """
    from ..registry import resolve_name

    resolve_name(name)  # an unknown name fails here, not when Trainer builds the optimizer
    return LmoptOptimizerFactory, {"name": name, **hyperparameters}
