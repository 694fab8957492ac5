"""Launching the 2-process CPU jobs (``tests/helpers/dist_*job.py``) and comparing their results."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent
REPO = HELPERS.parents[1]
JOB_TIMEOUT_S = 240


_DIST_ENV = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
)


def load_job(name: str):
    """``tests/helpers/<name>.py`` (a job script the distributed tests also run in subprocesses) as a module."""
    spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(strategy: str, out: Path, job: str = "dist_job") -> dict:
    """Run ``tests/helpers/<job>.py strategy out`` in its own session; kill the whole group on timeout."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = out / "job.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(HELPERS / f"{job}.py"), strategy, str(out)],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Lightning's second process joins this group: one killpg ends both
        )
        try:
            rc = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    if rc != 0:
        pytest.fail(
            f"{strategy} job failed (rc={rc}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-40:])
        )
    return json.loads((out / "result.json").read_text())


def grad_norms(run_dir: Path, tag: str = "grad/norm") -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]


def assert_matrices_close(actual, expected, abs_tol):
    assert len(actual) == len(expected)
    for row_a, row_e in zip(actual, expected):
        for a, e in zip(row_a, row_e):
            assert (a is None) == (e is None), (actual, expected)
            if a is not None:
                assert a == pytest.approx(e, abs=abs_tol), (actual, expected)
