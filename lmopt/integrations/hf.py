"""Hugging Face Trainer: a callback keeping Schedule-Free's averaged weights where they belong."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._common import schedule_free_optimizers

__all__ = ["ScheduleFreeCallback"]


class ScheduleFreeCallback(TrainerCallback):
    """Schedule-Free optimizers in eval mode (parameters at the average ``x``) for every evaluation and save.

    Trainer itself switches to eval mode only inside ``evaluate``; a checkpoint saved without an evaluation
    before it, and ``save_model`` after training, would hold the training point ``y``. This callback switches to
    eval mode at the end of every step that will evaluate or save (so the checkpoint's weights are ``x`` and its
    optimizer state says eval mode, which a resume restores), back to train mode after the save and before every
    step, and leaves the model at ``x`` when training ends (for ``save_model``, ``evaluate``, ``push_to_hub``).
    Other optimizers are left alone.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                   optimizers=(lmopt.create_optimizer("schedule_free_adamw", model, lr=1e-3), None),
        ...                   callbacks=[ScheduleFreeCallback()])
    """

    @staticmethod
    def _switch(kwargs: dict[str, Any], mode: str) -> None:
        for opt in schedule_free_optimizers(kwargs.get("optimizer")):
            opt.eval() if mode == "eval" else opt.train()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._switch(kwargs, "train")

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._switch(kwargs, "train")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if control.should_save or control.should_evaluate:
            self._switch(kwargs, "eval")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._switch(kwargs, "train")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._switch(kwargs, "eval")
