"""The run's checkpoint files: where they live, atomic writes, the run state, and which one to resume from.

    <run_dir>/checkpoints/stage-01-<domain>.ckpt        after each stage (adapters, optimizer, run state)
    <run_dir>/checkpoints/last.ckpt                     mid-stage (periodic or on SIGINT/SIGTERM)
    <run_dir>/adapters/stage-01-<domain>.safetensors    all adapters after each stage
    <run_dir>/checkpoints/manifest.json                 size and sha256 of each of these files

Every file is written to a temporary name and renamed into place, so a reader (or a resume after
a crash) never sees half a checkpoint. Each file's sha256 is recorded in the manifest once it is in
place and checked before the file is used (:mod:`crma_lightning.manifest`). Checkpoints are read with
``torch.load(weights_only=True)``: no pickled objects, so a checkpoint file cannot execute code.
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from crma_lightning.adapters.inject import adapter_parameter_names
from crma_lightning.adapters.serialization import write_adapter_file
from crma_lightning.compatibility import check_compatible
from crma_lightning.manifest import DamagedFile, Manifest
from crma_lightning.parallel.dist import is_global_zero
from crma_lightning.parallel.gather import clean_parameter_name
from crma_lightning.resume_settings import OptimizerSettings, record_stage_configs

RESUME_MODES = ("auto", "never")
STAGE_PREFIX = "stage-"


class RunState(Callback):
    """The stage driver's own state, stored in every checkpoint under ``callbacks[RunState.KEY]``.

    Attributes:
        domains: The run's domains in training order.
        completed: Finished stages.
        step_offset: Logging step at the start of the current stage.
        timings: Per-domain ``train_s``, ``eval_s``, ``steps``.
        identity: What a checkpoint must agree on to be resumed (see :func:`check_compatible`).
        stage_configs: Domain -> the resolved configuration (YAML text) its stage was trained with
            (the CLI's; empty when the runner was given no ``config_text``).
        config_changes: One entry per resume whose configuration differed from the one before it.

    On a mid-stage resume it also applies the optimizer settings of the current configuration to the
    restored optimizer (:class:`~crma_lightning.resume_settings.OptimizerSettings`).
    """

    KEY = "_RunState"
    """The checkpoint key; the class's first name, kept so that older checkpoints still resume."""

    def __init__(self) -> None:
        self.domains: list[str] = []
        self.completed = 0
        self.step_offset = 0
        self.timings: dict[str, dict[str, float]] = {}
        self.identity: dict[str, Any] = {}
        self.stage_configs: dict[str, str] = {}
        self.config_changes: list[dict[str, Any]] = []
        self.optimizer_settings = OptimizerSettings()
        # (config text, mid_stage, step) of this invocation: re-recorded whenever a checkpoint is loaded.
        self.current_config: tuple[str, bool, int] | None = None

    def use_config(self, text: str, mid_stage: bool, step: int) -> None:
        """Record ``text`` for every stage from ``completed`` on (:func:`record_stage_configs`)."""
        self.current_config = (text, mid_stage, step)
        record_stage_configs(self, text, mid_stage, step)

    @property
    def state_key(self) -> str:
        return self.KEY

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "completed": self.completed,
            "step_offset": self.step_offset,
            "timings": copy.deepcopy(self.timings),
            "identity": copy.deepcopy(self.identity),
            "stage_configs": dict(self.stage_configs),
            "config_changes": copy.deepcopy(self.config_changes),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.domains = list(state_dict["domains"])
        self.completed = int(state_dict["completed"])
        self.step_offset = int(state_dict["step_offset"])
        self.timings = dict(state_dict.get("timings", {}))
        self.identity = dict(state_dict.get("identity", {}))
        self.stage_configs = dict(state_dict.get("stage_configs", {}))
        self.config_changes = list(state_dict.get("config_changes", []))
        if self.current_config is not None:  # Lightning reloads the checkpoint on a mid-stage resume
            record_stage_configs(self, *self.current_config)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The optimizers now hold this configuration's settings; a mid-stage resume restores them next.
        self.optimizer_settings.remember(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        applied = self.optimizer_settings.apply(trainer)
        if applied:
            if self.config_changes and self.config_changes[-1].get("mid_stage"):
                self.config_changes[-1]["applied_to_optimizer"] = applied
            if trainer.is_global_zero:
                print(
                    f"[crma_lightning] resumed mid-stage at step {trainer.global_step} with changed optimizer "
                    f"settings, applied to the restored optimizer: {'; '.join(applied)}",
                    flush=True,
                )


class CheckpointStore:
    """Checkpoint paths, atomic saves and the choice of the checkpoint to resume from.

    Args:
        run_dir: The run directory; checkpoints go to ``<run_dir>/checkpoints``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.last = self.dir / "last.ckpt"
        self.manifest = Manifest(self.run_dir)

    def stage(self, stage: int, domain: str) -> Path:
        """Path of the checkpoint written after (0-based) ``stage`` on ``domain``."""
        return self.dir / f"{_stage_name(stage, domain)}.ckpt"

    def stage_adapters(self, stage: int, domain: str) -> Path:
        """Path of the adapter file (safetensors) written after (0-based) ``stage`` on ``domain``."""
        return self.run_dir / "adapters" / f"{_stage_name(stage, domain)}.safetensors"

    def check_writable(self) -> None:
        """``ValueError`` naming the path when the run directory cannot be created or written."""
        probe = self.run_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise ValueError(f"run directory {self.run_dir} cannot be created: {probe} is a file, not a directory")
        for folder in (probe, self.dir, self.run_dir / "adapters"):
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(
                    f"run directory {self.run_dir} is not writable: no write permission on {folder} "
                    "(or a read-only file system)"
                )

    @staticmethod
    def is_stage_checkpoint(path: Path) -> bool:
        return path.name.startswith(STAGE_PREFIX)

    def save(self, trainer: L.Trainer, path: Path) -> Path:
        """``trainer.save_checkpoint`` to a temporary name, then an atomic rename (rank 0)."""
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer and loops too
        except BaseException:
            # Disk full, a failing hook, ...: the previous file at `path` is untouched; leave no stray temp file.
            if trainer.is_global_zero and tmp.is_file():
                tmp.unlink()
            raise
        if trainer.is_global_zero:
            os.replace(tmp, path)
            self.manifest.record(path)
        trainer.strategy.barrier("crma_lightning.save_checkpoint")
        return path

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, newest progress first: ``last.ckpt`` then stage checkpoints."""
        stages = sorted(self.dir.glob(f"{STAGE_PREFIX}*.ckpt"), reverse=True)
        last = [self.last] if self.last.exists() else []
        return last + stages

    def newest(self) -> Path | None:
        candidates = self.candidates()
        return candidates[0] if candidates else None

    def find_resume(self, resume: str, identity: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None]:
        """The newest readable checkpoint to resume from and its contents, checked against ``identity``.

        ``resume="auto"``: an unreadable candidate (truncated, corrupt, not ours) is skipped with a
        warning naming it, and the next older one is tried. ``"never"``: refuse a run directory that
        holds checkpoints. A path: that file, which must be readable.

        Raises:
            ValueError: ``never`` with existing checkpoints, an unreadable explicit path, or a
                checkpoint written by a configuration that differs in a way that matters.
        """
        if resume == "never":
            if self.candidates():
                raise ValueError(
                    f"run_dir {self.run_dir} already holds checkpoints and resume='never'; choose another "
                    "run_dir, delete it, or resume with resume='auto'"
                )
            return None, None
        explicit = resume not in RESUME_MODES
        candidates = [Path(resume)] if explicit else self.candidates()
        for path in candidates:
            try:
                self.manifest.check(path)  # size and sha256 as written: damage that torch.load accepts
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
                state = ckpt["callbacks"][RunState.KEY]
            except Exception as err:  # corrupt, truncated or foreign file
                if explicit:
                    raise ValueError(f"cannot resume from {path}: {unreadable(path, err)}") from err
                warnings.warn(
                    f"skipping checkpoint {path}: {unreadable(path, err)}; trying the next older checkpoint",
                    stacklevel=3,
                )
                continue
            check_compatible(state, identity, path)
            return path, ckpt
        if candidates:
            warnings.warn(f"no readable checkpoint in {self.dir}: starting from the beginning", stacklevel=3)
        return None, None

    def repair_stage_adapters(self, model: Any, domains: list[str], completed: int) -> list[Path]:
        """Rewrite each finished stage's adapter file that is missing or damaged, from its stage checkpoint.

        A file with a manifest entry must match it; one without (an older run) must open as safetensors.
        Rank 0 only. Returns the rewritten files; each is named in a warning, as is a file that cannot
        be rebuilt because its stage checkpoint is gone or damaged too.

        Args:
            model: The ``ContinualLM`` (its adapters' names and its identity, stored in the files).
            domains: The run's domains in order.
            completed: Finished stages.
        """
        repaired: list[Path] = []
        if not is_global_zero():
            return repaired
        names = {clean_parameter_name(n) for n in adapter_parameter_names(model.model)}
        metadata = model.identity()
        for stage, domain in enumerate(domains[:completed]):
            path = self.stage_adapters(stage, domain)
            why = self._adapter_problem(path)
            if why is None:
                continue
            source = self.stage(stage, domain)
            try:
                self.manifest.check(source)
                state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
                tensors = {k[len("model.") :]: v for k, v in state.items() if k[len("model.") :] in names}
                if not tensors:
                    raise ValueError("it holds no adapter tensors")
            except Exception as err:
                warnings.warn(f"adapter file {path}: {why}, and {source} cannot rebuild it ({err})", stacklevel=2)
                continue
            write_adapter_file(
                tensors, path, metadata={"stage": stage + 1, "domain": domain, **metadata}, crma=model.crma_config
            )
            self.manifest.record(path)
            warnings.warn(f"adapter file {path}: {why}; rewritten from {source}", stacklevel=2)
            repaired.append(path)
        return repaired

    def _adapter_problem(self, path: Path) -> str | None:
        if not path.is_file():
            return "the file is missing"
        if self.manifest.is_recorded(path):
            return self.manifest.problem(path)
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:  # checks the header against the file's length
                f.keys()
        except Exception as err:
            return f"not a readable safetensors file ({type(err).__name__}: {str(err)[:200]})"
        self.manifest.record(path)  # readable: from now on its hash is checked
        return None

    def record_adapters(self, domains: list[str], completed: int) -> None:
        """Record the newest finished stage's adapter file, if written after its stage checkpoint (rank 0)."""
        if completed < 1 or not is_global_zero():
            return
        path = self.stage_adapters(completed - 1, domains[completed - 1])
        ckpt = self.stage(completed - 1, domains[completed - 1])
        if not (path.is_file() and ckpt.is_file()) or (
            self.manifest.is_recorded(path) and self.manifest.problem(path) is None
        ):
            return
        if path.stat().st_mtime_ns >= ckpt.stat().st_mtime_ns:  # exported after the checkpoint: this stage's
            self.manifest.record(path)

    def remove_stale_temp_files(self) -> None:
        """Delete temp files that a process killed mid-write (SIGKILL, power loss) left behind."""
        if not is_global_zero():
            return
        for folder in (self.run_dir, self.dir, self.run_dir / "adapters"):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp*"):
                    if tmp.is_file():
                        tmp.unlink()


def _stage_name(stage: int, domain: str) -> str:
    return f"{STAGE_PREFIX}{stage + 1:02d}-{domain}"


def unreadable(path: Path, err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` (or finding the run state in it) failed, in one line."""
    if isinstance(err, DamagedFile):
        return str(err)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the very end
        return "not a complete PyTorch checkpoint (no zip archive: truncated, corrupt, or another kind of file)"
    if isinstance(err, pickle.UnpicklingError):
        # torch's own text suggests weights_only=False; crma_lightning never unpickles arbitrary objects.
        return (
            "not a weights-only checkpoint (torch.load(weights_only=True) refused it: it is not a checkpoint, "
            "or it holds pickled objects, which crma_lightning never loads)"
        )
    if isinstance(err, (KeyError, TypeError)):
        return f"not a crma_lightning checkpoint (it has no run state: {type(err).__name__}: {err})"
    text = str(err).strip().splitlines()
    return f"unreadable ({type(err).__name__}: {text[0][:200] if text else 'no message'})"
