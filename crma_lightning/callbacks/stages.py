"""What the step-level callbacks share: stage bookkeeping, logging with explicit steps, one norm per step."""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import lightning as L
import torch

from crma_lightning import _compat
from crma_lightning.parallel.grad_norms import group_grad_square_sums

FALLBACK_INTERVAL = 50  # flush interval when the trainer logs never (log_every_n_steps=0)


class StageTracker:
    """Whether a ``fit`` starts a new stage or continues one restored from a mid-stage checkpoint.

    Each ``fit`` of the stage driver is one stage, named after ``pl_module.current_task``. A fit
    continues the previous stage only when the callback's state was loaded from a checkpoint written
    before that stage finished, and the task is the same.

    Attributes:
        task: ``current_task`` of the stage in progress (or last finished).
        finished: The stage's ``fit`` ended (``on_train_end``).
        restored: State was loaded from a checkpoint and no ``fit`` has started since.
    """

    def __init__(self) -> None:
        self.task: str | None = None
        self.finished = True
        self.restored = False

    def start(self, pl_module: L.LightningModule) -> bool:
        """Call from ``on_train_start``; returns ``True`` when this fit starts a new stage."""
        task = getattr(pl_module, "current_task", None)
        task = None if task is None else str(task)
        resumed = self.restored and not self.finished and task == self.task
        self.task, self.finished, self.restored = task, False, False
        return not resumed

    def end(self) -> None:
        """Call from ``on_train_end``."""
        self.finished = True

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task = state.get("task")
        self.finished = bool(state.get("finished", True))
        self.restored = True


def log_interval(trainer: L.Trainer, every: int | None) -> int:
    """``every``, else the trainer's ``log_every_n_steps`` (a fallback of 50 when that is 0)."""
    if every is not None:
        return every
    return int(trainer.log_every_n_steps) or FALLBACK_INTERVAL


def ends_logging_interval(trainer: L.Trainer) -> bool:
    """Whether the optimizer step about to be taken is one Lightning logs (call before it steps).

    The same test as Lightning's own (``(logged steps + 1) % log_every_n_steps == 0``), on the logging
    step the stage driver carries across stages, so per-interval flushes land on the logged steps.
    """
    return (_compat.logging_step(trainer) + 1) % log_interval(trainer, None) == 0


def log_to_loggers(trainer: L.Trainer | None, entries: list[tuple[int, dict[str, float]]]) -> None:
    """Log ``(step, metrics)`` entries with explicit steps to every logger, on global rank 0 only."""
    if trainer is None or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        for step, metrics in entries:
            if metrics:
                logger.log_metrics(metrics, step=step)


# One entry per live optimizer: (step key, group names, squared sums). Weak keys: a stage's optimizer
# is dropped with its trainer, so a new optimizer can never be served an old one's norms.
_STEP_NORMS: WeakKeyDictionary[Any, tuple[tuple[int, int], list[str], torch.Tensor]] = WeakKeyDictionary()


def step_grad_norms(
    trainer: L.Trainer, optimizer: torch.optim.Optimizer, device: torch.device, shard_group: Any = None
) -> tuple[list[str], torch.Tensor]:
    """Per-group squared gradient sums of the optimizer step in progress, computed once per step.

    ``GradientStability``, ``ZClip`` and the non-finite check all need this step's norm in
    ``on_before_optimizer_step``; the first caller computes it (collectives included, see
    :func:`~crma_lightning.parallel.grad_norms.group_grad_square_sums`) and the others reuse it. The value is
    the norm before any clipping: a later callback that rescales gradients does not change it.
    """
    key = (int(getattr(trainer, "global_step", 0)), _compat.logging_step(trainer))
    hit = _STEP_NORMS.get(optimizer)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    names, squares = group_grad_square_sums(optimizer, device, shard_group)
    _STEP_NORMS[optimizer] = (key, names, squares)
    return names, squares
