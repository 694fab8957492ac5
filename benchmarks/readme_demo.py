"""The README's demo and task-suite tables, generated from run reports - and the check that keeps them fresh.

The README's headline numbers come from two demo runs (MODULAR, the demo's default, and NAIVE), with the
CPU kernels pinned (:data:`PINNED_KERNELS`)::

    export OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
    crma-lightning fit --config configs/demo.yaml --run.dir runs/demo
    crma-lightning fit --config configs/demo.yaml --config configs/naive.yaml --run.dir runs/demo-naive
    python benchmarks/readme_demo.py --write runs/demo/report.json runs/demo-naive/report.json

``--check`` (what ``.ci/run`` does after fresh pinned demo runs on the CI machine) exits 1 when a number
in the README differs from the reports by more than the rounding of the printed digits (plus a small
tolerance). Why the pins: training amplifies last-bit floating-point differences, and which kernels run
depends on the CPU - ATen picks AVX-512, AVX2 or baseline kernels (``ATEN_CPU_CAPABILITY``), MKL its own
branch (``MKL_CBWR``), and a reduction split over threads sums in another order. Unpinned, an AVX-512/AMX
machine ended the demo with code 4.5812 against 4.5640 from another machine. The pins select what every
x86-64 CPU runs the same way; they do not cover a different torch/MKL build or C library.

``--block tasks`` does the same for the README's task-suite table (NAIVE, FROZEN, MODULAR on
configs/tasks.yaml, the base of benchmarks/task_suite_base.py), pinned the same way::

    python benchmarks/task_suite_base.py --out runs/tasks-base
    crma-lightning fit --config configs/tasks.yaml --config configs/naive.yaml --run.dir runs/tasks-naive
    crma-lightning fit --config configs/tasks.yaml --config configs/frozen.yaml --run.dir runs/tasks-frozen
    crma-lightning fit --config configs/tasks.yaml --run.dir runs/tasks-modular
    python benchmarks/readme_demo.py --block tasks --write runs/tasks-{naive,frozen,modular}/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {
    "demo": ("<!-- demo-table:start -->", "<!-- demo-table:end -->"),
    "tasks": ("<!-- tasks-table:start -->", "<!-- tasks-table:end -->"),
}
START, END = MARKERS["demo"]
TOLERANCE = 6e-3  # above the rounding of every printed number (losses: 4 decimals, drifts: 2)
PINNED_KERNELS = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
"""The environment the README's demo numbers are produced and checked under (the module docstring says why)."""


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def render(modular: dict, naive: dict) -> str:
    """The README block: MODULAR's loss matrix and mean drift, NAIVE's final row and mean drift."""
    domains = modular["domains"]
    rows = modular["loss_matrix"]["values"]
    lines = ["| after stage | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for r, row in enumerate(rows):
        label = "base" if r == 0 else f"{r}: {domains[r - 1]}"
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    naive_final = naive["loss_matrix"]["values"][-1]
    earlier = ", ".join(f"{d} {_fmt(v)}" for d, v in zip(naive["domains"][:-1], naive_final[:-1]))
    return "\n".join(
        [
            START,
            *lines,
            "",
            f"mean drift **{_drift(modular)}**. The same run with one shared LoRA (NAIVE,",
            f"`--config configs/naive.yaml` on top) ends at {earlier}:",
            f"mean drift **{_drift(naive)}**.",
            END,
        ]
    )


def render_tasks(naive: dict, frozen: dict, modular: dict) -> str:
    """The README's task-suite block: each arrangement's final loss and score rows, AP and BWT_score."""
    start, end = MARKERS["tasks"]
    domains = naive["domains"]
    names = " / ".join(domains)
    lines = [
        start,
        f"| arrangement | `L[{len(domains)}][j]`: {names} | `S[{len(domains)}][j]`: {names} | AP | BWT_score |",
        "|---|---|---|---|---|",
    ]
    labels = ("NAIVE (one shared LoRA)", "FROZEN (LoRA per task)", "MODULAR (CRMA + LoRA per task)")
    for label, report in zip(labels, (naive, frozen, modular)):
        losses = " / ".join(f"{v:.3f}" for v in report["loss_matrix"]["values"][-1])
        section = report["score_matrix"]
        scores = " / ".join(f"{v:.3f}" for v in section["values"][-1])
        lines.append(f"| {label} | {losses} | {scores} | {section['ap']:.3f} | {section['bwt_score']:+.3f} |")
    unlearned = sorted({d for r in (naive, frozen, modular) for d in (r.get("learning") or {}).get("unlearned", [])})
    lines += ["", f"Did not learn in its own stage (any arrangement): {', '.join(unlearned) or 'none'}.", end]
    return "\n".join(lines)


def _drift(report: dict) -> str:
    value = report["metrics"]["drift_mean"]
    return f"{value:+.2f}%"


def numbers(text: str) -> list[float]:
    """Every decimal number in ``text`` (the block's losses and drifts), in order."""
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)]


def current_block(readme: str, block: str = "demo") -> str:
    start_mark, end_mark = MARKERS[block]
    start, end = readme.find(start_mark), readme.find(end_mark)
    if start < 0 or end < 0:
        raise SystemExit(f"README has no {start_mark} ... {end_mark} block")
    return readme[start : end + len(end_mark)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "reports",
        type=Path,
        nargs="+",
        help="demo: MODULAR's and NAIVE's report.json; tasks: NAIVE's, FROZEN's and MODULAR's",
    )
    parser.add_argument("--block", choices=list(MARKERS), default="demo", help="which README table (default demo)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the README block from the reports")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README block differs from the reports")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    unpinned = {k: v for k, v in PINNED_KERNELS.items() if os.environ.get(k) != v}
    if unpinned:  # a warning only: the reports were made by other processes, whose environment may differ
        print(f"note: this shell does not pin {unpinned}; the README's numbers are made with them", file=sys.stderr)
    expected = {"demo": 2, "tasks": 3}[args.block]
    if len(args.reports) != expected:
        parser.error(f"--block {args.block} takes {expected} report.json files, got {len(args.reports)}")
    reports = [json.loads(p.read_text()) for p in args.reports]
    for path, report in zip(args.reports, reports):
        if report.get("status") != "complete":
            raise SystemExit(f"{path}: status {report.get('status')!r}, expected 'complete'")
    block = render(*reports) if args.block == "demo" else render_tasks(*reports)
    readme = args.readme.read_text()
    old = current_block(readme, args.block)
    if args.write:
        args.readme.write_text(readme.replace(old, block))
        print(f"wrote the {args.block} block of {args.readme}")
        return 0
    want, have = numbers(block), numbers(old)
    if len(want) != len(have):
        print(
            f"README {args.block} block has {len(have)} numbers, the reports give {len(want)}:\n{block}",
            file=sys.stderr,
        )
        return 1
    bad = [(h, w) for h, w in zip(have, want) if abs(h - w) > TOLERANCE]
    if bad:
        print(
            f"README {args.block} numbers are stale (README, fresh run): {bad}\nExpected block:\n{block}",
            file=sys.stderr,
        )
        return 1
    if args.block == "tasks" and block.splitlines()[-2] != old.splitlines()[-2]:
        print(f"README tasks block's did-not-learn line is stale:\nExpected block:\n{block}", file=sys.stderr)
        return 1
    print(f"README {args.block} block matches the reports ({len(want)} numbers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
