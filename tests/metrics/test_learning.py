"""Did each stage learn its domain: the flags (score or loss, margins), the learned-only means, and a run whose
stage cannot learn (lr 0) flagged in report.json, report.md and by `evaluate`, while a learning run is not."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.metrics.continual import summarize
from crma_lightning.metrics.learning import learned_only_means, learning_flags

LOSSES = [[4.0, 4.0, 4.0], [3.0, 4.1, 4.0], [3.5, 3.99, 4.0], [3.6, 4.05, 2.0]]


def test_loss_signal_uses_the_relative_improvement_over_the_base():
    flags = learning_flags(LOSSES, ["a", "b", "c"], upto=3, loss_margin=0.01)
    assert flags["a"]["learned"] and flags["a"]["gain"] == pytest.approx(0.25) and flags["a"]["signal"] == "loss"
    assert flags["b"]["learned"] is False and flags["b"]["gain"] == pytest.approx(0.0025)  # 0.25 % < 1 %
    assert flags["c"]["learned"] and flags["c"]["after_own_stage"] == 2.0
    assert learning_flags(LOSSES, ["a", "b", "c"], upto=3, loss_margin=0.3)["a"]["learned"] is False


def test_score_signal_wins_for_a_scored_domain_and_missing_entries_give_no_verdict():
    scores = [[0.0, None, 0.1], [0.6, None, 0.1], [0.5, None, 0.1], [0.4, None, 0.12]]
    flags = learning_flags(LOSSES, ["a", "b", "c"], upto=3, score_matrix=scores, score_margin=0.05)
    assert flags["a"] == {
        "learned": True,
        "signal": "score",
        "base": 0.0,
        "after_own_stage": 0.6,
        "gain": 0.6,
        "margin": 0.05,
    }
    assert flags["b"]["signal"] == "loss"  # no metric: judged by its loss
    assert flags["c"]["learned"] is False and flags["c"]["gain"] == pytest.approx(0.02)  # loss fell 50 %, score did not
    partial_run = [[4.0, 4.0], [None, 4.0]]
    assert learning_flags(partial_run, ["a", "b"], upto=1)["a"]["learned"] is None


def test_learned_only_means_leave_unlearned_domains_out():
    domains = ["a", "b", "c"]
    flags = learning_flags(LOSSES, domains, upto=3)
    summary = summarize(LOSSES, domains)
    only = learned_only_means(flags, summary, None, domains, 3)
    assert only["domains"] == ["a", "c"]
    assert only["drift_mean"] == pytest.approx(summary["drift"]["a"])  # c is last: no drift; b did not learn
    assert summary["drift_mean"] != pytest.approx(only["drift_mean"])  # b's ~0 drift was averaged in
    scores = [[0.0, 0.0, 0.0], [0.8, 0.0, 0.0], [0.6, 0.0, 0.0], [0.5, 0.0, 0.9]]
    flags = learning_flags(LOSSES, domains, 3, scores)
    assert learned_only_means(flags, summary, scores, domains, 3)["bwt_score"] == pytest.approx(-0.3)


def test_bad_margins_are_refused_with_their_name():
    with pytest.raises(ValueError, match=r"learn_loss_margin=-0.1 is invalid"):
        learning_flags(LOSSES, ["a", "b", "c"], 3, loss_margin=-0.1)
    from crma_lightning.callbacks.domain_evaluation import DomainEvaluation

    with pytest.raises(ValueError, match=r"learn_score_margin=nan is invalid"):
        DomainEvaluation(learn_score_margin=float("nan"))


# ---------------------------------------------------------------------------------------------- real runs
def _run(run_dir, lr: float):
    from crma_lightning.data.datamodule import SequentialDomainDataModule
    from crma_lightning.model.continual_lm import ContinualLM
    from crma_lightning.run.runner import ContinualRunner

    trainer = {"accelerator": "cpu", "max_steps": 12, "enable_progress_bar": False, "enable_model_summary": False}
    runner = ContinualRunner(run_dir=run_dir, trainer_kwargs=trainer)
    model = ContinualLM(model_config=TINY_LLAMA_CONFIG, optimizer=partial(torch.optim.AdamW, lr=lr))
    data = SequentialDomainDataModule(
        domains=["prose", "code"], max_length=32, batch_size=4, max_chars_per_domain=6000, max_eval_rows=8
    )
    runner.run(model, data)
    return json.loads((run_dir / "report.json").read_text()), (run_dir / "report.md").read_text()


def test_a_stage_that_cannot_learn_is_flagged_and_a_learning_stage_is_not(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="crma_lightning"):
        frozen, frozen_md = _run(tmp_path / "lr0", lr=0.0)
    learning = frozen["learning"]
    assert learning["unlearned"] == ["prose", "code"]
    assert learning["domains"]["prose"]["gain"] == 0.0 and learning["domains"]["prose"]["signal"] == "loss"
    assert learning["learned_only"]["drift_mean"] is None  # nothing learned: no forgetting number to show
    assert "**Did not learn: prose, code.**" in frozen_md and "| prose | **no** |" in frozen_md
    assert "†" in frozen_md
    assert "domain 'prose' did not learn in its own stage" in caplog.text
    learned, learned_md = _run(tmp_path / "lr", lr=0.02)
    assert learned["learning"]["unlearned"] == [] and learned["learning"]["domains"]["prose"]["learned"]
    assert "Did not learn" not in learned_md and "| prose | yes |" in learned_md

    from crma_lightning.cli import main

    main(["evaluate", "--run", str(tmp_path / "lr0"), "--accelerator", "cpu"])
    evaluated = json.loads((tmp_path / "lr0" / "evaluation" / "report.json").read_text())
    assert evaluated["learning"]["unlearned"] == ["prose", "code"]
    assert "**Did not learn: prose, code.**" in (tmp_path / "lr0" / "evaluation" / "report.md").read_text()
