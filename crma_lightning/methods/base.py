"""The interface of a continual-learning method (docs/method.md), and helpers the methods share.

A method is a plain Python object with hooks; the module and the stage runner call them, the method
never calls Lightning. Copy :class:`ContinualMethod` (or one of ``replay.py``, ``ewc.py``,
``olora.py``) to add the next method. When each hook is called:

====================  ==========================================================================
``setup``             once, after the model and its adapters exist (``prepare_tasks`` has run)
``on_task_start``     at every stage (re)start, *after* ``module.begin_task`` - also on a mid-stage
                      resume, after ``load_state_dict``: it must be idempotent
``train_data``        by the data module when it builds a stage's training loader
``active_adapters``   before training a stage and before evaluating a domain (adapter activation)
``penalty``           in every training step; added to the LM loss, logged as ``train/penalty``
``on_task_end``       once a stage's training is done, before its end-of-stage checkpoint
``state_dict``        into every checkpoint; ``load_state_dict`` on resume, before ``on_task_start``
``summary``           for the run report (sizes, hyper-parameters, memory the method holds)
====================  ==========================================================================

State must be loadable by ``torch.load(weights_only=True)``: tensors, lists, dicts, numbers, strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from crma_lightning.losses import token_losses

Batch = dict[str, Any]
"""A collated batch: ``input_ids``/``attention_mask``/``labels`` ``(B, T)`` (labels -100 not scored), ``domain``."""


class ContinualMethod:
    """The no-op method (``method: none``) and the base class of every method.

    ``module`` in the hooks is the ``ContinualLM`` (or, in unit tests, a bare ``nn.Module``): the
    helpers :func:`inner_model`, :func:`adapter_name`, :func:`trainable_named_parameters` and
    :func:`lm_loss` accept both.
    """

    name: str = "none"
    required_task_adapters: str | None = None
    """The ``task_adapters`` mode the method needs (``"per_task"``: one LoRA per task), ``None`` for either;
    checked by :meth:`check_task_adapters` when the module is built, before any model loads."""

    def check_task_adapters(self, mode: str) -> None:
        """Raise ``ValueError`` when the method cannot run with ``task_adapters=mode``."""
        needed = self.required_task_adapters
        if needed is not None and mode != needed:
            what = " (one LoRA per task)" if needed == "per_task" else ""
            raise ValueError(f"method {self.name} needs task_adapters={needed!r}{what}, got {mode!r}")

    def setup(self, module: nn.Module) -> None:
        """Called once before the first stage; check that the module suits the method here."""

    def on_task_start(self, module: nn.Module, task: str, index: int) -> None:
        """A stage begins (or resumes) training ``task`` (0-based ``index``); must be idempotent."""

    def penalty(self, module: nn.Module) -> torch.Tensor | None:
        """The regulariser added to the LM loss in this training step (``None``: nothing to add)."""
        return None

    def on_task_end(
        self,
        module: nn.Module,
        task: str,
        index: int,
        train_batches: Iterable[Batch],
        train_rows: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """A stage finished training ``task``.

        Args:
            module: The module, with the stage's final weights.
            task: The task (domain) just trained.
            index: Its 0-based stage index.
            train_batches: Collated training batches of ``task`` in a fixed order (read lazily; a method
                that needs none must not iterate it). Under DDP/FSDP, pass the same batches on every
                rank (or a method must reduce what it estimates) so that ranks keep equal state.
            train_rows: The stage's whole training set (``datamodule.train_sets[task]``: a
                ``datasets.Dataset`` or a sequence of ``{"input_ids": [...]}`` rows), the same on every rank.
        """

    def train_data(
        self,
        stage: int,
        domain: str,
        rows: Sequence[Mapping[str, Any]],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> tuple[Any, Any] | None:
        """Replace a stage's training data: ``(dataset, sampler)`` or ``None`` (keep the data module's).

        The sampler must be a :class:`~crma_lightning.data.sampling.GlobalBatchSampler` (subclass), so that
        ``ResumableLoader`` can save and restore its position; the dataset's items go to the usual
        ``Collator``.
        """
        return None

    def active_adapters(self, module: nn.Module, task: str | None) -> list[str] | None:
        """LoRA adapters to activate (summed) for training/evaluating ``task``; ``None``: the module's default."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (called on resume, before ``on_task_start``)."""

    def config(self) -> dict[str, Any]:
        """The method's hyper-parameters (for the report and for checking a resumed run)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Report entry: the method, its hyper-parameters and what it holds (rows, floats, bytes)."""
        return {"method": self.name, **self.config()}

    def _check_config(self, state: Mapping[str, Any]) -> None:
        """Refuse to resume from a checkpoint written with other hyper-parameters (results would differ)."""
        saved = state.get("config", {})
        for key, value in self.config().items():
            if key in saved and saved[key] != value:
                raise ValueError(
                    f"{self.name}: checkpoint was written with {key}={saved[key]!r}, this run has {key}={value!r}"
                )


# ---------------------------------------------------------------------- helpers shared by the methods
def inner_model(module: nn.Module) -> nn.Module:
    """The transformers model inside a ``ContinualLM`` (``module.model``), or ``module`` itself."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def adapter_name(module: nn.Module, task: str) -> str:
    """The LoRA adapter serving ``task`` (``module.adapter_for``; the task name itself for a bare model)."""
    adapter_for = getattr(module, "adapter_for", None)
    return adapter_for(task) if callable(adapter_for) else task


def trainable_named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module.trainable_parameters()`` when the module defines it, else its parameters that require grad."""
    hook = getattr(module, "trainable_parameters", None)
    if callable(hook):
        return iter(hook())
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


def named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter under the names :func:`trainable_named_parameters` uses (frozen ones included)."""
    params = dict(inner_model(module).named_parameters())
    params.update(trainable_named_parameters(module))  # a subclass may train parameters outside the model
    return params


def lm_loss(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (labels -100 ignored), as ``ContinualLM.compute_loss``.

    Computed here rather than by ``module.compute_loss`` so that a penalty wired into ``compute_loss``
    does not leak into what a method estimates (EWC's Fisher is of the LM loss alone).
    """
    # Keywords: a bare transformers model's second positional argument is not always the mask (GPT-2).
    out = module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = getattr(out, "logits", out)  # a ContinualLM returns logits, a transformers model an output object
    total, count = token_losses(logits, batch["labels"].to(logits.device))
    return total / count.clamp_min(1)
