"""``RoutedEvaluation``: task-agnostic evaluation next to the oracle one (docs/method.md, docs/metrics.md).

The oracle evaluation (:class:`~crma_lightning.callbacks.domain_evaluation.DomainEvaluation`) scores domain ``j``
with domain ``j``'s adapter: it is told each example's task. With ``mode: perplexity`` this callback
also routes every held-out sequence of the evaluations that fill the loss matrix: the first ``P``
tokens (``prefix_tokens``) are scored under each adapter trained so far, the lowest loss picks the
adapter, and the rest of the sequence is scored with it (:func:`crma_lightning.routing.policy.route_batch`).
It runs after the module's ``validation_step`` on the same batch, so the oracle numbers are untouched.

With ``mode: prototype`` the choice comes from one forward of the frozen base model over the same prefix
(:mod:`crma_lightning.routing.prototype`): at each stage's evaluation the statistics of the task just trained are
fitted on its training rows (summed over processes) and kept in the module (``ContinualLM.router``), so
they are in the stage checkpoint and the exported adapters' directory. With ``fallback_margin`` (the
hybrid) the sequences whose two nearest tasks are within the margin go by perplexity routing instead; the
share of them is reported, and with it the serving cost in forwards per sequence. Every candidate adapter still runs
one full forward on every batch here: the oracle loss on the same targets needs them, and every rank then
runs the same forwards (FSDP). Serving (``generate``, ``ContinualLM.route``) runs 2 forwards per sequence.

Domains with a task ``metric`` also get a routed score matrix ``S~[s][j]``: each held-out prompt is answered
by the adapter under which the prompt has the lowest mean loss
(:func:`crma_lightning.evaluation.scoring.routed_score_sums`).

Per matrix row ``s`` and domain ``j`` it records the routed loss ``L~[s][j]``, the oracle loss on the
same targets (positions ``>= P``, the domain's own adapter), the routing accuracy (fraction of
``j``'s sequences routed to ``j``'s adapter) and the confusion counts (how many of ``j``'s sequences went
to each candidate). Tasks whose adapters are the same (``shared``, O-LoRA's
stack) are one candidate, so routing among them is never counted as an error. When the run's oracle
evaluation keeps per-row numbers (``DomainEvaluation(row_losses=True)``), this one does too (``row_table``:
per held-out row, the routed and the oracle loss on the scored targets, their count, and whether the row
went to its own adapter; the runner writes them to ``heldout_rows.json``, docs/metrics.md). ``mode: none`` asserts
that the evaluation needs no task identity (every task activates the same adapters) and adds nothing.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from crma_lightning import _compat
from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.row_losses import RowLosses
from crma_lightning.callbacks.stages import log_to_loggers
from crma_lightning.data.sampling import right_padded
from crma_lightning.data.tokenizer import pad_id
from crma_lightning.evaluation import scoring
from crma_lightning.metrics import continual as metrics
from crma_lightning.routing import prototype
from crma_lightning.routing.config import RoutingConfig
from crma_lightning.routing.policy import (
    DEFAULT_PREFIX_TOKENS,
    NONE,
    ORACLE,
    PERPLEXITY,
    PROTOTYPE,
    route_batch,
)

BASE = "<base>"  # the candidate of row 0: no task trained yet, LoRA off
_FIELDS = 6  # per domain: routed loss sum, oracle (same targets) loss sum, scored tokens, correct rows, routed rows,
# rows the hybrid routed by perplexity
_ROW_FIELDS = ("loss_sum", "oracle_loss_sum", "tokens", "correct", "routed")  # per held-out row (row_table)


class RoutedEvaluation(L.Callback):
    """Routed loss matrix, routing accuracy and routed drift (``routing:`` section of the YAML).

    Args:
        mode: ``oracle`` (task identity given: nothing extra, the default), ``perplexity`` (route each
            held-out sequence on its first ``prefix_tokens`` tokens) or ``none`` (the method needs no
            routing: checked, nothing extra).
        prefix_tokens: ``P``: tokens read to choose an adapter; only targets at positions ``>= P`` are scored.
        layer: ``prototype``: the base model's ``hidden_states`` pooled: an index (-1: the last layer), a list
            of indices, ``all`` (every hidden state, concatenated) or ``auto`` (the default: ``all`` while that
            gives at most 4,096 features, else the last hidden state).
        pooling: ``prototype``: ``mean_std`` (the default), ``mean``, ``last`` or ``mean_last`` over the prefix.
        estimator: ``prototype``: ``mahalanobis`` (shared shrunk covariance) or ``nearest`` (Euclidean).
        shrinkage: ``prototype``: weight of the identity in the shrunk covariance, in [0, 1].
        fallback_margin: ``prototype``: the hybrid - a sequence whose two nearest tasks are within this
            log-odds margin is routed by perplexity instead (``None``: never, 2 forwards per sequence).

    Attributes:
        matrix: Routed loss matrix ``L~[s][j]`` (row 0: base model), ``None`` where not evaluated.
        oracle_matrix: The oracle loss on the routed targets (positions ``>= P``), same layout.
        accuracy: Routing accuracy per row and domain; ``None`` for the base row and untrained domains.
        scores: Routed task scores ``S~[s][j]`` of the domains with a metric (``None`` elsewhere).
        confusion: Per row, ``{"candidates": [...], "counts": {domain: [rows routed to each candidate]}}``.
        row_table: With the oracle evaluation's ``row_losses``: per matrix row and domain, per held-out row
            ``loss_sum`` (routed), ``oracle_loss_sum`` (``None`` where the oracle entry is), ``tokens`` and
            ``correct`` (``None`` for the base row, untrained domains and rows with no target).
    """

    def __init__(
        self,
        mode: str = ORACLE,
        prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
        layer: int | list[int] | str = prototype.DEFAULT_LAYER,
        pooling: str = prototype.DEFAULT_POOLING,
        estimator: str = "mahalanobis",
        shrinkage: float = prototype.DEFAULT_SHRINKAGE,
        fallback_margin: float | None = None,
    ) -> None:
        self.config = RoutingConfig(mode, prefix_tokens, layer, pooling, estimator, shrinkage, fallback_margin)
        """The routing settings, checked (:class:`~crma_lightning.routing.config.RoutingConfig`)."""
        self.confusion: list[dict[str, Any] | None] = []
        self.domains: list[str] = []
        self.matrix: list[list[float | None]] = []
        self.oracle_matrix: list[list[float | None]] = []
        self.accuracy: list[list[float | None]] = []
        self.scores: list[list[float | None]] = []
        self.fallback: list[list[float | None]] = []  # share of each domain's rows the hybrid routed by perplexity
        self._row: int | None = None
        self._candidates: dict[str, str | None] = {}  # candidate label -> a task that activates it
        self._own: dict[str, str] = {}  # domain -> the label of its own adapter(s)
        self._sums: dict[str, torch.Tensor] = {}
        self._chosen: dict[str, torch.Tensor] = {}  # domain -> (K,) rows routed to each candidate
        self.row_table: dict[int, dict[str, dict[str, Any]]] = {}
        self._rows = RowLosses(_ROW_FIELDS, counts=("tokens", "correct", "routed"))
        self._keep_rows = False

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def prefix_tokens(self) -> int:
        return self.config.prefix_tokens

    @property
    def fallback_margin(self) -> float | None:
        return self.config.fallback_margin

    @property
    def prototype_settings(self) -> dict[str, Any]:
        return self.config.prototype_settings

    # ------------------------------------------------------------------ which adapters
    @staticmethod
    def adapter_key(pl_module: L.LightningModule, task: str) -> tuple[str, ...]:
        """The adapters ``task`` activates: the method's choice, else the task's own adapter."""
        method = getattr(pl_module, "method", None)
        names = None if method is None else method.active_adapters(pl_module, task)
        return tuple(names) if names is not None else (pl_module.adapter_for(task),)

    def check_model(self, model: Any) -> None:
        """Refuse prototype settings ``model`` (the Hugging Face model) cannot serve: a layer it lacks, too wide.

        Called by the stage driver's up-front checks, before anything is trained or written.
        """
        if self.mode == PROTOTYPE:
            settings = self.prototype_settings
            prototype.check_model(getattr(model, "config", None), settings["layer"], settings["pooling"])

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
        self._sums, self._chosen = {}, {}
        self._rows.reset()
        # Per-row numbers exactly when the oracle evaluation keeps its own (the bootstrap needs both, paired).
        self._keep_rows = hasattr(trainer.datamodule, "eval_sets") and any(
            isinstance(cb, DomainEvaluation) and cb.row_losses for cb in trainer.callbacks
        )
        if self.mode == PROTOTYPE and self._row > 0:
            self._fit_prototypes(trainer, pl_module, tasks[: self._row])

    # ------------------------------------------------------------------ prototype statistics
    def router(self, pl_module: L.LightningModule) -> prototype.PrototypeRouter:
        """The module's router (created with this callback's settings; a resumed one must agree)."""
        settings = self.config.router_settings
        router = getattr(pl_module, "router", None)
        if router is None:
            router = pl_module.router = prototype.PrototypeRouter(**settings)
        else:
            if router.tasks:
                prototype.check_same_fit(router.settings(), settings)
            router.prefix_tokens, router.layer, router.pooling = (settings[k] for k in prototype.FIT_SETTINGS)
            router.configure(settings["estimator"], settings["shrinkage"])
        return router

    def _fit_prototypes(self, trainer: L.Trainer, pl_module: L.LightningModule, trained: list[str]) -> None:
        """Fit the statistics of every trained task that has none yet (the stage just trained), on every rank."""
        router = self.router(pl_module)
        dm = trainer.datamodule
        pad = pad_id(dm.tokenizer)
        for task in trained:
            if task in router.tasks:
                continue
            rows = dm.train_sets[task]  # a Dataset: read one batch at a time
            with prototype.adapters_off(pl_module.model, pl_module.activate_task):
                local = prototype.local_task_sums(
                    router,
                    pl_module.model,
                    rows,
                    dm.eval_batch_size,
                    pl_module.device,
                    pad,
                    world=trainer.world_size,
                    rank=trainer.global_rank,
                )
            router.add_task(task, trainer.strategy.reduce(local, reduce_op="sum"))

    def _prototype_scores(self, pl_module: L.LightningModule) -> Any:
        """``(prefix_ids, prefix_mask) -> (B, K)`` distances to the candidates (``None`` unless prototype)."""
        if self.mode != PROTOTYPE:
            return None
        if self._row == 0:  # one candidate (the base model): nothing to choose
            return lambda ids, mask: torch.zeros(ids.shape[0], 1, device=ids.device)
        router = pl_module.router
        groups = {label: [t for t, own in self._own.items() if own == label] for label in self._candidates}

        def scores(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            with prototype.adapters_off(pl_module.model, pl_module.activate_task):
                features = router.features(pl_module.model, ids, mask)
            return prototype.candidate_scores(router, features, groups)

        return scores

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
            scores_fn=self._prototype_scores(pl_module),
            fallback_margin=self.fallback_margin if self.mode == PROTOTYPE and self._row > 0 else None,
        )
        domain = batch["domain"]
        own = BASE if self._row == 0 else self._own.get(domain)  # None: a domain not trained yet
        # Counted on the device (no host sync per batch): rows with any target (a label after position 0)
        # are real; padding rows have none. Not "a target in the prefix": prompt/response rows label only
        # the response, which starts after P.
        real = (batch["labels"][:, 1:] != -100).any(dim=1).to(routed.prefix_losses.device)
        picked = routed.prefix_losses.argmin(dim=1)  # the choice route_batch made
        chosen = torch.zeros(len(labels), dtype=torch.float64, device=pl_module.device)
        chosen.index_add_(0, picked.to(pl_module.device), real.to(pl_module.device, torch.float64))  # padding adds 0
        self._chosen[domain] = self._chosen.get(domain, torch.zeros_like(chosen)) + chosen.to(pl_module.device)
        if own is None:  # a domain not trained yet: nothing counts as correct, no oracle loss
            correct, oracle = real.new_zeros(()), routed.loss_sum.new_zeros(())
        else:
            k = labels.index(own)
            correct = (real & (picked == k)).sum()
            oracle = routed.scored_sums[:, k].sum()
        fell_back = real.new_zeros(()) if routed.fallback is None else (real & routed.fallback.to(real.device)).sum()
        values = [routed.loss_sum, oracle, routed.tokens, correct, real.sum(), fell_back]
        row = torch.stack([v.to(device=pl_module.device, dtype=torch.float64) for v in values])
        self._sums[domain] = self._sums.get(domain, torch.zeros_like(row)) + row
        if self._keep_rows:
            self._add_rows(trainer, domain, routed, real, picked, None if own is None else labels.index(own))

    def _add_rows(
        self, trainer: L.Trainer, domain: str, routed: Any, real: torch.Tensor, picked: torch.Tensor, k: int | None
    ) -> None:
        """Record each row of the batch: routed and own-adapter loss sums, scored targets, right choice, routed."""
        sums = routed.scored_sums  # (B, K)
        picked = picked.to(sums.device)
        chosen = sums.gather(1, picked[:, None]).squeeze(1)  # the row's routed loss sum (route_batch's choice)
        own = sums[:, k] if k is not None else torch.zeros_like(chosen)
        correct = (picked == k) & real.to(sums.device) if k is not None else torch.zeros_like(picked, dtype=torch.bool)
        self._rows.add(trainer, domain, chosen, own, routed.row_tokens, correct, real)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._row is None:
            return
        order = list(trainer.datamodule.eval_domain_names())  # the same on every rank
        zeros = torch.zeros(_FIELDS, dtype=torch.float64, device=pl_module.device)
        local = torch.stack([self._sums.get(d, zeros) for d in order])  # (D, _FIELDS)
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        self._record(trainer, self._row, dict(zip(order, total, strict=True)))
        if self._keep_rows:
            self._record_rows(trainer, pl_module, self._row, order, dict(zip(order, total, strict=True)))
        self._record_confusion(trainer, pl_module, self._row, order)
        self._score(trainer, pl_module, self._row, order)
        self._row = None

    def _record_rows(
        self, trainer: L.Trainer, pl_module: L.LightningModule, row: int, order: list[str], sums: dict[str, list]
    ) -> None:
        """Gather the per-row numbers of matrix row ``row`` (summed over ranks) into ``row_table[row]``.

        Raises:
            RuntimeError: The rows' scored targets do not add up to the domain's count (a row missed or repeated).
        """
        table = {}
        for domain, numbers in self._rows.gather(trainer, order, pl_module.device).items():
            counted, routed_rows = sums[domain][2], sums[domain][4]
            # Every row evaluated once, else the bootstrap units are wrong. Tokens alone miss rows with no
            # target after P (they still count in the accuracy), hence the routed rows too.
            if sum(numbers["tokens"]) != round(counted) or sum(numbers["routed"]) != round(routed_rows):
                raise RuntimeError(
                    f"routed row numbers: domain {domain!r} per-row tokens sum to {sum(numbers['tokens'])} and "
                    f"routed rows to {round(sum(numbers['routed']))}, the routed evaluation counted {round(counted)} "
                    f"and {round(routed_rows)}: some held-out rows were not evaluated exactly once"
                )
            trained = domain in self._own
            table[domain] = {
                "loss_sum": numbers["loss_sum"],
                "oracle_loss_sum": numbers["oracle_loss_sum"] if trained or row == 0 else None,
                "tokens": numbers["tokens"],
                "correct": [bool(c) if trained and r else None for c, r in zip(numbers["correct"], numbers["routed"])],
            }
        self.row_table[row] = table

    def _record_confusion(self, trainer: L.Trainer, pl_module: L.LightningModule, row: int, order: list[str]) -> None:
        """Rows of each domain routed to each candidate, summed over processes; logged as a TensorBoard figure."""
        labels = list(self._candidates)
        zeros = torch.zeros(len(labels), dtype=torch.float64, device=pl_module.device)
        local = torch.stack([self._chosen.get(d, zeros) for d in order])  # (D, K)
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        names = [self._candidates[label] or BASE for label in labels]  # a task that the candidate serves
        while len(self.confusion) <= row:
            self.confusion.append(None)
        self.confusion[row] = {
            "candidates": names,
            "counts": {d: [round(c) for c in counts] for d, counts in zip(order, total, strict=True)},
        }
        if trainer.is_global_zero and row > 0:
            log_confusion(trainer, self.confusion[row], row)

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, row: int, order: list[str]) -> None:
        """Routed task scores of row ``row`` for the domains of ``order`` that have a metric."""
        dm = trainer.datamodule
        task_metrics = getattr(dm, "task_metrics", None) or {}
        scored = [d for d in order if d in task_metrics]
        if not scored:
            return
        candidates = {label: (lambda t=task: pl_module.activate_task(t)) for label, task in self._candidates.items()}
        scores_fn = self._prototype_scores(pl_module)
        choose = None
        if scores_fn is not None:
            pad = pad_id(pl_module.tokenizer)

            def choose(rows: list[dict[str, Any]]) -> list[int]:
                ids, mask = right_padded([r["prompt_ids"] for r in rows], pad, pl_module.device)
                distances = scores_fn(ids, mask)
                picked = distances.argmin(dim=1)
                if self.fallback_margin is not None:  # near-ties: -1, routed by the prompt losses instead
                    picked = picked.masked_fill(prototype.margins(distances) < self.fallback_margin, -1)
                return picked.tolist()

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
                choose=choose,
                fallback=choose is not None and self.fallback_margin is not None,
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
        for table in (self.matrix, self.oracle_matrix, self.accuracy, self.fallback):
            while len(table) <= row:
                table.append([None] * len(self.domains))
        for domain, (routed, oracle, tokens, correct, rows, fell_back) in sums.items():
            j, trained = self.domains.index(domain), domain in self._own
            self.matrix[row][j] = routed / max(tokens, 1.0)
            self.oracle_matrix[row][j] = oracle / max(tokens, 1.0) if trained or row == 0 else None
            self.accuracy[row][j] = correct / rows if trained and rows else None
            hybrid = self.fallback_margin is not None and self.mode == PROTOTYPE and row > 0
            self.fallback[row][j] = fell_back / rows if hybrid and rows else None
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
        if self.mode == PROTOTYPE:
            out["prototype"] = dict(self.prototype_settings)
            if self.fallback_margin is not None:
                out["fallback_margin"] = self.fallback_margin
        if self.mode == NONE or not self.matrix:
            return out
        rows = len(self.matrix) if upto is None else upto + 1
        out["loss_matrix_routed"] = [list(r) for r in self.matrix[:rows]]
        out["loss_matrix_oracle_same_targets"] = [list(r) for r in self.oracle_matrix[:rows]]
        out["routing_accuracy"] = [list(r) for r in self.accuracy[:rows]]
        last = self.accuracy[rows - 1] if rows else []
        out["routing_accuracy_final"] = dict(zip(self.domains, last, strict=True))
        out["metrics_routed"] = self.summary_metrics(upto=rows - 1)
        out["routing_forwards_final"] = self._forwards(rows - 1)
        if self.mode == PROTOTYPE and self.fallback_margin is not None:
            shares = (self.fallback[rows - 1] if len(self.fallback) >= rows else None) or []
            out["fallback_share_final"] = dict(zip(self.domains, shares, strict=False))
        confusion = [c for c in self.confusion[:rows] if c is not None]
        if confusion:
            out["confusion"] = list(self.confusion[:rows]) + [None] * (rows - len(self.confusion[:rows]))
            out["confusion_final"] = confusion[-1]
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

    def _forwards(self, row: int) -> float | None:
        """Forwards per routed sequence at serving time after stage ``row``.

        With ``K`` candidates: ``K + 1`` (perplexity: ``K`` prefix forwards, one answer), 2 (prototype),
        ``2 + share x K`` (the hybrid).
        """
        k = len([c for c in (self.confusion[row] or {}).get("candidates", [])]) if row < len(self.confusion) else 0
        if not k:
            return None
        if self.mode != PROTOTYPE:
            return float(k + 1)
        shares = [s for s in (self.fallback[row] if row < len(self.fallback) else []) if s is not None]
        return 2.0 + (k * sum(shares) / len(shares) if shares else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "prefix_tokens": self.prefix_tokens,
            "domains": list(self.domains),
            "matrix": [list(r) for r in self.matrix],
            "oracle_matrix": [list(r) for r in self.oracle_matrix],
            "accuracy": [list(r) for r in self.accuracy],
            "scores": [list(r) for r in self.scores],
            "confusion": list(self.confusion),
            "prototype": dict(self.prototype_settings),
            "fallback_margin": self.fallback_margin,
            "fallback": [list(r) for r in self.fallback],
            "prefix_targets": "tokens",  # perplexity routing reads the prefix's tokens (before: its labels)
            **({"row_table": dict(self.row_table)} if self.row_table else {}),
        }

    def check_resumable(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` when a checkpoint's routed numbers were made with other routing settings."""
        saved = (state_dict.get("mode"), state_dict.get("prefix_tokens"))
        if state_dict.get("matrix") and saved != (self.mode, self.prefix_tokens):
            raise ValueError(
                f"checkpoint was evaluated with routing mode={saved[0]!r}, prefix_tokens={saved[1]!r}; this run has "
                f"mode={self.mode!r}, prefix_tokens={self.prefix_tokens!r} (use the original settings or a new run dir)"
            )
        fitted = {k: (state_dict.get("prototype") or {}).get(k) for k in ("layer", "pooling")}
        fitted["fallback_margin"] = state_dict.get("fallback_margin")
        if fitted["layer"] is not None:
            fitted["layer"] = prototype.plain_layer(fitted["layer"])
        wanted = {
            **{k: self.prototype_settings[k] for k in ("layer", "pooling")},
            "fallback_margin": self.fallback_margin,
        }
        if self.mode == PROTOTYPE and state_dict.get("matrix") and fitted != wanted:
            raise ValueError(
                f"checkpoint's routing statistics were fitted with {fitted}; this run has {wanted} "
                "(use the original settings or a new run dir)"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_resumable(state_dict)
        by_loss = self.mode == PERPLEXITY or self.fallback_margin is not None
        if state_dict.get("matrix") and by_loss and state_dict.get("prefix_targets") != "tokens":
            rank_zero_warn(
                "the checkpoint's routed rows were evaluated by an earlier version whose perplexity routing read "
                "the prefix's training labels: on prompt/response or chat domains (prompt labels -100) those rows "
                "went to the first adapter, and the rows evaluated from now on read the prefix's tokens. Text "
                "domains are unaffected; for comparable routed numbers on such domains, start a new run dir."
            )
        self.domains = list(state_dict.get("domains", []))
        self.matrix = [list(r) for r in state_dict.get("matrix", [])]
        self.oracle_matrix = [list(r) for r in state_dict.get("oracle_matrix", [])]
        self.accuracy = [list(r) for r in state_dict.get("accuracy", [])]
        self.scores = [list(r) for r in state_dict.get("scores", [])]
        self.confusion = list(state_dict.get("confusion", []))
        self.fallback = [list(r) for r in state_dict.get("fallback", [])]
        self.row_table = {int(k): v for k, v in state_dict.get("row_table", {}).items()}


def log_confusion(trainer: L.Trainer, confusion: dict[str, Any], row: int) -> None:
    """The confusion counts as a TensorBoard text table ``routing/confusion`` (rows: domains; columns: choices)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from crma_lightning.evaluation.report import confusion_lines

    text = "\n".join(confusion_lines(confusion))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("routing/confusion", text, global_step=_compat.logging_step(trainer))
