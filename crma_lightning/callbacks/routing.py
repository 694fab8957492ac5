"""``RoutedEvaluation``: task-agnostic evaluation next to the oracle one (docs/method.md, docs/metrics.md).

The oracle evaluation (:class:`~crma_lightning.callbacks.evaluation.DomainEvaluation`) scores domain ``j``
with domain ``j``'s adapter: it is told each example's task. With ``mode: perplexity`` this callback
also routes every held-out sequence of the evaluations that fill the loss matrix: the first ``P``
tokens (``prefix_tokens``) are scored under each adapter trained so far, the lowest loss picks the
adapter, and the rest of the sequence is scored with it (:func:`crma_lightning.routing.route_batch`).
It runs after the module's ``validation_step`` on the same batch, so the oracle numbers are untouched.

Domains with a task ``metric`` also get a routed score matrix ``S~[s][j]``: each held-out prompt is answered
by the adapter under which the prompt has the lowest mean loss
(:func:`crma_lightning.scoring.routed_score_sums`).

Per matrix row ``s`` and domain ``j`` it records the routed loss ``L~[s][j]``, the oracle loss on the
same targets (positions ``>= P``, the domain's own adapter) and the routing accuracy (fraction of
``j``'s sequences routed to ``j``'s adapter). Tasks whose adapters are the same (``shared``, O-LoRA's
stack) are one candidate, so routing among them is never counted as an error. ``mode: none`` asserts
that the evaluation needs no task identity (every task activates the same adapters) and adds nothing.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from crma_lightning import _compat, metrics, scoring
from crma_lightning.callbacks.stages import log_to_loggers
from crma_lightning.routing import (
    DEFAULT_PREFIX_TOKENS,
    NONE,
    ORACLE,
    route_batch,
    validate_routing,
)

BASE = "<base>"  # the candidate of row 0: no task trained yet, LoRA off
_FIELDS = 5  # per domain: routed loss sum, oracle (same targets) loss sum, scored tokens, correct rows, routed rows


class RoutedEvaluation(L.Callback):
    """Routed loss matrix, routing accuracy and routed drift (``routing:`` section of the YAML).

    Args:
        mode: ``oracle`` (task identity given: nothing extra, the default), ``perplexity`` (route each
            held-out sequence on its first ``prefix_tokens`` tokens) or ``none`` (the method needs no
            routing: checked, nothing extra).
        prefix_tokens: ``P``: tokens read to choose an adapter; only targets at positions ``>= P`` are scored.

    Attributes:
        matrix: Routed loss matrix ``L~[s][j]`` (row 0: base model), ``None`` where not evaluated.
        oracle_matrix: The oracle loss on the routed targets (positions ``>= P``), same layout.
        accuracy: Routing accuracy per row and domain; ``None`` for the base row and untrained domains.
        scores: Routed task scores ``S~[s][j]`` of the domains with a metric (``None`` elsewhere).
    """

    def __init__(self, mode: str = ORACLE, prefix_tokens: int = DEFAULT_PREFIX_TOKENS) -> None:
        validate_routing(mode, prefix_tokens)
        self.mode, self.prefix_tokens = mode, prefix_tokens
        self.domains: list[str] = []
        self.matrix: list[list[float | None]] = []
        self.oracle_matrix: list[list[float | None]] = []
        self.accuracy: list[list[float | None]] = []
        self.scores: list[list[float | None]] = []
        self._row: int | None = None
        self._candidates: dict[str, str | None] = {}  # candidate label -> a task that activates it
        self._own: dict[str, str] = {}  # domain -> the label of its own adapter(s)
        self._sums: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ which adapters
    @staticmethod
    def adapter_key(pl_module: L.LightningModule, task: str) -> tuple[str, ...]:
        """The adapters ``task`` activates: the method's choice, else the task's own adapter."""
        method = getattr(pl_module, "method", None)
        names = None if method is None else method.active_adapters(pl_module, task)
        return tuple(names) if names is not None else (pl_module.adapter_for(task),)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._row = None
        if self.mode == ORACLE or trainer.sanity_checking or trainer.state.fn != "validate":
            return  # only the evaluations that fill the loss matrix are routed
        tasks = list(pl_module.tasks)
        keys = {t: self.adapter_key(pl_module, t) for t in tasks}
        if self.mode == NONE:
            if len(set(keys.values())) > 1:
                raise ValueError(
                    "routing mode 'none' needs an evaluation without task identity, but the tasks activate "
                    f"different adapters {sorted(set(keys.values()))}; use routing mode 'perplexity' or 'oracle'"
                )
            return
        current = pl_module.current_task
        self._row = 0 if current is None else tasks.index(current) + 1
        self.domains = list(getattr(trainer.datamodule, "domain_names", tasks))
        self._candidates, self._own = ({BASE: None}, {}) if self._row == 0 else ({}, {})
        for task in tasks[: self._row]:  # one candidate per distinct adapter set, in training order
            label = "+".join(keys[task])
            self._candidates.setdefault(label, task)
            self._own[task] = label
        self._sums = {}

    # ------------------------------------------------------------------ accumulation
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._row is None:
            return
        labels = list(self._candidates)
        # Every rank runs 2 forwards per candidate on every batch (padding batches included): equal counts.
        routed = route_batch(
            lambda ids, mask: pl_module(ids, mask),
            batch,
            labels,
            self.prefix_tokens,
            lambda label: pl_module.activate_task(self._candidates[label]),
        )
        domain = batch["domain"]
        own = BASE if self._row == 0 else self._own.get(domain)  # None: a domain not trained yet
        # Counted on the device (no host sync per batch): rows with a prefix target are real (not padding).
        real = (batch["labels"][:, 1 : self.prefix_tokens] != -100).any(dim=1).to(routed.prefix_losses.device)
        if own is None:  # a domain not trained yet: nothing counts as correct, no oracle loss
            correct, oracle = real.new_zeros(()), routed.loss_sum.new_zeros(())
        else:
            k = labels.index(own)
            correct = (real & (routed.prefix_losses.argmin(dim=1) == k)).sum()  # the choice route_batch made
            oracle = routed.scored_sums[:, k].sum()
        values = [routed.loss_sum, oracle, routed.tokens, correct, real.sum()]
        row = torch.stack([v.to(device=pl_module.device, dtype=torch.float64) for v in values])
        self._sums[domain] = self._sums.get(domain, torch.zeros_like(row)) + row

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._row is None:
            return
        order = list(trainer.datamodule.eval_domain_names())  # the same on every rank
        zeros = torch.zeros(_FIELDS, dtype=torch.float64, device=pl_module.device)
        local = torch.stack([self._sums.get(d, zeros) for d in order])  # (D, 5)
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        self._record(trainer, self._row, dict(zip(order, total, strict=True)))
        self._score(trainer, pl_module, self._row, order)
        self._row = None

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, row: int, order: list[str]) -> None:
        """Routed task scores of row ``row`` for the domains of ``order`` that have a metric."""
        dm = trainer.datamodule
        task_metrics = getattr(dm, "task_metrics", None) or {}
        scored = [d for d in order if d in task_metrics]
        if not scored:
            return
        candidates = {label: (lambda t=task: pl_module.activate_task(t)) for label, task in self._candidates.items()}
        sums = [
            scoring.routed_score_sums(
                pl_module.model,
                pl_module.tokenizer,
                task_metrics[d],
                dm.score_rows[d],
                pl_module.device,
                dm.eval_batch_size,
                candidates,
                world=trainer.world_size,
                rank=trainer.global_rank,
            )
            for d in scored
        ]
        local = torch.tensor(sums, dtype=torch.float64, device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        while len(self.scores) <= row:
            self.scores.append([None] * len(self.domains))
        scalars = {}
        for domain, (value, count) in zip(scored, total, strict=True):
            self.scores[row][self.domains.index(domain)] = value / max(count, 1.0)
            scalars[f"val/{domain}/{task_metrics[domain].name}_routed"] = value / max(count, 1.0)
        log_to_loggers(trainer, [(_compat.logging_step(trainer), scalars)])

    def _record(self, trainer: L.Trainer, row: int, sums: dict[str, list[float]]) -> None:
        for table in (self.matrix, self.oracle_matrix, self.accuracy):
            while len(table) <= row:
                table.append([None] * len(self.domains))
        for domain, (routed, oracle, tokens, correct, rows) in sums.items():
            j, trained = self.domains.index(domain), domain in self._own
            self.matrix[row][j] = routed / max(tokens, 1.0)
            self.oracle_matrix[row][j] = oracle / max(tokens, 1.0) if trained or row == 0 else None
            self.accuracy[row][j] = correct / rows if trained and rows else None
        scalars: dict[str, float] = {}
        for domain in sums:
            j = self.domains.index(domain)
            scalars[f"val/{domain}/loss_routed"] = self.matrix[row][j]
            if self.accuracy[row][j] is not None:
                scalars[f"val/{domain}/routing_accuracy"] = self.accuracy[row][j]
        drift = self.summary_metrics(upto=row).get("drift_mean")
        if drift is not None and math.isfinite(drift):
            scalars["cl/drift_mean_routed"] = float(drift)
        log_to_loggers(trainer, [(_compat.logging_step(trainer), scalars)])

    # ------------------------------------------------------------------ report and state
    def summary_metrics(self, upto: int | None = None) -> dict[str, Any]:
        """``metrics.summarize`` of the routed matrix (drift, BWT, ... of task-agnostic evaluation)."""
        if not self.matrix:
            return {}
        return metrics.summarize(self.matrix, self.domains, upto=len(self.matrix) - 1 if upto is None else upto)

    def summary(self, upto: int | None = None) -> dict[str, Any]:
        """The report entry: the mode, ``P``, and (``perplexity``) the routed matrices, accuracy and metrics."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == ORACLE:
            return out
        out["prefix_tokens"] = self.prefix_tokens
        if self.mode == NONE or not self.matrix:
            return out
        rows = len(self.matrix) if upto is None else upto + 1
        out["loss_matrix_routed"] = [list(r) for r in self.matrix[:rows]]
        out["loss_matrix_oracle_same_targets"] = [list(r) for r in self.oracle_matrix[:rows]]
        out["routing_accuracy"] = [list(r) for r in self.accuracy[:rows]]
        last = self.accuracy[rows - 1] if rows else []
        out["routing_accuracy_final"] = dict(zip(self.domains, last, strict=True))
        out["metrics_routed"] = self.summary_metrics(upto=rows - 1)
        if self.scores:
            scores = [list(r) for r in self.scores[:rows]]
            scores += [[None] * len(self.domains) for _ in range(rows - len(scores))]
            out["score_matrix_routed"] = scores
            out["score_metrics_routed"] = {
                k: v
                for k, v in metrics.summarize_scores(scores, self.domains, upto=rows - 1).items()
                if k != "score_matrix"
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "prefix_tokens": self.prefix_tokens,
            "domains": list(self.domains),
            "matrix": [list(r) for r in self.matrix],
            "oracle_matrix": [list(r) for r in self.oracle_matrix],
            "accuracy": [list(r) for r in self.accuracy],
            "scores": [list(r) for r in self.scores],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("mode"), state_dict.get("prefix_tokens"))
        if state_dict.get("matrix") and saved != (self.mode, self.prefix_tokens):
            raise ValueError(
                f"checkpoint was evaluated with routing mode={saved[0]!r}, prefix_tokens={saved[1]!r}; this run has "
                f"mode={self.mode!r}, prefix_tokens={self.prefix_tokens!r} (use the original settings or a new run dir)"
            )
        self.domains = list(state_dict.get("domains", []))
        self.matrix = [list(r) for r in state_dict.get("matrix", [])]
        self.oracle_matrix = [list(r) for r in state_dict.get("oracle_matrix", [])]
        self.accuracy = [list(r) for r in state_dict.get("accuracy", [])]
        self.scores = [list(r) for r in state_dict.get("scores", [])]
