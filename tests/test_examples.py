"""Every example runs (tiny settings): the research subclass from YAML, own JSONL domains, plotting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from fit_runs import tiny_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_research_subclass_runs_from_yaml(tmp_path):
    run_dir = tmp_path / "run"
    overlay = yaml.safe_load((EXAMPLES / "anchored_crma.yaml").read_text())
    overlay["run"]["dir"] = str(run_dir)
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    config = tiny_config(tmp_path, tmp_path / "unused")
    _run(
        ["-m", "crma_lightning", "fit", "--config", str(config), "--config", str(tmp_path / "overlay.yaml")],
        PYTHONPATH=str(EXAMPLES),
    )
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "anchored_crma.AnchoredCRMA"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    penalties = [e.value for e in events.Scalars("train/anchor_penalty")]
    assert penalties and max(penalties) > 0  # the hook ran and the backbone moved away from its anchor


def test_own_domains_and_plot_report(tmp_path):
    sample, run_dir = tmp_path / "sample", tmp_path / "run"
    _run([str(EXAMPLES / "own_domains.py"), "--write-sample", str(sample)])
    assert (sample / "recipes" / "train.jsonl").exists() and (sample / "support" / "holdout.jsonl").exists()
    script = str(EXAMPLES / "own_domains.py")
    proc = _run([script, "--data-dir", str(sample), "--steps", "3", "--run-dir", str(run_dir)])
    assert "| after stage | recipes | support |" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["domains"] == ["recipes", "support"] and report["status"] == "complete"
    _run([str(EXAMPLES / "plot_report.py"), str(run_dir), "--out", str(tmp_path / "plots")])
    for name in ("loss_matrix.png", "gradients.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
