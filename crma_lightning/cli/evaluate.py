"""``crma-lightning evaluate``: the loss matrix and forgetting metrics of a finished or partial run, again.

Row 0 is the freshly built model (the same seeded base and adapter initialisation as before stage 1),
row ``i`` the model after stage ``i`` (``checkpoints/stage-0i-<domain>.ckpt``). Each row is a
``Trainer.validate`` with :class:`~crma_lightning.callbacks.domain_evaluation.DomainEvaluation`, the same
callback, datamodule and per-domain adapter choice as ``fit`` (domain ``j`` with its own task adapter),
and the metrics come from the runner's own :func:`crma_lightning.evaluation.report.summarize_losses`, so the numbers
are the run's own.

``--data`` evaluates other held-out files: a list of domains with the fields of ``data.domains``. A
domain named like one of the run's tasks is evaluated with that task's adapter; any other domain with
LoRA off (the base model, plus CRMA in a CRMA run); a ``task:`` key on an entry chooses the adapter
(``task: null`` for LoRA off).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from crma_lightning.cli.run_dir import CommandParser, RunDirectory, writable_dir
from crma_lightning.evaluation.report import NonFiniteResults, final_status


def build_parser() -> CommandParser:
    """The ``evaluate`` options."""
    parser = CommandParser(
        prog="crma-lightning evaluate",
        description="Re-evaluate a run: the loss matrix (base row and one row per stage checkpoint) and the "
        "forgetting metrics, computed as fit computes them. Writes report.json and report.md to --out.",
    )
    parser.add_argument("--run", required=True, help="run directory (run.dir of the fit run)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stage", type=int, help="evaluate only the model after this stage (0: the base model)")
    which.add_argument("--ckpt", help="evaluate only this checkpoint of the run (e.g. checkpoints/last.ckpt)")
    parser.add_argument(
        "--data",
        help="other held-out data: a YAML/JSON list of domains (data.domains fields, plus an optional "
        "`task:` naming the adapter to use), or a YAML file holding that list",
    )
    parser.add_argument(
        "--routing",
        choices=["perplexity", "prototype"],
        help="also evaluate without task labels: each held-out sequence routed by perplexity or by the base "
        "model's features (prototype; statistics from the checkpoint, else fitted on the run's training rows)",
    )
    parser.add_argument(
        "--merge",
        choices=["mean", "ties"],
        help="evaluate MERGED: every domain with one adapter merged from the tasks trained so far (per-task runs)",
    )
    parser.add_argument("--density", type=float, default=0.2, help="--merge ties: share of each update kept (0.2)")
    parser.add_argument("--scale", type=float, default=1.0, help="--merge ties: factor of the merged update (1.0)")
    parser.add_argument(
        "--prefix_tokens", type=int, help="tokens read to route (default: the run's routing.prefix_tokens, else 32)"
    )
    parser.add_argument(
        "--fallback_margin",
        type=float,
        help="--routing prototype: route by perplexity the sequences whose two nearest tasks are within this "
        "log-odds margin (the hybrid; default: the run's setting, else never)",
    )
    parser.add_argument("--out", help="output directory (default: RUN/evaluation)")
    parser.add_argument("--accelerator", help="Lightning accelerator (default: the run's trainer.accelerator)")
    return parser


def run_evaluate(args: list[str]) -> None:
    """Parse ``args`` (what follows ``evaluate``), evaluate, write and print the report."""
    opts = build_parser().parse_args(args)
    run = RunDirectory(opts.run)
    specs, routes = parse_data(opts.data) if opts.data else (None, {})
    model, dm = run.build(data_domains=specs, prog="crma-lightning evaluate")
    for task in routes.values():
        if task is not None:
            run.check_task(task)
    routing = _routing(run, opts)
    if routing is not None:  # prototype: a layer the model lacks or too wide features, before row 0 is evaluated
        routing.check_model(model.model)
    merge = _merge(model, run.domains, opts)
    plan = _plan(run, opts)
    out = writable_dir(opts.out or run.path / "evaluation")  # after the checks, before the evaluation
    t0 = time.perf_counter()
    from crma_lightning.callbacks.domain_evaluation import DomainEvaluation

    # Also fills the score matrix of domains with a metric; judges "did it learn" with the run's own margins.
    evaluation = DomainEvaluation(log_heatmap=False, **_learn_margins(run))
    matrix, sources, completed = evaluate_rows(
        run, model, dm, plan, routes, opts.accelerator, evaluation, [routing] if routing is not None else [], merge
    )
    scores = evaluation.score_summary(upto=completed) if dm.domain_names == run.domains else {}
    report = _report(run, model, dm, matrix, sources, completed, time.perf_counter() - t0, scores)
    if dm.domain_names == run.domains and (learning := evaluation.learning_summary(upto=completed)):
        report["learning"] = learning
    if routing is not None:
        report["routing"] = routing.summary(upto=completed)
    if merge is not None:
        report["evaluation"]["merge"] = merge
        report["routing"] = {"mode": "merged", **merge}  # the evaluation policy: no task identity at all
    report["evaluation"]["routes"] = {d: t for d, t in routes.items()}
    report["status"] = "evaluated" + final_status(report).removeprefix("complete")  # names a non-finite loss
    markdown = _markdown(report, run)
    from crma_lightning.adapters.serialization import atomic_write

    text = json.dumps(report, indent=2, allow_nan=False)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown))
    print(markdown)
    print(f"Written: {out / 'report.json'}, {out / 'report.md'}")
    if report.get("nonfinite_evaluations"):  # as fit: a diverged adapter is exit 3
        raise NonFiniteResults(f"{report['status']}; see {out / 'report.md'}")


def _learn_margins(run: RunDirectory) -> dict[str, float]:
    """The "did it learn" margins the run's report used (the defaults for a run written before they existed)."""
    path = run.path / "report.json"
    learning = json.loads(path.read_text()).get("learning", {}) if path.is_file() else {}
    keys = ("loss_margin", "score_margin")
    return {f"learn_{k}": float(learning[k]) for k in keys if isinstance(learning.get(k), int | float)}


def _merge(model: Any, tasks: list[str], opts: Any) -> dict[str, Any] | None:
    """The ``--merge`` settings (``None``: each domain with its own adapter), checked before any work."""
    if opts.merge is None:
        return None
    if opts.routing or opts.data:
        raise ValueError("--merge evaluates one merged adapter on the run's own domains: drop --routing and --data")
    from crma_lightning.adapters.merging import check_merge

    check_merge(model.task_adapters, tasks, opts.density, min_tasks=1)
    return {"merge": opts.merge, **({"density": opts.density, "scale": opts.scale} if opts.merge == "ties" else {})}


def _routing(run: RunDirectory, opts: Any) -> Any:
    """The routed evaluation asked for with ``--routing`` (``None``: oracle only); the run's settings by default."""
    if opts.routing is None:
        if opts.prefix_tokens is not None:
            raise ValueError("--prefix_tokens needs --routing perplexity or --routing prototype")
        if opts.fallback_margin is not None:
            raise ValueError("--fallback_margin needs --routing prototype")
        return None
    if opts.data:
        raise ValueError("--routing evaluates the run's own domains (their training rows fit the routing); drop --data")
    from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
    from crma_lightning.routing.config import RoutingConfig

    saved = run.routing.config if run.routing is not None else RoutingConfig()
    config = saved.override(opts.routing, opts.prefix_tokens, opts.fallback_margin)
    return RoutedEvaluation(**dataclasses.asdict(config))


def parse_data(value: str) -> tuple[list[Any], dict[str, str | None]]:
    """``--data``: the domains (``DomainSpec``s) and the adapter chosen per domain by a ``task:`` key.

    A domain with only ``holdout_path`` reads its training rows from the same file (they are not used).
    """
    from crma_lightning.data.domains import as_domain_spec, validate_domains

    path = Path(value)
    try:
        text = path.read_text() if len(value) < 4096 and path.is_file() else value
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--data {value!r} is neither a readable file nor a YAML list of domains: {err}") from err
    if isinstance(data, dict):  # a file holding `domains:` or a whole `data:` section
        data = (data.get("data") or data).get("domains")
    if not isinstance(data, list) or not data:
        raise ValueError(f"--data {value!r}: expected a non-empty list of domains (the fields of data.domains)")
    specs, routes = [], {}
    for entry in data:
        if isinstance(entry, dict) and "task" in entry:
            entry = dict(entry)
            task = entry.pop("task")
            routes[str(entry.get("name"))] = None if task is None else str(task)
        spec = as_domain_spec(entry)
        if spec.path is None and spec.holdout_path is not None and spec.builtin is None and spec.hub is None:
            spec = dataclasses.replace(spec, path=spec.holdout_path)
        specs.append(spec)
    validate_domains(specs)
    return specs, routes


def _plan(run: RunDirectory, opts: Any) -> list[tuple[int, Path | None]]:
    """``(row, checkpoint)`` to evaluate in order; ``None``: the freshly built model (row 0)."""
    if opts.ckpt is not None:
        return [(-1, Path(opts.ckpt))]  # its row comes from the checkpoint itself
    if opts.stage is not None:
        if opts.stage == 0:
            return [(0, None)]
        return [(opts.stage, run.stage_checkpoint(opts.stage).path)]
    return [(0, None)] + [(c.stage, c.path) for c in run.stage_checkpoints()]


def evaluate_rows(
    run: RunDirectory,
    model: Any,
    dm: Any,
    plan: list[tuple[int, Path | None]],
    routes: dict[str, str | None],
    accelerator: str | None = None,
    evaluation: Any = None,
    callbacks: list[Any] | None = None,
    merge: dict[str, Any] | None = None,
) -> tuple[list[list[float | None]], dict[str, str], int]:
    """Evaluate the rows of ``plan``; returns the loss matrix, the source of each row, and the last row.

    Each row is ``fit``'s own row evaluation (:meth:`DomainEvaluation.evaluate_row`), after the row's
    checkpoint was verified and loaded by the run's one loader (:meth:`RunDirectory.load`). With the
    run's own domains the matrix is ``fit``'s; with other domains (``--data``) it has one column per
    given domain, every one evaluated in every row, each with the adapter ``routes`` (or its name) gives.
    ``callbacks``: more callbacks of the evaluation (``--routing``: the routed evaluation). ``merge``
    (``--merge``): row ``s`` evaluates every domain with the merge of the adapters of the ``s`` tasks trained
    (row 0: the base model).
    """
    import lightning as L

    from crma_lightning.callbacks.domain_evaluation import DomainEvaluation

    dm.prepare(model.tokenizer)
    model.prepare_tasks(run.domains)
    model.evaluation_tasks = dict(routes)
    evaluation = DomainEvaluation(log_heatmap=False) if evaluation is None else evaluation
    evaluation.start_run(dm.domain_names)
    evaluation.stage_names = list(run.domains)
    kwargs = run.trainer_kwargs
    trainer = L.Trainer(
        accelerator=accelerator or kwargs.get("accelerator") or "auto",
        devices=1,
        precision=kwargs.get("precision"),
        limit_val_batches=kwargs.get("limit_val_batches"),
        inference_mode=kwargs.get("inference_mode", True),
        callbacks=[evaluation, *(callbacks or [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(run.path),
    )
    same_domains = dm.domain_names == run.domains
    sources: dict[str, str] = {}
    last = 0
    refitted = None  # prototype statistics fitted by this evaluation (a task's do not depend on the stage)
    for row, path in plan:
        if merge is not None:
            _drop_merged(model)  # the checkpoint has no such adapter
        if path is not None:
            row = run.load(model, path)
        elif getattr(model, "router", None) is not None:
            model.router = None  # the freshly built model: no routing statistics yet
        if merge is not None:
            _use_merged(model, run.domains[:row], merge)
        _refit_other_statistics(model, callbacks or [])
        earlier = refitted is not None and row > 0 and set(refitted.tasks) <= set(run.domains[:row])
        if getattr(model, "router", None) is None and earlier:  # an earlier row's tasks: fitted once, not per row
            model.router = refitted
        loaded = getattr(model, "router", None)
        model.activate_task(None)
        evaluation.evaluate_row(trainer, model, dm, row, all_domains=not same_domains)
        if getattr(model, "router", None) is not None and (model.router is not loaded or loaded is refitted):
            refitted = model.router
        sources[str(row)] = str(path) if path is not None else f"freshly built model (seed {run.seed})"
        last = max(last, row)
    width = len(dm.domain_names)
    matrix = [list(r) for r in evaluation.matrix] + [[None] * width] * (last + 1 - len(evaluation.matrix))
    return matrix[: last + 1], sources, last


def _refit_other_statistics(model: Any, callbacks: list[Any]) -> None:
    """Drop the checkpoint's prototype statistics when ``--routing prototype`` asks for other ones (refitted)."""
    router = getattr(model, "router", None)
    for cb in callbacks:
        if getattr(cb, "mode", None) == "prototype" and router is not None:
            wanted = {"prefix_tokens": cb.prefix_tokens, **cb.prototype_settings}
            if any(router.settings()[k] != wanted[k] for k in ("prefix_tokens", "layer", "pooling")):
                model.router = None


def _drop_merged(model: Any) -> None:
    from crma_lightning.adapters import delete_lora_adapter, lora_adapter_names
    from crma_lightning.adapters.merging import MERGED_ADAPTER

    if MERGED_ADAPTER in lora_adapter_names(model.model):
        delete_lora_adapter(model.model, MERGED_ADAPTER)
    model.evaluation_tasks = {}


def _use_merged(model: Any, tasks: list[str], merge: dict[str, Any]) -> None:
    """Add the merge of ``tasks``' adapters and evaluate every domain with it (no tasks: the base model)."""
    from crma_lightning.adapters.merging import MERGED_ADAPTER, add_merged_adapter

    if not tasks:
        model.evaluation_tasks = {t: None for t in model.tasks}
        return
    ties = {k: merge[k] for k in ("density", "scale") if k in merge}
    add_merged_adapter(model.model, [model.adapter_for(t) for t in tasks], merge["merge"], **ties)
    model.evaluation_tasks = {t: MERGED_ADAPTER for t in model.tasks}


def _report(run, model, dm, matrix, sources, completed, seconds, scores=None) -> dict[str, Any]:
    from crma_lightning.evaluation.report import build_report, data_settings, model_settings, summarize_losses

    comparable = dm.domain_names == run.domains
    summary = summarize_losses(matrix, dm.domain_names, completed) if comparable and matrix else {}
    report = build_report(
        domains=dm.domain_names,
        matrix=matrix,
        completed_stages=completed,
        status="evaluated",
        metrics=summary,
        gradients={},
        config={"model": model_settings(model), "data": data_settings(dm)},
        data=dm.summary(),
        timings={"total_s": seconds},
        nonfinite={},
        scores=scores,
    )
    report["total_stages"] = len(run.domains)
    report["loss_matrix"]["rows"] = ["base"] + [f"after_stage_{i}_{d}" for i, d in enumerate(run.domains, 1)]
    report["loss_matrix"]["rows"] = report["loss_matrix"]["rows"][: len(matrix)]
    report["evaluation"] = {"run": str(run.path), "rows": sources, "run_domains": run.domains}
    if not comparable:
        report["evaluation"]["note"] = (
            "--data domains differ from the run's: every row evaluates every given domain; forgetting "
            "metrics need the run's own domains and are left out"
        )
        warnings.warn(report["evaluation"]["note"], stacklevel=2)
    return report


def _markdown(report: dict[str, Any], run: RunDirectory) -> str:
    from crma_lightning.evaluation.report import render_markdown

    title = f"# crma_lightning evaluation of {run.path}"
    merge = report["evaluation"].get("merge")
    if merge:
        title += (
            f"\n\nMERGED ({merge['merge']}): row *s* evaluates every domain with one adapter merged from the "
            "adapters of the tasks trained by stage *s*."
        )
    if report["domains"] == run.domains:
        body = render_markdown(report).split("\n", 1)[1]
        return f"{title}\n{body}"
    domains = report["domains"]
    lines = [title, "", "Held-out loss of the --data domains (mean token cross-entropy, lower is better).", ""]
    lines += ["| after stage | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for r, row in enumerate(report["loss_matrix"]["values"]):
        label = "base" if r == 0 else f"{r}: {run.domains[r - 1]}"
        lines.append(f"| {label} | " + " | ".join(_loss(v) for v in row) + " |")
    routes = report["evaluation"].get("routes") or {}
    lines += ["", "Adapters: " + ", ".join(_adapter_text(d, run.domains, routes) for d in domains) + "."]
    return "\n".join(lines) + "\n"


def _loss(value: Any) -> str:
    """A loss cell: ``—`` not evaluated, ``nan``/``inf`` (the report's markers) diverged."""
    return "—" if value is None else value if isinstance(value, str) else f"{value:.4f}"


def _adapter_text(domain: str, tasks: list[str], routes: dict[str, str | None]) -> str:
    task = routes.get(domain, domain if domain in tasks else None)
    return f"{domain}: " + (f"task {task!r}" if task is not None else "LoRA off")
