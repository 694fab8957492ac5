"""A progress bar that names the stage ("stage 2/4: code") instead of Lightning's "Epoch 0/-2".

Each stage is one ``fit`` with a step budget, so Lightning's epoch counter says nothing useful (and
``max_epochs=-1`` prints as ``/-2``). The bars below are Lightning's own (rich when installed, else
tqdm) with only the training description replaced, and the training loss shown as of the last
logging step: Lightning turns every ``prog_bar=True`` value into a Python number after every batch, a
host sync per step on a GPU, so ``train/loss`` is logged without ``prog_bar`` and read here once per
logging interval instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from crma_lightning.callbacks.stages import ends_logging_interval


class LossAtLoggingSteps:
    """Progress-bar mixin: show ``train/loss`` as of the last logging step (one read per interval)."""

    LOSS = "train/loss"

    def _init_loss(self) -> None:
        self._loss: float | None = None
        self._read_loss = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._read_loss = ends_logging_interval(trainer)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # type: ignore[misc]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._read_loss:
            value = trainer.callback_metrics.get(self.LOSS)
            if value is not None:
                self._loss = float(value)
            self._read_loss = False
        super().on_train_batch_end(trainer, pl_module, *args)  # type: ignore[misc]

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if self._loss is not None:
            metrics[self.LOSS] = self._loss
        return metrics


class StageRichProgressBar(LossAtLoggingSteps, RichProgressBar):
    """``RichProgressBar`` whose training task reads ``label`` (e.g. ``stage 2/4: code``)."""

    def __init__(self, label: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label
        self._init_loss()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.label and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self.label)


class StageTQDMProgressBar(LossAtLoggingSteps, TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar reads ``label``."""

    def __init__(self, label: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label
        self._init_loss()

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
