"""Stopping a run cleanly on SIGINT/SIGTERM, and mid-stage checkpoints.

Signal handlers only record the signal; the checkpoint is written at the next training batch end,
where model, optimizer and loops are consistent (a ``KeyboardInterrupt`` raised in the middle of an
optimizer step could leave a half-applied update behind). A second Ctrl+C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from crma_lightning import _compat
from crma_lightning.run.checkpoints import CheckpointStore


class RunInterrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; resumable checkpoint: {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class StopSignals:
    """A context manager that records SIGINT/SIGTERM instead of dying on them (main thread only).

    Attributes:
        signum: The first signal received, or ``None``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._handler: Any = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl+C: stop now
            self.signum = signum
            print(
                f"\n[crma_lightning] {signal.Signals(signum).name} received: saving a checkpoint after this step "
                "(Ctrl+C again to abort without saving)",
                flush=True,
            )

        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            signal.signal(s, handler)
        self._handler = handler
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handler = None
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def reclaim_sigterm(self, trainer: L.Trainer) -> None:
        """Put our SIGTERM handler back in place of the one ``Trainer.fit``/``validate`` install.

        Lightning's handler makes its loops raise ``SIGTERMException`` - a ``SystemExit`` with exit
        code 0 - at an epoch end or in the middle of a validation, without a checkpoint. The driver
        instead lets a validation finish (so the stage's checkpoint is written) and stops training at
        the next batch end with a checkpoint. Lightning restores our handler when it tears down. A
        SIGTERM that arrived while Lightning's handler was in place also ran ours (Lightning chains to
        it), so clearing Lightning's flag loses nothing. If this private attribute moves, the driver's
        fallback still reports the stop as an interruption.
        """
        if self._handler is None or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._handler)
        _compat.clear_received_sigterm(trainer)


class StopAndSave(Callback):
    """Mid-stage checkpoints: every ``every_n_steps`` optimizer steps, and when a stop signal came.

    With several processes the stop flag is reduced across ranks every ``sync_every`` steps so that
    all ranks stop at the same step (and write the checkpoint together).
    """

    def __init__(
        self, signals: StopSignals, checkpoints: CheckpointStore, every_n_steps: int | None, sync_every: int = 10
    ) -> None:
        self.signals = signals
        self.checkpoints = checkpoints
        self.every_n_steps = every_n_steps
        self.sync_every = sync_every

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.reclaim_sigterm(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.reclaim_sigterm(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # With gradient accumulation only a batch that ended with an optimizer step is a consistent point:
        # a checkpoint between micro-batches would drop the partial gradients (same rule as ModelCheckpoint).
        if _compat.is_accumulating(trainer):
            return
        stop = self.signals.signum is not None
        if trainer.world_size > 1:
            stop = trainer.global_step % self.sync_every == 0 and trainer.strategy.reduce_boolean_decision(
                stop, all=False
            )
        if stop:
            path = self.checkpoints.save(trainer, self.checkpoints.last)
            raise RunInterrupted(self.signals.signum or signal.SIGTERM, str(path))
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.checkpoints.save(trainer, self.checkpoints.last)
