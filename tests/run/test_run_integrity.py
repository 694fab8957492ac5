"""Run integrity: the after-training commands verify a run's files as ``fit`` does, and a run directory has one owner.

One finished two-stage CRMA run (module fixture) is copied for each test that damages it.
``docs/reliability.md`` maps every case to its test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fit_runs import (
    config,
    copy_run,
    fail_mid_stage_two,
    files_of,
    interrupt_stage_two,
    long_config,
    overwrite_inside_tensors,
    report_of,
    run_main,
    subprocess_env,
    write_config,
)

from crma_lightning.cli import main
from crma_lightning.run.checkpoints import CheckpointStore
from crma_lightning.run.manifest import Manifest

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def command(capsys, *args: str) -> tuple[int, str]:
    """An after-training command in-process: (exit code, its one ``error:`` line or the whole stderr)."""
    capsys.readouterr()
    code = 0
    try:
        main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("[crma_lightning] error:")]
    return code, errors[0] if len(errors) == 1 else err


def after_training_commands(run_dir: Path, out: Path) -> dict[str, list[str]]:
    return {
        "evaluate": ["evaluate", "--run", str(run_dir), "--out", str(out / "eval")],
        "generate": ["generate", "--run", str(run_dir), "--task", "prose", "--max_new_tokens", "2", "Hi"],
        "export": ["export", "--run", str(run_dir), "--task", "prose", "--format", "merged", "--drop_crma",
                   str(out / "export")],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- 1: one loader
def test_after_training_commands_refuse_a_damaged_checkpoint(finished, tmp_path, capsys):
    run_dir, _ = copy_run(finished, tmp_path)
    damaged = run_dir / "checkpoints" / "stage-02-code.ckpt"
    overwrite_inside_tensors(damaged)  # torch.load still accepts it; only the manifest's sha256 tells
    for name, args in after_training_commands(run_dir, tmp_path).items():
        code, line = command(capsys, *args)
        assert code == 2, (name, line)
        assert f"cannot read checkpoint {damaged}: its content does not match the sha256" in line, (name, line)
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_a_corrupt_manifest_is_refused_by_every_command_and_never_rebuilt(finished, tmp_path, capsys):
    run_dir, cfg = copy_run(finished, tmp_path)
    manifest = Manifest(run_dir).path
    manifest.write_text('{"manifest_version": 1, "files": {"checkpoints/stage-01-pro')  # torn
    before = files_of(run_dir)
    for name, args in after_training_commands(run_dir, tmp_path).items():
        code, line = command(capsys, *args)
        assert code == 2, (name, line)
        assert f"{manifest} is corrupt" in line and "cannot read checkpoint" in line, (name, line)
    code, stderr = run_main(cfg, capsys)  # fit's resume: refused too, not "no readable checkpoint, start over"
    assert code == 2 and f"{manifest} is corrupt" in stderr, stderr
    assert files_of(run_dir) == before, "a refused command must leave the run (and its manifest) untouched"


def test_evaluate_exits_3_on_a_non_finite_loss_as_fit_does(finished, tmp_path, capsys):
    run_dir, _ = copy_run(finished, tmp_path)
    path = run_dir / "checkpoints" / "stage-01-prose.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if "lora_B" in k and "prose" in k)
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))  # a diverged adapter
    torch.save(ckpt, path)
    Manifest(run_dir).record(path)  # written by the run itself: the hash matches, the numbers are NaN
    with pytest.warns(UserWarning, match="non-finite held-out loss"):
        code, stderr = command(capsys, "evaluate", "--run", str(run_dir), "--stage", "1")
    assert code == 3, stderr
    assert "finished with non-finite results" in stderr and "Traceback" not in stderr
    report = report_of(run_dir / "evaluation")
    assert report["status"].startswith("evaluated (non-finite evaluation: prose after stage 1 (prose) = nan")
    assert report["loss_matrix"]["values"][1][0] == "nan"


def test_evaluate_reproduces_fit_on_the_verified_files(finished, tmp_path, capsys):
    code, stderr = command(capsys, "evaluate", "--run", str(finished), "--out", str(tmp_path / "eval"))
    assert code == 0, stderr
    got, want = report_of(tmp_path / "eval"), report_of(finished)
    for g_row, w_row in zip(got["loss_matrix"]["values"], want["loss_matrix"]["values"], strict=True):
        assert g_row == pytest.approx(w_row, abs=1e-5)
    assert got["metrics"]["bwt"] == pytest.approx(want["metrics"]["bwt"], abs=1e-5)


def test_stage_file_names_are_parsed_by_the_store_that_writes_them(tmp_path):
    store = CheckpointStore(tmp_path)
    store.dir.mkdir()
    domains = ["prose", "my-code-2", "stage-3"]
    for stage, domain in enumerate(domains):
        store.stage(stage, domain).write_bytes(b"x")
    for other in ("stage-xx-notes.ckpt", "stage-00-zero.ckpt", "last.ckpt", "stage-01-prose.ckpt.tmp"):
        (store.dir / other).write_bytes(b"x")
    found = store.stage_checkpoints()
    assert [(c.stage, c.domain) for c in found] == [(1, "prose"), (2, "my-code-2"), (3, "stage-3")]
    assert [c.path for c in found] == [store.stage(i, d) for i, d in enumerate(domains)]


# ---------------------------------------------------------------------------------------------- 2: base identity
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"seed": 3}, "base_seed: checkpoint 0 vs now 3"),  # a base from model_config: the seed draws its weights
        ({"dtype": "bfloat16"}, "dtype: checkpoint 'float32' vs now 'bfloat16'"),
    ],
)
def test_a_changed_base_is_refused_on_resume_and_after_training(finished, tmp_path, capsys, change, reason):
    run_dir, _ = copy_run(finished, tmp_path)
    (run_dir / "checkpoints" / "stage-02-code.ckpt").unlink()  # stage 2 to redo: resume from stage 1
    before = files_of(run_dir)
    cfg = config(run_dir)
    cfg["model"]["init_args"].update(change)
    code, stderr = run_main(write_config(tmp_path / "changed.yaml", cfg), capsys)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "cannot resume from" in lines[0] and reason in lines[0], stderr
    assert files_of(run_dir) == before
    # A config.yaml edited to the other base: the after-training commands refuse the checkpoint too.
    text = (run_dir / "config.yaml").read_text()
    key, value = next(iter(change.items()))
    old = {"seed": "seed: 0", "dtype": "dtype: float32"}[key]
    assert old in text
    (run_dir / "config.yaml").write_text(text.replace(old, f"{key}: {value}", 1))
    code, line = command(capsys, "evaluate", "--run", str(run_dir), "--stage", "1", "--out", str(tmp_path / "e"))
    assert code == 2 and "does not fit the run's model" in line and reason in line, line


def test_checkpoints_written_before_the_base_identity_was_recorded_still_resume():
    from crma_lightning.model.identity import identity_differences

    now = {"model": "m", "base_seed": 0, "dtype": "float32", "adapter": "crma"}
    assert identity_differences({"model": "m", "adapter": "crma"}, now) == []
    assert identity_differences({"model": "m", "adapter": "crma", "base_seed": 1}, now) == [
        "base_seed: checkpoint 1 vs now 0"
    ]


# ---------------------------------------------------------------------------------------------- 3: run lock
def test_a_live_run_holds_the_run_directory_and_a_killed_one_leaves_a_stale_lock(finished, tmp_path, capsys):
    import os
    import signal
    import socket
    import subprocess
    import sys


    run_dir, cfg = copy_run(finished, tmp_path)
    (run_dir / "checkpoints" / "stage-02-code.ckpt").unlink()  # work left to do: stage 2
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from crma_lightning.run.lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_of(run_dir)
        code, stderr = run_main(cfg, capsys)
        assert code == 2, stderr
        lines = [line for line in stderr.splitlines() if "error:" in line]
        assert len(lines) == 1, stderr
        assert f"run directory {run_dir} is in use by another crma-lightning run (PID {holder.pid} on host " in lines[0]
        assert socket.gethostname() in lines[0]
        assert files_of(run_dir) == before, "a refused second run must write nothing"
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without releasing: its lock file stays
        holder.wait()
    lock_file = run_dir / ".crma_lightning.lock"
    assert str(holder.pid) in lock_file.read_text()
    capsys.readouterr()
    try:
        main(["fit", "--config", str(cfg)])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    out = capsys.readouterr().out
    assert f"the previous run (PID {holder.pid} on host" in out and "was killed without a clean stop" in out, out
    assert not lock_file.exists(), "a finished run releases and removes its lock"
    assert report_of(run_dir)["loss_matrix"] == report_of(finished)["loss_matrix"]


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    import os

    from crma_lightning.run.lock import RunDirectoryLocked, RunLock

    with RunLock(tmp_path / "new-run") as first:
        assert first.previous is None and (tmp_path / "new-run" / ".crma_lightning.lock").is_file()
        with pytest.raises(RunDirectoryLocked, match=f"PID {os.getpid()} on host "):
            RunLock(tmp_path / "new-run").acquire()
    assert not (tmp_path / "new-run" / ".crma_lightning.lock").exists()
    with RunLock(tmp_path / "new-run") as again:  # free again
        assert again.previous is None


# ---------------------------------------------------------------------------------------------- 4: fail before work
GPT2_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ({"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": -0.001}}}, {},
         "Invalid learning rate: -0.001"),
        ({"crma_gate_lr": -1.0}, {}, "crma_gate_lr=-1.0 is invalid: expected a learning rate >= 0"),
        ({}, {"max_length": 256}, "data.max_length=256 is above the model's context: max_position_embeddings=128"),
        ({"model_config": GPT2_CONFIG, "adapter": "lora"}, {"max_length": 65},
         "data.max_length=65 is above the model's context: max_position_embeddings=64 (GPT2LMHeadModel)"),
        ({"lora": {"r": 40}}, {}, "LoRA r=40 is above the width of model.layers.0.self_attn."),
    ],
    ids=["negative_lr", "negative_crma_lr", "max_length_llama", "max_length_gpt2", "lora_rank"],
)  # fmt: skip
def test_bad_settings_fail_before_anything_is_written(finished, tmp_path, capsys, model, data, message):
    fresh = tmp_path / "fresh"
    code, stderr = run_main(write_config(tmp_path / "fresh.yaml", config(fresh, model=model, data=data)), capsys)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr, stderr
    assert not fresh.exists()
    # The same setting on a resume of an existing run: refused too, and the run keeps its bytes.
    run_dir, _ = copy_run(finished, tmp_path)
    (run_dir / "checkpoints" / "stage-02-code.ckpt").unlink()
    before = files_of(run_dir)
    code, stderr = run_main(write_config(tmp_path / "resume.yaml", config(run_dir, model=model, data=data)), capsys)
    assert code == 2 and message in stderr, stderr
    assert files_of(run_dir) == before


def test_a_changed_batch_size_on_a_mid_stage_resume_is_refused_before_anything_is_written(tmp_path, capsys):

    run_dir, cfg = fail_mid_stage_two(tmp_path, capsys)  # last.ckpt after 1 step of 4 rows in stage 2
    before = files_of(run_dir)
    cfg["data"]["batch_size"] = 3
    code, stderr = run_main(write_config(tmp_path / "c3.yaml", cfg), capsys)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    assert f"cannot resume mid-stage from {run_dir / 'checkpoints' / 'last.ckpt'}: the checkpoint consumed 4 rows, " \
           "not a whole number of global batches of 3" in lines[0]  # fmt: skip
    assert files_of(run_dir) == before, "config.yaml and the report must keep their bytes"


# ---------------------------------------------------------------------------------------------- 5: data content
def test_a_domain_file_replaced_mid_run_is_refused_on_resume(tmp_path, capsys):
    import json

    notes = tmp_path / "notes.jsonl"

    def write_notes(word: str) -> None:
        rows = [{"text": f"{word} note {i}: the {word} of line {i} is {i * 7 % 13}."} for i in range(200)]
        notes.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write_notes("first")
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config(run_dir, domains=[{"name": "notes", "path": str(notes)}, "code"]))
    code, stderr = run_main(cfg, capsys)
    assert code == 0, stderr
    digest = report_of(run_dir)["data"]["notes"].get("rows_sha256")
    (run_dir / "checkpoints" / "stage-02-code.ckpt").unlink()  # stage 2 to redo
    before = files_of(run_dir)
    write_notes("second")  # same path, same size class, other text
    code, stderr = run_main(cfg, capsys)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "cannot resume from" in lines[0], stderr
    assert digest and f"data.content.notes: checkpoint '{digest}' vs now '" in lines[0], lines[0]
    assert "data.content.code" not in lines[0]
    assert files_of(run_dir) == before
    write_notes("first")  # the original text: resumes
    code, stderr = run_main(cfg, capsys)
    assert code == 0, stderr


# ---------------------------------------------------------------------------------------------- 6: resume choices
def _lr(cfg: dict, lr: float) -> dict:
    cfg["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}
    return cfg


def test_an_abandoned_branch_is_set_aside_and_never_resumed(finished, tmp_path, capsys):
    from crma_lightning.cli.fit import RunFailed

    run_dir, _ = copy_run(finished, tmp_path)
    stage1 = run_dir / "checkpoints" / "stage-01-prose.ckpt"
    old_stage2 = (run_dir / "checkpoints" / "stage-02-code.ckpt").read_bytes()
    # A new branch from stage 1 with another lr, killed (here: a failing hook) in stage 2.
    failing = _lr(config(run_dir, model={"fail_step": 1}, model_class="fault_injection.FailingLM"), 0.002)
    with pytest.raises(RunFailed, match="simulated bug"):
        run_main(write_config(tmp_path / "branch.yaml", failing), capsys, "--ckpt_path", str(stage1))
    assert not (run_dir / "checkpoints" / "stage-02-code.ckpt").exists(), "the old branch's stage 2 is still there"
    aside = list((run_dir / "abandoned").glob("*/checkpoints/stage-02-code.ckpt"))
    assert len(aside) == 1 and aside[0].read_bytes() == old_stage2, "the old branch is kept, not deleted"
    assert list((run_dir / "abandoned").glob("*/adapters/stage-02-code.safetensors"))
    # The same settings without --ckpt_path: resume: auto continues the new branch, with its lr.
    code, stderr = run_main(write_config(tmp_path / "again.yaml", _lr(config(run_dir), 0.002)), capsys)
    assert code == 0, stderr
    ckpt = torch.load(run_dir / "checkpoints" / "stage-02-code.ckpt", map_location="cpu", weights_only=True)
    assert {g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {0.002}


def test_a_complete_run_resumed_with_other_settings_says_so_and_keeps_its_config(finished, tmp_path, capsys):
    run_dir, _ = copy_run(finished, tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    try:
        main(["fit", "--config", str(write_config(tmp_path / "c.yaml", _lr(config(run_dir), 0.5)))])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    out = capsys.readouterr().out
    assert "is already complete: nothing to train" in out and "model.init_args.optimizer" in out, out
    assert (run_dir / "config.yaml").read_bytes() == before, "config.yaml must stay what the run trained with"


def test_max_steps_below_the_step_reached_mid_stage_is_refused(tmp_path, capsys):
    from crma_lightning.cli.fit import RunFailed

    cfg = config(
        tmp_path / "run", model={"fail_step": 2}, model_class="fault_injection.FailingLM",
        run={"checkpoint_every_n_steps": 1},
    )  # fmt: skip
    with pytest.raises(RunFailed, match="simulated bug"):
        run_main(write_config(tmp_path / "c.yaml", cfg), capsys)  # last.ckpt at step 2 of stage 2
    before = files_of(tmp_path / "run")
    cfg = config(tmp_path / "run", steps=1, run={"checkpoint_every_n_steps": 1})
    code, stderr = run_main(write_config(tmp_path / "c1.yaml", cfg), capsys)
    assert code == 2, stderr
    assert "stage 2 (code) already ran 2 optimizer steps, more than max_steps=1" in stderr, stderr
    assert files_of(tmp_path / "run") == before


# ---------------------------------------------------------------------------------------------- 8: honest reports
def test_a_diverged_run_says_its_gradient_statistics_are_undefined(tmp_path, capsys):
    model = {"max_nonfinite_steps": 0, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e6}}}
    cfg = config(tmp_path / "run", model=model, steps=4)
    with pytest.warns(UserWarning, match="non-finite held-out loss"):
        code, stderr = run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert code == 3, stderr
    report = report_of(tmp_path / "run")
    markdown = (tmp_path / "run" / "report.md").read_text()
    stages = report["gradients"]["stages"]
    assert any(s["nonfinite_steps"] for s in stages.values()), stages
    for name, s in stages.items():
        bad, steps = s["nonfinite_steps"], s["steps"]
        assert f"| {name} | {steps} | {bad} |" in markdown, markdown
        if bad:
            assert f"**{name}: {bad} of {steps} gradient norms were NaN/inf.**" in markdown
        if steps - bad - s["warmup_steps"] < 2:
            assert s["var"] is None and s["std"] is None, s  # not 0.000000: undefined
    assert "0.000000" not in markdown


def test_a_killed_run_is_named_at_the_next_start_and_timings_add_up(tmp_path, capsys):
    import signal


    cfg = long_config(tmp_path, "run")
    run_dir = tmp_path / "run"
    code, _ = interrupt_stage_two(tmp_path, cfg, run_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert report_of(run_dir)["status"] == "running"  # what a kill leaves behind
    killed_total = report_of(run_dir)["timings"]["total_s"]
    capsys.readouterr()
    try:
        main(["fit", "--config", str(cfg)])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    out = capsys.readouterr().out
    assert "the previous run (PID " in out and "was killed without a clean stop" in out, out
    report = report_of(run_dir)
    assert report["status"] == "complete"
    [killed] = report["killed_runs"]
    assert killed["status_then"] == "running" and killed["holder"].startswith("PID ")
    assert "A previous invocation was killed without a clean stop: PID " in (run_dir / "report.md").read_text()
    timings = report["timings"]
    assert timings["total_s"] > timings["this_invocation_s"] and timings["total_s"] >= killed_total


# ---------------------------------------------------------------------------------------------- 7: environment
def test_checkpoints_are_not_staged_in_tmpdir(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))  # a missing (or full) $TMPDIR
    code, stderr = run_main(write_config(tmp_path / "c.yaml", config(tmp_path / "run")), capsys)
    assert code == 0, stderr
    assert report_of(tmp_path / "run")["completed_stages"] == 2


@pytest.mark.parametrize("fault", ["full_disk", "no_permission"])
def test_a_failed_checkpoint_write_names_the_checkpoint_file(tmp_path, capsys, monkeypatch, fault):
    import builtins
    import errno

    import crma_lightning.run.checkpoints as checkpoints

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")  # as write(2) reports it: no file name

        def __getattr__(self, name):
            return getattr(self.f, name)

    def faulty_open(path, mode="r", *args, **kwargs):
        if "stage-02" in str(path) and "w" in mode:
            if fault == "no_permission":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return FullDisk(builtins.open(path, mode, *args, **kwargs))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", faulty_open, raising=False)
    run_dir = tmp_path / "run"
    code, stderr = run_main(write_config(tmp_path / "c.yaml", config(run_dir)), capsys)
    assert code == 2, stderr
    target = run_dir / "checkpoints" / ".stage-02-code.ckpt.tmp"
    reason = "No space left on device" if fault == "full_disk" else "Permission denied"
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert lines == [f"[crma_lightning] error: {reason}: {target}"], stderr
    report = report_of(run_dir)
    assert report["status"].startswith("failed") and report["completed_stages"] == 1
    assert (run_dir / "checkpoints" / "stage-01-prose.ckpt").is_file() and not target.exists()


def test_atomic_writes_and_checkpoints_are_fsynced(tmp_path, monkeypatch):
    import os
    import stat

    from crma_lightning.adapters.serialization import atomic_write
    from crma_lightning.run.checkpoints import LocalCheckpointIO

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "report.json", lambda tmp: Path(tmp).write_text("{}"))
    assert synced == ["file", "dir"], "the file's bytes, then the rename"
    synced.clear()
    LocalCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, tmp_path / "checkpoints" / ".x.ckpt.tmp")
    assert synced == ["file"]
    assert torch.load(tmp_path / "checkpoints" / ".x.ckpt.tmp", weights_only=True)["w"].shape == (3,)


# ---------------------------------------------------------------------------------------------- 10: messages
def test_malformed_yaml_names_its_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args: {adapter: lora\ndata: [\n")
    code, stderr = run_main(bad, capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert lines == [f"[crma_lightning] error: config file {bad} is not valid YAML: line 3, column 5: "
                     "expected ',' or '}', but got ':'"], stderr  # fmt: skip
    assert "<unicode string>" not in stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "fine"}\n{"text": "bad \x01 control"}\n',
         "line 2 is not valid JSON: Invalid control character at column 15"),
        (b"   \n\n  \t\n", "holds only whitespace (no rows)"),
    ],
    ids=["control_character", "whitespace_only"],
)  # fmt: skip
def test_bad_jsonl_messages_are_whole(tmp_path, capsys, content, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    cfg = config(tmp_path / "run", domains=[{"name": "d", "path": str(data)}, "code"])
    code, stderr = run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "domain 'd': " in lines[0] and message in lines[0], stderr
    assert "corresponds to no data" not in stderr and not (tmp_path / "run").exists()


def test_the_refusal_for_other_domains_or_sources_is_short_and_names_the_change(finished, tmp_path, capsys):
    run_dir, _ = copy_run(finished, tmp_path)
    code, stderr = run_main(write_config(tmp_path / "o.yaml", config(run_dir, domains=["code", "prose"])), capsys)
    assert code == 2
    [line] = [line for line in stderr.splitlines() if "error:" in line]
    assert "domains: checkpoint ['prose', 'code'] vs now ['code', 'prose']" in line
    assert len(line) < 400, (len(line), line)  # was 1,367 characters: every domain's source listed twice
    changed = [{"name": "prose", "builtin": "prose", "template": "Text: {text}"}, "code"]
    code, stderr = run_main(write_config(tmp_path / "s.yaml", config(run_dir, domains=changed)), capsys)
    assert code == 2
    [line] = [line for line in stderr.splitlines() if "error:" in line]
    assert "data.sources.prose.template: checkpoint None vs now 'Text: {text}'" in line, line
    assert "data.sources.code" not in line and len(line) < 600, line


# ---------------------------------------------------------------------------------------------- 9: README demo
def test_ci_checks_the_readme_demo_with_the_kernels_the_readme_names():
    import importlib.util
    import re

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("readme_demo", root / "benchmarks" / "readme_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = " ".join(f"{k}={v}" for k, v in module.PINNED_KERNELS.items())
    ci = (root / ".ci" / "run").read_text()
    exported = re.search(r"^export (.+)$", ci, re.MULTILINE)
    assert exported and exported.group(1).split() == pins.split(), "CI must run the demo with the README's pins"
    demo_lines = [line for line in ci.splitlines() if line.startswith("crma-lightning fit")]
    assert demo_lines and ci.index(exported.group(0)) < ci.index(demo_lines[0]), "pinned before the demo runs"
    assert ci.index("unset " + " ".join(module.PINNED_KERNELS)) > ci.index("readme_demo.py --check")
    assert f"`{pins}`" in (root / "README.md").read_text(), "the README names the pins that reproduce its numbers"
