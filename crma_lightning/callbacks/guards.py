"""Callbacks a ``ContinualLM`` attaches to every trainer itself (``configure_callbacks``).

They hold behaviour a user must not lose by overriding a module hook without calling ``super()``:
skipping non-finite optimizer steps, and restoring the training task's adapter after a validation
that switched adapters per domain. Lightning appends a module's own callbacks after the trainer's,
so both run after ``GradientStability`` and ``ZClip``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from crma_lightning.callbacks.stages import step_grad_norms
from crma_lightning.parallel.fsdp1 import shard_group


class SkipNonFiniteSteps(L.Callback):
    """Skip an optimizer step whose gradients are not finite (``pl_module.nonfinite`` decides and counts).

    Uses the step's gradient norm shared with ``GradientStability`` (no second pass over the
    gradients); the norm is exact under FSDP1/FSDP2/DDP, so every rank takes the same decision.
    """

    def __init__(self) -> None:
        self._shard_group: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shard_group = shard_group(pl_module)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        guard = getattr(pl_module, "nonfinite", None)
        if guard is None or not guard.enabled:
            return
        _, squares = step_grad_norms(trainer, optimizer, pl_module.device, self._shard_group)
        guard.check(optimizer, step=trainer.global_step, square_norm=squares.sum())


class RestoreTrainingAdapter(L.Callback):
    """After a validation that activated each domain's adapter, re-activate the training task's one."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        task = getattr(pl_module, "current_task", None)
        if task is not None:
            pl_module.activate_task(task)
