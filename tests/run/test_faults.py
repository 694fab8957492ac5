"""Faults and bad input: real signals, atomic writes, corrupt checkpoints, non-finite steps, bad data and
configuration, reproducibility and safe loading. ``docs/reliability.md`` maps every case to its test.

Runs that must be real processes (signals, exit codes of the console script) are started with
``python -m crma_lightning``; everything else calls the same entry point, :func:`crma_lightning.cli.main`,
in-process, which is faster and checks the same exit codes and messages.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from fit_runs import (
    EVERY,
    STAGE2_STEPS,
    TINY_MODEL,
    config,
    interrupt_stage_two,
    load_checkpoint,
    long_config,
    report_of,
    results,
    run_main,
    run_process,
    temp_files,
    write_config,
)

# Stage 2 is long (150 steps, several seconds even on an idle machine) so that a signal sent as soon
# as stage 2 has written its first periodic checkpoint (step 10) always lands in the middle of it.


# ---------------------------------------------------------------------------------------------- signals
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    """The long run without interruption, run once for the signal and reproducibility tests."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_process(long_config(tmp, "ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"report": report_of(tmp / "ref"), "run_dir": tmp / "ref"}


def check_interrupted_run(run_dir: Path, reference_report: dict[str, Any], code: int, stderr: str, sig) -> None:
    assert code == 128 + sig, f"exit code {code}, expected {128 + sig}; stderr:\n{stderr[-3000:]}"
    assert f"interrupted by {sig.name}" in stderr and "Run the same command again to resume" in stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert EVERY <= ckpt["global_step"] < STAGE2_STEPS, f"signal did not land mid-stage: step {ckpt['global_step']}"
    assert ckpt["callbacks"]["_RunState"]["completed"] == 1
    assert ckpt["continual_model"]["current_task"] == "code"
    assert ckpt["optimizer_states"], "a resumable checkpoint keeps the optimizer state"
    assert not temp_files(run_dir), temp_files(run_dir)
    partial = report_of(run_dir)
    assert partial["status"] == "interrupted" and partial["completed_stages"] == 1
    # Stage 1's results are on disk, number for number those of the uninterrupted run.
    assert partial["loss_matrix"]["values"] == reference_report["loss_matrix"]["values"][:2]
    assert (run_dir / "checkpoints" / "stage-01-prose.ckpt").is_file()
    assert not (run_dir / "checkpoints" / "stage-02-code.ckpt").exists()


def check_resumed_run(proc: subprocess.CompletedProcess, run_dir: Path, reference_report: dict[str, Any]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1/3" not in proc.stdout, "a finished stage was trained again"
    assert "stage 2/3: code" in proc.stdout and "stage 3/3: arithmetic" in proc.stdout
    resumed = report_of(run_dir)
    assert resumed["status"] == "complete"
    # Exact (tolerance 0) on CPU: per-stage seeds, restored RNG states and a sampler that resumes at
    # the batch where the run stopped give the uninterrupted run's arithmetic, step for step.
    assert results(resumed) == results(reference_report)
    assert not (run_dir / "checkpoints" / "last.ckpt").exists(), "last.ckpt is superseded by the stage checkpoints"
    assert not temp_files(run_dir)


def test_sigint_mid_stage_saves_and_the_same_command_resumes_exactly(tmp_path, reference):
    config_path, run_dir = long_config(tmp_path, "run"), tmp_path / "run"
    code, stderr = interrupt_stage_two(tmp_path, config_path, run_dir, signal.SIGINT)
    check_interrupted_run(run_dir, reference["report"], code, stderr, signal.SIGINT)
    step = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    proc = run_process(config_path)
    check_resumed_run(proc, run_dir, reference["report"])
    assert report_of(run_dir)["timings"]["stages"]["code"]["steps"] == STAGE2_STEPS > step


def test_sigterm_then_corrupt_last_checkpoint_falls_back_to_the_stage_checkpoint(tmp_path, reference):
    config_path, run_dir = long_config(tmp_path, "run"), tmp_path / "run"
    code, stderr = interrupt_stage_two(tmp_path, config_path, run_dir, signal.SIGTERM)
    check_interrupted_run(run_dir, reference["report"], code, stderr, signal.SIGTERM)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk
    proc = run_process(config_path)
    assert f"skipping checkpoint {last}" in proc.stderr, proc.stderr[-3000:]
    # Stage 2 restarts from stage 1's checkpoint with stage 2's seed: again the uninterrupted results.
    check_resumed_run(proc, run_dir, reference["report"])


def test_same_config_and_seed_give_the_same_report_and_files_load_without_pickle(tmp_path, reference):
    from safetensors.torch import load_file

    proc = run_process(long_config(tmp_path, "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Exact on CPU (tolerance 0): loss matrix, metrics, gradient statistics, skipped steps.
    assert results(report_of(tmp_path / "again")) == results(reference["report"])
    ckpts = sorted((reference["run_dir"] / "checkpoints").glob("*.ckpt"))
    adapters = sorted((reference["run_dir"] / "adapters").glob("*.safetensors"))
    assert len(ckpts) == 3 and len(adapters) == 3
    for path in ckpts:
        assert load_checkpoint(path)["state_dict"], path
    for path in adapters:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


class _SignalDuringValidation(L.Callback):
    """Sends SIGTERM to this process from the middle of the evaluation that follows stage 1."""

    def __init__(self) -> None:
        self.sent = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.sent and pl_module.current_task == "prose" and batch_idx == 0:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def tiny_runner_parts(tmp_path: Path, domains=("prose", "code"), every=None, callbacks=None, **runner_kwargs):
    from functools import partial

    from crma_lightning.data.datamodule import SequentialDomainDataModule
    from crma_lightning.model.continual_lm import ContinualLM
    from crma_lightning.run.runner import ContinualRunner

    trainer = {"accelerator": "cpu", "max_steps": 3, "enable_progress_bar": False, "enable_model_summary": False}
    runner = ContinualRunner(
        run_dir=tmp_path / "run",
        trainer_kwargs=trainer,
        callbacks=callbacks,
        checkpoint_every_n_steps=every,
        **runner_kwargs,
    )
    model = ContinualLM(model_config=TINY_MODEL, adapter="crma", optimizer=partial(torch.optim.AdamW, lr=0.01))
    data = SequentialDomainDataModule(
        domains=list(domains), max_length=32, batch_size=4, max_chars_per_domain=6000, max_eval_rows=8
    )
    return runner, model, data


def test_sigterm_during_evaluation_lets_the_stage_finish_and_save(tmp_path):
    """Lightning alone would raise SIGTERMException (SystemExit, exit code 0) mid-validation, unsaved."""
    from crma_lightning.run.interrupts import RunInterrupted

    callback = _SignalDuringValidation()
    runner, model, data = tiny_runner_parts(tmp_path, callbacks=[callback])
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        runner.run(model, data)
    assert callback.sent and info.value.signum == signal.SIGTERM
    stage1 = tmp_path / "run" / "checkpoints" / "stage-01-prose.ckpt"
    assert info.value.checkpoint == str(stage1) and load_checkpoint(stage1)["callbacks"]["_RunState"]["completed"] == 1
    report = report_of(tmp_path / "run")
    assert report["status"] == "interrupted" and report["completed_stages"] == 1
    assert report["loss_matrix"]["values"][1][0] is not None, "the evaluation of stage 1 was cut short"
    assert signal.getsignal(signal.SIGTERM) == handler_before, "the run must restore the signal handlers it replaced"


class _DoubleCtrlC(L.Callback):
    """Presses Ctrl+C twice in the first training step of stage 1."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs on the main thread right after the signal arrives


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    """Lightning turns the second Ctrl+C into ``exit(1)``; the driver still reports an interruption."""
    from crma_lightning.run.interrupts import RunInterrupted

    runner, model, data = tiny_runner_parts(tmp_path, callbacks=[_DoubleCtrlC()])
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as info:
        runner.run(model, data)
    assert info.value.signum == signal.SIGINT and info.value.checkpoint is None
    assert not (tmp_path / "run" / "checkpoints").exists(), "the second Ctrl+C must not wait for a save"
    report = report_of(tmp_path / "run")
    assert report["status"] == "interrupted" and report["completed_stages"] == 0
    assert signal.getsignal(signal.SIGINT) == handler_before


# ---------------------------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("target", ["stage", "last"])
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, target):
    """The save dies after writing part of its temp file: the previous good file is intact, no temp is left."""
    original = L.Trainer.save_checkpoint
    saves: list[str] = []

    def crashing_save(self, filepath, *args, **kwargs):
        name = Path(filepath).name
        saves.append(name)
        doomed = "stage-02" in name if target == "stage" else name.startswith(".last") and saves.count(name) == 2
        if doomed:
            Path(filepath).write_bytes(b"PK\x03\x04 half a zip")  # part of the file, then the disk is full
            raise OSError(28, "No space left on device (simulated)")
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", crashing_save)
    runner, model, data = tiny_runner_parts(tmp_path, every=1 if target == "last" else None)
    with pytest.raises(OSError, match="No space left"):
        runner.run(model, data)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not temp_files(tmp_path / "run"), temp_files(tmp_path / "run")
    report = report_of(tmp_path / "run")
    assert report["status"].startswith("failed: ") and "No space left" in report["status"]
    if target == "stage":
        assert report["completed_stages"] == 1
        assert load_checkpoint(checkpoints / "stage-01-prose.ckpt")["callbacks"]["_RunState"]["completed"] == 1
        assert not (checkpoints / "stage-02-code.ckpt").exists()
    else:  # the second periodic save failed: the first one (after step 1) is still there and whole
        assert report["completed_stages"] == 0
        assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 1
    monkeypatch.setattr(L.Trainer, "save_checkpoint", original)
    runner, model, data = tiny_runner_parts(tmp_path)
    resumed = runner.run(model, data)
    assert resumed["status"] == "complete" and resumed["completed_stages"] == 2


def test_crash_while_writing_the_report_keeps_the_previous_one(tmp_path, monkeypatch):
    from crma_lightning.evaluation.report import write_report

    good = {"status": "running", "domains": ["a"], "completed_stages": 0, "total_stages": 1}
    good["loss_matrix"] = {"values": [[1.0]]}
    write_report(tmp_path, good)
    before = (tmp_path / "report.json").read_text()
    real_write_text = Path.write_text

    def dying_write_text(self, data, *args, **kwargs):
        if ".tmp" in self.name:
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half the file, then a crash
            raise OSError(5, "I/O error (simulated)")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dying_write_text)
    with pytest.raises(OSError, match="I/O error"):
        write_report(tmp_path, {**good, "status": "complete", "completed_stages": 1})
    monkeypatch.undo()
    assert (tmp_path / "report.json").read_text() == before
    assert json.loads(before)["status"] == "running"
    assert not temp_files(tmp_path)


def test_stale_temp_files_of_a_killed_process_are_removed_at_the_next_start(tmp_path):
    runner, model, data = tiny_runner_parts(tmp_path, domains=("prose",))
    stale = [tmp_path / "run" / "checkpoints" / ".last.ckpt.tmp", tmp_path / "run" / ".report.json.tmp123"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert runner.run(model, data)["status"] == "complete"
    assert not temp_files(tmp_path / "run")


# ---------------------------------------------------------------------------------------------- corrupt resume
def _garbage(path: Path) -> None:
    path.write_text("this is not a checkpoint\n")


def _truncated(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])


def _foreign(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)  # a readable checkpoint, but not ours


def _pickled_object(path: Path) -> None:
    torch.save({"callbacks": {"_RunState": Path("x")}}, path)  # unpickling it would construct an object


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_garbage, "not a complete PyTorch checkpoint"),
        (_truncated, "not a complete PyTorch checkpoint"),
        (_foreign, "not a crma_lightning checkpoint"),
        (_pickled_object, "not a weights-only checkpoint"),
    ],
)
def test_an_explicit_unreadable_resume_path_is_a_clear_error(tmp_path, capsys, make, reason):
    bad = tmp_path / "given.ckpt"
    make(bad)
    path = write_config(tmp_path / "c.yaml", config(tmp_path / "run", run={"resume": str(bad)}))
    code, stderr = run_main(path, capsys)
    assert code == 2, stderr
    assert f"cannot resume from {bad}: {reason}" in stderr
    assert not (tmp_path / "run").exists(), "nothing is written before the checkpoint is known to be usable"


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("poison", ["nan_loss", "inf_grad"])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, capsys, poison):
    model = {
        "poison_task": "code",
        "poison_from_step": 1,
        "poison_steps": 2,
        "poison": poison,
        "max_nonfinite_steps": 3,
    }
    cfg = config(tmp_path / "run", steps=6, model_class="fault_injection.PoisonedLM", model=model)
    code, stderr = run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert code == 0, stderr
    report = report_of(tmp_path / "run")
    assert report["status"] == "complete"
    assert report["nonfinite_steps"]["skipped"] == 2 and report["nonfinite_steps"]["per_stage"] == {"code": 2}
    assert report["nonfinite_steps"]["skipped_steps"] == [1, 2]
    assert report["gradients"]["stages"]["code"]["nonfinite_steps"] == 2
    assert report["gradients"]["stages"]["prose"]["nonfinite_steps"] == 0
    # A skipped step changes nothing: the adapters, and so every evaluated loss, stay finite.
    matrix = report["loss_matrix"]["values"]
    evaluated = matrix[0] + [v for s, row in enumerate(matrix[1:], 1) for v in row[:s]]
    assert all(v is not None for v in evaluated), matrix


def test_consecutive_nonfinite_steps_stop_the_run_with_exit_code_1(tmp_path):
    """Through the real command, with the research subclass given as ``model.class_path``."""
    from safetensors.torch import load_file

    model = {"poison_task": "code", "poison_from_step": 2, "max_nonfinite_steps": 3}
    cfg = config(tmp_path / "run", steps=8, model_class="fault_injection.PoisonedLM", model=model)
    proc = run_process(write_config(tmp_path / "c.yaml", cfg))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stopped: 3 consecutive optimizer steps had a non-finite loss or gradient" in proc.stderr
    assert "step 4 of stage 'code'" in proc.stderr
    report = report_of(tmp_path / "run")
    assert report["status"].startswith("failed: 3 consecutive") and report["completed_stages"] == 1
    assert report["nonfinite_steps"]["skipped"] == 3 and report["nonfinite_steps"]["skipped_steps"] == [2, 3, 4]
    # The finished stage stays on disk, loadable without pickle.
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "stage-01-prose.ckpt")
    assert ckpt["callbacks"]["_RunState"]["completed"] == 1
    assert load_file(tmp_path / "run" / "adapters" / "stage-01-prose.safetensors")
    assert not (tmp_path / "run" / "checkpoints" / "stage-02-code.ckpt").exists()


def test_an_error_during_training_exits_1_with_a_traceback_not_as_a_config_error(tmp_path):
    cfg = config(tmp_path / "run", steps=4, model_class="fault_injection.FailingLM", model={"fail_step": 1})
    proc = run_process(write_config(tmp_path / "c.yaml", cfg))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "simulated bug in a research hook" in proc.stderr
    assert "[crma_lightning] error:" not in proc.stderr  # not presented as a configuration error
    report = report_of(tmp_path / "run")
    assert report["status"].startswith("failed") and report["completed_stages"] == 1


# ---------------------------------------------------------------------------------------------- bad data
GOOD_ROWS = [{"text": f"good example number {i} " * 4} for i in range(60)]


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


BAD_FILES = {
    "empty": (b"", r"domain 'bad': file .*bad\.jsonl is empty"),
    "no_text_field": (
        _jsonl([{"body": "x " * 20}] * 30),
        r"domain 'bad' \(train, .*bad\.jsonl\): no text field 'text'.*\['body'\]",
    ),
    "not_utf8": (
        _jsonl(GOOD_ROWS) + b'{"text": "caf\xe9"}\n',
        r"domain 'bad': .*bad\.jsonl line 61 is not valid UTF-8",
    ),
    "blank_texts": (_jsonl([{"text": "  \n "}] * 30), r"domain 'bad' \(train, .*bad\.jsonl\) has no non-empty text"),
    "not_a_string": (
        _jsonl([*GOOD_ROWS, {"text": 42}]),
        r"domain 'bad' \(train\): .*bad\.jsonl row 60: field 'text' is int",
    ),
    "smaller_than_a_batch": (
        _jsonl([{"text": f"tiny {i}"} for i in range(10)]),
        r"domain 'bad' has 1 training rows of 32 tokens \(from file\(s\) .*bad\.jsonl\), fewer than one global batch",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_is_rejected_before_training(tmp_path, capsys, case):
    """The bad domain comes last: had it been checked lazily, stage 1 would have trained first."""
    content, message = BAD_FILES[case]
    (tmp_path / "bad.jsonl").write_bytes(content)
    domains = ["prose", {"name": "bad", "path": str(tmp_path / "bad.jsonl")}]
    code, stderr = run_main(write_config(tmp_path / "c.yaml", config(tmp_path / "run", domains=domains)), capsys)
    assert code == 2, stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "run").exists(), "nothing trained, nothing written"


def test_rows_without_text_are_dropped_with_a_warning_and_counted(tmp_path, capsys):
    rows = [*GOOD_ROWS, {"body": "no text field"}, {"text": None}, {"text": "   "}]
    (tmp_path / "some.jsonl").write_bytes(_jsonl(rows))
    domains = [{"name": "some", "path": str(tmp_path / "some.jsonl"), "holdout_fraction": 0.05}, "prose"]
    cfg = config(tmp_path / "run", domains=domains, steps=2)
    with pytest.warns(UserWarning, match=r"domain 'some' \(\w+\): dropped \d+ of \d+ rows .*some\.jsonl row 6[0-2]"):
        code, stderr = run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert code == 0, stderr
    dropped = report_of(tmp_path / "run")["data"]["some"]["dropped_rows"]
    assert dropped.get("train_blank", 0) + dropped.get("holdout_blank", 0) == 3


# ---------------------------------------------------------------------------------------------- bad config
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["model"]["init_args"].update(lora={"target_modules": ["qkv"]}),
            "target_modules=['qkv'] matches no",
        ),
        (lambda c: c["data"].update(domains=["prose", "code", "prose"]), "duplicate domain name 'prose'"),
        (
            lambda c: c["data"].update(domains=["prose", {"name": "c", "builtin": "code", "max_steps": -2}]),
            "max_steps=-2",
        ),
        (
            lambda c: c["data"].update(domains=[{"name": "p", "builtin": "prose", "sorce": "x"}]),
            "domain 'p' has unknown keys ['sorce']",
        ),
        (lambda c: c["data"].update(max_eval_rows=0), "max_eval_rows=0 is invalid"),
        (lambda c: c["data"].update(max_chars_per_domain=-5), "max_chars_per_domain=-5 is invalid"),
        (lambda c: c["trainer"].update(max_epochs=-3), "max_epochs"),
        (lambda c: c["run"].update(checkpoint_every_n_steps=0), "checkpoint_every_n_steps=0"),
        (lambda c: c["model"]["init_args"].update(max_nonfinite_steps=-1), "max_nonfinite_steps=-1"),
        (lambda c: c["run"].update(resume="no/such/file.ckpt"), "resume='no/such/file.ckpt' is invalid"),
    ],
    ids=[
        "lora_targets_match_nothing",
        "duplicate_domains",
        "negative_domain_budget",
        "unknown_domain_key",
        "zero_eval_rows",
        "negative_char_budget",
        "negative_epochs",
        "zero_checkpoint_interval",
        "negative_nonfinite_limit",
        "missing_resume_file",
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, capsys, edit, message):
    """Complements tests/cli/test_fit.py (unknown top-level keys, wrong types, lora.r=0, trainer.max_steps<0)."""
    cfg = config(tmp_path / "run")
    edit(cfg)
    code, stderr = run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert code == 2, stderr
    assert message in stderr
    if "[crma_lightning] error:" in stderr:  # raised by our code (not a parser error): the cause comes first
        assert "Does not validate against any of the Union subtypes" not in stderr
    assert not (tmp_path / "run").exists(), "a configuration error must not leave a run directory behind"


def test_resuming_with_a_config_that_matters_differently_is_refused_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = write_config(tmp_path / "c.yaml", config(run_dir))
    assert run_main(first, capsys)[0] == 0
    snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    changes = {
        "model": (lambda c: c["model"]["init_args"]["model_config"].update(hidden_size=64), "model: checkpoint"),
        "domain order": (
            lambda c: c["data"].update(domains=["code", "prose"]),
            "domains: checkpoint ['prose', 'code']",
        ),
        "adapter": (
            lambda c: c["model"]["init_args"].update(adapter="lora"),
            "adapter: checkpoint 'crma' vs now 'lora'",
        ),
        "task adapters": (
            lambda c: c["model"]["init_args"].update(task_adapters="shared"),
            "task_adapters: checkpoint",
        ),
        "lora rank": (lambda c: c["model"]["init_args"].update(lora={"r": 4}), "lora: checkpoint {'r': 8"),
        "held-out data": (
            lambda c: c["data"].update(max_chars_per_domain=5000),
            "data.max_chars_per_domain: checkpoint",
        ),
        "resume never": (lambda c: c["run"].update(resume="never"), "already holds checkpoints and resume='never'"),
    }
    for name, (edit, message) in changes.items():
        cfg = config(run_dir)
        edit(cfg)
        code, stderr = run_main(write_config(tmp_path / "changed.yaml", cfg), capsys)
        assert code == 2, (name, stderr)
        assert message in stderr, (name, stderr)
        if name != "resume never":
            assert "configuration changed in a way that matters" in stderr and "stage-02-code.ckpt" in stderr, name
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
        assert after == snapshot, f"{name}: a refused resume changed the run directory (config.yaml, checkpoints)"


# ---------------------------------------------------------------------------------------------- safety
def test_trust_remote_code_is_off_unless_set_and_is_passed_through(monkeypatch):
    import inspect

    import transformers

    from crma_lightning.data import tokenizer
    from crma_lightning.data.tokenizer import byte_tokenizer
    from crma_lightning.model import base_model
    from crma_lightning.model.continual_lm import ContinualLM

    assert inspect.signature(ContinualLM).parameters["trust_remote_code"].default is False
    calls: list[tuple[str, Any]] = []

    def fake_tokenizer(name, **kwargs):
        calls.append(("tokenizer", kwargs.get("trust_remote_code", "missing")))
        return byte_tokenizer()

    def fake_model(name, **kwargs):
        calls.append(("model", kwargs.get("trust_remote_code", "missing")))
        config = transformers.AutoConfig.for_model(**{**TINY_MODEL, "vocab_size": 259})
        return transformers.AutoModelForCausalLM.from_config(config)

    monkeypatch.setattr(tokenizer.AutoTokenizer, "from_pretrained", fake_tokenizer)
    monkeypatch.setattr(base_model.AutoModelForCausalLM, "from_pretrained", fake_model)
    ContinualLM(model_name_or_path="some/hub-model", adapter="lora")
    assert calls == [("tokenizer", False), ("model", False)]
    calls.clear()
    ContinualLM(model_name_or_path="some/hub-model", adapter="lora", trust_remote_code=True)
    assert calls == [("tokenizer", True), ("model", True)]


def _popen(marker: Path) -> dict[str, Any]:
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}


@pytest.mark.parametrize("where", ["yaml_tag", "optimizer", "callback", "model"])
def test_a_config_cannot_run_arbitrary_code(tmp_path, capsys, where):
    """YAML is parsed safely, and a class_path must name a subclass of the expected type.

    (Importing the module a class_path names does run that module's top-level code: a config is only
    as trustworthy as whoever wrote it - see docs/reliability.md.)
    """
    marker = tmp_path / "pwned"
    cfg = config(tmp_path / "run")
    if where == "optimizer":
        cfg["model"]["init_args"]["optimizer"] = _popen(marker)
    elif where == "callback":
        cfg["trainer"]["callbacks"] = [_popen(marker)]
    elif where == "model":
        cfg["model"] = _popen(marker)
    text = yaml.safe_dump(cfg)
    if where == "yaml_tag":
        text = text.replace(
            "seed_everything: 0", f"seed_everything: !!python/object/apply:os.system ['touch {marker}']"
        )
    (tmp_path / "c.yaml").write_text(text)
    code, _ = run_main(tmp_path / "c.yaml", capsys)
    time.sleep(0.2)  # a spawned `touch` would need a moment
    assert code != 0
    assert not marker.exists(), "the configuration executed code"
    assert not (tmp_path / "run").exists()
