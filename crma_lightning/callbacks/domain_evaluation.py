"""``DomainEvaluation``: per-domain held-out loss and task score, the loss and score matrices, forgetting metrics."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.aggregation import SumMetric

from crma_lightning import _compat
from crma_lightning.callbacks.row_losses import RowLosses, gather_row_scores
from crma_lightning.evaluation import scoring
from crma_lightning.evaluation.plotting import loss_matrix_image
from crma_lightning.evaluation.report import summarize_losses
from crma_lightning.metrics import continual as metrics
from crma_lightning.metrics.learning import (
    DEFAULT_LOSS_MARGIN,
    DEFAULT_SCORE_MARGIN,
    check_margins,
    learned_only_means,
    learning_flags,
    unlearned_line,
)
from crma_lightning.parallel.dist import distributed_ready

log = logging.getLogger("crma_lightning")


class DomainEvaluation(L.Callback):
    """Token-weighted held-out loss per domain, and the run's loss matrix ``L[s][j]`` (docs/metrics.md).

    Every validation pass (during ``fit`` or a standalone ``validate``) logs ``val/<domain>/loss``
    and ``val/<domain>/ppl``, aggregated with torchmetrics (synchronised across processes: each
    rank evaluates a disjoint shard). When the stage driver announces a matrix row with
    :meth:`expect_row` - row 0 before stage 1 (the base model), row ``i`` after stage ``i`` - the
    next standalone validation fills that row, and the ``cl/*`` metrics and the ``cl/loss_matrix``
    heatmap are logged. The matrix is part of the callback's checkpoint state.

    Domains with a task ``metric`` (``datamodule.task_metrics``) are also scored when a row is filled:
    their held-out prompts are continued greedily with the domain's adapter
    (:func:`crma_lightning.evaluation.scoring.domain_score_sums`, each rank a shard, sums reduced over ranks), giving
    the score matrix ``S[s][j]`` (``scores``), ``val/<domain>/<metric>``, ``cl/ap``, ``cl/bwt_score``,
    ``cl/fwt_score``, ``cl/forgetting_mean`` and the ``cl/score_matrix`` heatmap. ``score_seconds[row]``
    is the generation's wall time.

    With ``row_losses=True`` every filled row also keeps each held-out row's summed loss and token
    count (``row_table[s][domain]``) and each scored row's task score (``row_scores[s][domain]``): what
    intervals over held-out rows need (:mod:`crma_lightning.callbacks.row_losses`; the runner writes
    them to ``heldout_rows.json``). It costs a second, per-row loss reduction per evaluation batch.

    Args:
        log_heatmap: Log the matrix as a TensorBoard image (and as a Markdown text table).
        row_losses: Keep per-row numbers of every matrix row (off by default).
        learn_loss_margin: A domain without a task metric *learned* in its own stage when its held-out loss
            fell by at least this fraction of the base model's (docs/metrics.md, "Did it learn").
        learn_score_margin: A domain with a task metric learned when its score rose by at least this much
            over the base model's. A stage that did not learn is said on the console, logged
            (``cl/learned/<domain>`` = 0) and marked in the report.
    """

    def __init__(
        self,
        log_heatmap: bool = True,
        row_losses: bool = False,
        learn_loss_margin: float = DEFAULT_LOSS_MARGIN,
        learn_score_margin: float = DEFAULT_SCORE_MARGIN,
    ) -> None:
        check_margins(learn_loss_margin, learn_score_margin)
        self.learn_loss_margin, self.learn_score_margin = learn_loss_margin, learn_score_margin
        self.log_heatmap = log_heatmap
        self.row_losses = row_losses
        self.row_table: dict[int, dict[str, dict[str, list]]] = {}
        self.row_scores: dict[int, dict[str, list[float]]] = {}
        self._rows = RowLosses()
        self.domains: list[str] = []
        self.matrix: list[list[float | None]] = []
        self.tokens: dict[str, int] = {}
        self._pending_row: int | None = None
        self._metrics: dict[str, tuple[SumMetric, SumMetric]] = {}
        self.last_losses: dict[str, float] = {}
        self.scores: list[list[float | None]] = []
        self.score_metrics: dict[str, str] = {}  # domain -> metric name (its log key)
        self.score_seconds: dict[int, float] = {}
        self.last_scores: dict[str, float] = {}

    # ------------------------------------------------------------------ driver API
    stage_names: list[str] | None = None
    """The run's domains in training order, when the columns are other domains (``evaluate --data``)."""

    def start_run(self, domains: list[str]) -> None:
        """Fix the column order; a restored matrix must have been written for the same domains."""
        if self.domains and self.domains != list(domains):
            raise ValueError(f"the loss matrix was recorded for domains {self.domains}, this run has {list(domains)}")
        self.domains = list(domains)

    def expect_row(self, row: int) -> None:
        """The next standalone validation fills matrix row ``row`` (0 = base model)."""
        self._pending_row = row

    def evaluate_row(
        self, trainer: L.Trainer, model: L.LightningModule, datamodule: Any, row: int, all_domains: bool = False
    ) -> None:
        """Fill matrix row ``row`` with one ``trainer.validate``: the row evaluation of ``fit`` and ``evaluate``.

        Row 0 (the base model), or ``all_domains``, evaluates every domain; row ``i`` the domains seen
        after stage ``i`` (``datamodule.set_stage(i - 1)``; every domain with ``eval_domains: all``).

        Raises:
            RuntimeError: The validation recorded no loss for the row.
        """
        self.expect_row(row)
        if all_domains or row == 0:
            with datamodule.evaluating_all_domains():
                trainer.validate(model, datamodule=datamodule, verbose=False)
        else:
            datamodule.set_stage(row - 1)
            trainer.validate(model, datamodule=datamodule, verbose=False)
        if not self.has_row(row):
            raise RuntimeError(f"evaluation after stage {row} recorded no losses (did validation run?)")

    def has_row(self, row: int) -> bool:
        return row < len(self.matrix) and any(v is not None for v in self.matrix[row])

    def summary(self, upto: int | None = None) -> dict[str, Any]:
        """Every docs/metrics.md metric of the matrix so far (``upto``: completed stages)."""
        if not self.matrix:
            return {}
        upto = len(self.matrix) - 1 if upto is None else upto
        return metrics.summarize(self.matrix, self.domains, upto=upto)

    def score_summary(self, upto: int | None = None) -> dict[str, Any]:
        """The task-score metrics (:func:`metrics.summarize_scores`) so far; ``{}`` when no domain is scored."""
        if not self.scores or not self.score_metrics:
            return {}
        upto = min(len(self.scores), len(self.matrix)) - 1 if upto is None else upto
        rows = [list(r) for r in self.scores[: upto + 1]]
        rows += [[None] * len(self.domains) for _ in range(upto + 1 - len(rows))]
        return {
            "metrics": dict(self.score_metrics),
            **metrics.summarize_scores(rows, self.domains, upto=upto),
            "eval_seconds": {str(r): v for r, v in sorted(self.score_seconds.items()) if r <= upto},
        }

    def learning_summary(self, upto: int | None = None) -> dict[str, Any]:
        """Whether each trained domain was learned in its own stage, and the learned-only means (docs/metrics.md).

        ``{}`` before any stage. The report's ``learning`` section; ``evaluate`` shows the same.
        """
        if len(self.matrix) < 2 or self.stage_names not in (None, self.domains):
            return {}
        upto = len(self.matrix) - 1 if upto is None else upto
        scores = self.score_summary(upto=upto).get("score_matrix") if self.score_metrics else None
        flags = learning_flags(self.matrix, self.domains, upto, scores, self.learn_loss_margin, self.learn_score_margin)
        summary = summarize_losses(self.matrix, self.domains, upto=upto)
        return {
            "loss_margin": self.learn_loss_margin,
            "score_margin": self.learn_score_margin,
            "domains": flags,
            "unlearned": [d for d, f in flags.items() if f["learned"] is False],
            "learned_only": learned_only_means(flags, summary, scores, self.domains, upto),
        }

    # ------------------------------------------------------------------ accumulation
    def _sums(self, domain: str, device: torch.device) -> tuple[SumMetric, SumMetric]:
        """(summed cross-entropy, token count) of ``domain``: the loss is their ratio.

        ``nan_strategy="disable"``: no per-batch NaN check (it would sync the host every batch) and no
        silently dropped NaN batches either - a diverged domain reports NaN. float64 keeps token counts
        exact far beyond float32's 16M.
        """
        if domain not in self._metrics:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            loss_sum, tokens = (SumMetric(nan_strategy="disable").set_dtype(dtype).to(device) for _ in range(2))
            self._metrics[domain] = (loss_sum, tokens)
        return self._metrics[domain]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for pair in self._metrics.values():
            for metric in pair:
                metric.reset()
        self._rows.reset()
        # Per-row numbers only for a matrix row (runner validation), not for in-fit or sanity validations.
        pl_module.keep_row_losses = bool(self.row_losses and self._pending_row is not None)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "loss_sum" not in outputs:
            return
        loss_sum, tokens = self._sums(outputs["domain"], pl_module.device)
        loss_sum.update(outputs["loss_sum"])
        tokens.update(outputs["tokens"])
        if self.row_losses and "row_loss_sums" in outputs:
            self._rows.add(trainer, outputs["domain"], outputs["row_loss_sums"], outputs["row_tokens"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Every rank must compute (and so synchronise) the same metrics in the same order.
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "eval_domain_names"):
            order = list(datamodule.eval_domain_names())
        else:
            order = [d for d in self.domains if d in self._metrics] + sorted(set(self._metrics) - set(self.domains))
        losses: dict[str, float] = {}
        for domain in order:
            loss_sum, tokens = self._sums(domain, pl_module.device)
            if loss_sum.update_count == 0 and not distributed_ready():
                continue
            total, count = loss_sum.compute(), tokens.compute()  # summed over ranks by torchmetrics
            value = (total / count.clamp_min(1)).float()
            losses[domain] = float(value)
            pl_module.log(f"val/{domain}/loss", value, add_dataloader_idx=False)
            pl_module.log(f"val/{domain}/ppl", torch.exp(value.clamp(max=50.0)), add_dataloader_idx=False)
            self.tokens[domain] = int(count)
        self.last_losses = losses
        if self._pending_row is not None and trainer.state.fn == "validate":
            if self.row_losses and hasattr(datamodule, "eval_sets"):
                rows = self._rows.gather(trainer, order, pl_module.device)
                for domain, numbers in rows.items():  # every row evaluated once: else the bootstrap units are wrong
                    if domain in self.tokens and sum(numbers["tokens"]) != self.tokens[domain]:
                        raise RuntimeError(
                            f"row_losses: domain {domain!r} per-row tokens sum to {sum(numbers['tokens'])}, the "
                            f"evaluation counted {self.tokens[domain]}: some held-out rows were not evaluated "
                            "exactly once (limit_val_batches, or a replaced sampler?)"
                        )
                self.row_table[self._pending_row] = rows
            self._score(trainer, pl_module, self._pending_row, order)
            self._record_row(trainer, self._pending_row, losses)
            self._pending_row = None

    # ------------------------------------------------------------------ task scores
    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, row: int, order: list[str]) -> None:
        """Fill score-matrix row ``row`` for the domains of ``order`` that have a task metric."""
        datamodule = getattr(trainer, "datamodule", None)
        task_metrics = getattr(datamodule, "task_metrics", None) or {}
        scored = [d for d in order if d in task_metrics]  # the same on every rank
        self.last_scores = {}
        if not scored:
            return
        t0 = time.perf_counter()
        sums = []
        for domain in scored:
            pl_module.activate_task(pl_module.evaluation_task(domain))  # as validation_step does (merged, --data)
            indices, scores = scoring.shard_row_scores(
                pl_module.model,
                pl_module.tokenizer,
                task_metrics[domain],
                datamodule.score_rows[domain],
                pl_module.device,
                datamodule.eval_batch_size,
                world=trainer.world_size,
                rank=trainer.global_rank,
            )
            sums.append([float(sum(scores)), float(len(scores))])
            if self.row_losses:
                n = len(datamodule.score_rows[domain])
                per_row = gather_row_scores(trainer, n, indices, scores, pl_module.device)
                self.row_scores.setdefault(row, {})[domain] = per_row
        local = torch.tensor(sums, dtype=torch.float64, device=pl_module.device)
        reduced = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        while len(self.scores) <= row:
            self.scores.append([None] * len(self.domains))
        for domain, (total, count) in zip(scored, reduced, strict=True):
            self.score_metrics[domain] = task_metrics[domain].name
            value = total / max(count, 1.0)
            self.last_scores[domain] = value
            if domain in self.domains:
                self.scores[row][self.domains.index(domain)] = value
            pl_module.log(f"val/{domain}/{task_metrics[domain].name}", value, add_dataloader_idx=False)
        self.score_seconds[row] = time.perf_counter() - t0

    # ------------------------------------------------------------------ the matrix
    def _record_row(self, trainer: L.Trainer, row: int, losses: dict[str, float]) -> None:
        while len(self.matrix) <= row:
            self.matrix.append([None] * len(self.domains))
        self.matrix[row] = [losses.get(d, self.matrix[row][i]) for i, d in enumerate(self.domains)]
        if not trainer.is_global_zero:
            return
        names = self.stage_names or self.domains  # `evaluate --data`: columns are not the run's stages
        after = "the base model" if row == 0 else f"stage {row}" + (f" ({names[row - 1]})" if row <= len(names) else "")
        for domain, value in losses.items():
            if not math.isfinite(value):
                rank_zero_warn(
                    f"evaluation after {after}: domain {domain!r} has a non-finite held-out loss ({value}); "
                    "its adapters diverged. The report marks it, and every metric computed from it, as non-finite",
                    category=UserWarning,
                )
        learning = self.learning_summary(upto=row) if 1 <= row <= len(self.domains) else {}
        own = (learning.get("domains") or {}).get(self.domains[row - 1]) if learning else None
        if own is not None and own["learned"] is False:
            log.warning("after stage %d: %s", row, unlearned_line(self.domains[row - 1], own))
        if not trainer.loggers:
            return  # nothing to log to (`crma-lightning evaluate`, whose --data columns need not be a run's domains)
        step = _compat.logging_step(trainer)
        # A non-finite loss makes the metrics read from it NaN - logged as NaN, never left out silently.
        summary = summarize_losses(self.matrix, self.domains, upto=row)
        scalars = {
            "cl/drift_mean": summary.get("drift_mean"),
            "cl/bwt": summary.get("bwt"),
            "cl/fwt": summary.get("fwt"),
            "cl/base_forgetting_mean": summary.get("base_relative_forgetting_mean"),
            "cl/plasticity_mean": summary.get("plasticity_mean"),
        }
        scores = self.score_summary(upto=row) if row < len(self.scores) else {}
        for key in ("ap", "bwt_score", "fwt_score", "forgetting_mean"):
            scalars[f"cl/{key}"] = scores.get(key)
        if own is not None and own["learned"] is not None:
            scalars[f"cl/learned/{self.domains[row - 1]}"] = float(own["learned"])
            scalars["cl/unlearned_count"] = len(learning["unlearned"])
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=step)
            if self.log_heatmap and isinstance(logger, TensorBoardLogger):
                image = loss_matrix_image(self.matrix, self.domains)
                logger.experiment.add_image("cl/loss_matrix", image, global_step=step, dataformats="HWC")
                logger.experiment.add_text("cl/loss_matrix_table", self.markdown_table(), global_step=step)
                if scores:
                    image = loss_matrix_image(self.scores, self.domains, higher_is_better=True)
                    logger.experiment.add_image("cl/score_matrix", image, global_step=step, dataformats="HWC")

    def markdown_table(self) -> str:
        """The matrix so far as a Markdown table (rows: base, after stage i; columns: domains).

        ``—``: not evaluated yet; ``nan``/``inf``: evaluated, and not finite.
        """
        head = "| after stage | " + " | ".join(self.domains) + " |"
        sep = "|---" * (len(self.domains) + 1) + "|"
        lines = [head, sep]
        for r, row in enumerate(self.matrix):
            label = "base" if r == 0 else f"{r}: {self.domains[r - 1]}"
            cells = ["—" if v is None else (f"{v:.4f}" if math.isfinite(v) else str(v)) for v in row]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "matrix": [list(r) for r in self.matrix],
            "tokens": dict(self.tokens),
            "scores": [list(r) for r in self.scores],
            "score_metrics": dict(self.score_metrics),
            "score_seconds": {str(k): v for k, v in self.score_seconds.items()},
            **({"row_table": dict(self.row_table), "row_scores": dict(self.row_scores)} if self.row_losses else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.domains = list(state_dict.get("domains", []))
        self.matrix = [list(r) for r in state_dict.get("matrix", [])]
        self.tokens = dict(state_dict.get("tokens", {}))
        self.scores = [list(r) for r in state_dict.get("scores", [])]
        self.score_metrics = dict(state_dict.get("score_metrics", {}))
        self.score_seconds = {int(k): float(v) for k, v in state_dict.get("score_seconds", {}).items()}
        self.row_table = {int(k): v for k, v in state_dict.get("row_table", {}).items()}
        self.row_scores = {int(k): v for k, v in state_dict.get("row_scores", {}).items()}
