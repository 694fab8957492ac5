"""The continual benchmark (benchmarks/continual.py) end to end at smoke-test size: runs, files, fields."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
MODES = ["NAIVE", "FROZEN", "MODULAR", "CRMA-shared"]


def _load_benchmark():
    sys.path.insert(0, str(BENCH_DIR))  # the script imports its helpers (_runs, _results, ...) by name
    spec = importlib.util.spec_from_file_location("crma_bench_continual", BENCH_DIR / "continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, value


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    bench = _load_benchmark()
    root = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--domains", "prose", "code", "--out", str(root / "out"), "--cache-dir", str(root / "cache")]
    payload = bench.main(argv)
    return bench, root, argv, payload


def test_tiny_run_writes_complete_results(tiny_results):
    _, root, _, payload = tiny_results
    out = root / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == payload
    # Every setting ran once per seed through the runner, each in its own run directory.
    assert payload["setup"]["seeds"] == [0, 1]
    for seed in ("0", "1"):
        runs = payload["per_seed"][seed]["runs"]
        assert list(runs) == MODES
        for mode, run in runs.items():
            assert run["status"] == "complete", (seed, mode)
            assert (Path(run["run_dir"]) / "report.json").is_file()
            assert len(run["loss_matrix"]) == 3 and run["step_time"]["timed_steps"] > 0
    # Seed order rotates, so no mode always takes the first turn.
    assert payload["per_seed"]["0"]["order"][0] != payload["per_seed"]["1"]["order"][0]
    # The base model was pretrained once and cached with its settings.
    base = payload["setup"]["base_model"]
    assert Path(base["path"], "pretrain.json").is_file() and base["pretrain"]["cached"] is False


def test_every_field_is_finite_or_null_with_a_reason(tiny_results):
    _, _, _, payload = tiny_results
    reasons = payload["null_reasons"]
    for path, value in _leaves({k: v for k, v in payload.items() if k != "null_reasons"}):
        if value is None:
            assert path in reasons, f"{path} is null without a reason"
        elif isinstance(value, float):
            assert math.isfinite(value), path
    assert not [p for p, r in reasons.items() if "unexplained" in r]
    # FWT is undefined (future domains are not evaluated) and says so.
    assert payload["per_seed"]["0"]["runs"]["NAIVE"]["fwt"] is None
    assert "future domains" in reasons["/per_seed/0/runs/NAIVE/fwt"]


def test_aggregates_pairs_and_targets_are_present(tiny_results):
    _, root, _, payload = tiny_results
    agg = payload["aggregates"]
    for mode in MODES:
        for key in ("drift_mean_pct", "base_relative_forgetting_mean_pct", "plasticity_mean", "grad_var", "grad_peak"):
            entry = agg["modes"][mode][key]
            assert entry["n"] == 2 and math.isfinite(entry["mean"]) and math.isfinite(entry["std"]), (mode, key)
        assert agg["modes"][mode]["step_median_ms"]["mean"] > 0
    for pair in ("CRMA-shared_vs_NAIVE", "MODULAR_vs_FROZEN"):
        for key in ("heldout_improvement_pct", "stability_gain", "plasticity_rel_diff_pct", "overhead"):
            assert math.isfinite(agg["pairs"][pair][key]["mean"]), (pair, key)
    # FROZEN trains each domain's own LoRA once and never touches it again: zero drift by construction.
    assert abs(agg["modes"]["FROZEN"]["drift_mean_pct"]["mean"]) < 1e-3
    assert all(isinstance(v["met"], bool) for v in payload["targets"].values())
    table = (root / "out" / "results.md").read_text()
    assert all(f"| {mode} |" in table for mode in MODES)


def test_step_interleaving_does_not_change_the_numbers(tiny_results):
    """Round-robin threads give the same losses as one run after another (nothing global leaks)."""
    bench, root, argv, payload = tiny_results
    sequential = bench.main([*argv[:-4], "--seeds", "1", "--interleave", "run", "--out", str(root / "seq"),
                             "--cache-dir", str(root / "cache")])  # fmt: skip
    assert sequential["setup"]["base_model"]["pretrain"]["cached"] is True
    for mode in MODES:
        a = payload["per_seed"]["0"]["runs"][mode]
        b = sequential["per_seed"]["0"]["runs"][mode]
        assert a["loss_matrix"] == b["loss_matrix"], mode
        assert a["grad"]["var_run"] == pytest.approx(b["grad"]["var_run"], rel=1e-6), mode


def test_refuses_to_mix_with_earlier_runs(tiny_results):
    bench, _, argv, _ = tiny_results
    with pytest.raises(SystemExit, match="already holds runs"):
        bench.main(argv)
