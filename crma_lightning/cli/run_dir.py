"""A finished or partial run, read back from its directory (what ``evaluate``/``generate``/``export`` share).

A run directory (written by ``crma-lightning fit``, see :mod:`crma_lightning.run.runner`) holds
``config.yaml`` (the resolved configuration), ``report.json``, and ``checkpoints/stage-NN-<domain>.ckpt``.
:class:`RunDirectory` parses the configuration with the same CLI as ``fit`` (so a ``class_path``
subclass of ``ContinualLM`` comes back as itself), builds the model and the datamodule without training,
and loads a stage checkpoint into the model through the module's own ``on_load_checkpoint`` and
``load_state_dict`` - the same two calls the runner makes when it resumes. Every problem is a
``ValueError`` naming the path, stage or task and what was expected (``crma-lightning`` exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crma_lightning.run.checkpoints import StageCheckpoint


class CommandParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are ``ValueError``: one line and exit code 2 from the dispatcher."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{self.prog}: {message} (see {self.prog} --help)")


class RunDirectory:
    """A run directory: its configuration, report and stage checkpoints.

    Args:
        path: The directory given as ``run.dir`` to ``crma-lightning fit``.

    Raises:
        ValueError: ``path`` is not a directory or has no ``config.yaml``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"run directory {self.path} does not exist (expected the run.dir of a fit run)")
        self.config_path = self.path / "config.yaml"
        if not self.config_path.is_file():
            raise ValueError(
                f"run directory {self.path} has no config.yaml: not a crma_lightning run, or a run that stopped "
                "before its first check passed"
            )
        from crma_lightning.run.checkpoints import CheckpointStore  # torch and Lightning: only when a run is read

        self.store = CheckpointStore(self.path)

    # ------------------------------------------------------------------ configuration
    def build(self, data_domains: list[Any] | None = None, prog: str = "crma-lightning") -> tuple[Any, Any]:
        """The run's model (freshly built, as before stage 1) and datamodule (not prepared).

        Args:
            data_domains: Replace the datamodule's domains (other held-out data); the other data
                settings (``max_length``, packing, batch sizes, seed) stay the run's.
            prog: Program name for messages.
        """
        from crma_lightning.cli.fit import CRMALightningCLI
        from crma_lightning.data.datamodule import SequentialDomainDataModule

        # The resume settings only matter to `fit`; a resume path that is gone must not stop a reader.
        args = ["--config", str(self.config_path), "--run.dir", str(self.path), "--run.resume=auto", "--ckpt_path=null"]
        try:
            cli = CRMALightningCLI(args=args, parser_kwargs={"prog": prog, "exit_on_error": False})
        except (SystemExit, argparse.ArgumentError) as err:
            text = " ".join(str(err).split())[:400]
            raise ValueError(f"{self.config_path} is not a valid crma-lightning fit configuration: {text}") from err
        model, datamodule = cli.model, cli.datamodule
        if data_domains is not None:
            settings = cli.config["data"].as_dict()
            settings["domains"] = data_domains
            datamodule = SequentialDomainDataModule(**settings)
        self.seed = int(model.hparams["seed"])
        self.trainer_kwargs = dict(cli.runner.trainer_kwargs) if cli.runner is not None else {}
        self.routing = cli.runner.routing if cli.runner is not None else None  # the run's routed evaluation
        self.domains = list(cli.datamodule.domain_names)
        return model, datamodule

    def report(self) -> dict[str, Any] | None:
        """``report.json`` of the run (``None`` when there is none yet)."""
        path = self.path / "report.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not readable JSON ({err})") from err

    # ------------------------------------------------------------------ checkpoints
    def stage_checkpoints(self) -> list[StageCheckpoint]:
        """Every ``checkpoints/stage-NN-<domain>.ckpt``, by stage (:meth:`CheckpointStore.stage_checkpoints`)."""
        return self.store.stage_checkpoints()

    def stage_checkpoint(self, stage: int | None) -> StageCheckpoint:
        """The checkpoint after ``stage`` (1-based; ``None``: the newest stage checkpoint)."""
        available = self.stage_checkpoints()
        if not available:
            raise ValueError(
                f"run directory {self.path} has no stage checkpoints in {self.store.dir} (expected "
                "stage-NN-<domain>.ckpt: did the first stage finish?)"
            )
        if stage is None:
            return available[-1]
        for ckpt in available:
            if ckpt.stage == stage:
                return ckpt
        stages = [c.stage for c in available]
        raise ValueError(f"run {self.path} has no checkpoint for stage {stage}: available stages {stages}")

    def check_task(self, task: str, stage: int | None = None) -> None:
        """``task`` must be one of the run's domains and, when ``stage`` is given, trained by then."""
        if task not in self.domains:
            raise ValueError(f"unknown task {task!r}: the run at {self.path} trained {self.domains}")
        trained_in = self.domains.index(task) + 1
        if stage is not None and stage < trained_in:
            raise ValueError(
                f"task {task!r} is trained in stage {trained_in}, after the chosen stage {stage}: its adapter is "
                f"untrained there; choose --stage {trained_in} or later"
            )

    def read_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """A checkpoint of this run, verified as ``fit``'s resume verifies it (:meth:`CheckpointStore.read`).

        Raises:
            ValueError: One line naming the file: missing, damaged (its size or sha256 differs from
                ``checkpoints/manifest.json``), a corrupt manifest, not a weights-only crma_lightning
                checkpoint, or written for other domains.
        """
        from crma_lightning.run.checkpoints import RunState, unreadable

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"checkpoint {path} does not exist (or is not a file)")
        try:
            ckpt = self.store.read(path)
            state = ckpt["callbacks"][RunState.KEY]
            missing = [key for key in ("state_dict", "continual_model") if key not in ckpt]
            if missing:
                raise KeyError(", ".join(missing))
        except Exception as err:
            raise ValueError(f"cannot read checkpoint {path}: {unreadable(path, err)}") from err
        if list(state.get("domains", [])) != self.domains:
            raise ValueError(
                f"checkpoint {path} was written for domains {state.get('domains')}, the run at {self.path} has "
                f"{self.domains}"
            )
        return ckpt

    @staticmethod
    def load_into(model: Any, ckpt: dict[str, Any], path: str | os.PathLike) -> int:
        """Load ``ckpt`` into ``model`` as a resume does; returns its loss-matrix row (1-based stage).

        A stage checkpoint is the row of its stage; a mid-stage one (``last.ckpt``) the row of the stage
        it interrupted.
        """
        from crma_lightning.run.checkpoints import load_states

        try:
            load_states(ckpt, model)  # the runner's own loading (module identity check, adapters, weights)
        except ValueError as err:
            raise ValueError(f"checkpoint {path} does not fit the run's model: {err}") from err
        task = ckpt["continual_model"].get("current_task")
        return model.tasks.index(task) + 1 if task is not None else 0

    def load(self, model: Any, path: str | os.PathLike) -> int:
        """The one loader of the after-training commands: :meth:`read_checkpoint`, then :meth:`load_into`."""
        return self.load_into(model, self.read_checkpoint(path), path)


def writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check that a file can be written there, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write the {what} {path}: {err.strerror or err}") from err
    return path


__all__ = ["CommandParser", "RunDirectory", "writable_dir"]
