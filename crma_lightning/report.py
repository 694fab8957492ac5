"""The run report: ``report.json`` (everything, machine-readable) and ``report.md`` (the tables).

Both are rewritten atomically after every stage, so a crash or an interrupt never loses a finished
stage's numbers, and a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from crma_lightning.adapters.serialization import atomic_write

REPORT_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become ``None`` (JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


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
) -> dict[str, Any]:
    """Assemble the report dictionary (see ``docs/metrics.md`` for every field)."""
    return _clean(
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
            "nonfinite_steps": nonfinite,
            "timings": timings,
            "data": data,
            "config": config,
        }
    )


def _fmt(value: Any, digits: int = 4, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
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
        lines += [
            "",
            "## Forgetting",
            "",
            "| domain | plasticity `L[j][j]` | drift % | base-relative % |",
            "|---|---|---|---|",
        ]
        for d in domains:
            lines.append(
                f"| {d} | {_fmt(m.get('plasticity', {}).get(d))} | {_fmt(m.get('drift', {}).get(d), 2, '%')} | "
                f"{_fmt(m.get('base_relative_forgetting', {}).get(d), 2, '%')} |"
            )
        lines += [
            "",
            f"- mean drift: **{_fmt(m.get('drift_mean'), 2, '%')}** (positive = forgetting)",
            f"- mean base-relative forgetting: {_fmt(m.get('base_relative_forgetting_mean'), 2, '%')}",
            f"- BWT: {_fmt(m.get('bwt'))} (loss units, negative = forgetting); "
            f"FWT: {_fmt(m.get('fwt'))}; mean plasticity: {_fmt(m.get('plasticity_mean'))}",
        ]
    stages = report.get("gradients", {}).get("stages", {})
    if stages:
        lines += [
            "",
            "## Gradient stability (global L2 norm per optimizer step, before clipping)",
            "",
            "| stage | steps | mean norm | variance | peak |",
            "|---|---|---|---|---|",
        ]
        for name, s in stages.items():
            row = [name, s.get("steps"), _fmt(s.get("mean")), _fmt(s.get("var"), 6), _fmt(s.get("peak"))]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        run = report["gradients"].get("run")
        if run:
            lines.append(
                f"| **run** | {run.get('steps')} | {_fmt(run.get('mean'))} | {_fmt(run.get('var'), 6)} | "
                f"{_fmt(run.get('peak'))} |"
            )
    skipped = report.get("nonfinite_steps", {}).get("skipped", 0)
    timings = report.get("timings", {})
    lines += ["", f"Non-finite steps skipped: {skipped}. Wall-clock: {_fmt(timings.get('total_s'), 1)} s."]
    return "\n".join(lines) + "\n"


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
        "crma": hp["crma"] if model.adapter == "crma" else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


def data_settings(dm: Any) -> dict[str, Any]:
    """The report's ``config.data``: domains, batch size and the data identity (``SequentialDomainDataModule``)."""
    identity = {k: v for k, v in dm.identity().items() if k != "sources"}
    return {"domains": dm.domain_names, "batch_size": dm.batch_size, **identity}
