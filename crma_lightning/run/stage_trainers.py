"""A fresh Lightning ``Trainer`` per stage, sharing the run's callbacks and loggers (used by the runner).

Each stage is one ``Trainer.fit`` with its own trainer, so that a stage's budget, strategy copy and
loops start clean. What the stages share - the callbacks whose state is the run's state, the loggers,
the logging step - is carried here. Also the run plan's checks that need no trainer: the per-stage
budget and the default callbacks.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from crma_lightning import _compat
from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient_stability import GradientStability
from crma_lightning.callbacks.progress import stage_progress_bar


class StageTrainers:
    """Builds each stage's trainer from the run's trainer settings.

    Args:
        run_dir: The run directory (Lightning's ``default_root_dir``; TensorBoard logs go below it).
        trainer_kwargs: ``lightning.Trainer`` keyword arguments without ``callbacks`` and ``logger``.
        callbacks: The callbacks every stage shares (their state is the run's).
        logger: The ``trainer.logger`` setting: ``True``/``None`` (TensorBoard in ``run_dir/tensorboard``),
            ``False`` (none), or logger object(s) shared by every stage.

    Attributes:
        loggers: The run's loggers, set by :meth:`setup_loggers`.
    """

    def __init__(
        self, run_dir: Path, trainer_kwargs: dict[str, Any], callbacks: list[Callback], logger: Any = True
    ) -> None:
        self.run_dir = run_dir
        self.trainer_kwargs = trainer_kwargs
        self.callbacks = callbacks
        self._logger_arg = logger
        self.loggers: list[Logger] = []
        self._made = 0
        self._summary_shown = False

    def setup_loggers(self, purge_step: int | None) -> None:
        """Create the run's loggers; ``purge_step``: TensorBoard drops what a killed run logged from there on."""
        arg = self._logger_arg
        if arg is True or arg is None:
            kwargs = {"purge_step": purge_step} if purge_step else {}
            self.loggers = [
                TensorBoardLogger(
                    save_dir=str(self.run_dir), name="tensorboard", version="", default_hp_metric=False, **kwargs
                )
            ]
        elif arg is False:
            self.loggers = []
        else:
            self.loggers = list(arg) if isinstance(arg, (list, tuple)) else [arg]

    def make(
        self,
        stage: int,
        dm: Any,
        run_callbacks: list[Callback],
        step_offset: int,
        for_fit: bool = False,
    ) -> L.Trainer:
        """A fresh trainer for ``stage`` (or the base evaluation).

        Lightning's per-trainer banners (device info, tips) are shown for the first trainer only, the
        model summary for the first trained stage only, and the progress bar names the stage.

        Args:
            stage: The stage index (its domain's ``max_steps`` overrides the trainer's).
            dm: The ``SequentialDomainDataModule``.
            run_callbacks: Callbacks of this run's driver (run state, stop-and-save), after the shared ones.
            step_offset: The logging step the previous stage ended at: one continuous TensorBoard run.
            for_fit: The trainer will train (not only evaluate).
        """
        kwargs = copy.copy(self.trainer_kwargs)
        for key in ("strategy", "plugins"):  # stateful objects: a pristine copy per stage
            if key in kwargs and not isinstance(kwargs[key], str):
                kwargs[key] = copy.deepcopy(kwargs[key])
        spec = dm.specs[stage]
        if spec.max_steps is not None:
            kwargs["max_steps"] = spec.max_steps
        if kwargs.get("num_sanity_val_steps") is None:  # every stage is evaluated in full afterwards
            kwargs["num_sanity_val_steps"] = 0
        if not for_fit or self._summary_shown:
            kwargs["enable_model_summary"] = False  # the model does not change between stages
        elif kwargs.get("enable_model_summary") is None and not verbose():
            kwargs["enable_model_summary"] = False  # quiet by default: the stage line counts the parameters
        self._summary_shown |= for_fit
        kwargs["enable_checkpointing"] = any(isinstance(cb, ModelCheckpoint) for cb in self.callbacks)
        label = f"stage {stage + 1}/{dm.num_stages}: {dm.domain_names[stage]}"
        bar = stage_progress_bar(self.callbacks, kwargs.get("enable_progress_bar"), label)
        kwargs["callbacks"] = [*self.callbacks, *([bar] if bar is not None else []), *run_callbacks]
        kwargs["logger"] = self.loggers or False
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        with _compat.quiet_lightning_info(self._made > 0):
            trainer = L.Trainer(**kwargs)
        self._made += 1
        _compat.set_logging_step(trainer, step_offset)
        return trainer


def verbose() -> bool:
    """``CRMA_VERBOSE=1``: the libraries' own info lines, progress bars and Lightning's model summary are shown."""
    return os.environ.get("CRMA_VERBOSE", "") not in ("", "0")


def with_default_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """Add the default callbacks; ``GradientStability`` goes first, before any clipping callback."""
    grads = [cb for cb in callbacks if isinstance(cb, GradientStability)] or [GradientStability()]
    rest = [cb for cb in callbacks if not isinstance(cb, GradientStability)]
    if not any(isinstance(cb, DomainEvaluation) for cb in rest):
        rest.append(DomainEvaluation())
    return grads + rest


def check_budget(
    kwargs: dict[str, Any], max_steps: int | None = None, domain: str | None = None, required: bool = True
) -> None:
    """Each stage needs a positive budget: ``max_steps`` (trainer or domain) or ``max_epochs``."""
    where = f" for domain {domain!r}" if domain else ""
    steps = max_steps if max_steps is not None else kwargs.get("max_steps", -1)
    epochs = kwargs.get("max_epochs")
    if steps is not None and steps != -1 and steps < 1:
        raise ValueError(
            f"max_steps={steps!r}{where} is invalid: expected a positive number of optimizer steps per stage"
        )
    if epochs is not None and epochs != -1 and epochs < 1:
        raise ValueError(f"max_epochs={epochs!r} is invalid: expected a positive number of epochs per stage")
    if required and (steps in (None, -1)) and (epochs in (None, -1)):
        raise ValueError(
            f"no per-stage budget{where}: set trainer max_steps (optimizer steps per stage) or max_epochs, "
            "or max_steps on the domain"
        )
