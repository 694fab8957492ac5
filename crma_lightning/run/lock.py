"""An exclusive lock on a run directory: one ``fit`` writes it at a time.

Two ``fit`` processes on one ``run.dir`` would resume from each other's live checkpoints and overwrite
each other's stages, report and ``config.yaml``. :class:`RunLock` takes an exclusive ``flock`` on
``<run_dir>/.crma_lightning.lock`` and writes the holder (PID, host, start time) into it. The kernel
releases a ``flock`` when its process ends in any way (SIGKILL and OOM kill included), so a lock left
by a crashed run is stale by construction: the next run takes it and is told which process left it.
A second run while the first is alive is refused at once, naming the holder.

The file is removed on release. Because another process may have opened it just before, a lock is
only held when the locked file is still the one at the path (same inode); otherwise it is taken again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".crma_lightning.lock"


class RunDirectoryLocked(ValueError):
    """Another live process holds the run directory (exit code 2: choose another ``run.dir`` or wait)."""


class RunLock:
    """The exclusive lock of one run directory (a context manager; :meth:`acquire` / :meth:`release`).

    Args:
        run_dir: The run directory; created when missing (only once every up-front check has passed).
        enabled: ``False``: a lock that does nothing (the processes of a multi-process run other than
            the one that writes the run directory).

    Attributes:
        previous: The holder recorded in a lock file whose process is gone (a killed run), else ``None``.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / LOCK_NAME
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunDirectoryLocked` naming its holder."""
        if fcntl is None or not self.enabled or self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirectoryLocked(
                    f"run directory {self.run_dir} is in use by another crma-lightning run ({describe(holder)}); "
                    "wait for it to finish or stop it, or choose another run.dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the new one
        self.previous = _read(fd) or None  # left behind by a process that could not remove it: killed
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe(holder: dict[str, Any] | None) -> str:
    """``PID 123 on host h, since 2026-...`` (or that the holder is unknown)."""
    if not holder:
        return "holder unknown: its lock file is empty"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["LOCK_NAME", "RunDirectoryLocked", "RunLock", "describe"]
