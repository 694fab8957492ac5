"""The run's checkpoint files: where they live, atomic writes, and which one to resume from.

    <run_dir>/checkpoints/stage-01-<domain>.ckpt   after each stage (adapters, optimizer, run state)
    <run_dir>/checkpoints/last.ckpt                mid-stage (periodic or on SIGINT/SIGTERM)

Every file is written to a temporary name and renamed into place, so a reader (or a resume after
a crash) never sees half a checkpoint. Checkpoints are read with ``torch.load(weights_only=True)``:
no pickled objects, so a checkpoint file cannot execute code.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from crma_lightning.utils import is_global_zero

RESUME_MODES = ("auto", "never")
STAGE_PREFIX = "stage-"
RUN_STATE_KEY = "_RunState"
"""Key of the stage driver's state in a checkpoint's ``callbacks`` entry."""


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
        return self.dir / f"{STAGE_PREFIX}{stage + 1:02d}-{domain}.ckpt"

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
                state = ckpt["callbacks"][RUN_STATE_KEY]
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


def check_compatible(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise ``ValueError`` listing every setting where checkpoint ``path`` and this run differ.

    ``identity`` holds ``domains``, ``model`` (:meth:`ContinualLM.identity`) and ``data``
    (:func:`data_identity`); ``saved`` is the run state stored in the checkpoint.
    """
    saved_identity = saved.get("identity", {})
    ours, theirs = identity["domains"], saved_identity.get("domains", saved.get("domains"))
    problems = []
    if theirs != ours:
        problems.append(f"domains: checkpoint {theirs} vs now {ours}")
    saved_model = saved_identity.get("model", {})
    for key, value in identity["model"].items():
        if saved_model.get(key) != value:
            problems.append(f"{key}: checkpoint {saved_model.get(key)!r} vs now {value!r}")
    saved_data = saved_identity.get("data")
    if saved_data is not None:  # absent from checkpoints written before it was recorded
        for key, value in identity["data"].items():
            if saved_data.get(key) != value:
                problems.append(f"data.{key}: checkpoint {saved_data.get(key)!r} vs now {value!r}")
    if problems:
        raise ValueError(
            f"cannot resume from {path}: the configuration changed in a way that matters ("
            + "; ".join(problems)
            + "). Use the original configuration, or a new run_dir."
        )


def data_identity(dm: Any) -> dict[str, Any]:
    """Data settings that change what the loss matrix measures: a resumed run must keep them.

    Left out on purpose: budgets (``max_steps``), batch sizes, workers and the cache directory, which
    change how training proceeds or how fast, not which held-out text a loss is measured on.
    """
    return {
        "max_length": dm.max_length,
        "packing": dm.packing,
        "max_chars_per_domain": dm.max_chars_per_domain,
        "max_eval_rows": dm.max_eval_rows,
        "eval_domains": dm.eval_domains,
        "seed": dm.seed,
        "sources": [{k: v for k, v in dataclasses.asdict(s).items() if k != "max_steps"} for s in dm.specs],
    }


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


class SingleFileCheckpoints:
    """Strategy mixin: load the one-file adapter checkpoints of the adapter strategies on every rank.

    Used by :class:`~crma_lightning.distributed.AdapterModelParallelStrategy` (FSDP2) and
    :class:`~crma_lightning.fsdp1.AdapterFSDPStrategy` (FSDP1): their checkpoints hold the adapters
    only, as full tensors, so every rank reads the whole file and takes what it holds. The strategy
    loads the optimizer state itself in ``load_optimizer_state_dict``.
    """

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise ValueError(
                f"{path} is a sharded (distributed) checkpoint folder; {type(self).__name__} reads the "
                "single-file adapter checkpoints it writes (or any single-process ContinualLM checkpoint)"
            )
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # Lightning calls load_optimizer_state_dict (the FSDP parents load it in load_checkpoint)
