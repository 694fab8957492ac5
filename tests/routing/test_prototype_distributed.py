"""Prototype routing statistics on 2 CPU processes (DDP, FSDP2) equal one process's (rows sharded, sums reduced)."""

from __future__ import annotations

import pytest
import torch
from dist_launch import launch, load_job

job = load_job("dist_prototype_job")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return job.run(tmp_path_factory.mktemp("single") / "run", "single")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_statistics_equal_one_process(tmp_path, single, strategy, monkeypatch):
    result = launch(strategy, tmp_path / strategy, job="dist_prototype_job")
    assert result["tasks"] == single["tasks"] == ["prose", "code"]
    assert result["counts"] == single["counts"] and min(single["counts"]) > 1  # every row once, padding never
    for key in ("sums", "second"):
        torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(single[key]), rtol=1e-6, atol=1e-6)
    assert result["routing"]["confusion"] == single["routing"]["confusion"]  # the same choices, counted once
