"""``crma-lightning compare``: one table across runs, and the settings in which they differ.

Reads each run's ``report.json`` (nothing is re-evaluated; run ``crma-lightning evaluate`` first to
refresh a report). The table holds, per run: status, domains, the continual method, mean drift (oracle
task identity) and, for runs evaluated with ``routing: perplexity`` or ``prototype``, the routed mean drift,
mean routing accuracy, the routing mode and the routed task-score AP, mean base-relative forgetting,
BWT, FWT, mean plasticity, and the gradient norm's
variance and coefficient of variation (std / mean) over the run, and for runs whose domains have a task
metric the task-score AP, BWT_score and mean forgetting (docs/metrics.md). The settings are the ``config``
sections of the reports, flattened to dotted keys; every key whose value is not the same in all runs is
listed. Runs on different domains are compared all the same, with a warning: their means average over
different domains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from crma_lightning.cli.run_dir import CommandParser, writable_dir

COLUMNS = {
    "status": "status",
    "stages": "stages",
    "method": "method",
    "drift_mean": "mean drift %",
    "drift_mean_routed": "routed mean drift %",
    "routing_accuracy_mean": "routing accuracy",
    "routing": "routed by",
    "base_relative_forgetting_mean": "mean base-rel. forgetting %",
    "bwt": "BWT",
    "fwt": "FWT",
    "plasticity_mean": "mean plasticity",
    "ap": "AP (task score)",
    "ap_routed": "routed AP",
    "bwt_score": "BWT_score",
    "forgetting_mean": "mean score forgetting",
    "grad_norm_var": "grad-norm variance",
    "grad_norm_cv": "grad-norm CV",
}
"""Summary keys -> column titles of the table."""

IGNORED_SETTINGS = ("cli.run.dir",)
"""Settings that always differ between runs and say nothing about them."""


def build_parser() -> CommandParser:
    """The ``compare`` options."""
    parser = CommandParser(
        prog="crma-lightning compare",
        description="Compare runs (their report.json): forgetting, plasticity, gradient stability, and the "
        "settings that differ. With --out: comparison.md, comparison.json and comparison.png.",
    )
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", help="write comparison.md/.json/.png into this directory")
    return parser


def run_compare(args: list[str]) -> None:
    """Parse ``args`` (what follows ``compare``), print the comparison, write it to ``--out``."""
    opts = build_parser().parse_args(args)
    out = writable_dir(opts.out) if opts.out else None
    reports = [_read(Path(p)) for p in opts.runs]
    names = _names([Path(p) for p in opts.runs])
    comparison = compare(names, reports)
    markdown = render(comparison)
    print(markdown)
    if out is None:
        return
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2, allow_nan=False))
    (out / "comparison.md").write_text(markdown)
    written = ["comparison.json", "comparison.md"]
    try:
        from crma_lightning.evaluation.plotting import save_comparison_chart

        # The task-score panel only when some run has task scores.
        keys = [k for k in _CHART if k != "ap" or any(_finite(r["ap"]) for r in comparison["runs"])]
        panels = {COLUMNS[k]: [r[k] if _finite(r[k]) else None for r in comparison["runs"]] for k in keys}
        save_comparison_chart(str(out / "comparison.png"), names, panels)
        written.append("comparison.png")
    except ImportError:
        print("matplotlib is not importable: no comparison.png (pip install matplotlib)")
    print(f"Written to {out}: {', '.join(written)}")


_CHART = ("drift_mean", "plasticity_mean", "ap", "grad_norm_var", "grad_norm_cv")


def _read(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        raise ValueError(f"run directory {run} does not exist")
    path = run / "report.json"
    if not path.is_file():
        raise ValueError(f"{run} has no report.json: not a crma_lightning run directory, or it wrote no report yet")
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not {"domains", "loss_matrix"} <= set(report):
            raise KeyError("domains/loss_matrix")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a crma_lightning report ({type(err).__name__}: {err})") from err
    return report


def _names(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory names, with parents added where two are the same."""
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


def compare(names: list[str], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: ``runs`` (one summary each), ``domains``, ``settings``."""
    runs = []
    for name, report in zip(names, reports):
        m = report.get("metrics") or {}
        grads = (report.get("gradients") or {}).get("run") or {}
        mean, std = grads.get("mean"), grads.get("std")
        routing = report.get("routing") or {}
        accuracy = [a for a in (routing.get("routing_accuracy_final") or {}).values() if _finite(a)]
        scores = report.get("score_matrix") or {}
        runs.append(
            {
                "run": name,
                "status": report.get("status"),
                "stages": f"{report.get('completed_stages')}/{report.get('total_stages')}",
                "domains": report["domains"],
                "method": (report.get("method") or {}).get("method", "none"),
                **{k: m.get(k) for k in ("drift_mean", "base_relative_forgetting_mean", "bwt", "fwt")},
                "drift_mean_routed": (routing.get("metrics_routed") or {}).get("drift_mean"),
                "routing_accuracy_mean": sum(accuracy) / len(accuracy) if accuracy else None,
                "routing": routing.get("mode", "oracle"),
                "ap_routed": (routing.get("score_metrics_routed") or {}).get("ap"),
                "plasticity_mean": m.get("plasticity_mean"),
                **{k: scores.get(k) for k in ("ap", "bwt_score", "forgetting_mean")},
                "grad_norm_var": grads.get("var"),
                "grad_norm_cv": std / mean if _finite(std) and _finite(mean) and mean else None,
                "drift": m.get("drift") or {},
                "plasticity": m.get("plasticity") or {},
            }
        )
    domains = [r["domains"] for r in runs]
    flat = [_flatten(r.get("config") or {}) for r in reports]
    keys = sorted(set().union(*flat) - set(IGNORED_SETTINGS))
    differing = {k: [f.get(k) for f in flat] for k in keys if any(f.get(k) != flat[0].get(k) for f in flat)}
    return {
        "runs": runs,
        "same_domains": all(d == domains[0] for d in domains),
        "all_domains": list(dict.fromkeys(d for ds in domains for d in ds)),
        "settings_that_differ": differing,
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(comparison: dict[str, Any]) -> str:
    """The comparison as Markdown: the table, per-domain drift/plasticity, the settings that differ."""
    runs = comparison["runs"]
    lines = ["# crma_lightning comparison", ""]
    if not comparison["same_domains"]:
        lines += [
            "**The runs have different domains** (listed below): means average over different domains, "
            "so compare them with care; per-domain values are in the second table.",
            "",
        ]
    lines += ["| run | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join([r["run"], *(_cell(r[k]) for k in COLUMNS)]) + " |" for r in runs]
    domains = comparison["all_domains"]
    lines += ["", "## Per domain: drift % / plasticity (— : not in the run, or undefined)", ""]
    lines += ["| run | domains | " + " | ".join(domains) + " |", "|---" * (len(domains) + 2) + "|"]
    for r in runs:
        cells = [f"{_cell(r['drift'].get(d))} / {_cell(r['plasticity'].get(d))}" for d in domains]
        lines.append(f"| {r['run']} | {', '.join(r['domains'])} | " + " | ".join(cells) + " |")
    differing = comparison["settings_that_differ"]
    lines += ["", "## Settings that differ", ""]
    if not differing:
        lines.append("None: the runs' recorded settings are identical.")
    else:
        lines += ["| setting | " + " | ".join(r["run"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for key, values in differing.items():
            lines.append(f"| `{key}` | " + " | ".join(_setting(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _setting(value: Any) -> str:
    text = "(unset)" if value is None else json.dumps(value) if not isinstance(value, str) else value
    return (text if len(text) <= 60 else text[:57] + "...").replace("|", "\\|")
