"""Where ``ContinualLM`` calls its continual-learning method (:mod:`crma_lightning.methods`).

The module keeps one line per hook; the plumbing is here: which adapters a task activates, the penalty,
the method's entry in a checkpoint and in the module's identity, the end of a stage and the report entry.
Call sites (``docs/method.md``, "Continual-learning methods and routing"):

=====================  ========================================================================
``setup``              ``ContinualLM.prepare_tasks`` (first call: every task adapter exists)
``on_task_start``      ``ContinualLM.begin_task`` (also on a mid-stage resume) and
                       ``ContinualLM.on_load_checkpoint`` (after ``load_state_dict``)
``active_adapters``    ``ContinualLM.activate_task`` (training, evaluation, routing)
``penalty``            ``ContinualLM.training_step``: ``train/loss = train/loss_lm + train/penalty``
``train_data``         ``SequentialDomainDataModule.train_dataloader``
``on_task_end``        ``ContinualLM.end_task``, which the stage driver calls after each stage's ``fit``
                       with ``datamodule.fisher_batches(stage)`` and the stage's rows
``state_dict``         ``ContinualLM.on_save_checkpoint`` / ``on_load_checkpoint`` (key ``continual_method``)
``config``             ``ContinualLM.identity()["method"]``: a resume with other settings is refused
=====================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from crma_lightning.methods import ContinualMethod, build_method
from crma_lightning.parallel.dist import has_dtensors

CHECKPOINT_KEY = "continual_method"


def check_method(method: Any, task_adapters: str) -> ContinualMethod | None:
    """``method`` if it is a :class:`ContinualMethod` (or ``None``) suiting ``task_adapters``; raise before any work.

    A mapping ``{"name": ..., **settings}`` (what the module's hyper-parameters record) builds a registered method.
    """
    if method is None:
        return None
    if isinstance(method, Mapping) and "name" in method:  # saved hyper-parameters (load_from_checkpoint)
        method = build_method(method["name"], **{k: v for k, v in method.items() if k != "name"})
    if not isinstance(method, ContinualMethod):
        raise ValueError(
            f"method={method!r} is invalid: expected a crma_lightning.methods.ContinualMethod "
            "(e.g. class_path: crma_lightning.methods.Replay) or null"
        )
    method.check_task_adapters(task_adapters)  # before the base model loads, not at setup
    return method


def setup(module: Any) -> None:
    """``method.setup`` once per module, when its task adapters exist (``prepare_tasks``).

    Whether it ran is the module's own ``method_set_up`` flag (``ContinualLM.__init__`` sets it ``False``).
    """
    if module.method is not None and not module.method_set_up:
        module.method.setup(module)
        module.method_set_up = True


def start_task(module: Any) -> None:
    """``method.on_task_start`` for the module's current task (idempotent), then activate its adapters."""
    task = module.current_task
    if module.method is not None and task is not None:
        module.method.on_task_start(module, task, module.tasks.index(task))
        module.activate_task(task)


def identity(method: ContinualMethod | None) -> dict[str, Any] | None:
    """The method's part of ``ContinualLM.identity()``: its name and hyper-parameters (``None``: no method)."""
    return None if method is None else {"name": method.name, **method.config()}


def active_adapters(module: nn.Module, task: str | None) -> list[str] | None:
    """The adapters the method activates for ``task`` (``None``: the module's default, one per task)."""
    method = getattr(module, "method", None)
    return None if method is None else method.active_adapters(module, task)


def add_penalty(module: Any, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``loss`` plus the method's regulariser; logs ``train/loss_lm`` and ``train/penalty`` (0 while it has none)."""
    method = getattr(module, "method", None)
    if method is None:
        return loss
    value = method.penalty(module)
    penalty = loss.new_zeros(()) if value is None else value.to(loss.dtype)
    module.log("train/loss_lm", loss, batch_size=batch_size)
    module.log("train/penalty", penalty, batch_size=batch_size)
    return loss + penalty


def end_task(
    module: Any,
    task: str,
    index: int,
    train_batches: Iterable[dict[str, Any]] | None,
    train_rows: Sequence[Mapping[str, Any]] | None,
) -> None:
    """Call ``method.on_task_end`` with the module on its trainer's device.

    Lightning's teardown after ``fit`` moves an unsharded module to the CPU; an estimate over training
    batches (EWC's Fisher) belongs on the accelerator, so the module goes back there first (the next
    ``validate`` would move it anyway). A sharded module is left where it is.
    """
    method = module.method
    if method is None:
        return
    trainer = getattr(module, "_trainer", None)
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    if device is not None and device != module.device and not has_dtensors(module):
        module.to(device)
    batches = (_to_device(b, module.device) for b in (train_batches or ()))
    method.on_task_end(module, task, index, batches, train_rows)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def save_state(method: ContinualMethod | None) -> dict[str, Any] | None:
    """The checkpoint entry: ``{"name", "state"}`` (weights-only loadable) or ``None``."""
    return None if method is None else {"name": method.name, "state": method.state_dict()}


def load_state(method: ContinualMethod | None, saved: Mapping[str, Any] | None) -> None:
    """Restore the method from a checkpoint entry; a checkpoint of another method is refused."""
    saved_name = None if saved is None else saved.get("name")
    name = None if method is None else method.name
    if saved_name != name:
        raise ValueError(f"checkpoint was written with method {saved_name!r}, this run has method {name!r}")
    if method is not None and saved is not None:
        method.load_state_dict(saved["state"])


def summary(method: ContinualMethod | None) -> dict[str, Any] | None:
    """Report entry: :meth:`ContinualMethod.summary` plus ``state_bytes``, the tensors its checkpoint state holds."""
    if method is None:
        return None
    return {**method.summary(), "state_bytes": _tensor_bytes(method.state_dict())}


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0
