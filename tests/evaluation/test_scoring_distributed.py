"""Task scores on 2 CPU processes (DDP, FSDP2, FSDP1) equal the single-process ones (each rank scores a shard)."""

from __future__ import annotations

import pytest
from dist_launch import assert_matrices_close, launch, load_job

job = load_job("dist_scores_job")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return job.run(tmp_path_factory.mktemp("single") / "run", "single")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp1"])
def test_two_process_scores_equal_one_process(tmp_path, single, strategy, monkeypatch):
    result = launch(strategy, tmp_path / strategy, job="dist_scores_job")
    assert_matrices_close(result["loss"], single["loss_matrix"]["values"], abs_tol=1e-4)
    scores = single["score_matrix"]["values"]
    assert any(0 < v < 1 for row in scores for v in row if v is not None)  # not a trivially equal matrix
    assert result["scores"] == scores
