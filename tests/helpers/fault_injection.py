"""Fault injection for ``tests/run/test_faults.py``: a research subclass that poisons chosen training steps.

It is loaded the way a user's own subclass would be - ``model.class_path: fault_injection.PoisonedLM``
in the YAML, with ``tests/`` on ``PYTHONPATH`` - so the non-finite guard is exercised end to end
through the CLI, not by patching the framework.
"""

from __future__ import annotations

from typing import Any

import torch

from crma_lightning.model.continual_lm import ContinualLM

POISON_KINDS = ("nan_loss", "inf_grad")


class PoisonedLM(ContinualLM):
    """A :class:`ContinualLM` whose loss (or gradient) turns non-finite on chosen steps of one task.

    Args:
        poison_task: Task (domain) whose training steps are poisoned; ``None``: no poisoning.
        poison_from_step: First poisoned optimizer step of that task's stage (0-based, stage-local).
        poison_steps: Number of poisoned steps in a row; ``None``: every step from ``poison_from_step``.
        poison: ``"nan_loss"`` (the loss is multiplied by NaN) or ``"inf_grad"`` (one trainable
            parameter's gradient is set to +inf after the backward pass, the loss stays finite).
        **kwargs: Everything :class:`ContinualLM` takes.
    """

    def __init__(
        self,
        *args: Any,
        poison_task: str | None = None,
        poison_from_step: int = 0,
        poison_steps: int | None = None,
        poison: str = "nan_loss",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if poison not in POISON_KINDS:
            raise ValueError(f"poison={poison!r} is invalid: expected one of {list(POISON_KINDS)}")
        self.poison_task = poison_task
        self.poison_from_step = poison_from_step
        self.poison_steps = poison_steps
        self.poison = poison

    def _poisoned(self) -> bool:
        if self.poison_task is None or self.current_task != self.poison_task:
            return False
        step = self.trainer.global_step  # each stage has a fresh trainer: the stage-local step
        if step < self.poison_from_step:
            return False
        return self.poison_steps is None or step < self.poison_from_step + self.poison_steps

    def compute_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        loss = super().compute_loss(batch, logits)
        if self.poison == "nan_loss" and self._poisoned():
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.poison == "inf_grad" and self._poisoned():
            param = next(p for _, p in self.trainable_parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("inf")


class FailingLM(ContinualLM):
    """A :class:`ContinualLM` whose ``compute_loss`` raises ``ValueError`` at one step of one task.

    Stands for a bug in research code that surfaces mid-training: it must not be reported as a bad
    configuration (exit 2) - the run fails with exit code 1 and a traceback, finished stages kept.
    """

    def __init__(self, *args: Any, fail_task: str = "code", fail_step: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_task = fail_task
        self.fail_step = fail_step

    def compute_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        if self.current_task == self.fail_task and self.trainer.global_step == self.fail_step:
            raise ValueError("simulated bug in a research hook")
        return super().compute_loss(batch, logits)
