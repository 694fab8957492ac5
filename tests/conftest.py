"""Shared fixtures: tiny transformers models built from configs (no downloads, seconds on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is fastest, and it avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

from tiny_models import MODEL_FACTORIES  # noqa: E402 - after the environment above


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_factory(request):
    """Each tiny architecture in turn: a callable ``factory(seed=0) -> model``."""
    return MODEL_FACTORIES[request.param]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A complete run of two CRMA stages (prose, code), 3 steps each (the reliability tests copy it)."""
    from fit_runs import config, write_config

    from crma_lightning.cli import main

    tmp = tmp_path_factory.mktemp("finished")
    path = write_config(tmp / "c.yaml", config(tmp / "run"))
    try:
        main(["fit", "--config", str(path)])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    return tmp / "run"


