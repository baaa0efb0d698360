"""Helpers for the frameworks users already train with: Hugging Face Trainer, accelerate, Lightning, PEFT.

Nothing here imports transformers, accelerate or Lightning when ``lmopt`` (or this package) is imported: the
framework callbacks are built on first access.

* :func:`eval_mode` -- context manager putting Schedule-Free optimizers at the averaged point ``x`` (and a model
  in ``eval()``) and restoring the previous mode; the accelerate recipe, usable with any loop.
* :func:`hf_optimizer` -- ``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` that keeps lmopt's
  structural parameter groups and Muon's routing.
* :class:`ScheduleFreeCallback` -- a ``transformers.TrainerCallback``: eval mode for every evaluation and save,
  and the averaged weights at the end of training.
* :class:`ScheduleFreeLightningCallback` -- a Lightning callback doing the same for validation, test, predict and
  checkpoints (the checkpoint's model state holds ``x``).
"""

from __future__ import annotations

from typing import Any

from ._common import LmoptOptimizerFactory, eval_mode, hf_optimizer, is_schedule_free, schedule_free_optimizers

__all__ = [
    "LmoptOptimizerFactory",
    "ScheduleFreeCallback",
    "ScheduleFreeLightningCallback",
    "eval_mode",
    "hf_optimizer",
    "is_schedule_free",
    "schedule_free_optimizers",
]


def __getattr__(name: str) -> Any:
    if name == "ScheduleFreeCallback":
        from .hf import ScheduleFreeCallback

        return ScheduleFreeCallback
    if name == "ScheduleFreeLightningCallback":
        from .lightning import ScheduleFreeLightningCallback

        return ScheduleFreeLightningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
