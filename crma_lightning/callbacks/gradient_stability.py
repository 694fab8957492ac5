"""``GradientStability``: per-step gradient norm, its variance and peak, and CRMA health (docs/metrics.md).

Nothing in the optimizer step waits for the device: the norms of each step are queued in a device
buffer and copied to the host in one transfer per logging interval, where the statistics are updated
and the per-step values logged with their own step numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import lightning as L
import torch

from crma_lightning import _compat
from crma_lightning.callbacks.health import (
    HEALTH_METRICS,
    crma_health_vector,
    fsdp1_crma_health_vector,
    has_sharded_crma,
)
from crma_lightning.callbacks.stages import (
    FALLBACK_INTERVAL,
    StageTracker,
    log_interval,
    log_to_loggers,
    step_grad_norms,
)
from crma_lightning.parallel.fsdp1 import shard_group


# ---------------------------------------------------------------------- host-side statistics
class RunningStats:
    """Welford mean and population variance (``ddof=0``), peak and median of the gradient norm.

    The first ``warmup`` steps (decided by the caller) and non-finite norms are counted but left out
    of the statistics. Scale-free summaries sit next to the raw variance, because a method that only
    rescales gradients (CRMA's contracting ``mix`` form does) lowers the variance without being any
    steadier: the coefficient of variation ``cv = std / mean`` and ``peak / median`` do not move
    under rescaling (docs/metrics.md).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.warmup_steps = 0
        self.nonfinite_steps = 0
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.peak: float | None = None
        self.values: list[float] = []  # the norms kept for the median (one float per step)

    def add(self, x: float, warmup: bool = False) -> None:
        """Record one step's norm."""
        self.steps += 1
        if warmup:
            self.warmup_steps += 1
            return
        if not math.isfinite(x):
            self.nonfinite_steps += 1
            return
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)
        self.peak = x if self.peak is None else max(self.peak, x)
        self.values.append(x)

    @property
    def cv(self) -> float | None:
        """Coefficient of variation ``std / mean`` (``None`` before two values or with mean 0)."""
        if self.n < 2 or self.mean == 0:
            return None
        return math.sqrt(self.m2 / self.n) / self.mean

    def summary(self) -> dict[str, Any]:
        """``steps``, ``warmup_steps``, ``nonfinite_steps``, then mean/var/std/peak/cv/median/peak_over_median.

        The variance (and ``std``) of fewer than two finite norms is undefined (``None``), not 0: a stage
        whose norms were all but one NaN/inf must not read as perfectly stable.
        """
        var = self.m2 / self.n if self.n >= 2 else None
        median = statistics.median(self.values) if self.values else None
        return {
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "mean": self.mean if self.n else None,
            "var": var,
            "std": math.sqrt(var) if var is not None else None,
            "peak": self.peak,
            "cv": self.cv,
            "median": median,
            "peak_over_median": self.peak / median if median and self.peak is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**vars(self), "values": list(self.values)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningStats:
        stats = cls()
        for key in vars(stats):
            if key in state:
                setattr(stats, key, state[key])
        return stats


def _window_var(values: deque[float]) -> float | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


# ---------------------------------------------------------------------- the callback
class GradientStability(L.Callback):
    """Gradient norm per optimizer step, its Welford variance and peak per stage and run; CRMA health.

    The norm is the global L2 norm over the gradients of every parameter the optimizer updates, taken
    in ``on_before_optimizer_step`` - after backward and AMP unscaling, before Lightning's gradient
    clipping (and before :class:`~crma_lightning.callbacks.ZClip`, which must come later in the
    callback list). It is exact under FSDP1/FSDP2 (shards are reduced, see
    :func:`group_grad_square_sums`) and DDP (gradients are already identical on every rank).

    Per step it logs, with the step's own number as ``step``: ``grad/norm``, ``grad/var`` (variance over
    the last ``window`` steps of the stage), ``grad/peak`` (the stage's running peak) and
    ``grad/norm_<group>`` for each optimizer param group (``lora``, ``crma``, ...; they combine to
    ``grad/norm`` as a root of the sum of squares). At every flush it also logs the CRMA health of all
    adapters (``crma/spectral_norm_max``, ``crma/gate_mean``, ``crma/gate_max``,
    ``crma/row_sum_error_max``, ``crma/col_sum_error_max``, ``crma/sinkhorn_residual_max``).

    A flush - the one device-to-host copy - happens at the end of every ``log_every_n_steps``-th
    optimizer step, at train end, and before a checkpoint takes this callback's state. Each ``fit``
    call is one stage, named after ``pl_module.current_task`` (else ``stage{n}``); a fit resumed from a
    mid-stage checkpoint continues that stage's statistics. Statistics live on every rank; only global
    rank 0 logs.

    Args:
        log_every_n_steps: Flush/log interval in optimizer steps (default: the trainer's).
        warmup_steps: Steps at the start of each stage left out of the mean, variance and peak.
        window: Steps in the rolling variance logged as ``grad/var``.
        log_health: Log the CRMA health metrics (skipped when the model has no CRMA adapters).

    Note:
        Variances are population variances (``ddof=0``, numpy's default): ``var = mean((x - mean)²)``.
    """

    def __init__(
        self, log_every_n_steps: int | None = None, warmup_steps: int = 0, window: int = 50, log_health: bool = True
    ) -> None:
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} is invalid: expected an integer >= 1 or None")
        if isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} is invalid: expected an integer >= 0")
        if isinstance(window, bool) or window < 1:
            raise ValueError(f"window={window!r} is invalid: expected an integer >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self.window = window
        self.log_health = log_health
        self.stages: dict[str, RunningStats] = {}
        self.run = RunningStats()
        self._stage: str | None = None  # key in self.stages
        self._tracker = StageTracker()
        self._window: deque[float] = deque(maxlen=window)
        self._pending: list[torch.Tensor] = []
        self._pending_steps: list[int] = []
        self._pending_names: list[str] = []
        self._trainer: L.Trainer | None = None
        self._shard_group: Any = None
        self._every = FALLBACK_INTERVAL

    # ------------------------------------------------------------------ stage bookkeeping
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self._every = log_interval(trainer, self.log_every_n_steps)
        self._shard_group = shard_group(pl_module)
        task = getattr(pl_module, "current_task", None)
        if self._tracker.start(pl_module) or self._stage is None:
            base = str(task) if task is not None else f"stage{len(self.stages)}"
            key, k = base, 2
            while key in self.stages:  # the same task trained twice: keep both stages
                key, k = f"{base}#{k}", k + 1
            self.stages[key] = RunningStats()
            self._stage = key
            self._window.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending:
            self._flush(health=True)
        self._tracker.end()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._pending:
            self._flush(health=False)  # keep what was measured; no collectives on a failing run

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = None

    # ------------------------------------------------------------------ per step: device only
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        names, squares = step_grad_norms(trainer, optimizer, pl_module.device, self._shard_group)
        if self._pending and names != self._pending_names:
            self._flush(health=False)  # a different optimizer layout: rows would not stack
        self._pending_names = names
        self._pending.append(torch.cat([squares.sum().sqrt().reshape(1), squares.sqrt()]))
        self._pending_steps.append(_compat.logging_step(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Aligned with Lightning's own logging steps; under gradient accumulation only the batch that
        # stepped has a fresh pending entry.
        if self._pending and (self._pending_steps[-1] + 1) % self._every == 0:
            self._flush(health=True)

    # ------------------------------------------------------------------ per interval: host
    def _flush(self, health: bool = True) -> None:
        """Copy the buffered norms (and the CRMA health) to the host once; update statistics; log."""
        rows, steps, names = self._pending, self._pending_steps, self._pending_names
        self._pending, self._pending_steps = [], []
        trainer = self._trainer
        parts = [torch.stack(rows).flatten()]
        health_vec = None
        if health and self.log_health and trainer is not None and trainer.lightning_module is not None:
            if self._shard_group is not None:  # FSDP1
                health_vec = fsdp1_crma_health_vector(trainer.lightning_module, trainer.is_global_zero)
            # Rank 0 logs it; other ranks only join in when the adapters are sharded (a collective).
            elif trainer.is_global_zero or has_sharded_crma(trainer.lightning_module):
                health_vec = crma_health_vector(trainer.lightning_module)
        if health_vec is not None:
            parts.append(health_vec.to(parts[0].device))
        values = torch.cat(parts).tolist()  # the single device-to-host transfer of this interval
        width = 1 + len(names)
        stage = self.stages[self._stage] if self._stage is not None else RunningStats()
        entries: list[tuple[int, dict[str, float]]] = []
        for k, step in enumerate(steps):
            row = values[k * width : (k + 1) * width]
            norm = row[0]
            warmup = stage.steps < self.warmup_steps
            stage.add(norm, warmup)
            self.run.add(norm, warmup)
            if math.isfinite(norm):
                self._window.append(norm)
            metrics = {"grad/norm": norm}
            window_var = _window_var(self._window)
            if window_var is not None:
                metrics["grad/var"] = window_var
            if stage.peak is not None:
                metrics["grad/peak"] = stage.peak
            if stage.cv is not None:
                metrics["grad/cv"] = stage.cv
            metrics.update({f"grad/norm_{name}": v for name, v in zip(names, row[1:])})
            entries.append((step, metrics))
        if health_vec is not None and entries:
            tail = values[len(steps) * width :]
            entries[-1][1].update({key: v for (key, _, _), v in zip(HEALTH_METRICS, tail)})
        log_to_loggers(trainer, entries)

    # ------------------------------------------------------------------ results and state
    def summary(self) -> dict[str, Any]:
        """``{"stages": {name: stats}, "run": stats}``; stats as in :meth:`RunningStats.summary`."""
        if self._pending:
            self._flush(health=False)
        return {"stages": {k: v.summary() for k, v in self.stages.items()}, "run": self.run.summary()}

    def state_dict(self) -> dict[str, Any]:
        # Lightning takes this when it writes a checkpoint: include the steps still on the device.
        if self._pending:
            self._flush(health=False)
        return {
            "version": 1,
            "stages": {k: v.state_dict() for k, v in self.stages.items()},
            "run": self.run.state_dict(),
            "stage": self._stage,
            **self._tracker.state_dict(),
            "window": list(self._window),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stages = {k: RunningStats.from_state(v) for k, v in state_dict.get("stages", {}).items()}
        self.run = RunningStats.from_state(state_dict.get("run", {}))
        self._stage = state_dict.get("stage")
        self._tracker.load_state_dict(state_dict)
        self._window = deque((float(v) for v in state_dict.get("window", [])), maxlen=self.window)
