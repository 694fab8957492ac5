"""Task scores with every adapter arrangement and continual method, with routing, and across a mid-stage resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from scoring_runs import TRAINER, complete_scores, task_data, task_model

from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
from crma_lightning.methods import EWC, OLoRA, Replay
from crma_lightning.run.runner import ContinualRunner


@pytest.mark.parametrize(
    ("adapter", "task_adapters", "method"),
    [
        ("lora", "shared", None),  # NAIVE
        ("lora", "per_task", None),  # FROZEN
        ("crma", "per_task", None),  # MODULAR
        ("crma", "shared", None),
        ("lora", "shared", lambda: Replay(buffer_size=8, ratio=0.5)),
        ("crma", "per_task", lambda: EWC(lam=100.0, fisher_samples=2)),
        ("lora", "per_task", lambda: OLoRA(lam=0.5)),
    ],
)
def test_every_arrangement_and_method_fills_the_score_matrix(tmp_path, adapter, task_adapters, method):
    runner = ContinualRunner(run_dir=tmp_path / "run", trainer_kwargs=dict(TRAINER), resume="never")
    report = runner.run(task_model(adapter, task_adapters, method() if method else None), task_data())
    values = complete_scores(report)
    if task_adapters == "per_task" and adapter == "lora" and method is None:
        assert values[2][0] == values[1][0]  # FROZEN: task 1's adapter is untouched by stage 2


@pytest.mark.parametrize("task_adapters", ["shared", "per_task"])
def test_perplexity_routing_adds_routed_scores_and_leaves_the_oracle_ones(tmp_path, task_adapters):
    plain = ContinualRunner(run_dir=tmp_path / "a", trainer_kwargs=dict(TRAINER), resume="never")
    routed = ContinualRunner(
        run_dir=tmp_path / "b",
        trainer_kwargs=dict(TRAINER),
        resume="never",
        callbacks=[RoutedEvaluation(mode="perplexity", prefix_tokens=8)],
    )
    a = plain.run(task_model("lora", task_adapters), task_data())
    b = routed.run(task_model("lora", task_adapters), task_data())
    assert complete_scores(a) == complete_scores(b)
    routed_scores = b["routing"]["score_matrix_routed"]
    assert len(routed_scores) == 3 and None not in routed_scores[2]
    assert b["routing"]["score_metrics_routed"]["ap"] is not None
    if task_adapters == "shared":  # one candidate adapter: routing has nothing to choose
        assert routed_scores[1:] == complete_scores(b)[1:]
    assert "routed AP" in (tmp_path / "b" / "report.md").read_text()


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.current_task == "last" and trainer.global_step == 2:
            raise RuntimeError("simulated crash")


def test_a_mid_stage_resume_gives_the_uninterrupted_score_matrix(tmp_path):
    reference = ContinualRunner(run_dir=tmp_path / "ref", trainer_kwargs=dict(TRAINER), resume="never")
    expected = complete_scores(reference.run(task_model("crma", "per_task"), task_data()))
    crash = ContinualRunner(
        run_dir=tmp_path / "run", trainer_kwargs=dict(TRAINER), callbacks=[_Crash()], checkpoint_every_n_steps=1
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crash.run(task_model("crma", "per_task"), task_data())
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in last["callbacks"].items() if "DomainEvaluation" in k)
    assert len(state["scores"]) == 2  # the base row and stage 1's: in the mid-stage checkpoint
    resumed = ContinualRunner(run_dir=tmp_path / "run", trainer_kwargs=dict(TRAINER), checkpoint_every_n_steps=1)
    values = complete_scores(resumed.run(task_model("crma", "per_task"), task_data()))
    assert values == expected
