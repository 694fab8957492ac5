"""End to end on the task suite: `fit` with configs/tasks.yaml (tiny model, few steps) writes the score matrix;
`evaluate` recomputes it from the checkpoints; `compare` shows AP and BWT_score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def test_fit_evaluate_compare_on_the_task_suite(tmp_path, capsys):
    metric = {"name": "exact_match", "eval_rows": 4, "max_new_tokens": 3}
    overlay = {
        "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"init_args": {"model_name_or_path": None, "model_config": TINY_LLAMA_CONFIG}},
        "data": {
            "domains": [{"name": t, "builtin": t, "metric": metric} for t in ("first", "last")],
            "max_eval_rows": 8,
            "batch_size": 4,
        },
    }
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(overlay))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "crma_lightning", "fit", "--config", "configs/tasks.yaml", "--config"]
    cmd += [str(tmp_path / "small.yaml"), "--run.dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    scores = report["score_matrix"]
    assert scores["metric"] == {"first": "exact_match", "last": "exact_match"}
    assert len(scores["values"]) == 3 and scores["values"][1][1] is None
    assert report["data"]["first"]["score_rows"] == 4 and report["config"]["model"]["adapter"] == "crma"

    main(["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "ev")])
    again = json.loads((tmp_path / "ev" / "report.json").read_text())["score_matrix"]
    assert again["values"] == scores["values"]  # greedy and seeded: the same scores from the checkpoints
    assert again["ap"] == scores["ap"] and again["bwt_score"] == scores["bwt_score"]

    capsys.readouterr()
    main(["compare", str(run_dir), str(tmp_path / "ev"), "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "AP (task score)" in table and "BWT_score" in table
    runs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]
    assert [r["ap"] for r in runs] == [scores["ap"], again["ap"]]
