"""Which LoRA adapter serves which task, and which adapters train: the per-task bookkeeping. Pure torch.

Vocabulary (``docs/method.md``): a *domain* is a dataset, a *stage* is one ``fit`` on one domain, and
the *task adapter* is the LoRA adapter that a stage trains - its own (``per_task``) or the one shared
by every stage (``shared``). CRMA adapters are not task adapters: they train in every stage.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from crma_lightning.adapters import (
    LoRAConfig,
    add_lora_adapter,
    lora_adapter_names,
    lora_layers,
    set_active_adapter,
    set_adapter_trainable,
    set_crma_trainable,
)
from crma_lightning.adapters.lora import check_adapter_name

TaskAdapterMode = Literal["shared", "per_task"]
"""One LoRA trained through every stage, or a fresh one per task (earlier ones frozen)."""
TASK_ADAPTER_MODES: tuple[str, ...] = get_args(TaskAdapterMode)
SHARED_ADAPTER = "shared"


class TaskAdapters:
    """The tasks of a run, their LoRA adapters in ``model``, and the task now training.

    Args:
        model: The model with adapters attached (``attach_adapters``).
        mode: ``"shared"`` or ``"per_task"``.
        lora: Hyper-parameters of the adapters created here.
        seed: Task ``i``'s adapter is initialised from ``seed + 1 + i``.

    Attributes:
        tasks: Task names in the order they were registered (the training order).
        current: The task now training, or ``None`` before the first stage.
    """

    def __init__(self, model: nn.Module, mode: str, lora: LoRAConfig, seed: int) -> None:
        if mode not in TASK_ADAPTER_MODES:
            raise ValueError(f"task_adapters={mode!r} is invalid: expected one of {list(TASK_ADAPTER_MODES)}")
        self.model, self.mode, self.lora, self.seed = model, mode, lora, seed
        self.tasks: list[str] = []
        self.current: str | None = None

    def adapter_for(self, task: str) -> str:
        """Name of the LoRA adapter that serves ``task``."""
        return SHARED_ADAPTER if self.mode == "shared" else task

    def ensure(self, task: str) -> None:
        """Register ``task`` and create its adapter (frozen, inactive) if it does not exist yet.

        Adapter ``i`` is initialised from ``seed + 1 + i`` in a forked RNG, so it is the same whether it
        is created up front or when its stage begins, and creating it consumes no global randomness.
        """
        check_adapter_name(task)
        if task not in self.tasks:
            self.tasks.append(task)
        name = self.adapter_for(task)
        if name not in lora_adapter_names(self.model):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1 + self.tasks.index(task))
                add_lora_adapter(self.model, name, self.lora, trainable=False)

    def train(self, task: str) -> None:
        """Make ``task``'s adapter the only trainable and active LoRA adapter; CRMA trains too."""
        self.ensure(task)
        active = self.adapter_for(task)
        for name in lora_adapter_names(self.model):
            set_adapter_trainable(self.model, name, name == active)
        set_crma_trainable(self.model, True)
        set_active_adapter(self.model, active)
        self.current = task

    def activate(self, task: str | None, adapters: list[str] | None = None) -> None:
        """Make ``task``'s adapter the active one (evaluation); ``None``: LoRA off.

        ``adapters``: activate these instead, summed (a method's choice, e.g. O-LoRA's stack).
        """
        if adapters is None:
            name = None if task is None else self.adapter_for(task)
            if name is not None and name not in lora_adapter_names(self.model):
                raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
            adapters = [] if name is None else [name]
        for _, layer in lora_layers(self.model):
            if layer.active_adapters != adapters:  # a list: `active_adapter` raises when several are active
                layer.set_active_adapters(adapters)
