"""Routing without task labels on a finished continual benchmark: perplexity vs prototype vs hybrid, and MERGED.

Usage (``--bench``: the ``--out`` of a ``benchmarks/continual.py`` run with FROZEN and MODULAR, routed by
perplexity, and optionally MERGED-mean / MERGED-ties):

    python benchmarks/routing_table.py --bench runs/bench/routing-real [--prefix_tokens 32] [--fallback_margin 2]

The perplexity numbers are the runs' own routed evaluation (``report.json``). Prototype routing (the
library's default settings) and the hybrid (prototype, perplexity for the sequences whose two nearest
tasks are within ``--fallback_margin``) are evaluated after the fact on the same checkpoints with the
command users run, ``crma-lightning evaluate --run RUN --routing prototype [--fallback_margin M]`` (the
statistics fitted on each run's training rows; the runs' training is not repeated), into
``RUN/evaluation-prototype`` and ``RUN/evaluation-hybrid``. Prints and writes ``routing.md`` and
``routing.json`` into ``--bench``: per setting and router, over seeds (mean ± std), the routing accuracy
(final row, mean over domains), the routed mean drift and the oracle drift on the same targets, and the
forwards per routed sequence; MERGED's final-row mean loss and drift next to FROZEN's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py`: the repo root

from benchmarks.lib.table import MERGED_DRIFT_NOTE
from crma_lightning.cli.evaluate import run_evaluate
from crma_lightning.metrics import continual as metrics
from crma_lightning.routing.prototype import DEFAULT_LAYER, DEFAULT_POOLING, DEFAULT_SHRINKAGE, HYBRID_MARGIN


def _routed(routing: dict[str, Any]) -> dict[str, float | None]:
    acc = [v for v in (routing.get("routing_accuracy_final") or {}).values() if v is not None]
    same = routing.get("loss_matrix_oracle_same_targets")
    shares = [v for v in (routing.get("fallback_share_final") or {}).values() if v is not None]
    domains = list((routing.get("routing_accuracy_final") or {}).keys())
    return {
        "accuracy": statistics.fmean(acc) if acc else None,
        "drift_routed": (routing.get("metrics_routed") or {}).get("drift_mean"),
        "drift_oracle_same_targets": metrics.summarize(same, domains).get("drift_mean") if same else None,
        "forwards": routing.get("routing_forwards_final"),
        "fallback_share": statistics.fmean(shares) if shares else None,
    }


def _settings_differ(routing: dict[str, Any], router: str, prefix: int, margin: float) -> dict[str, Any]:
    """What of an earlier evaluation's ``routing`` entry differs from this table's options (empty: reusable)."""
    wanted = {
        "mode": "prototype",
        "prefix_tokens": prefix,
        "fallback_margin": margin if router == "hybrid" else None,
        "prototype": {
            "layer": DEFAULT_LAYER,
            "pooling": DEFAULT_POOLING,
            "estimator": "mahalanobis",
            "shrinkage": DEFAULT_SHRINKAGE,
        },
    }
    return {k: (routing.get(k), v) for k, v in wanted.items() if routing.get(k) != v}


def _evaluate(run: Path, router: str, prefix: int, margin: float, reuse: bool) -> dict[str, Any]:
    out = run / f"evaluation-{router}"
    if reuse and (out / "report.json").is_file():
        routing = json.loads((out / "report.json").read_text())["routing"]
        differ = _settings_differ(routing, router, prefix, margin)
        if not differ:
            return routing
        print(f"{out}: not reused, made with other settings (found, wanted): {differ}", flush=True)
    args = ["--run", str(run), "--routing", "prototype", "--prefix_tokens", str(prefix), "--out", str(out)]
    if router == "hybrid":
        args += ["--fallback_margin", str(margin)]
    with contextlib.redirect_stdout(io.StringIO()):
        run_evaluate(args)
    return json.loads((out / "report.json").read_text())["routing"]


def _ms(values: list[Any], spec: str) -> str:
    xs = [v for v in values if isinstance(v, (int, float))]
    if not xs:
        return "—"
    return format(statistics.fmean(xs), spec) + (f" ± {statistics.stdev(xs):{spec.lstrip('+')}}" if len(xs) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, required=True)
    parser.add_argument("--settings", nargs="+", default=["FROZEN", "MODULAR"])
    parser.add_argument("--routers", nargs="+", default=["perplexity", "prototype", "hybrid"])
    parser.add_argument("--prefix_tokens", type=int, default=32)
    parser.add_argument("--fallback_margin", type=float, default=HYBRID_MARGIN)
    parser.add_argument("--reuse", action="store_true", help="keep evaluations already written")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to read (default: every seed directory)")
    opts = parser.parse_args()
    seeds = sorted(opts.bench.glob("seed*")) if opts.seeds is None else [opts.bench / f"seed{s}" for s in opts.seeds]
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for seed in seeds:
        for setting in opts.settings:
            run = seed / setting
            for router in opts.routers:
                if router == "perplexity":
                    routing = json.loads((run / "report.json").read_text())["routing"]
                    if routing.get("mode") != "perplexity" or routing.get("prefix_tokens") != opts.prefix_tokens:
                        raise SystemExit(f"{run} was not routed by perplexity on {opts.prefix_tokens} tokens")
                else:
                    routing = _evaluate(run, router, opts.prefix_tokens, opts.fallback_margin, opts.reuse)
                table.setdefault(setting, {}).setdefault(router, []).append(_routed(routing))
                print(f"{seed.name} {setting} {router}: {table[setting][router][-1]}", flush=True)
    lines = [
        f"Routing on the first {opts.prefix_tokens} tokens, {len(seeds)} seeds ({', '.join(s.name for s in seeds)}); "
        f"hybrid margin {opts.fallback_margin:g}.",
        "",
        "| setting | routing | accuracy (final row) | routed drift % | oracle drift % (same targets) "
        "| forwards / routed sequence | perplexity share (hybrid) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, routers in table.items():
        for router, rows in routers.items():
            lines.append(
                f"| {setting} | {router} | {_ms([r['accuracy'] for r in rows], '.3f')} "
                f"| {_ms([r['drift_routed'] for r in rows], '+.3f')} "
                f"| {_ms([r['drift_oracle_same_targets'] for r in rows], '+.3f')} "
                f"| {_ms([r['forwards'] for r in rows], '.2f')} | {_ms([r['fallback_share'] for r in rows], '.3f')} |"
            )
    merged = {}
    for name in ("FROZEN", "MERGED-mean", "MERGED-ties"):
        reports = [json.loads((s / name / "report.json").read_text()) for s in seeds if (s / name).is_dir()]
        if reports:
            finals = [statistics.fmean(r["loss_matrix"]["values"][-1]) for r in reports]
            merged[name] = {"final_loss_mean": finals, "drift_mean": [r["metrics"]["drift_mean"] for r in reports]}
    if len(merged) > 1:
        lines += ["", "| setting | final-row mean loss (all positions) | mean drift % |", "|---|---|---|"]
        for name, m in merged.items():
            lines.append(f"| {name} | {_ms(m['final_loss_mean'], '.4f')} | {_ms(m['drift_mean'], '+.3f')} |")
        lines += ["", MERGED_DRIFT_NOTE.replace("[1] ", "")]
    text = "\n".join(lines) + "\n"
    (opts.bench / "routing.md").write_text(text)
    (opts.bench / "routing.json").write_text(json.dumps({"routing": table, "merged": merged, "options": {
        "prefix_tokens": opts.prefix_tokens, "fallback_margin": opts.fallback_margin}}, indent=1))  # fmt: skip
    print("\n" + text)


if __name__ == "__main__":
    main()
