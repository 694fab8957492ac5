"""Resume and run checks: --ckpt_path checks, non-finite evaluations, changed settings on resume, content hashes,
environment errors and the smaller items. ``docs/reliability.md`` maps every case to its test.

One finished two-stage run (module fixture) is copied for each test that damages or resumes it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fit_runs import (
    config,
    copy_run,
    fail_mid_stage_two,
    files_of,
    load_checkpoint,
    overwrite_inside_tensors,
    report_of,
    run_main,
    subprocess_env,
    write_config,
)
from safetensors import safe_open
from safetensors.torch import load_file

from crma_lightning.adapters import read_adapter_metadata


# ---------------------------------------------------------------------------------------------- 1: --ckpt_path
def test_ckpt_path_goes_through_the_same_checks_as_run_resume(finished, tmp_path, capsys):
    run_dir, cfg = copy_run(finished, tmp_path)
    before = files_of(run_dir)
    stage2 = str(run_dir / "checkpoints" / "stage-02-code.ckpt")
    for extra, message in [
        (["--model.init_args.adapter=lora"], "adapter: checkpoint 'crma' vs now 'lora'"),
        (["--model.init_args.lora.r=4"], "lora: checkpoint {'r': 8"),
    ]:
        code, stderr = run_main(cfg, capsys, "--ckpt_path", stage2, *extra)
        assert code == 2, stderr
        assert f"cannot resume from {stage2}: the configuration changed in a way that matters" in stderr
        assert message in stderr and "Traceback" not in stderr
    truncated, pickled = tmp_path / "truncated.ckpt", tmp_path / "pickled.ckpt"
    truncated.write_bytes(Path(stage2).read_bytes()[:5000])
    torch.save({"callbacks": {"_RunState": Path("x")}}, pickled)
    for path, reason in [(truncated, "not a complete PyTorch checkpoint"), (pickled, "not a weights-only checkpoint")]:
        code, stderr = run_main(cfg, capsys, "--ckpt_path", str(path))
        assert code == 2 and f"cannot resume from {path}: {reason}" in stderr, stderr
        assert "Traceback" not in stderr
    assert files_of(run_dir) == before, "a refused resume must leave the run directory untouched"


# ---------------------------------------------------------------------------------------------- 2: non-finite
@pytest.mark.parametrize("adapter", ["lora", "crma"])
def test_a_diverged_run_reports_nan_not_missing_and_exits_3(tmp_path, capsys, adapter):
    model = {
        "adapter": adapter,
        "max_nonfinite_steps": 0,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e6}},
    }
    cfg = config(tmp_path / "run", model=model, trainer={"log_every_n_steps": 1})
    cfg["gradient_stability"] = {"log_every_n_steps": 1}  # CRMA health on every step: it must not crash
    with pytest.warns(UserWarning, match="non-finite held-out loss"):
        code, stderr = run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert code == 3, stderr
    assert "Traceback" not in stderr and "finished with non-finite results" in stderr
    report = report_of(tmp_path / "run")
    assert report["status"].startswith("complete (non-finite evaluation: ")
    values = report["loss_matrix"]["values"]
    assert values[0] == [pytest.approx(v) for v in values[0]] and all(isinstance(v, float) for v in values[0])
    assert values[1][0] == "nan" and values[1][1] is None, "not evaluated stays null, diverged is 'nan'"
    assert report["metrics"]["plasticity"]["prose"] == "nan" and report["metrics"]["bwt"] == "nan"
    assert {"domain": "prose", "row": 1, "after": "stage 1 (prose)", "value": "nan"} in report["nonfinite_evaluations"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "| 1: prose | nan | — |" in markdown and "non-finite evaluation" in markdown


def test_nonfinite_metrics_are_marked_and_logged():
    from crma_lightning.evaluation.report import render_markdown, summarize_losses

    matrix = [[4.0, 4.0, 4.0], [2.0, 3.0, 4.0], [float("nan"), 2.0, 4.0], [3.0, 2.5, 1.0]]
    summary = summarize_losses(matrix, ["a", "b", "c"], upto=3)
    assert summary["loss_matrix"][2][0] != summary["loss_matrix"][2][0]  # NaN kept, not None
    assert summary["drift"]["a"] == pytest.approx(50.0) and summary["drift"]["b"] == pytest.approx(25.0)
    assert summary["plasticity"]["a"] == 2.0 and summary["fwt"] == pytest.approx(0.5)
    early = summarize_losses(matrix, ["a", "b", "c"], upto=2)
    assert early["drift"]["a"] != early["drift"]["a"] and early["bwt"] != early["bwt"], early  # read the NaN
    assert early["plasticity"]["b"] == 2.0
    from crma_lightning.evaluation.report import build_report

    report = build_report(
        domains=["a", "b", "c"], matrix=matrix[:3], completed_stages=2, status="complete", metrics=early,
        gradients={}, config={}, data={}, timings={}, nonfinite={},
    )  # fmt: skip
    json.dumps(report, allow_nan=False)
    assert report["metrics"]["drift_mean"] == "nan" and report["status"].startswith("complete (non-finite")
    assert "| 2: b | nan | 2.0000 | 4.0000 |" in render_markdown(report)


# ---------------------------------------------------------------------------------------------- 3: changed settings


def test_a_changed_lr_on_a_mid_stage_resume_is_applied_and_every_stage_config_is_kept(tmp_path, capsys):
    run_dir, cfg = fail_mid_stage_two(tmp_path, capsys)
    cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.002
    capsys.readouterr()
    code, stderr = run_main(write_config(tmp_path / "c2.yaml", cfg), capsys)
    assert code == 0, stderr
    report = report_of(run_dir)
    change = report["config_changes"][-1]
    assert change["stage"] == 2 and change["mid_stage"] and change["at_step"] == 1
    assert change["changes"]["model.init_args.optimizer.init_args.lr"] == [0.01, 0.002]
    assert any("lr: 0.01 -> 0.002" in line for line in change["applied_to_optimizer"]), change
    ckpt = load_checkpoint(run_dir / "checkpoints" / "stage-02-code.ckpt")
    assert {g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {0.002}, "the new lr was not applied"
    assert "lr: 0.01" in (run_dir / "configs" / "stage-01-prose.yaml").read_text()
    assert "lr: 0.002" in (run_dir / "configs" / "stage-02-code.yaml").read_text()
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()  # the latest


def test_a_changed_optimizer_class_on_a_mid_stage_resume_is_refused(tmp_path, capsys):
    run_dir, cfg = fail_mid_stage_two(tmp_path, capsys)
    before = files_of(run_dir)
    cfg["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}}
    code, stderr = run_main(write_config(tmp_path / "c2.yaml", cfg), capsys)
    assert code == 2, stderr
    assert "cannot resume mid-stage from" in stderr and "torch.optim.SGD" in stderr
    assert files_of(run_dir) == before


# ---------------------------------------------------------------------------------------------- 4: content hashes


def test_a_damaged_checkpoint_and_adapter_file_are_detected_by_hash(finished, tmp_path, capsys):
    run_dir, cfg = copy_run(finished, tmp_path)
    stage2, adapters1 = (
        run_dir / "checkpoints" / "stage-02-code.ckpt",
        run_dir / "adapters" / "stage-01-prose.safetensors",
    )
    original = adapters1.read_bytes()
    overwrite_inside_tensors(stage2)
    adapters1.write_bytes(original[: len(original) // 2])
    with pytest.warns(UserWarning) as caught:
        code, stderr = run_main(cfg, capsys)
    assert code == 0, stderr
    messages = [str(w.message) for w in caught]
    assert any(f"skipping checkpoint {stage2}: its content does not match the sha256" in m for m in messages), messages
    assert any(f"adapter file {adapters1}" in m and "rewritten from" in m for m in messages), messages
    # The rewritten file is the one the stage exported: same tensors, same metadata (safetensors writes its
    # metadata keys in hash order, which varies between processes, so bytes are not compared).
    reference = finished / "adapters" / "stage-01-prose.safetensors"
    rewritten, exported = load_file(adapters1), load_file(reference)
    assert rewritten.keys() == exported.keys() and all(torch.equal(rewritten[k], exported[k]) for k in exported)
    assert read_adapter_metadata(adapters1) == read_adapter_metadata(reference)
    assert safe_open(str(adapters1), "pt").metadata() == safe_open(str(reference), "pt").metadata()
    assert results_equal(report_of(run_dir), report_of(finished))
    overwrite_inside_tensors(stage2)
    code, stderr = run_main(cfg, capsys, "--ckpt_path", str(stage2))
    assert code == 2 and "its content does not match the sha256" in stderr


def results_equal(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("loss_matrix", "metrics", "completed_stages")) and a["status"] == "complete"


# ---------------------------------------------------------------------------------------------- 5: environment
def test_unwritable_or_full_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for run_dir, message in [
        (blocker / "run", f"{blocker} is a file, not a directory"),
        (Path("/proc/sys/crma-run"), "is not writable: no write permission on /proc/sys"),
    ]:
        code, stderr = run_main(write_config(tmp_path / "c.yaml", config(run_dir)), capsys)
        assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    real_write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name.startswith(".config.yaml.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, stderr = run_main(write_config(tmp_path / "c.yaml", config(tmp_path / "run")), capsys)
    assert code == 2 and "No space left on device:" in stderr and ".config.yaml.tmp" in stderr, stderr
    assert "Traceback" not in stderr.split("error:")[-1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model-dir", "model_name_or_path='/no/such/model-dir': no such directory"),
        ("./models/missing", "model_name_or_path='./models/missing': no such directory"),
        ("some-org/not-cached-model", "is not a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE"),
    ],
)
def test_a_missing_model_or_an_offline_hub_fails_fast_with_one_line(tmp_path, name, message):
    cfg = config(tmp_path / "run")
    cfg["model"]["init_args"] = {"model_name_or_path": name, "adapter": "lora"}
    started = time.monotonic()
    cmd = [sys.executable, "-m", "crma_lightning", "fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()
    env = {**subprocess_env(), "CRMA_DEBUG": "1"}
    debug = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and message in debug.stderr


def test_offline_without_the_flag_does_not_retry(monkeypatch):
    from crma_lightning import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert hub.pretrained_kwargs("org/model", "model_name_or_path") == {"local_files_only": True}
    assert hub.looks_like_path("../m") and not hub.looks_like_path("org/model")


# ---------------------------------------------------------------------------------------------- 6: smaller items
def test_missing_file_names_its_domain_and_files_share_one_mode(finished, tmp_path, capsys):
    domains = ["prose", {"name": "gone", "path": str(tmp_path / "missing.jsonl")}]
    code, stderr = run_main(write_config(tmp_path / "c.yaml", config(tmp_path / "run", domains=domains)), capsys)
    assert code == 2 and "domain 'gone': file '" in stderr and "missing.jsonl' does not exist" in stderr, stderr
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {
        p.name: p.stat().st_mode & 0o777 for p in finished.rglob("*") if p.is_file() and "tensorboard" not in p.parts
    }
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_typo_in_a_key_prints_the_error_not_the_usage(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", config(tmp_path / "run"))
    cmd = [sys.executable, "-m", "crma_lightning", "fit", "--config", str(cfg), "--model.init_args.adaptor=lora"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= 3 and "usage:" not in proc.stderr, proc.stderr
    assert "Option 'adaptor' is not accepted" in lines[-1] and lines[-1].startswith("[crma_lightning] error:")
