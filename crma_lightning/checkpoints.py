"""The run's checkpoint files: where they live, atomic writes, the run state, and which one to resume from.

    <run_dir>/checkpoints/stage-01-<domain>.ckpt        after each stage (adapters, optimizer, run state)
    <run_dir>/checkpoints/last.ckpt                     mid-stage (periodic or on SIGINT/SIGTERM)
    <run_dir>/adapters/stage-01-<domain>.safetensors    all adapters after each stage

Every file is written to a temporary name and renamed into place, so a reader (or a resume after
a crash) never sees half a checkpoint. Checkpoints are read with ``torch.load(weights_only=True)``:
no pickled objects, so a checkpoint file cannot execute code.
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

from crma_lightning.parallel.dist import is_global_zero

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
    """

    KEY = "_RunState"
    """The checkpoint key; the class's first name, kept so that older checkpoints still resume."""

    def __init__(self) -> None:
        self.domains: list[str] = []
        self.completed = 0
        self.step_offset = 0
        self.timings: dict[str, dict[str, float]] = {}
        self.identity: dict[str, Any] = {}

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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.domains = list(state_dict["domains"])
        self.completed = int(state_dict["completed"])
        self.step_offset = int(state_dict["step_offset"])
        self.timings = dict(state_dict.get("timings", {}))
        self.identity = dict(state_dict.get("identity", {}))


class CheckpointStore:
    """Checkpoint paths, atomic saves and the choice of the checkpoint to resume from.

    Args:
        run_dir: The run directory; checkpoints go to ``<run_dir>/checkpoints``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.last = self.dir / "last.ckpt"

    def stage(self, stage: int, domain: str) -> Path:
        """Path of the checkpoint written after (0-based) ``stage`` on ``domain``."""
        return self.dir / f"{_stage_name(stage, domain)}.ckpt"

    def stage_adapters(self, stage: int, domain: str) -> Path:
        """Path of the adapter file (safetensors) written after (0-based) ``stage`` on ``domain``."""
        return self.run_dir / "adapters" / f"{_stage_name(stage, domain)}.safetensors"

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


def identity_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: checkpoint X vs now Y"`` for every key of ``current`` whose saved value differs.

    The one comparison of identities: the model's (``ContinualLM.identity``), the data's
    (``SequentialDomainDataModule.identity``) and the run's domains all go through it.
    """
    return [
        f"{prefix}{key}: checkpoint {saved.get(key)!r} vs now {value!r}"
        for key, value in current.items()
        if saved.get(key) != value
    ]


def check_compatible(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise ``ValueError`` listing every setting where checkpoint ``path`` and this run differ.

    ``identity`` holds ``domains``, ``model`` and ``data`` (see :func:`identity_differences`);
    ``saved`` is the run state stored in the checkpoint.
    """
    saved_identity = saved.get("identity", {})
    saved_domains = saved_identity.get("domains", saved.get("domains"))
    problems = identity_differences({"domains": saved_domains}, {"domains": identity["domains"]})
    problems += identity_differences(saved_identity.get("model", {}), identity["model"])
    if saved_identity.get("data") is not None:  # absent from checkpoints written before it was recorded
        problems += identity_differences(saved_identity["data"], identity["data"], prefix="data.")
    if problems:
        raise ValueError(
            f"cannot resume from {path}: the configuration changed in a way that matters ("
            + "; ".join(problems)
            + "). Use the original configuration, or a new run_dir."
        )


def unreadable(path: Path, err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` (or finding the run state in it) failed, in one line."""
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
