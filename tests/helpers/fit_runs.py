"""Tiny runs of ``crma-lightning fit``: their configs, running them (in-process or as a process), reading them back.

Shared by the run, CLI, method and routing tests. ``subprocess_env`` puts this folder on ``PYTHONPATH`` so a
subprocess can load ``fault_injection.FailingLM`` by its class path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.cli import main
from crma_lightning.cli.fit import RunFailed

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]
CONFIGS = ROOT / "configs"

TINY_MODEL = TINY_LLAMA_CONFIG


LONG_DOMAINS = ["prose", {"name": "code", "builtin": "code", "max_steps": 150}, "arithmetic"]


STAGE2_STEPS = 150


EVERY = 10  # run.checkpoint_every_n_steps of the signal runs


PROCESS_TIMEOUT = 300


def config(
    run_dir: Path,
    *,
    domains: list[Any] | None = None,
    steps: int = 3,
    model_class: str = "crma_lightning.ContinualLM",
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A tiny run: llama hidden 32 x 2 layers, byte tokenizer, built-in domains of ~6000 characters."""
    return {
        "seed_everything": 0,
        "run": {"dir": str(run_dir), **(run or {})},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": steps,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **(trainer or {}),
        },
        "model": {
            "class_path": model_class,
            "init_args": {
                "model_config": dict(TINY_MODEL),
                "adapter": "crma",
                "task_adapters": "per_task",
                **(model or {}),
            },
        },
        "data": {
            "domains": domains if domains is not None else ["prose", "code"],
            "max_length": 32,
            "batch_size": 4,
            "max_chars_per_domain": 6000,
            "max_eval_rows": 8,
            **(data or {}),
        },
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def long_config(tmp_path: Path, name: str) -> Path:
    cfg = config(tmp_path / name, domains=LONG_DOMAINS, steps=40, run={"checkpoint_every_n_steps": EVERY})
    return write_config(tmp_path / f"{name}.yaml", cfg)


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH", "")) if p)
    # One thread: fair on a shared machine, and the same arithmetic in every process (exact comparisons).
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_process(config_path: Path) -> subprocess.CompletedProcess:
    """``python -m crma_lightning fit --config <config_path>`` to completion."""
    cmd = [sys.executable, "-m", "crma_lightning", "fit", "--config", str(config_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=PROCESS_TIMEOUT)


def run_main(config_path: Path, capsys, *extra: str) -> tuple[int, str]:
    """The console entry point in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = 0
    try:
        with mock.patch.object(sys, "argv", ["crma-lightning"]):  # pytest's own arguments are not ours
            main(["fit", "--config", str(config_path), *extra])
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else (0 if exit_info.code is None else 1)
    return code, capsys.readouterr().err


def report_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "report.json").read_text())


def results(report: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on interruptions or on which process ran it: everything but timings and paths."""
    return {k: report[k] for k in ("loss_matrix", "metrics", "gradients", "nonfinite_steps", "completed_stages")}


def temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if ".tmp" in p.name]


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)  # no pickle: plain tensors and containers


def interrupt_stage_two(tmp_path: Path, config_path: Path, run_dir: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start the run, send ``sig`` once stage 2 has written a periodic checkpoint; (exit code, stderr)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "crma_lightning", "fit", "--config", str(config_path)]
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, env=subprocess_env())
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        # "stage 2/3" is printed after stage 1's last.ckpt was deleted, so a last.ckpt seen after it
        # is stage 2's own periodic checkpoint (step 10 of 150): the signal lands mid-stage.
        while not ("stage 2/3: code" in out.read_text() and (run_dir / "checkpoints" / "last.ckpt").exists()):
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (exit code {proc.returncode}) before stage 2 could be interrupted; "
                    f"stage 2 must be longer than the polling delay. stderr:\n{err.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"stage 2 did not write a periodic checkpoint within {PROCESS_TIMEOUT} s")
            time.sleep(0.02)
        proc.send_signal(sig)
        code = proc.wait(timeout=PROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, err.read_text()


def fit(path: Path, cfg: dict[str, Any]) -> int:
    """``crma-lightning fit --config path`` in-process; the exit code."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        with mock.patch.object(sys, "argv", ["crma-lightning"]):
            main(["fit", "--config", str(path)])
    except SystemExit as exit_info:
        return exit_info.code if isinstance(exit_info.code, int) else 1
    except RunFailed:  # exit code 1 with its traceback (raised out of the entry point)
        return 1
    return 0


def copy_run(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run, and its config file (pointing at the copy)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir, write_config(tmp_path / "c.yaml", config(run_dir))


def files_of(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}


def fail_mid_stage_two(tmp_path: Path, capsys) -> tuple[Path, dict]:
    """Stage 2 fails after its first step, leaving a mid-stage last.ckpt (lr 0.01)."""
    model = {"fail_step": 1, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}}
    cfg = config(
        tmp_path / "run", model=model, model_class="fault_injection.FailingLM", run={"checkpoint_every_n_steps": 1}
    )
    with pytest.raises(RunFailed, match="simulated bug"):  # exit 1 with its traceback
        run_main(write_config(tmp_path / "c.yaml", cfg), capsys)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 1
    cfg["model"]["class_path"] = "crma_lightning.ContinualLM"
    del cfg["model"]["init_args"]["fail_step"]
    return tmp_path / "run", cfg


def overwrite_inside_tensors(path: Path) -> None:
    """64 bytes inside every tensor record: still a valid zip that torch.load(weights_only=True) accepts."""
    with zipfile.ZipFile(path) as archive:
        records = [(i.header_offset, i) for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64]
    data = bytearray(path.read_bytes())
    for offset, info in records:
        start = offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header, then the bytes
        data[start : start + 64] = b"\x7f" * 64
    path.write_bytes(bytes(data))
    load_checkpoint(path)  # the damage is invisible to torch.load


def tiny_config(tmp_path: Path, run_dir: Path, steps: int = 3) -> Path:
    cfg = {
        "seed_everything": 0,
        "run": {"dir": str(run_dir)},
        "trainer": {
            "accelerator": "cpu",
            "max_steps": steps,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "crma_lightning.ContinualLM",
            "init_args": {
                "model_config": TINY_LLAMA_CONFIG,
                "adapter": "crma",
                "task_adapters": "per_task",
            },
        },
        "data": {
            "domains": ["prose", "arithmetic"],
            "max_length": 32,
            "batch_size": 4,
            "max_chars_per_domain": 6000,
            "max_eval_rows": 8,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def print_config(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "crma_lightning", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
