"""Content hashes of the files a run writes: ``<run_dir>/checkpoints/manifest.json``.

``torch.load(weights_only=True)`` accepts a checkpoint whose tensor bytes were overwritten, and a
truncated safetensors file is only noticed when it is read. So every checkpoint and adapter file the
run writes gets its size and sha256 recorded here (the manifest itself is rewritten atomically after
each file), and a file is checked against its entry before it is used: a mismatch means the file was
damaged or changed after it was written, and it is treated like a corrupt file.

A file without an entry (written by an older version, or given from elsewhere with ``--ckpt_path``)
is not checked. A manifest that exists but cannot be read is an error (:class:`DamagedFile` naming
it), never an empty one: rebuilding it would silently drop the protection of every file it lists.
Hashing streams the file in 8 MiB chunks: about 1-2 s per GB on one core.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from crma_lightning.adapters.serialization import atomic_write

CHUNK = 8 << 20
MANIFEST_VERSION = 1


def sha256(path: str | os.PathLike) -> str:
    """The file's sha256, read in chunks (a multi-GB checkpoint is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DamagedFile(ValueError):
    """A file does not match the size and sha256 recorded when it was written."""


class Manifest:
    """Size and sha256 of each file under ``run_dir``, by path relative to ``run_dir``.

    Args:
        run_dir: The run directory; the manifest is ``<run_dir>/checkpoints/manifest.json``.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "checkpoints" / "manifest.json"

    def _key(self, path: Path) -> str | None:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.run_dir)).as_posix()
        except ValueError:
            return None  # not a file of this run

    def entries(self) -> dict[str, dict[str, Any]]:
        """The recorded files (none when there is no manifest yet).

        Raises:
            DamagedFile: The manifest exists but is not one this module wrote (truncated, edited, not JSON).
        """
        if not self.path.exists():
            return {}
        try:
            files = json.loads(self.path.read_text())["files"]
            if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
                raise TypeError("'files' is not a mapping of file entries")
            return dict(files)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DamagedFile(
                f"{self.path} is corrupt ({type(err).__name__}: {str(err)[:120]}), so no file of the run can be "
                "verified; restore it, or delete it to use the files unverified"
            ) from err

    def record(self, path: str | os.PathLike) -> None:
        """Hash ``path`` (just written) and store it; entries of files that no longer exist are dropped."""
        path = Path(path)
        key = self._key(path)
        if key is None:
            return
        files = {k: v for k, v in self.entries().items() if (self.run_dir / k).is_file()}
        files[key] = {"size": path.stat().st_size, "sha256": sha256(path)}
        text = json.dumps({"manifest_version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def is_recorded(self, path: str | os.PathLike) -> bool:
        key = self._key(Path(path))
        return key is not None and key in self.entries()

    def problem(self, path: str | os.PathLike) -> str | None:
        """Why ``path`` does not match its entry (a sentence), or ``None`` (it matches, or has no entry)."""
        path = Path(path)
        key = self._key(path)
        entry = self.entries().get(key) if key is not None else None
        if entry is None:
            return None
        if not path.is_file():
            return "the file is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return (
                f"its size is {size} bytes but {entry.get('size')} were written ({self.path.name}): "
                "truncated or replaced after it was written"
            )
        if sha256(path) != entry.get("sha256"):
            return (
                f"its content does not match the sha256 recorded when it was written ({self.path.name}): "
                "damaged or changed after it was written"
            )
        return None

    def check(self, path: str | os.PathLike) -> None:
        """Raise :class:`DamagedFile` naming the reason when ``path`` does not match its entry."""
        why = self.problem(path)
        if why is not None:
            raise DamagedFile(why)


__all__ = ["DamagedFile", "Manifest", "sha256"]
