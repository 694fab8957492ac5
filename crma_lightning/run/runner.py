"""The stage driver: one ``Trainer.fit`` per domain, evaluation after each, checkpoints, resume.

Why a fresh ``Trainer`` per stage: a reused trainer keeps its loops' state - a second ``fit`` with
``max_steps`` finds the step budget already spent and silently trains nothing (Lightning issue
#11425), and the fit loop keeps serving the previous stage's cached train dataloader. A new trainer
per stage has neither problem. What must stay continuous is shared explicitly: the callbacks (their
state is the run's state), the loggers (one TensorBoard run), and the logging step, which starts each
stage where the previous one ended.

Run directory: ``report.json``/``report.md`` (rewritten after every stage; with ``DomainEvaluation(row_losses=True)``
also ``heldout_rows.json``, the per-row held-out numbers, routed ones included), ``config.yaml``,
``tensorboard/`` (one continuous run), and the files of :mod:`crma_lightning.run.checkpoints`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from crma_lightning import _compat
from crma_lightning.adapters.serialization import atomic_write
from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient_stability import GradientStability
from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
from crma_lightning.callbacks.row_losses import row_documents, write_row_losses
from crma_lightning.callbacks.train_until_learned import TrainUntilLearned
from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.data.sampling import resume_batches
from crma_lightning.evaluation.report import build_report, data_settings, model_settings, summarize_losses, write_report
from crma_lightning.model import hparams
from crma_lightning.model.base_model import check_context
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.parallel.dist import is_global_zero, owns_run_dir
from crma_lightning.parallel.export import export_adapters
from crma_lightning.routing.prototype import ROUTER_FILE_SUFFIX, save_router
from crma_lightning.run import resume_settings
from crma_lightning.run.checkpoints import (
    RESUME_MODES,
    CheckpointStore,
    RunState,
    load_states,
    use_local_checkpoint_io,
)
from crma_lightning.run.config_file import python_run_config
from crma_lightning.run.interrupts import RunInterrupted, StopAndSave, StopSignals
from crma_lightning.run.lock import RunLock, describe
from crma_lightning.run.resume_settings import refuse_optimizer_class_change, write_stage_configs
from crma_lightning.run.stage_trainers import StageTrainers, check_budget, with_default_callbacks

__all__ = ["ContinualRunner", "RunInterrupted"]

log = logging.getLogger("crma_lightning")


class ContinualRunner:
    """Train a :class:`ContinualLM` on every domain of a :class:`SequentialDomainDataModule` in turn.

    Args:
        run_dir: Directory for checkpoints, adapters, TensorBoard logs and the report.
        trainer_kwargs: Keyword arguments of each stage's ``lightning.Trainer`` (accelerator, devices,
            strategy, precision, ``max_steps``/``max_epochs`` = the per-stage budget, ...). ``callbacks``
            and ``logger`` given here are shared by every stage.
        callbacks: Extra callbacks shared by all stages. ``GradientStability`` and ``DomainEvaluation``
            are added when missing.
        seed: Stage ``i`` starts from ``seed_everything(seed + i)``, so a stage re-run after a crash
            sees the same randomness as the original.
        resume: ``"auto"``: continue from the newest valid checkpoint in ``run_dir`` if there is one;
            ``"never"``: refuse to reuse a ``run_dir`` that already holds checkpoints; or a path to a
            checkpoint to continue from.
        checkpoint_every_n_steps: Also write ``checkpoints/last.ckpt`` every n optimizer steps (bounds
            the work lost to a hard kill). Signals always write it.
        save_stage_adapters: Write all adapters as safetensors after every stage.
        config: The run's configuration, copied into the report (the CLI passes the parsed YAML).
        config_text: The resolved configuration as YAML, written to ``run_dir/config.yaml`` once every
            up-front check has passed (the CLI passes it). ``None`` (a run made from Python): built from
            the model, the data module and these settings (:mod:`crma_lightning.run.config_file`), so the
            after-training commands read the run like one made by ``crma-lightning fit``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike = "runs/continual",
        trainer_kwargs: dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
        seed: int = 0,
        resume: str = "auto",
        checkpoint_every_n_steps: int | None = None,
        save_stage_adapters: bool = True,
        config: dict[str, Any] | None = None,
        config_text: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoints = CheckpointStore(self.run_dir)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        extra = list(self.trainer_kwargs.pop("callbacks", None) or [])
        self.callbacks = with_default_callbacks(list(callbacks or []) + extra)
        self.trainers = StageTrainers(
            self.run_dir, self.trainer_kwargs, self.callbacks, self.trainer_kwargs.pop("logger", True)
        )
        self.seed = seed
        self.resume = resume
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.save_stage_adapters = save_stage_adapters
        self.config = config or {}
        self.config_text = config_text
        self.started = False  # every up-front check passed and the run directory is being written
        self.state = RunState()
        self.signals = StopSignals()
        self.lock = RunLock(self.run_dir, enabled=owns_run_dir())
        self._purge_step = 0
        # (path, checkpoint) that `preflight` chose to resume from; None until it has looked.
        self._resume_choice: tuple[Path | None, dict[str, Any] | None] | None = None
        self._resume_step = 0
        check_budget(self.trainer_kwargs, required=False)  # a missing budget may come from every domain
        if resume not in RESUME_MODES and not Path(resume).is_file():
            raise ValueError(f"resume={resume!r} is invalid: expected one of {list(RESUME_MODES)} or an existing file")
        if checkpoint_every_n_steps is not None and checkpoint_every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps={checkpoint_every_n_steps!r} is invalid: expected >= 1")

    # ------------------------------------------------------------------ paths and callbacks
    @property
    def evaluation(self) -> DomainEvaluation:
        return next(cb for cb in self.callbacks if isinstance(cb, DomainEvaluation))

    @property
    def gradient_stats(self) -> GradientStability:
        return next(cb for cb in self.callbacks if isinstance(cb, GradientStability))

    @property
    def routing(self) -> RoutedEvaluation | None:
        return next((cb for cb in self.callbacks if isinstance(cb, RoutedEvaluation)), None)

    @property
    def budget(self) -> TrainUntilLearned | None:
        """The train-until-learned budget rule, when the run has one (``None``: each stage runs its fixed steps)."""
        return next((cb for cb in self.callbacks if isinstance(cb, TrainUntilLearned)), None)

    def _stateful_callbacks(self) -> list[Callback]:
        return [*self.callbacks, self.state]

    # ------------------------------------------------------------------ the run
    def preflight(self, model: ContinualLM, datamodule: SequentialDomainDataModule) -> None:
        """Every check that needs no training and no trainer, done before anything is written to ``run_dir``.

        Loads, checks and tokenises every domain; checks each stage's budget and, when resuming, that
        the checkpoint to continue from is readable and belongs to this configuration (model, adapters,
        domains and their held-out data). :meth:`run` calls it first; calling it earlier yourself is
        harmless (its work is not repeated).

        Raises:
            ValueError: Naming the domain, file, setting or checkpoint at fault.
        """
        if self._resume_choice is not None:
            return  # already done
        if self.config_text is None:
            run = {
                "dir": str(self.run_dir),
                "resume": self.resume,
                "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
                "save_stage_adapters": self.save_stage_adapters,
            }
            self.config_text = python_run_config(
                model, datamodule, run, self.trainer_kwargs, self.seed, routing=self.routing
            )
        self.checkpoints.check_writable()
        check_context(model.model, datamodule.max_length)
        if self.routing is not None:
            self.routing.check_model(model.model)  # prototype routing: a layer the model lacks, too wide a feature
        try:
            datamodule.prepare(model.tokenizer)
        except ValueError as err:
            raise ValueError(resume_settings.name_the_domain(str(err), datamodule.specs)) from err
        for spec in datamodule.specs:
            check_budget(self.trainer_kwargs, spec.max_steps, domain=spec.name)
        if is_global_zero():
            log.info("domains, in training order:\n  %s", "\n  ".join(datamodule.describe()))
        self.state.domains = datamodule.domain_names
        if self.budget is not None:
            self.budget.check_data(datamodule)
        self.state.identity = {
            "model": model.identity(),
            "domains": datamodule.domain_names,
            "data": datamodule.identity(),
            # A budget rule decides how long each stage trains: part of what a resumed run must keep.
            **({"budget": self.budget.settings()} if self.budget is not None else {}),
        }
        self._choose_resume(datamodule)

    def _choose_resume(self, datamodule: SequentialDomainDataModule) -> None:
        self._resume_snapshot = self.checkpoints.snapshot()
        self._resume_choice = self.checkpoints.find_resume(self.resume, self.state.identity)
        path, ckpt = self._resume_choice
        if path is not None and ckpt is not None and not CheckpointStore.is_stage_checkpoint(path):
            refuse_optimizer_class_change(path, ckpt, self.config_text, datamodule.domain_names)
        if ckpt is not None and self.routing is not None:  # before any work: routed numbers need the same routing
            saved = (ckpt.get("callbacks") or {}).get(self.routing.state_key)
            if saved:
                self.routing.check_resumable(saved)

    def run(self, model: ContinualLM, datamodule: SequentialDomainDataModule) -> dict[str, Any]:
        """Run every remaining stage; returns the final report (also written to ``run_dir``).

        Nothing is written before every up-front check passed: data, budgets, the checkpoint to resume,
        and that every domain fills one global batch at this trainer's world size.
        """
        self.preflight(model, datamodule)
        domains = datamodule.domain_names
        first = self._make_trainer(self.state.completed if self.state.completed < len(domains) else 0, datamodule)
        datamodule.check_batches(first.world_size)
        global_batch = datamodule.batch_size * first.world_size
        self._check_resume_batch(global_batch)
        self._check_resume_budget(datamodule)
        # One writer per run directory: taken once every check passed, before the first write (rank 0).
        with self.lock:
            if self.checkpoints.snapshot() != self._resume_snapshot:  # another run wrote while we checked
                self._choose_resume(datamodule)
                self._check_resume_batch(global_batch)
                self._check_resume_budget(datamodule)
            return self._run_locked(model, datamodule)

    def _previous_run_killed(self) -> dict[str, Any] | None:
        """The earlier invocation, when it was killed: its lock file stayed, or its report still says ``running``."""
        report = self.run_dir / "report.json"
        if not self.lock.enabled:  # the other processes of a multi-process run: rank 0 notices it
            return None
        try:
            status = json.loads(report.read_text()).get("status") if report.is_file() else None
        except (OSError, ValueError):
            status = None
        if not self.lock.previous and status != "running":
            return None
        holder = describe(self.lock.previous) if self.lock.previous else "holder unknown"
        log.warning(
            "run directory %s: the previous run (%s) was killed without a clean stop (SIGKILL, out of memory, "
            "power loss; its report said %r); continuing from its newest checkpoint",
            self.run_dir,
            holder,
            status,
        )
        return {"holder": holder, "status_then": status, "noticed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _check_resume_budget(self, datamodule: SequentialDomainDataModule) -> None:
        """A mid-stage resume whose stage budget is below the step already reached is refused (not ignored)."""
        path, ckpt = self._resume_choice or (None, None)
        if path is None or ckpt is None or CheckpointStore.is_stage_checkpoint(path):
            return
        stage = int(ckpt["callbacks"][RunState.KEY].get("completed", 0))
        if stage >= datamodule.num_stages:
            return
        budget = datamodule.specs[stage].max_steps or self.trainer_kwargs.get("max_steps")
        step = int(ckpt.get("global_step", 0))
        if budget is not None and budget != -1 and budget < step:
            raise ValueError(
                f"cannot resume mid-stage from {path}: stage {stage + 1} ({datamodule.domain_names[stage]}) already "
                f"ran {step} optimizer steps, more than max_steps={budget}; set max_steps >= {step}, or resume from "
                f"the stage checkpoint before it to redo the stage with the new budget"
            )

    def _check_resume_batch(self, global_batch: int) -> None:
        """A mid-stage resume skips the rows the checkpoint consumed: the new global batch must divide them."""
        path, ckpt = self._resume_choice or (None, None)
        if path is None or ckpt is None or CheckpointStore.is_stage_checkpoint(path):
            return
        for state in _compat.saved_train_loader_states(ckpt):
            try:
                resume_batches(state, global_batch)
            except ValueError as err:
                raise ValueError(f"cannot resume mid-stage from {path}: {err}") from err

    def _run_locked(self, model: ContinualLM, datamodule: SequentialDomainDataModule) -> dict[str, Any]:
        domains = datamodule.domain_names
        self.started = True
        model.prepare_tasks(domains)
        killed = self._previous_run_killed()
        resume_from, resume_stage_done = self._restore(model, datamodule)
        self.state.note_killed(killed)
        if resume_from is not None and self.resume not in RESUME_MODES and resume_stage_done:
            aside = self.checkpoints.set_aside_after(resume_from)
            if aside is not None:
                log.warning(
                    "resuming from %s starts a new branch of the run: the later stages' files were moved to %s "
                    "(resume: auto would otherwise pick them up)",
                    resume_from,
                    aside,
                )
        self._write_config(mid_stage=resume_from is not None and not resume_stage_done)
        self.checkpoints.remove_stale_temp_files()
        if self.save_stage_adapters:  # a finished stage's adapter file that is missing or damaged
            self.checkpoints.repair_stage_adapters(model, domains, self.state.completed)
        self.evaluation.start_run(domains)
        self.trainers.setup_loggers(purge_step=self._purge_step if resume_from else None)
        self._t0 = self.state.started_at = time.perf_counter()
        with self.signals:
            try:
                self._run_stages(model, datamodule, resume_from, resume_stage_done)
            except BaseException as err:
                # A stop that Lightning turned into SystemExit (its SIGTERM exception, or its exit(1)
                # after a second Ctrl+C) is still an interruption: report it as one, exit 128 + signal.
                stopped = self.signals.signum is not None and isinstance(err, (SystemExit, KeyboardInterrupt))
                status = "interrupted" if stopped or isinstance(err, (RunInterrupted, KeyboardInterrupt)) else "failed"
                self._write_report(model, datamodule, f"{status}: {err}" if status == "failed" else status)
                if stopped and not isinstance(err, RunInterrupted):
                    newest = self.checkpoints.newest()
                    raise RunInterrupted(self.signals.signum, str(newest) if newest else None) from err
                raise
        report = self._write_report(model, datamodule, "complete")
        if is_global_zero():  # TensorBoard's HParams tab: the settings with the run's final numbers
            data = {
                "domains": ",".join(datamodule.domain_names),
                "batch_size": datamodule.batch_size,
                "max_length": datamodule.max_length,
            }
            budget = {k: self.trainer_kwargs.get(k) for k in ("max_steps", "max_epochs", "accumulate_grad_batches")}
            domain_steps = {s.name: s.max_steps for s in datamodule.specs if s.max_steps is not None}
            trainer = {k: v for k, v in {**budget, "domain_max_steps": domain_steps or None}.items() if v is not None}
            settings = {**model.hparams, "data": data, "trainer": trainer, "optimizer": model.optimizer_settings}
            hparams.log_final_hparams(self.loggers, {**settings, "run_seed": self.seed}, report)
        return report

    def _write_config(self, mid_stage: bool) -> None:
        """``config.yaml`` (this invocation's), and this configuration recorded for every stage it will train.

        A complete run trains nothing more: its ``config.yaml`` stays the one it was trained with, and
        settings that differ from it are named as unused instead of being written as if they applied.
        """
        if self.config_text is None:
            return
        domains = self.state.domains
        if domains and self.state.completed >= len(domains):
            changes = resume_settings.config_diff(self.state.stage_configs.get(domains[-1]), self.config_text)
            if changes and is_global_zero():
                log.warning(
                    "the run in %s is already complete: nothing to train, and these settings differ from the ones "
                    "it was trained with and were not used (config.yaml keeps those): %s",
                    self.run_dir,
                    ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()),
                )
            if changes:
                return
        self.state.use_config(self.config_text, mid_stage, self._resume_step)
        if is_global_zero():
            atomic_write(self.run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(self.config_text))

    def _run_stages(
        self, model: ContinualLM, dm: SequentialDomainDataModule, resume_from: Path | None, stage_done: bool
    ) -> None:
        if not self.evaluation.has_row(0):
            trainer = self._make_trainer(0, dm)
            model.activate_task(None)
            self.evaluation.evaluate_row(trainer, model, dm, row=0)
            self.state.step_offset = max(self.state.step_offset, 1)  # the base evaluation is step 0
            self._write_report(model, dm, "running")
        for stage in range(self.state.completed, dm.num_stages):
            if self.signals.signum is not None:
                raise RunInterrupted(self.signals.signum, str(self.checkpoints.newest()))
            domain = dm.domain_names[stage]
            dm.set_stage(stage)
            mid_stage = resume_from is not None and not stage_done and stage == self.state.completed
            if not mid_stage:
                L.seed_everything(self.seed + stage, workers=True, verbose=False)
            model.begin_task(domain, resumed=mid_stage)
            model.nonfinite.stage = domain  # skipped steps are counted, and reported, per stage
            trainer = self._make_trainer(stage, dm, for_fit=True)
            if trainer.is_global_zero:
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                total = sum(p.numel() for p in model.parameters())
                log.info(
                    "stage %d/%d: %s (%s trainable parameters of %s)",
                    stage + 1,
                    dm.num_stages,
                    domain,
                    get_human_readable_count(trainable),
                    get_human_readable_count(total),
                )
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if mid_stage else None, weights_only=True)
            resume_from = None  # only the first stage after a restart resumes mid-stage
            # Before the stage checkpoint: what the method consolidates here (replay buffer, EWC's Fisher) is in it.
            model.end_task(domain, train_batches=dm.fisher_batches(stage), train_rows=dm.train_sets[domain])
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.evaluation.evaluate_row(trainer, model, dm, row=stage + 1)
            eval_s = time.perf_counter() - t0
            self.state.timings[domain] = {
                "train_s": train_s + self.state.timings.get(domain, {}).get("train_s", 0.0) * mid_stage,
                "eval_s": eval_s,  # loss and task scores together
                "score_s": self.evaluation.score_seconds.get(stage + 1, 0.0),  # of which generation
                "steps": int(trainer.global_step),
            }
            timing = self.state.timings[domain]
            timing["eval_share"] = timing["eval_s"] / max(timing["train_s"] + timing["eval_s"], 1e-9)
            self.state.completed = stage + 1
            # The next stage logs from the step after this stage's evaluation: no two events share a step.
            self.state.step_offset = _compat.logging_step(trainer) + 1
            try:
                self.checkpoints.save(trainer, self.checkpoints.stage(stage, domain))
            except BaseException:
                # Not on disk, so not complete: the failure report must agree with what a resume finds.
                self.state.completed = stage
                raise
            if self.save_stage_adapters:
                self._export_adapters(trainer, model, stage, domain)
            if trainer.is_global_zero and self.checkpoints.last.exists():
                self.checkpoints.last.unlink()  # superseded by the stage checkpoint
            self._write_report(model, dm, "running" if stage + 1 < dm.num_stages else "complete")

    # ------------------------------------------------------------------ trainers and loggers
    @property
    def loggers(self) -> list[Logger]:
        """The run's loggers (shared by every stage's trainer)."""
        return self.trainers.loggers

    def _make_trainer(self, stage: int, dm: SequentialDomainDataModule, for_fit: bool = False) -> L.Trainer:
        """A fresh trainer for ``stage`` (or the base evaluation), continuing the logging step."""
        stop = StopAndSave(self.signals, self.checkpoints, self.checkpoint_every_n_steps)
        trainer = self.trainers.make(stage, dm, [self.state, stop], self.state.step_offset, for_fit=for_fit)
        use_local_checkpoint_io(trainer)
        return trainer

    # ------------------------------------------------------------------ checkpoints
    def _export_adapters(self, trainer: L.Trainer, model: ContinualLM, stage: int, domain: str) -> None:
        path = self.checkpoints.stage_adapters(stage, domain)
        # Every rank joins: sharded (FSDP) adapters are gathered collectively; rank 0 writes the file.
        metadata = {"stage": stage + 1, "domain": domain, **model.identity()}
        export_adapters(model.model, path, metadata=metadata, write=trainer.is_global_zero)
        if model.router is not None and trainer.is_global_zero:  # prototype routing statistics, beside them
            save_router(model.router, path.with_name(path.stem + ROUTER_FILE_SUFFIX))

    def _restore(self, model: ContinualLM, dm: SequentialDomainDataModule) -> tuple[Path | None, bool]:
        """Load the chosen checkpoint's states; returns (path, stage_was_complete)."""
        path, ckpt = self._resume_choice or (None, None)
        self._resume_choice = None  # consumed: the checkpoint's tensors need not stay in memory
        if path is None or ckpt is None:
            return None, False
        self._resume_step = int(ckpt.get("global_step", 0))
        self._load_states(ckpt, model, dm)
        complete = CheckpointStore.is_stage_checkpoint(path)
        # TensorBoard drops events at and after `purge_step`: what the killed run logged past the checkpoint.
        # A stage checkpoint is followed by the next stage's first step; a mid-stage one by its next step.
        self._purge_step = self.state.step_offset if complete else _compat.saved_logging_step(ckpt) + 1
        return path, complete

    def _load_states(self, ckpt: dict[str, Any], model: ContinualLM, dm: SequentialDomainDataModule) -> None:
        load_states(ckpt, model, self._stateful_callbacks(), dm)

    # ------------------------------------------------------------------ signals and report
    def _write_report(self, model: ContinualLM, dm: SequentialDomainDataModule, status: str) -> dict[str, Any]:
        evaluation, domains = self.evaluation, dm.domain_names
        report = build_report(
            domains=domains,
            matrix=evaluation.matrix,
            completed_stages=self.state.completed,
            status=status,
            metrics=summarize_losses(evaluation.matrix, domains, self.state.completed) if evaluation.matrix else {},
            gradients=self.gradient_stats.summary(),
            config={"model": model_settings(model), "data": data_settings(dm), **self.config},
            data=dm.summary(),
            timings={
                "stages": self.state.timings,
                "total_s": self.state.total_s(),
                "this_invocation_s": time.perf_counter() - getattr(self, "_t0", time.perf_counter()),
            },
            nonfinite=model.nonfinite.state_dict(),
            config_changes=self.state.config_changes,
            method=model.method_summary(),
            routing=None if self.routing is None else self.routing.summary(),
            scores=evaluation.score_summary(upto=self.state.completed) if evaluation.matrix else {},
            learning=evaluation.learning_summary(upto=self.state.completed),
            budget=self.budget.summary() if self.budget is not None else None,
        )
        if self.state.killed_runs:
            report["killed_runs"] = list(self.state.killed_runs)
        if is_global_zero():
            write_report(self.run_dir, report)
            if evaluation.row_losses and evaluation.row_table:  # DomainEvaluation(row_losses=True)
                documents = self._row_documents(dm)
                routing = self.routing  # a routed evaluation keeps its rows too (RoutedEvaluation.row_table)
                routed = routing.row_table if routing is not None else None
                settings = (
                    {
                        "mode": routing.mode,
                        "prefix_tokens": routing.prefix_tokens,
                        "fallback_margin": routing.fallback_margin,
                    }
                    if routed
                    else None
                )
                write_row_losses(
                    self.run_dir, domains, evaluation.row_table, evaluation.row_scores, documents, routed, settings
                )
            write_stage_configs(self.run_dir, self.state, domains)
            if status in ("running", "complete"):  # right after a stage's adapters were exported
                self.checkpoints.record_adapters(domains, self.state.completed)
        return report

    def _row_documents(self, dm: SequentialDomainDataModule) -> dict[str, list[int]]:
        """Each held-out row's document, per domain: computed once per prepared data (not at every report)."""
        if getattr(self, "_documents_of", None) is not dm.eval_sets:  # holds a reference: no id() reuse
            eos = getattr(dm.tokenizer, "eos_token_id", None)
            self._documents = {d: row_documents(dm.eval_sets[d]["input_ids"], eos) for d in dm.eval_sets}
            self._documents_of = dm.eval_sets
        return self._documents
