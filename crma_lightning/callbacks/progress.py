"""A progress bar that names the stage ("stage 2/4: code") instead of Lightning's "Epoch 0/-2".

Each stage is one ``fit`` with a step budget, so Lightning's epoch counter says nothing useful (and
``max_epochs=-1`` prints as ``/-2``). The bars below are Lightning's own (rich when installed, else
tqdm) with only the training description replaced.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


class StageRichProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training task reads ``label`` (e.g. ``stage 2/4: code``)."""

    def __init__(self, label: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.label and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self.label)


class StageTQDMProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar reads ``label``."""

    def __init__(self, label: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self.label:
            self.train_progress_bar.set_description(self.label)


def stage_progress_bar(callbacks: list[Any], enabled: bool | None, label: str) -> ProgressBar | None:
    """The progress bar to add to a stage's trainer, or ``None`` (disabled, or the user brought one)."""
    if enabled is False or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return None
    try:
        return StageRichProgressBar(label)
    except ModuleNotFoundError:  # rich is not installed: Lightning's default is tqdm then
        return StageTQDMProgressBar(label)
