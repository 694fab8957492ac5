"""Prototype routing under several processes, for ``tests/routing/test_prototype_distributed.py`` (a script).

    python tests/helpers/dist_prototype_job.py ddp OUT_DIR       # DDP, 2 CPU processes
    python tests/helpers/dist_prototype_job.py fsdp2 OUT_DIR     # FSDP2, 2 CPU processes

The 2-stage CRMA + per-task LoRA run of ``dist_job.py`` (prose, code) with ``routing: prototype``: each rank
pools its shard of a task's training rows (padded to as many batches), the sums are reduced, and rank 0
writes ``OUT_DIR/result.json`` with the statistics and the routed report. The statistics are those of the
frozen base, so they must equal one process's whatever the training did. The single-process reference
calls :func:`run` with ``"single"`` in the test process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from dist_job import WORLD, make_data, make_model, trainer_kwargs

from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
from crma_lightning.run.runner import ContinualRunner


def run(run_dir: Path, strategy: str) -> dict:
    """One run; returns the statistics and the routing report."""
    model = make_model()
    runner = ContinualRunner(
        run_dir=run_dir,
        trainer_kwargs=trainer_kwargs(strategy),
        seed=0,
        callbacks=[RoutedEvaluation(mode="prototype", prefix_tokens=8)],
    )
    report = runner.run(model, make_data(1 if strategy == "single" else WORLD))
    state = model.router.state_dict()
    return {
        "tasks": state["tasks"],
        "counts": state["counts"].tolist(),
        "sums": state["sums"].tolist(),
        "second": state["second"].tolist(),
        "routing": report["routing"],
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy, out = sys.argv[1], Path(sys.argv[2])
    result = run(out / "run", strategy)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        (out / "result.json").write_text(json.dumps(result))
