"""The stage driver and everything a run directory holds.

``ContinualRunner`` (one ``Trainer.fit`` per domain), the per-stage trainers, checkpoints and the run
state, resume and what a changed setting does, interrupts, the directory's lock, the sha256 manifest
and the ``config.yaml`` of a run made from Python.
"""

from __future__ import annotations

from crma_lightning._lazy import lazy_exports

_LAZY = {
    "ContinualRunner": "crma_lightning.run.runner",
    "RunInterrupted": "crma_lightning.run.interrupts",
}

__all__ = list(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
