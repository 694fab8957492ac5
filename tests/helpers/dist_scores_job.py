"""Task scores under several processes, for ``tests/evaluation/test_scoring_distributed.py`` (a script).

    python tests/helpers/dist_scores_job.py fsdp2 OUT_DIR     # FSDP2, 2 CPU processes
    python tests/helpers/dist_scores_job.py fsdp1 OUT_DIR     # FSDP1, 2 CPU processes
    python tests/helpers/dist_scores_job.py ddp OUT_DIR       # DDP, 2 CPU processes

A 2-stage CRMA + per-task LoRA run on two built-in tasks, 5 held-out rows each in batches of 2 (2 ranks: 3
and 2 rows, i.e. 2 and 1 batches - uneven on purpose): ``first`` scored by generation with a registered
metric that reads every generated character (a model trained 3 steps gets no exact match, and an all-zero
matrix would compare nothing), ``last`` by label loss (``accuracy``, ``label_mode: loss``); rank 0 writes
``OUT_DIR/result.json`` with the loss and score matrices. The single-process reference calls :func:`run`
with ``"single"`` in the test process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from dist_job import GLOBAL_BATCH, WORLD, make_model, trainer_kwargs

from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.metrics.task import register_metric
from crma_lightning.run.runner import ContinualRunner

register_metric("text_signature", lambda pred, ref: (sum(map(ord, pred)) % 11) / 10)
"""A row score that any change in the generated text changes (almost surely)."""
METRICS = {
    "first": {"name": "text_signature", "eval_rows": 5, "max_new_tokens": 3},
    "last": {"name": "accuracy", "labels": list("abcdefgh"), "label_mode": "loss", "eval_rows": 5},
}


def run(run_dir: Path, strategy: str) -> dict:
    """One run; returns its report."""
    world = 1 if strategy == "single" else WORLD
    data = SequentialDomainDataModule(
        domains=[{"name": t, "builtin": t, "metric": m} for t, m in METRICS.items()],
        max_length=32,
        packing=False,
        batch_size=GLOBAL_BATCH // world,
        eval_batch_size=2,
        max_eval_rows=5,
    )
    runner = ContinualRunner(run_dir=run_dir, trainer_kwargs=trainer_kwargs(strategy), seed=0)
    return runner.run(make_model(), data)


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy, out = sys.argv[1], Path(sys.argv[2])
    report = run(out / "run", strategy)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        result = {"loss": report["loss_matrix"]["values"], "scores": report["score_matrix"]["values"]}
        (out / "result.json").write_text(json.dumps(result))
