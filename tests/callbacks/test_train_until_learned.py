"""TrainUntilLearned: a stage stops on its dev loss (patience, min_delta, min_steps, the max_steps cap), the same
decision after a mid-stage resume, and the steps each stage used in report.json / report.md."""

from __future__ import annotations

import json
import os
import signal
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.callbacks.train_until_learned import TrainUntilLearned


class _Trainer:
    """The two attributes the rule reads and writes."""

    def __init__(self) -> None:
        self.global_step, self.should_stop = 0, False


class _Module:
    current_task = "a"

    def log(self, *args, **kwargs) -> None:
        pass


def _stop_step(callback: TrainUntilLearned, curve: dict[int, float], max_steps: int) -> int:
    """Drive the rule over steps 1..max_steps with a scripted dev curve; the step the stage ends at."""
    callback.dev_loss = lambda trainer, module, domain: curve[trainer.global_step]
    trainer, module = _Trainer(), _Module()
    for step in range(1, max_steps + 1):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
        if trainer.should_stop:
            return step
    return max_steps


def _curve(values: list[float], every: int) -> dict[int, float]:
    return {every * (i + 1): v for i, v in enumerate(values)}


def test_stops_at_the_first_check_after_patience_checks_without_improvement():
    rule = TrainUntilLearned(check_every_n_steps=5, patience=2, min_delta=0.05)
    # 5: 3.0 (best), 10: 2.5 (best), 15: 2.48 (< 0.05 better: no), 20: 2.6 (no) -> wait 2 at step 20.
    assert _stop_step(rule, _curve([3.0, 2.5, 2.48, 2.6, 1.0, 1.0], 5), 30) == 20
    record = rule.stages["a"]
    assert record["best"] == 2.5 and record["best_step"] == 10 and record["stopped_early"]
    assert [s for s, _ in record["curve"]] == [5, 10, 15, 20]


def test_min_steps_keeps_training_and_an_improving_curve_runs_to_the_cap():
    flat = _curve([2.0] * 10, 5)
    assert _stop_step(TrainUntilLearned(check_every_n_steps=5, patience=1), flat, 50) == 10  # no min: at once
    assert _stop_step(TrainUntilLearned(check_every_n_steps=5, patience=1, min_steps=25), flat, 50) == 25
    falling = _curve([3.0 - 0.1 * i for i in range(10)], 5)
    rule = TrainUntilLearned(check_every_n_steps=5, patience=1)
    assert _stop_step(rule, falling, 50) == 50 and not rule.stages["a"]["stopped_early"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"patience": 0}, "patience"),
        ({"check_every_n_steps": 0}, "check_every_n_steps"),
        ({"min_delta": -1.0}, "min_delta"),
        ({"min_steps": -2}, "min_steps"),
    ],
)
def test_bad_settings_fail_when_the_rule_is_built(kwargs, field):
    with pytest.raises(ValueError, match=rf"TrainUntilLearned: {field}=.* is invalid"):
        TrainUntilLearned(**kwargs)


def test_resumed_state_takes_the_same_decision_and_refuses_another_rule():
    curve = _curve([3.0, 2.5, 2.48, 2.6, 2.7, 1.0], 5)
    whole = TrainUntilLearned(check_every_n_steps=5, patience=2, min_delta=0.05)
    assert _stop_step(whole, curve, 30) == 20
    first = TrainUntilLearned(check_every_n_steps=5, patience=2, min_delta=0.05)
    _stop_step(first, {k: v for k, v in curve.items() if k <= 10}, 12)  # interrupted at step 12
    second = TrainUntilLearned(check_every_n_steps=5, patience=2, min_delta=0.05)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # a checkpoint holds plain data
    second.dev_loss = lambda trainer, module, domain: curve[trainer.global_step]
    trainer, module = _Trainer(), _Module()
    for step in range(13, 31):
        trainer.global_step = step
        second.on_train_batch_end(trainer, module, None, None, step - 1)
        if trainer.should_stop:
            break
    assert trainer.global_step == 20 and second.stages["a"]["curve"] == whole.stages["a"]["curve"]
    with pytest.raises(ValueError, match=r"another budget rule .*'patience': \(2, 3\)"):
        TrainUntilLearned(check_every_n_steps=5, patience=3, min_delta=0.05).load_state_dict(first.state_dict())


def test_the_rule_needs_dev_rows_before_any_training(tmp_path):
    from crma_lightning.data.datamodule import SequentialDomainDataModule

    with pytest.raises(ValueError, match=r"set data.dev_rows > 0"):
        TrainUntilLearned().check_data(SequentialDomainDataModule(domains=["prose"]))
    with pytest.raises(ValueError, match=r"dev_rows=-1 is invalid"):
        SequentialDomainDataModule(domains=["prose"], dev_rows=-1)


# ---------------------------------------------------------------------------------------------- real runs
SCRIPT = {"prose": [3.0, 2.9, 2.95, 2.97, 2.99, 2.0, 2.0, 2.0], "code": [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3]}
"""Dev loss per check (every 2 steps): prose stops at step 10 (best at 4, then 3 checks without improvement),
code improves up to the 16-step cap."""


def _scripted(self, trainer, module, domain):
    return SCRIPT[domain][trainer.global_step // 2 - 1] if trainer.global_step else 3.5


class _SigtermAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.sent and pl_module.current_task == "prose" and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def _run(run_dir: Path, extra=(), every=None):
    from crma_lightning.data.datamodule import SequentialDomainDataModule
    from crma_lightning.model.continual_lm import ContinualLM
    from crma_lightning.run.runner import ContinualRunner

    trainer = {"accelerator": "cpu", "max_steps": 16, "enable_progress_bar": False, "enable_model_summary": False}
    rule = TrainUntilLearned(check_every_n_steps=2, patience=3, min_delta=0.01)
    runner = ContinualRunner(
        run_dir=run_dir, trainer_kwargs=trainer, callbacks=[rule, *extra], checkpoint_every_n_steps=every
    )
    model = ContinualLM(model_config=TINY_LLAMA_CONFIG, optimizer=partial(torch.optim.AdamW, lr=0.01))
    data = SequentialDomainDataModule(
        domains=["prose", "code"], max_length=32, batch_size=4, max_chars_per_domain=6000, max_eval_rows=8, dev_rows=8
    )
    runner.run(model, data)
    return json.loads((run_dir / "report.json").read_text()), (run_dir / "report.md").read_text(), data


def test_a_run_stops_each_stage_on_its_dev_loss_and_reports_the_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainUntilLearned, "dev_loss", _scripted)
    report, markdown, data = _run(tmp_path / "run")
    stages = report["budget"]["stages"]
    assert stages["prose"]["steps"] == 10 and stages["prose"]["stopped_early"]
    assert stages["code"]["steps"] == 16 and not stages["code"]["stopped_early"]
    assert report["timings"]["stages"]["prose"]["steps"] == 10
    assert report["budget"]["rule"] == {"check_every_n_steps": 2, "patience": 3, "min_delta": 0.01, "min_steps": 0}
    assert "## Stage budgets" in markdown and "| prose | 10 | yes |" in markdown
    # The dev rows were held back from training and are not the held-out rows.
    assert len(data.dev_sets["prose"]) == 8
    train_ids = {tuple(r) for r in data.train_sets["prose"]["input_ids"]}
    assert not train_ids & {tuple(r) for r in data.dev_sets["prose"]["input_ids"]}


def test_a_run_resumed_mid_stage_stops_at_the_same_step(tmp_path, monkeypatch):
    from crma_lightning.run.interrupts import RunInterrupted

    monkeypatch.setattr(TrainUntilLearned, "dev_loss", _scripted)
    with pytest.raises(RunInterrupted):
        _run(tmp_path / "run", extra=[_SigtermAt(5)], every=2)
    report, _, _ = _run(tmp_path / "run", every=2)
    assert report["budget"]["stages"]["prose"]["steps"] == 10 and report["budget"]["stages"]["code"]["steps"] == 16
    assert [s for s, _ in report["budget"]["stages"]["prose"]["curve"]] == [2, 4, 6, 8, 10]
