"""Task-scored runs from Python: two built-in tasks, a tiny model with any adapter arrangement and method."""

from __future__ import annotations

from functools import partial

import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.model.continual_lm import ContinualLM

TRAINER = {"accelerator": "cpu", "max_steps": 3, "enable_progress_bar": False, "enable_model_summary": False}


METRIC = {"name": "exact_match", "eval_rows": 4, "max_new_tokens": 3}


def task_data():
    domains = [{"name": t, "builtin": t, "metric": METRIC} for t in ("first", "last")]
    return SequentialDomainDataModule(domains=domains, max_length=32, packing=False, batch_size=4, max_eval_rows=8)


def task_model(adapter, task_adapters, method=None):
    return ContinualLM(
        model_config=TINY_LLAMA_CONFIG,
        adapter=adapter,
        task_adapters=task_adapters,
        method=method,
        optimizer=partial(torch.optim.AdamW, lr=0.01),
    )


def complete_scores(report):
    values = report["score_matrix"]["values"]
    assert len(values) == 3 and None not in values[0] and None not in values[2] and values[1][1] is None
    assert report["score_matrix"]["ap"] is not None
    return values
