"""Scale-free stability gains of each CRMA setting over its LoRA pair, from a benchmark's run directories.

    python benchmarks/cv_gains.py runs/bench/ablation-v2-real

Per seed: ``1 - cv_X / cv_LoRA`` with ``cv`` the per-stage coefficient of variation (std / mean) of the
gradient norm averaged over the stages (``report.json`` ``gradients.stages.*.cv``), and the ratio of the
stage-mean peak / median; printed as mean ± std over seeds for every pair whose two settings ran.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py`: the repo root

from benchmarks.lib.results import LORA_PAIRS


def stage_means(report: dict) -> tuple[float, float]:
    stages = report["gradients"]["stages"].values()
    return statistics.mean(s["cv"] for s in stages), statistics.mean(s["peak_over_median"] for s in stages)


def main(out: Path) -> None:
    seeds = sorted(out.glob("seed*"))
    print("| pair | stability gain on CV (mean ± std) | peak/median ratio (mean ± std) |\n|---|---|---|")
    for x, ref in LORA_PAIRS.items():
        if not all((s / x / "report.json").is_file() and (s / ref / "report.json").is_file() for s in seeds):
            continue
        gains, peaks = [], []
        for s in seeds:
            cx, px = stage_means(json.loads((s / x / "report.json").read_text()))
            cr, pr = stage_means(json.loads((s / ref / "report.json").read_text()))
            gains.append(1 - cx / cr)
            peaks.append(px / pr)
        spread = (statistics.stdev(gains), statistics.stdev(peaks)) if len(seeds) > 1 else (0.0, 0.0)
        print(
            f"| {x} vs {ref} | {statistics.mean(gains):+.3f} ± {spread[0]:.3f} | "
            f"{statistics.mean(peaks):.3f} ± {spread[1]:.3f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
