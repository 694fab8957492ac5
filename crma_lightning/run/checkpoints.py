"""The run's checkpoint files: where they live, atomic writes, the run state, and which one to resume from.

    <run_dir>/checkpoints/stage-01-<domain>.ckpt        after each stage (adapters, optimizer, run state)
    <run_dir>/checkpoints/last.ckpt                     mid-stage (periodic or on SIGINT/SIGTERM)
    <run_dir>/adapters/stage-01-<domain>.safetensors    all adapters after each stage
    <run_dir>/checkpoints/manifest.json                 size and sha256 of each of these files

Every file is written to a temporary name and renamed into place, so a reader (or a resume after
a crash) never sees half a checkpoint. Each file's sha256 is recorded in the manifest once it is in
place and checked before the file is used (:mod:`crma_lightning.run.manifest`). Checkpoints are read with
``torch.load(weights_only=True)``: no pickled objects, so a checkpoint file cannot execute code.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import time
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from crma_lightning.adapters.inject import adapter_parameter_names
from crma_lightning.adapters.serialization import fsync_path, write_adapter_file
from crma_lightning.model.identity import check_compatible
from crma_lightning.parallel.dist import is_global_zero
from crma_lightning.parallel.gather import clean_parameter_name
from crma_lightning.routing.prototype import ROUTER_FILE_SUFFIX
from crma_lightning.run.manifest import DamagedFile, Manifest
from crma_lightning.run.resume_settings import OptimizerSettings, record_stage_configs

RESUME_MODES = ("auto", "never")
STAGE_PREFIX = "stage-"
_STAGE_NAME = re.compile(rf"^{STAGE_PREFIX}(\d+)-(.+)$")


@dataclass(frozen=True)
class StageCheckpoint:
    """A stage checkpoint: ``stage`` (1-based, = its loss-matrix row), its ``domain`` and ``path``."""

    stage: int
    domain: str
    path: Path


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
        killed_runs: One entry per earlier invocation that was killed without a clean stop (SIGKILL, OOM,
            power loss): found at the next start by its lock file or its report's ``running`` status.
        elapsed_s: Wall-clock of the earlier invocations, up to the checkpoint this one resumed from.

    On a mid-stage resume it also applies the optimizer settings of the current configuration to the
    restored optimizer (:class:`~crma_lightning.run.resume_settings.OptimizerSettings`).
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
        self.killed_runs: list[dict[str, Any]] = []
        self.noticed_kill: dict[str, Any] | None = None  # found at this invocation's start
        self.elapsed_s = 0.0
        self.started_at: float | None = None  # time.perf_counter() when this invocation started training
        self.optimizer_settings = OptimizerSettings()
        # (config text, mid_stage, step) of this invocation: re-recorded whenever a checkpoint is loaded.
        self.current_config: tuple[str, bool, int] | None = None

    def note_killed(self, entry: dict[str, Any] | None) -> None:
        """Record ``entry`` (an earlier invocation that was killed), once; kept across checkpoint reloads."""
        self.noticed_kill = entry
        if entry is not None and entry not in self.killed_runs:
            self.killed_runs.append(entry)

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
            "killed_runs": copy.deepcopy(self.killed_runs),
            "elapsed_s": self.total_s(),
        }

    def total_s(self) -> float:
        """Wall-clock of every invocation so far (the earlier ones up to the checkpoint resumed from)."""
        return self.elapsed_s + (time.perf_counter() - self.started_at if self.started_at is not None else 0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.domains = list(state_dict["domains"])
        self.completed = int(state_dict["completed"])
        self.step_offset = int(state_dict["step_offset"])
        self.timings = dict(state_dict.get("timings", {}))
        self.identity = dict(state_dict.get("identity", {}))
        self.stage_configs = dict(state_dict.get("stage_configs", {}))
        self.config_changes = list(state_dict.get("config_changes", []))
        self.killed_runs = list(state_dict.get("killed_runs", []))
        self.elapsed_s = float(state_dict.get("elapsed_s", 0.0))
        self.note_killed(self.noticed_kill)  # Lightning reloads the checkpoint on a mid-stage resume
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


class LocalCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing a local checkpoint straight to its file, then ``fsync``.

    Lightning's own writer stages every checkpoint in ``$TMPDIR`` (fsspec's transaction) and moves it
    into place: a full ``$TMPDIR`` was blamed on the run directory, a full run directory was reported
    as ``/tmp/tmpXXXX``, and a ``PermissionError`` on ``checkpoints/`` surfaced as ``ENOENT``. Here every
    error names the file being written. :class:`CheckpointStore` already writes to a temporary name in
    the same folder and renames it, so no second staging is needed. Remote paths (``s3://``, ...) and
    ``storage_options`` go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if err.filename is None:  # a failed write(): name the file it was writing
                err.filename = str(path)
            raise


def use_local_checkpoint_io(trainer: L.Trainer) -> None:
    """Give ``trainer`` :class:`LocalCheckpointIO` unless it was configured with another checkpoint IO."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = LocalCheckpointIO()


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

    def stage_checkpoints(self) -> list[StageCheckpoint]:
        """Every ``checkpoints/stage-NN-<domain>.ckpt`` on disk, by stage (parsed as :meth:`stage` names them)."""
        found = []
        for path in self.dir.glob(f"{STAGE_PREFIX}*.ckpt"):
            parsed = _parse_stage_name(path.stem)
            if parsed is not None:
                found.append(StageCheckpoint(parsed[0] + 1, parsed[1], path))
        return sorted(found, key=lambda c: c.stage)

    def read(self, path: Path) -> dict[str, Any]:
        """A checkpoint's contents, verified: manifest entry (size, sha256), weights-only load, run state.

        The one reading of a checkpoint of this run: ``fit``'s resume and every after-training command use
        it. The raw error is raised (:func:`unreadable` turns it into one line); a corrupt manifest raises
        :class:`~crma_lightning.run.manifest.DamagedFile` naming it.
        """
        self.manifest.check(path)  # size and sha256 as written: damage that torch.load accepts
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if RunState.KEY not in ckpt["callbacks"]:  # a KeyError/TypeError: not a crma_lightning checkpoint
            raise KeyError(RunState.KEY)
        return ckpt

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
            fsync_path(path.parent)  # the rename survives a power loss (LocalCheckpointIO synced the bytes)
            self.manifest.record(path)
        trainer.strategy.barrier("crma_lightning.save_checkpoint")
        return path

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, newest progress first: ``last.ckpt`` then stage checkpoints."""
        stages = sorted(self.dir.glob(f"{STAGE_PREFIX}*.ckpt"), reverse=True)
        last = [self.last] if self.last.exists() else []
        return last + stages

    def snapshot(self) -> tuple[tuple[str, int, int], ...]:
        """(name, size, mtime) of the resume candidates and the manifest: changes when another process writes."""
        out = []
        for path in [*self.candidates(), self.manifest.path]:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            out.append((path.name, stat.st_size, stat.st_mtime_ns))
        return tuple(out)

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
        if candidates:
            self.manifest.entries()  # a corrupt manifest is refused, never skipped over (nothing could be verified)
        for path in candidates:
            try:
                ckpt = self.read(path)
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
            router = path.with_name(path.stem + ROUTER_FILE_SUFFIX)  # prototype routing statistics, if any
            if router.is_file():
                self.manifest.record(router)

    def set_aside_after(self, path: Path) -> Path | None:
        """Move the files of the stages after stage checkpoint ``path`` to ``abandoned/<time>/`` (rank 0).

        Resuming explicitly from an earlier stage starts a new branch of the run: the later stage
        checkpoints, ``last.ckpt``, adapter files and stage configs belong to the old one, and a later
        ``resume: auto`` must never pick them up. They are kept (moved, not deleted); returns the folder,
        or ``None`` when there was nothing to move or ``path`` is not one of this run's stage checkpoints.
        """
        parsed = _parse_stage_name(path.stem)
        if parsed is None or path.resolve().parent != self.dir.resolve() or not is_global_zero():
            return None
        later = [c for c in self.stage_checkpoints() if c.stage > parsed[0] + 1]
        moves: list[tuple[Path, str]] = [(c.path, "checkpoints") for c in later]
        if self.last.exists():
            moves.append((self.last, "checkpoints"))
        for folder in ("adapters", "configs"):
            for file in sorted((self.run_dir / folder).glob(f"{STAGE_PREFIX}*")):
                stage = _parse_stage_name(file.name.split(".", 1)[0])
                if stage is not None and stage[0] > parsed[0]:
                    moves.append((file, folder))
        if not moves:
            return None
        target = self.run_dir / "abandoned" / time.strftime("%Y%m%dT%H%M%S")
        for file, folder in moves:
            (target / folder).mkdir(parents=True, exist_ok=True)
            os.replace(file, target / folder / file.name)
        return target

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


def _parse_stage_name(name: str) -> tuple[int, str] | None:
    """``(stage, domain)`` (0-based stage) of a name :func:`_stage_name` wrote; ``None`` for any other name."""
    match = _STAGE_NAME.match(name)
    if match is None or int(match.group(1)) < 1:
        return None
    return int(match.group(1)) - 1, match.group(2)


def load_states(ckpt: dict[str, Any], model: Any, callbacks: Iterable[Callback] = (), datamodule: Any = None) -> None:
    """Load a checkpoint's states as a resume does: the module's, then the given callbacks' and the datamodule's.

    The runner's resume and :class:`crma_lightning.cli.run_dir.RunDirectory` (the after-training commands)
    both load through here. The module's ``on_load_checkpoint`` checks the model identity and creates
    the task adapters before their weights load.
    """
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
    saved_callbacks = ckpt.get("callbacks", {})
    for cb in callbacks:
        if cb.state_key in saved_callbacks:
            cb.load_state_dict(saved_callbacks[cb.state_key])
    dm_state = None if datamodule is None else ckpt.get(type(datamodule).__qualname__)
    if dm_state is not None:
        datamodule.load_state_dict(dm_state)


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
