"""``TrainUntilLearned``: each stage trains until its dev loss stops improving (an early-stopping budget).

Lightning's ``EarlyStopping`` watches a metric logged by a validation loop; a stage here has no
validation loop of its own (the held-out rows are the *test* of the loss matrix, and deciding when to
stop on them would peek at it). So this callback measures its own signal: every
``check_every_n_steps`` optimizer steps, the mean token loss of the current domain's **dev rows**
(``data.dev_rows``: training rows held back, disjoint from the held-out rows that are scored), with
the adapter being trained. The rule, as ``EarlyStopping``'s:

* a check *improves* when ``dev_loss < best - min_delta``; otherwise ``wait`` grows by one;
* the stage stops (``trainer.should_stop``) at the first check with ``wait >= patience`` and
  ``step >= min_steps``; the trainer's ``max_steps`` (or the domain's) stays the cap.

The rule's settings are part of the run's identity (a resume with other settings is refused), and the
callback's state - the current stage's best, wait and curve, every finished stage's record - is in
every checkpoint, so a run resumed mid-stage takes the same decision at the same step. The steps
each stage used go to ``report.json``/``report.md`` (``budget``) and TensorBoard (``stage/dev_loss``,
``stage/steps_used``). One host sync per check (the dev loss itself), none in the steps between.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from crma_lightning import _compat

log = logging.getLogger("crma_lightning")


class TrainUntilLearned(L.Callback):
    """Stop each stage once its dev loss has not improved for ``patience`` checks.

    Args:
        check_every_n_steps: Optimizer steps between two dev-loss checks (the first check is at this step;
            the dev loss at the stage's start is measured too, as ``start``).
        patience: Checks without improvement before the stage stops.
        min_delta: Least decrease of the dev loss (loss units) that counts as an improvement.
        min_steps: The stage trains at least this many steps whatever the dev loss does.
    """

    def __init__(
        self, check_every_n_steps: int = 50, patience: int = 3, min_delta: float = 0.0, min_steps: int = 0
    ) -> None:
        for name, value, low in (("check_every_n_steps", check_every_n_steps, 1), ("patience", patience, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainUntilLearned: {name}={value!r} is invalid: expected an integer >= {low}")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ValueError(f"TrainUntilLearned: min_steps={min_steps!r} is invalid: expected an integer >= 0")
        if not isinstance(min_delta, int | float) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"TrainUntilLearned: min_delta={min_delta!r} is invalid: expected a finite number >= 0")
        self.check_every_n_steps, self.patience = check_every_n_steps, patience
        self.min_delta, self.min_steps = float(min_delta), min_steps
        self.stages: dict[str, dict[str, Any]] = {}
        """Domain -> its record: ``start``, ``best``, ``best_step``, ``wait``, ``curve``, ``steps``,
        ``stopped_early``."""

    # ------------------------------------------------------------------ settings and checks
    def settings(self) -> dict[str, Any]:
        """The rule, as the run's identity and the report record it."""
        return {
            "check_every_n_steps": self.check_every_n_steps,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "min_steps": self.min_steps,
        }

    def check_data(self, datamodule: Any) -> None:
        """Every domain needs dev rows (raise before any training)."""
        if not getattr(datamodule, "dev_rows", 0):
            raise ValueError(
                "TrainUntilLearned stops each stage on its dev loss: set data.dev_rows > 0 (training rows held "
                "back per domain, disjoint from the scored held-out rows)"
            )

    # ------------------------------------------------------------------ the stage
    def _record(self, domain: str) -> dict[str, Any]:
        return self.stages.setdefault(
            domain,
            {
                "start": None,
                "best": None,
                "best_step": None,
                "wait": 0,
                "curve": [],
                "steps": 0,
                "stopped_early": False,
            },
        )

    @torch.no_grad()
    def dev_loss(self, trainer: L.Trainer, pl_module: L.LightningModule, domain: str) -> float:
        """Mean token loss of ``domain``'s dev rows with the active adapter, summed over ranks (one host sync)."""
        was_training = pl_module.training
        pl_module.eval()
        total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        count = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        try:
            for batch in trainer.datamodule.dev_dataloader(domain):
                batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logits = pl_module(batch["input_ids"], batch.get("attention_mask"))
                s, n = pl_module.token_losses(logits, batch["labels"])
                total += s.double()
                count += n.double()
        finally:
            pl_module.train(was_training)
        both = trainer.strategy.reduce(torch.stack([total, count]), reduce_op="sum")
        return float(both[0] / both[1].clamp_min(1))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        domain = pl_module.current_task
        record = self._record(domain)
        if record["start"] is None:  # not when resumed mid-stage: the start was measured before
            record["start"] = self.dev_loss(trainer, pl_module, domain)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.check_every_n_steps:
            return
        domain = pl_module.current_task
        record = self._record(domain)
        if record["curve"] and record["curve"][-1][0] >= step:
            return  # this step was checked already (gradient accumulation: several batches per step)
        loss = self.dev_loss(trainer, pl_module, domain)
        record["curve"].append([step, loss])
        if record["best"] is None or loss < record["best"] - self.min_delta:
            record["best"], record["best_step"], record["wait"] = loss, step, 0
        else:
            record["wait"] += 1
        pl_module.log("stage/dev_loss", loss, on_step=True, on_epoch=False, sync_dist=False)
        if record["wait"] >= self.patience and step >= self.min_steps:
            record["stopped_early"] = True
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        domain = pl_module.current_task
        record = self._record(domain)
        record["steps"] = int(trainer.global_step)
        if trainer.is_global_zero:
            how = (
                f"stopped early at step {record['steps']} (no dev-loss improvement in {self.patience} checks)"
                if record["stopped_early"]
                else f"ran its full budget of {record['steps']} steps"
            )
            best, at = _round(record["best"]), record["best_step"]
            log.info("stage %s: %s; best dev loss %s at step %s", domain, how, best, at)
            for logger in trainer.loggers:
                logger.log_metrics({"stage/steps_used": float(record["steps"])}, step=_compat.logging_step(trainer))

    # ------------------------------------------------------------------ report and checkpoints
    def summary(self) -> dict[str, Any]:
        """``{"rule": settings, "stages": {domain: record}}`` for the report."""
        return {"rule": self.settings(), "stages": {d: dict(r) for d, r in self.stages.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings(), "stages": {d: dict(r) for d, r in self.stages.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings", {})
        if saved and saved != self.settings():
            changed = {k: (saved.get(k), v) for k, v in self.settings().items() if saved.get(k) != v}
            raise ValueError(
                f"TrainUntilLearned: the checkpoint was trained with another budget rule {changed} (saved -> now); "
                "a stage's budget is part of what it measured: resume with the same settings or start a new run"
            )
        self.stages = {d: dict(r) for d, r in state_dict.get("stages", {}).items()}


def _round(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
