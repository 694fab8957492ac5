"""Callbacks a ``ContinualLM`` attaches to every trainer itself (``configure_callbacks``).

They hold behaviour a user must not lose by overriding a module hook without calling ``super()``:
skipping non-finite optimizer steps, restoring the training task's adapter after a validation that
switched adapters per domain, and following the data module's stage in a plain ``trainer.fit`` loop.
Lightning appends a module's own callbacks after the trainer's, so they run after
``GradientStability`` and ``ZClip``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from crma_lightning.callbacks.stages import ends_logging_interval, step_grad_norms
from crma_lightning.parallel.fsdp1 import shard_group


class SkipNonFiniteSteps(L.Callback):
    """Skip an optimizer step whose gradients are not finite (``pl_module.nonfinite`` decides and counts).

    Uses the step's gradient norm shared with ``GradientStability`` (no second pass over the
    gradients); the norm is exact under FSDP1/FSDP2/DDP, so every rank takes the same decision. With
    a fused optimizer and no grad scaler the decision stays on the device and is counted at each
    logging interval, at the end of the fit and when a checkpoint is saved: no host sync per step.
    """

    def __init__(self) -> None:
        self._shard_group: Any = None
        self._on_device = False
        self._flush_after_step = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shard_group = shard_group(pl_module)
        # A grad scaler (16-bit mixed precision) sets found_inf on the optimizer itself.
        self._on_device = getattr(trainer.precision_plugin, "scaler", None) is None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        guard = getattr(pl_module, "nonfinite", None)
        if guard is None or not guard.enabled:
            return
        _, squares = step_grad_norms(trainer, optimizer, pl_module.device, self._shard_group)
        guard.check(optimizer, step=trainer.global_step, square_norm=squares.sum(), on_device=self._on_device)
        self._flush_after_step = ends_logging_interval(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        guard = getattr(pl_module, "nonfinite", None)
        if guard is not None and self._flush_after_step:
            guard.flush()
        self._flush_after_step = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        guard = getattr(pl_module, "nonfinite", None)
        if guard is not None:
            guard.flush()


class RestoreTrainingAdapter(L.Callback):
    """After a validation that activated each domain's adapter, re-activate the training task's one."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        task = getattr(pl_module, "current_task", None)
        if task is not None:
            pl_module.activate_task(task)


class FollowDataModuleStage(L.Callback):
    """The plain-Lightning path: ``dm.set_stage(i)`` then ``trainer.fit(model, datamodule=dm)`` trains task ``i``.

    At the start of a ``fit`` whose data module names a current domain (``SequentialDomainDataModule``:
    ``domain_names``, ``current_domain``) that is not the module's current task, the module registers
    every domain's adapter (``prepare_tasks``) and begins that task, before the optimizer is built; when
    the ``fit`` finishes it ends the task (the method's ``on_task_end``, e.g. EWC's Fisher, with the
    stage's batches). A stage driver that already began the task (:class:`~crma_lightning.run.runner.ContinualRunner`)
    is left alone: nothing happens then, and it ends the task itself.
    """

    def __init__(self) -> None:
        self._began: tuple[int, str] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._began = None
        datamodule = getattr(trainer, "datamodule", None)
        if stage != "fit" or not hasattr(datamodule, "current_domain") or not hasattr(pl_module, "begin_task"):
            return
        task = datamodule.current_domain
        if pl_module.current_task == task:
            return  # begun by the caller (the stage driver, or begin_task by hand)
        if set(datamodule.domain_names) - set(pl_module.tasks):
            pl_module.prepare_tasks(list(datamodule.domain_names))
        pl_module.begin_task(task)
        self._began = (datamodule.stage, task)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._began is None or trainer.interrupted:
            return
        (stage, task), self._began = self._began, None
        datamodule = trainer.datamodule
        pl_module.end_task(task, train_batches=datamodule.fisher_batches(stage), train_rows=datamodule.train_sets[task])
