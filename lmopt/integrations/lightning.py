"""Lightning: a callback keeping Schedule-Free's averaged weights where they belong.

Built on ``pytorch_lightning`` when it is installed, else on ``lightning.pytorch``.
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified ``lightning`` package
    import lightning.pytorch as pl

from ._common import eval_mode, schedule_free_optimizers

__all__ = ["ScheduleFreeLightningCallback"]


class ScheduleFreeLightningCallback(pl.Callback):
    """Schedule-Free optimizers in eval mode (parameters at ``x``) for validation, test, predict and checkpoints.

    Lightning validates at the training point ``y`` unless told otherwise. This callback switches every
    Schedule-Free optimizer of the trainer to eval mode at the start of validation / test / predict and
    restores the previous mode at the end. On a checkpoint it stores the model state at ``x`` and the optimizer
    states in eval mode (so a resume finds ``x`` and switches back to ``y`` itself, bit-exactly), then returns
    to training. Each training batch starts in train mode; after ``fit`` the model holds ``x``.

    Example:
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[ScheduleFreeLightningCallback()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._held = contextlib.ExitStack()  # the eval_mode block open between a *_start and its *_end hook

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[Any]:
        return schedule_free_optimizers(list(getattr(trainer, "optimizers", None) or []))

    def _enter_eval(self, trainer: pl.Trainer) -> None:
        self._held.enter_context(eval_mode(self._optimizers(trainer)))

    def _restore(self) -> None:
        self._held.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for opt in self._optimizers(trainer):
            opt.train()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for opt in self._optimizers(trainer):
            opt.eval()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        found = self._optimizers(trainer)
        if not found:
            return
        with eval_mode(found):
            # the dumped tensors alias the parameters: copies of x, not views that turn back into y
            checkpoint["state_dict"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
