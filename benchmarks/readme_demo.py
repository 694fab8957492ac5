"""The README's demo table, generated from demo reports - and the check that keeps it from going stale.

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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
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


def _drift(report: dict) -> str:
    value = report["metrics"]["drift_mean"]
    return f"{value:+.2f}%"


def numbers(text: str) -> list[float]:
    """Every decimal number in ``text`` (the block's losses and drifts), in order."""
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)]


def current_block(readme: str) -> str:
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < 0:
        raise SystemExit(f"README has no {START} ... {END} block")
    return readme[start : end + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modular", type=Path, help="report.json of the default demo run (MODULAR)")
    parser.add_argument("naive", type=Path, help="report.json of the NAIVE demo run")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the README block from the reports")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README block differs from the reports")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    unpinned = {k: v for k, v in PINNED_KERNELS.items() if os.environ.get(k) != v}
    if unpinned:  # a warning only: the reports were made by other processes, whose environment may differ
        print(f"note: this shell does not pin {unpinned}; the README's numbers are made with them", file=sys.stderr)
    reports = [json.loads(p.read_text()) for p in (args.modular, args.naive)]
    for path, report in zip((args.modular, args.naive), reports):
        if report.get("status") != "complete":
            raise SystemExit(f"{path}: status {report.get('status')!r}, expected 'complete'")
    block = render(*reports)
    readme = args.readme.read_text()
    old = current_block(readme)
    if args.write:
        args.readme.write_text(readme.replace(old, block))
        print(f"wrote the demo block of {args.readme}")
        return 0
    want, have = numbers(block), numbers(old)
    if len(want) != len(have):
        print(f"README demo block has {len(have)} numbers, the reports give {len(want)}:\n{block}", file=sys.stderr)
        return 1
    bad = [(h, w) for h, w in zip(have, want) if abs(h - w) > TOLERANCE]
    if bad:
        print(f"README demo numbers are stale (README, fresh run): {bad}\nExpected block:\n{block}", file=sys.stderr)
        return 1
    print(f"README demo block matches the reports ({len(want)} numbers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
