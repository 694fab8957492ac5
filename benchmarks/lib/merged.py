"""MERGED settings of the continual benchmark: the FROZEN run's per-task LoRAs merged into one adapter.

Not trained: after a seed's FROZEN run, ``crma-lightning evaluate --merge mean|ties`` (the command users
run) evaluates every row of the loss matrix with the merge of the adapters trained so far - row ``s``: the
merge of tasks 1..s, every domain evaluated with it, no task identity and no routing. Its run directory
``<out>/seed<s>/MERGED-<how>`` holds that evaluation's ``report.json`` / ``report.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

MERGED_OF = "FROZEN"
"""The setting whose per-task adapters are merged."""


def merged_raw(name: str, how: str, seed: int, frozen: dict[str, Any], out: Path) -> dict[str, Any]:
    """``runs._run_one``'s record for MERGED setting ``name`` (``how``: ``mean`` or ``ties``); never raises."""
    from crma_lightning.cli.evaluate import run_evaluate

    run_dir = out / f"seed{seed}" / name
    t0 = time.perf_counter()
    report, error = None, None
    if frozen.get("report") is None:
        error = f"{MERGED_OF} did not complete: {frozen.get('error')}"
    else:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its report is in run_dir; the table prints the numbers
                run_evaluate(["--run", frozen["run_dir"], "--merge", how, "--out", str(run_dir)])
            report = json.loads((run_dir / "report.json").read_text())
            report["status"] = report["status"].replace("evaluated", "complete", 1)
        except Exception as err:  # a failed merge is a result, not the end of the benchmark
            error = f"{type(err).__name__}: {err}"
    return {
        "mode": name,
        "seed": seed,
        "run_dir": str(run_dir),
        "report": report,
        "error": error,
        "step_times": {},
        "crma_effect": {},
        "wall_s": time.perf_counter() - t0,
    }
