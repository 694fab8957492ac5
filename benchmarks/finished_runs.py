"""The v3 tables of a continual benchmark's finished runs, read from their ``report.json`` (also mid-benchmark).

``continual.py`` writes ``results.md`` once every order and seed has run. This script reads the runs that
have finished so far under ``--out`` (``order<k>/seed<s>/<SETTING>/report.json`` with status ``complete``;
or ``seed<s>/<SETTING>`` for one order) and prints the per-order table and the table against joint
training with task scores, computed by the same functions (``results``, ``table``). Step times and
the CRMA effect are not in ``report.json``, so the settings table with them is left to ``results.md``.
Only orders in which every setting finished are used, so each order counts whole. ``--intervals`` adds
each order's bootstrap intervals (``lib/intervals.py``, as ``continual.py`` computes them, from the runs'
``heldout_rows.json``; with ``<SETTING>-apriori`` rows of ``--chosen`` each dev-chosen setting is paired
with its a-priori row), e.g. for a run from before a statistic existed.

    python benchmarks/finished_runs.py --out runs/bench/tasks-v3
    python benchmarks/finished_runs.py --out runs/bench/v3-real --intervals
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py`: the repo root

from benchmarks.lib.intervals import benchmark_intervals, render_intervals
from benchmarks.lib.results import LORA_PAIRS, aggregate, gap_to_joint, over_orders, run_numbers
from benchmarks.lib.runs import SETTINGS
from benchmarks.lib.table import render_orders, render_scores


def _group(seed_dir: Path) -> dict[str, Any] | None:
    """The run group of one seed directory, or ``None`` unless every setting in it is complete."""
    runs, domains = {}, None
    names = [n for m in SETTINGS for n in (m, f"{m}-apriori")]  # --chosen's a-priori rows follow their setting
    for mode in (m for m in names if (seed_dir / m / "report.json").is_file()):
        report = json.loads((seed_dir / mode / "report.json").read_text())
        if report.get("status") != "complete":
            return None
        raw = {"report": report, "error": None, "run_dir": str(seed_dir / mode), "step_times": {}, "wall_s": 0.0}
        runs[mode] = run_numbers(raw, 0)
        domains = report["domains"]
    if not runs:
        return None
    gap_to_joint(runs)
    return {"domains": domains, "runs": runs, "pairs": {}}


def collect(out: Path, intervals: bool = False, resamples: int = 2000, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """``(markdown, {"per_seed", "per_order"[, "intervals"]})`` of the complete orders under ``out``."""
    order_dirs = sorted(out.glob("order*"), key=lambda p: int(p.name[5:])) or [out]
    per_seed: dict[str, Any] = {}
    per_order: dict[str, Any] = {}
    for order_dir in order_dirs:
        groups = {}
        for seed_dir in sorted(order_dir.glob("seed*"), key=lambda p: int(p.name[4:])):
            group = _group(seed_dir)
            if group is None:
                groups = {}  # an unfinished seed: the order does not count
                break
            key = f"{order_dir.name}/{seed_dir.name}" if order_dir != out else seed_dir.name[4:]
            groups[key] = group
        if groups:
            per_seed.update(groups)
            per_order["1" if order_dir == out else order_dir.name[5:]] = {
                "domains": next(iter(groups.values()))["domains"],
                "groups": list(groups),
                "aggregates": aggregate(groups),
            }
    if not per_seed:
        raise SystemExit(f"{out}: no order in which every setting has finished")
    full = dict(per_seed)  # every group's own settings: the per-order intervals use them all
    common = set.intersection(*(set(g["runs"]) for g in per_seed.values()))
    left_out = sorted({m for g in per_seed.values() for m in g["runs"]} - common)
    if left_out:  # e.g. --chosen's a-priori rows in one order only: the pooled tables need every setting everywhere
        per_seed = {k: {**g, "runs": {m: r for m, r in g["runs"].items() if m in common}} for k, g in per_seed.items()}
        for order in per_order.values():
            order["aggregates"] = aggregate({g: per_seed[g] for g in order["groups"]})
    first = next(iter(per_seed.values()))
    results = {
        "setup": {"domains": first["domains"]},
        "per_seed": per_seed,
        "per_order": per_order if len(per_order) > 1 else {},
        "over_orders": over_orders(per_order),
    }
    text = f"Complete orders: {', '.join(per_order)} ({len(per_seed)} runs of each setting).\n"
    if left_out:
        text += f"Not in every order, so left out of these tables: {', '.join(left_out)}.\n"
    text += render_orders(results) + render_scores(results, aggregate(per_seed))
    found: dict[str, Any] = {"per_seed": list(per_seed), "per_order": list(per_order)}
    if intervals:  # per order, as continual.py computes them
        found["intervals"] = {}
        for k, order in per_order.items():
            groups = {g: full[g] for g in order["groups"]}
            modes = set(next(iter(groups.values()))["runs"])
            pairs = {x: ref for x, ref in LORA_PAIRS.items() if x in modes and ref in modes}
            found["intervals"][k] = benchmark_intervals(groups, pairs, resamples, seed)
            text += f"\n\nOrder {k}:" + render_intervals(found["intervals"][k])
    return text, found


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the benchmark's --out directory")
    parser.add_argument("--intervals", action="store_true", help="also each order's bootstrap intervals")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap replicates (B)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")
    args = parser.parse_args(argv)
    text, _ = collect(args.out, args.intervals, args.resamples, args.bootstrap_seed)
    print(text)
    return text


if __name__ == "__main__":
    main()
