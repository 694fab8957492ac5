"""The run report: ``report.json`` (everything, machine-readable) and ``report.md`` (the tables).

Both are rewritten atomically after every stage, so a crash or an interrupt never loses a finished
stage's numbers, and a reader never sees a half-written file.

Non-finite numbers: JSON has no NaN, and ``null`` already means "not evaluated". A loss or metric
that is NaN or infinite is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (and shown so in
``report.md``); every metric computed from a non-finite loss is ``"nan"``; ``nonfinite_evaluations``
lists each non-finite loss-matrix entry, and the status of a finished run says so
(:func:`final_status`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from crma_lightning.adapters.serialization import atomic_write
from crma_lightning.metrics import continual as metrics
from crma_lightning.metrics.learning import unlearned_line

REPORT_VERSION = 1
NONFINITE_MARKERS = ("nan", "inf", "-inf")
"""How ``report.json`` writes a non-finite number (``null`` means "not evaluated")."""


class NonFiniteResults(Exception):
    """Every stage ran, but some held-out losses are not finite (the CLI exits with code 3)."""


def _marker(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become ``"nan"``/``"inf"``/``"-inf"`` (JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _marker(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summarize_losses(matrix: list[list[float | None]], domains: list[str], upto: int) -> dict[str, Any]:
    """:func:`metrics.summarize`, except that a non-finite loss is a diverged evaluation, not a missing one.

    ``loss_matrix`` keeps the NaN/inf entries, and every metric whose formula reads one is NaN.
    """
    return _mark_nonfinite(metrics.summarize(matrix, domains, upto=upto), matrix, list(domains), upto)


def _mark_nonfinite(summary: dict[str, Any], matrix: list[list[Any]], names: list[str], upto: int) -> dict[str, Any]:
    """NaN for every metric of ``summary`` whose formula reads a non-finite entry of ``matrix``."""
    raw = [[None if v is None else float(v) for v in row] for row in matrix]
    bad = {(s, c) for s, row in enumerate(raw) for c, v in enumerate(row) if v is not None and not math.isfinite(v)}
    if not bad:
        return summary
    nan = float("nan")

    def hit(*cells: tuple[int, int]) -> bool:
        return any(cell in bad for cell in cells)

    for c in range(upto - 1):
        if hit((upto, c), (c + 1, c)):
            summary["drift"][names[c]] = nan
        if hit((upto, c), (0, c)):
            summary["base_relative_forgetting"][names[c]] = nan
    for c in range(upto):
        if hit((c + 1, c)):
            summary["plasticity"][names[c]] = nan
    for mean, per_domain in (
        ("drift_mean", "drift"),
        ("base_relative_forgetting_mean", "base_relative_forgetting"),
        ("plasticity_mean", "plasticity"),
    ):
        if any(v is not None and math.isnan(v) for v in summary[per_domain].values()):
            summary[mean] = nan
    if any(hit((c + 1, c), (upto, c)) for c in range(upto - 1)):
        summary["bwt"] = nan
    if any(hit((0, c), (c, c)) for c in range(1, upto)):
        summary["fwt"] = nan
    summary["loss_matrix"] = [
        [raw[s][c] if (s, c) in bad else v for c, v in enumerate(row)] for s, row in enumerate(summary["loss_matrix"])
    ]
    return summary


def nonfinite_evaluations(matrix: list[list[Any]], domains: list[str]) -> list[dict[str, Any]]:
    """One entry per non-finite loss-matrix value: ``domain``, ``row`` (0 = base), ``after`` and ``value``."""
    found = []
    for s, row in enumerate(matrix):
        for c, value in enumerate(row):
            if isinstance(value, str) or (isinstance(value, float) and not math.isfinite(value)):
                after = "base model" if s == 0 else f"stage {s} ({domains[s - 1]})"
                marker = value if isinstance(value, str) else _marker(value)
                found.append({"domain": domains[c], "row": s, "after": after, "value": marker})
    return found


def final_status(report: dict[str, Any]) -> str:
    """``complete``, or ``complete (non-finite evaluation: prose after stage 2 (code) = nan; ...)``."""
    found = report.get("nonfinite_evaluations") or []
    if not found:
        return "complete"
    listed = "; ".join(f"{e['domain']} after {e['after']} = {e['value']}" for e in found[:3])
    more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
    return f"complete (non-finite evaluation: {listed}{more})"


def build_report(
    *,
    domains: list[str],
    matrix: list[list[float | None]],
    completed_stages: int,
    status: str,
    metrics: dict[str, Any],
    gradients: dict[str, Any],
    config: dict[str, Any],
    data: dict[str, Any],
    timings: dict[str, Any],
    nonfinite: dict[str, Any],
    config_changes: list[dict[str, Any]] | None = None,
    method: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    scores: dict[str, Any] | None = None,
    learning: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dictionary (see ``docs/metrics.md`` for every field).

    ``scores``: the task-score summary (``DomainEvaluation.score_summary``); ``{}``/``None``: no domain has a
    task metric, and the report has no ``score_matrix``.

    ``method``: the continual method's summary (``None``: plain fine-tuning); ``routing``: the routed
    evaluation's summary (``None``: no routing callback, i.e. oracle task identity only).

    ``learning``: whether each stage learned its domain (``DomainEvaluation.learning_summary``); ``budget``:
    the stage budget rule and the steps each stage used (``TrainUntilLearned.summary``; ``None``: fixed steps).

    ``status="complete"`` becomes :func:`final_status` when a loss is not finite.
    """
    report = _clean(
        {
            "report_version": REPORT_VERSION,
            "status": status,
            "domains": list(domains),
            "completed_stages": completed_stages,
            "total_stages": len(domains),
            "loss_matrix": {
                "rows": ["base"] + [f"after_stage_{i}_{d}" for i, d in enumerate(domains[: len(matrix) - 1], 1)],
                "columns": list(domains),
                "values": [list(r) for r in matrix],
                "definition": "values[s][j]: mean held-out token cross-entropy of domain j with its adapter "
                "active, after stage s (s = 0: base model)",
            },
            "metrics": metrics,
            "gradients": gradients,
            "nonfinite_evaluations": nonfinite_evaluations(matrix, domains),
            "nonfinite_steps": nonfinite,
            "timings": timings,
            "data": data,
            "config": config,
            "config_changes": list(config_changes or []),
            "method": method,
            "routing": routing or {"mode": "oracle"},
            **({"score_matrix": _score_section(domains, scores)} if scores else {}),
            **({"learning": learning} if learning else {}),
            **({"budget": budget} if budget else {}),
        }
    )
    if status == "complete":
        report["status"] = final_status(report)
    return report


def _score_section(domains: list[str], scores: dict[str, Any]) -> dict[str, Any]:
    """The report's ``score_matrix``: the values laid out as ``loss_matrix``, and the task-score metrics."""
    values = scores["score_matrix"]
    return {
        "rows": ["base"] + [f"after_stage_{i}_{d}" for i, d in enumerate(domains[: len(values) - 1], 1)],
        "columns": list(domains),
        "values": values,
        "metric": scores.get("metrics", {}),
        "definition": "values[s][j]: mean task score in [0, 1] of domain j's held-out prompts, generated greedily "
        "with its adapter active, after stage s (s = 0: base model); null: no metric or not evaluated",
        **{k: v for k, v in scores.items() if k not in ("score_matrix", "metrics")},
    }


def _fmt(value: Any, digits: int = 4, suffix: str = "") -> str:
    if value is None:
        return "—"  # not evaluated / undefined
    if isinstance(value, float) and not math.isfinite(value):
        return _marker(value)
    if value in NONFINITE_MARKERS:
        return value
    if isinstance(value, float):
        return f"{value:+.{digits}f}{suffix}" if suffix == "%" else f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: loss matrix, forgetting per domain, gradient stability per stage."""
    domains = report["domains"]
    cfg = report.get("config", {})
    model = cfg.get("model", {})
    lines = [
        "# crma_lightning run report",
        "",
        f"- status: **{report['status']}** ({report['completed_stages']}/{report['total_stages']} stages)",
        f"- adapter: `{model.get('adapter')}`, task adapters: `{model.get('task_adapters')}`",
        f"- base model: `{model.get('base')}`",
        f"- method: {_method_line(report.get('method'))}; evaluation: {_routing_line(report.get('routing'))}",
        *(
            f"- **non-finite evaluation**: {e['domain']} after {e['after']} = {e['value']}"
            for e in report.get("nonfinite_evaluations", [])
        ),
        *(
            f"- configuration changed from stage {c['stage']} ({c['domain']})"
            + (f", mid-stage at step {c.get('at_step')}" if c.get("mid_stage") else "")
            + ": "
            + ", ".join(f"`{k}` {v[0]!r} -> {v[1]!r}" for k, v in c.get("changes", {}).items())
            for c in report.get("config_changes", [])
        ),
        "",
        "## Held-out loss `L[s][j]`",
        "",
        "Rows: after stage *s* (base = before training); columns: domains. Mean token cross-entropy, lower is better.",
        "",
        "| after stage | " + " | ".join(domains) + " |",
        "|---" * (len(domains) + 1) + "|",
    ]
    for r, row in enumerate(report["loss_matrix"]["values"]):
        label = "base" if r == 0 else f"{r}: {domains[r - 1]}"
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    m = report.get("metrics", {})
    if m:
        flags = (report.get("learning") or {}).get("domains") or {}
        lines += [
            "",
            "## Forgetting",
            "",
            "| domain | learned | plasticity `L[j][j]` | drift % | base-relative % |",
            "|---|---|---|---|---|",
        ]
        for d in domains:
            mark = UNLEARNED_MARK if (flags.get(d) or {}).get("learned") is False else ""
            lines.append(
                f"| {d} | {_learned_cell(flags.get(d))} | {_fmt(m.get('plasticity', {}).get(d))} | "
                f"{_fmt(m.get('drift', {}).get(d), 2, '%')}{mark} | "
                f"{_fmt(m.get('base_relative_forgetting', {}).get(d), 2, '%')}{mark} |"
            )
        lines += [
            "",
            f"- mean drift: **{_fmt(m.get('drift_mean'), 2, '%')}** (positive = forgetting)",
            f"- mean base-relative forgetting: {_fmt(m.get('base_relative_forgetting_mean'), 2, '%')}",
            f"- BWT: {_fmt(m.get('bwt'))} (loss units, negative = forgetting); "
            f"FWT: {_fmt(m.get('fwt'))}; mean plasticity: {_fmt(m.get('plasticity_mean'))}",
        ]
        lines += _learning_lines(report)
    lines += _score_lines(report)
    lines += _budget_lines(report)
    stages = report.get("gradients", {}).get("stages", {})
    if stages:
        lines += [
            "",
            "## Gradient stability (global L2 norm per optimizer step, before clipping)",
            "",
            "| stage | steps | non-finite norms | mean norm | variance | peak |",
            "|---|---|---|---|---|---|",
        ]
        run = report["gradients"].get("run")
        for name, s in [*stages.items(), *([("**run**", run)] if run else [])]:
            row = [name, s.get("steps"), s.get("nonfinite_steps", 0), _fmt(s.get("mean")), _fmt(s.get("var"), 6)]
            lines.append("| " + " | ".join(str(c) for c in [*row, _fmt(s.get("peak"))]) + " |")
        for name, s in stages.items():
            bad, steps = s.get("nonfinite_steps", 0), s.get("steps", 0)
            if bad:
                lines.append(
                    f"\n**{name}: {bad} of {steps} gradient norms were NaN/inf.** The statistics cover only the "
                    f"finite ones{' (undefined: fewer than two)' if steps - bad < 2 else ''} and do not describe "
                    "those steps."
                )
    lines += _routing_lines(report)
    skipped = report.get("nonfinite_steps", {}).get("skipped", 0)
    timings = report.get("timings", {})
    lines += ["", f"Non-finite steps skipped: {skipped}. Wall-clock: {_fmt(timings.get('total_s'), 1)} s."]
    stages = timings.get("stages") or {}
    train = sum(t.get("train_s") or 0.0 for t in stages.values())
    evaluation = sum(t.get("eval_s") or 0.0 for t in stages.values())
    if train + evaluation > 0:  # the end-of-stage evaluation grows as T² over a run: its share, said plainly
        shares = ", ".join(f"{d} {100 * (t.get('eval_share') or 0.0):.0f}%" for d, t in stages.items())
        lines.append(
            f"End-of-stage evaluation: {evaluation:.1f} s, {100 * evaluation / (train + evaluation):.0f}% of "
            f"training + evaluation (per stage: {shares}; `data.eval_every` thins it)."
        )
    for killed in report.get("killed_runs") or []:
        lines.append(f"A previous invocation was killed without a clean stop: {killed.get('holder')}.")
    return "\n".join(lines) + "\n"


UNLEARNED_MARK = " †"
"""Marks a forgetting number that rests on a domain its own stage did not learn."""


def _learned_cell(flag: dict[str, Any] | None) -> str:
    if not flag or flag.get("learned") is None:
        return "—"
    return "yes" if flag["learned"] else "**no**"


def _learning_lines(report: dict[str, Any]) -> list[str]:
    """The did-not-learn warning and the learned-only means, under the forgetting table."""
    learning = report.get("learning") or {}
    unlearned = learning.get("unlearned") or []
    if not unlearned:
        return []
    only = learning.get("learned_only") or {}
    flags = learning.get("domains") or {}
    lines = ["", f"**Did not learn: {', '.join(unlearned)}.**"]
    lines += [f"- {unlearned_line(d, flags[d])}" for d in unlearned if d in flags]
    lines += [
        f"- Numbers marked{UNLEARNED_MARK} rest on a domain that was never learned: its drift says nothing about "
        "forgetting. Over the domains that learned "
        f"({', '.join(only.get('domains') or []) or 'none'}): mean drift {_fmt(only.get('drift_mean'), 2, '%')}"
        + (f", BWT_score {_fmt(only.get('bwt_score'), 3)}" if "bwt_score" in only else "")
        + "."
    ]
    return lines


def _budget_lines(report: dict[str, Any]) -> list[str]:
    """Steps each stage used under a train-until-learned budget."""
    budget = report.get("budget") or {}
    stages = budget.get("stages") or {}
    if not stages:
        return []
    rule = budget.get("rule") or {}
    lines = [
        "",
        "## Stage budgets",
        "",
        "Train until learned: "
        + ", ".join(f"{k}={v}" for k, v in rule.items())
        + " (dev loss on each domain's dev rows, disjoint from the scored held-out rows).",
        "",
        "| stage | steps used | stopped early | best dev loss (step) | dev loss at start |",
        "|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        best = f"{_fmt(s.get('best'))} ({s.get('best_step')})"
        lines.append(
            f"| {name} | {s.get('steps')} | {'yes' if s.get('stopped_early') else 'no'} | {best} | "
            f"{_fmt(s.get('start'))} |"
        )
    return lines


def _score_lines(report: dict[str, Any]) -> list[str]:
    """The score matrix ``S[s][j]`` next to the loss matrix, AP, BWT_score, FWT_score, forgetting per domain."""
    section = report.get("score_matrix")
    if not section:
        return []
    domains = report["domains"]
    names = section.get("metric", {})
    lines = [
        "",
        "## Task score `S[s][j]`",
        "",
        "Greedy generation on held-out prompts, each domain with its own adapter; metric per domain: "
        + ", ".join(f"{d}: `{names[d]}`" for d in domains if d in names)
        + ". In [0, 1], higher is better.",
        "",
        "| after stage | " + " | ".join(domains) + " |",
        "|---" * (len(domains) + 1) + "|",
    ]
    for r, row in enumerate(section["values"]):
        label = "base" if r == 0 else f"{r}: {domains[r - 1]}"
        lines.append(f"| {label} | " + " | ".join(_fmt(v, 3) for v in row) + " |")
    forgetting = section.get("forgetting") or {}
    learning = report.get("learning") or {}
    learned_only = learning.get("learned_only") if learning.get("unlearned") else None
    lines += [
        "",
        f"- AP (mean final score): **{_fmt(section.get('ap'), 3)}**; BWT_score: {_fmt(section.get('bwt_score'), 3)} "
        f"(negative = forgetting); FWT_score: {_fmt(section.get('fwt_score'), 3)}"
        + (
            f"; over the domains that learned: BWT_score {_fmt(learned_only.get('bwt_score'), 3)}"
            if learned_only is not None
            else ""
        ),
        "- forgetting `max_s S[s][j] − S[T][j]`: "
        + (", ".join(f"{d} {_fmt(v, 3)}" for d, v in forgetting.items()) or "—")
        + f" (mean {_fmt(section.get('forgetting_mean'), 3)})",
    ]
    timings = (report.get("timings") or {}).get("stages") or {}
    if timings:
        lines += ["", "| stage | train s | eval s (of which generation) | eval share |", "|---|---|---|---|"]
        for name, t in timings.items():
            times = f"{_fmt(t.get('train_s'), 1)} | {_fmt(t.get('eval_s'), 1)} ({_fmt(t.get('score_s'), 1)})"
            share = t.get("eval_share")
            lines.append(f"| {name} | {times} | {'—' if share is None else f'{100 * share:.0f}%'} |")
        train = sum(t.get("train_s") or 0.0 for t in timings.values())
        evaluation = sum(t.get("eval_s") or 0.0 for t in timings.values())
        if train + evaluation > 0:
            lines.append(f"| all | {train:.1f} | {evaluation:.1f} | {100 * evaluation / (train + evaluation):.0f}% |")
    return lines


def _method_line(method: dict[str, Any] | None) -> str:
    if not method:
        return "`none` (sequential fine-tuning)"
    settings = ", ".join(
        f"{k}={v}" for k, v in method.items() if k not in ("method", "state_bytes") and not isinstance(v, dict | list)
    )
    return f"`{method.get('method')}` ({settings}; state {method.get('state_bytes', 0) / 1e6:.2f} MB)"


def _routing_line(routing: dict[str, Any] | None) -> str:
    mode = (routing or {}).get("mode", "oracle")
    if mode == "oracle":
        return "oracle task identity (each domain scored with its own adapter)"
    if mode == "none":
        return "no task identity needed (every task activates the same adapters)"
    if mode == "merged":
        return f"MERGED: one adapter merged ({routing.get('merge')}) from the tasks trained so far, for every domain"
    how = "by the base model's hidden states (prototype)" if mode == "prototype" else "by perplexity"
    if routing.get("fallback_margin") is not None:
        how += f", by perplexity within a margin of {routing['fallback_margin']:g} (hybrid)"
    return f"routed {how} on the first {routing.get('prefix_tokens')} tokens, and oracle"


def _routing_lines(report: dict[str, Any]) -> list[str]:
    """The routed loss matrix, routing accuracy, routed forgetting and confusion (``perplexity``/``prototype``)."""
    routing = report.get("routing") or {}
    values = routing.get("loss_matrix_routed")
    if not values:
        return []
    domains = report["domains"]
    lines = [
        "",
        f"## Task-agnostic evaluation ({'prototype ' if routing['mode'] == 'prototype' else ''}routing on the first "
        f"{routing['prefix_tokens']} tokens)",
        "",
        "Routed loss `L~[s][j]` on the tokens after the prefix, and the routing accuracy (share of domain *j*'s "
        "sequences routed to *j*'s adapter).",
        "",
        "| after stage | " + " | ".join(domains) + " |",
        "|---" * (len(domains) + 1) + "|",
    ]
    accuracy = routing.get("routing_accuracy", [])
    for r, row in enumerate(values):
        label = "base" if r == 0 else f"{r}: {domains[r - 1]}"
        acc = accuracy[r] if r < len(accuracy) else [None] * len(row)
        cells = [_fmt(v) + ("" if a is None else f" ({100 * a:.0f}%)") for v, a in zip(row, acc, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    m = routing.get("metrics_routed", {})
    lines += ["", f"- routed mean drift: **{_fmt(m.get('drift_mean'), 2, '%')}**; routed BWT: {_fmt(m.get('bwt'))}"]
    if routing.get("routing_forwards_final") is not None:
        shares = [v for v in (routing.get("fallback_share_final") or {}).values() if v is not None]
        hybrid = f" (hybrid: perplexity for {_fmt(sum(shares) / len(shares), 3)} of the sequences)" if shares else ""
        forwards = _fmt(routing["routing_forwards_final"], 2)
        lines.append(f"- forwards per routed sequence at serving time: {forwards}{hybrid}")
    scores = routing.get("score_matrix_routed")
    if scores:
        s = routing.get("score_metrics_routed", {})
        final = ", ".join(f"{d} {_fmt(v, 3)}" for d, v in zip(domains, scores[-1], strict=True))
        lines.append(
            f"- routed task scores after the last stage: {final}; routed AP: **{_fmt(s.get('ap'), 3)}**, "
            f"routed BWT_score: {_fmt(s.get('bwt_score'), 3)}"
        )
    confusion = routing.get("confusion_final")
    if confusion:
        lines += ["", "Where each domain's held-out sequences were routed after the last evaluated stage:", ""]
        lines += confusion_lines(confusion)
    return lines


def confusion_lines(confusion: dict[str, Any]) -> list[str]:
    """A markdown table of routing counts: one row per domain, one column per candidate adapter."""
    names = confusion["candidates"]
    lines = ["| domain (rows) → routed to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for domain, counts in confusion["counts"].items():
        lines.append(f"| {domain} | " + " | ".join(str(c) for c in counts) + " |")
    return lines


def write_report(run_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``run_dir`` (each atomically)."""
    run_dir = Path(run_dir)
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    text = json.dumps(report, indent=2, allow_nan=False)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    markdown = render_markdown(report)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(markdown))
    return json_path, md_path


def model_settings(model: Any) -> dict[str, Any]:
    """The report's ``config.model``: base model, adapter settings, parameter counts (a ``ContinualLM``)."""
    hp = model.hparams
    base = hp["model_name_or_path"] or {k: v for k, v in (hp["model_config"] or {}).items()}
    return {
        "base": base,
        "adapter": model.adapter,
        "task_adapters": model.task_adapters,
        "lora": hp["lora"],
        "crma": None if model.crma_config is None else dataclasses.asdict(model.crma_config),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "adapted_modules": adapted_modules(model.attached_adapters),
    }


def adapted_modules(attached: Any) -> dict[str, Any]:
    """Which modules carry adapters (what ``target_modules: all-linear`` or a name list resolved to).

    ``lora_targets``: the distinct names of the LoRA-wrapped linears; ``lora``: their paths; ``crma``:
    the decoder blocks CRMA follows (``attach_adapters``' record of what it attached).
    """
    return {
        "lora_targets": sorted({name.rsplit(".", 1)[-1] for name in attached.lora_modules}),
        "lora": list(attached.lora_modules),
        "crma": list(attached.crma_blocks),
    }


def data_settings(dm: Any) -> dict[str, Any]:
    """The report's ``config.data``: domains, batch size and the data identity (``SequentialDomainDataModule``)."""
    # The row digests are in `data.<domain>.rows_sha256` (dm.summary()), once per domain.
    identity = {k: v for k, v in dm.identity().items() if k != "sources" and not k.startswith("content.")}
    return {"domains": dm.domain_names, "batch_size": dm.batch_size, **identity}
