"""The dev sweep (benchmarks/sweep.py): the selection rule, the grid file, a --tiny sweep on dev, and --chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sweep

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_selection_rule():
    # final loss: lowest wins; within the tolerance the a-priori point wins, else the first tied one.
    assert sweep.select([3.0, 2.0, 2.5], "final_loss_mean", 0.0, 0, "a_priori") == 1
    assert sweep.select([3.0, 2.0, 2.0004], "final_loss_mean", 0.0005, 2, "a_priori") == 2
    assert sweep.select([3.0, 2.0, 2.0004], "final_loss_mean", 0.0005, 0, "a_priori") == 1
    # routing accuracy: highest wins; tie_break first = the first tied point in grid order (the smaller P).
    assert sweep.select([0.5, 0.9, 0.895], "routing_accuracy_mean", 0.01, 2, "first") == 1
    assert sweep.select([None, 0.4, 0.3], "routing_accuracy_mean", 0.0, 0, "a_priori") == 1
    # task score (AP): highest wins, ties within the tolerance go to the a-priori point.
    assert sweep.select([0.2, 0.25, 0.245], "ap", 0.01, 0, "a_priori") == 1
    assert sweep.select([0.2, 0.25, 0.245], "ap", 0.01, 2, "a_priori") == 2
    with pytest.raises(ValueError, match="no grid point completed"):
        sweep.select([None, None], "final_loss_mean", 0.0, 0, "a_priori")


def test_the_committed_grid_is_valid_and_bad_grids_are_refused(tmp_path):
    groups = sweep.load_grid(BENCH / "sweep_grid.yaml")
    assert set(groups) == {"EWC", "REPLAY", "O-LORA", "ROUTING"}
    # The a-priori values are the benchmark's own defaults (default preset).
    from benchmarks import continual

    args = continual.parse_args(["--out", "unused"])
    for g in groups.values():
        assert all(getattr(args, k) == v for k, v in g["a_priori"].items()), g
    # The task suite's grid: its a-priori values are the task preset's, and P stays inside every prompt.
    tasks = sweep.load_grid(BENCH / "sweep_grid_tasks.yaml")
    assert set(tasks) == set(groups) and {g["metric"] for k, g in tasks.items() if k != "ROUTING"} == {"ap"}
    args = continual.parse_args(["--suite", "tasks", "--out", "unused"])
    for g in tasks.values():
        assert all(getattr(args, k) == v for k, v in g["a_priori"].items()), g
    from crma_lightning.data.builtin_tasks import TASKS

    shortest = min(len(f"{instruction} abc\n= ") for instruction, _ in TASKS.values())
    assert max(p["prefix_tokens"] for p in tasks["ROUTING"]["grid"]) < shortest
    bad = tmp_path / "g.yaml"
    bad.write_text(
        "groups:\n  E: {settings: [EWC], metric: final_loss_mean, a_priori: {ewc_lam: 5}, grid: [{ewc_lam: 1}]}\n"
    )
    with pytest.raises(ValueError, match="must be one of the grid points"):
        sweep.load_grid(bad)
    bad.write_text("groups:\n  E: {settings: [EWC], metric: final_loss_mean, a_priori: {lam: 1}, grid: [{lam: 1}]}\n")
    with pytest.raises(ValueError, match="grid point"):
        sweep.load_grid(bad)


def test_tiny_sweep_runs_the_grid_on_dev_and_chosen_values_reach_the_benchmark(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "groups:\n"
        "  EWC: {settings: [EWC], metric: final_loss_mean, tolerance: 0.0, a_priori: {ewc_lam: 1000.0},\n"
        "        grid: [{ewc_lam: 1.0}, {ewc_lam: 1000.0}]}\n"
        "  ROUTING: {settings: [FROZEN, MODULAR], metric: routing_accuracy_mean, tolerance: 0.0, tie_break: first,\n"
        "            a_priori: {prefix_tokens: 8}, grid: [{prefix_tokens: 4}, {prefix_tokens: 8}]}\n"
    )
    cache, out = str(tmp_path / "cache"), tmp_path / "sweep"
    chosen = sweep.main(
        ["--tiny", "--grid", str(grid), "--out", str(out), "--", "--domains", "prose", "code", "--seeds", "1",
         "--cache-dir", cache]
    )  # fmt: skip
    assert json.loads((out / "chosen.json").read_text()) == chosen and (out / "sweep.md").is_file()
    dev = json.loads((out / "dev" / "results.json").read_text())
    assert dev["setup"]["eval_split"] == "dev"
    assert all(Path(f["holdout_path"]).name == "dev.jsonl" for f in dev["setup"]["domain_files"])
    for name, group in chosen["groups"].items():
        values = [p["value"] for p in group["points"]]
        assert None not in values, name
        best = (min if group["metric"] == "final_loss_mean" else max)(values)
        picked = next(p for p in group["points"] if p["chosen"])
        assert picked["params"] == group["chosen"]
        assert picked["value"] == best or group["chosen"] == group["a_priori"]
    # continual.py --chosen: the chosen values, and an a-priori row where they differ (here forced to differ).
    chosen["groups"]["EWC"]["chosen"] = {"ewc_lam": 1.0}
    chosen["groups"]["ROUTING"]["chosen"] = {"prefix_tokens": 8}
    path = tmp_path / "chosen.json"
    path.write_text(json.dumps(chosen))
    from benchmarks import continual

    args = continual.parse_args(["--tiny", "--out", "unused", "--chosen", str(path), "--settings", "NAIVE", "EWC"])
    assert args.settings == ["NAIVE", "EWC", "EWC-apriori"] and args.ewc_lam == 1.0 and args.prefix_tokens == 8
    payload = continual.main(
        ["--tiny", "--chosen", str(path), "--settings", "EWC", "--domains", "prose", "code", "--seeds", "1",
         "--cache-dir", cache, "--out", str(tmp_path / "test")]
    )  # fmt: skip
    modes = payload["setup"]["modes"]
    assert payload["setup"]["eval_split"] == "test"
    assert modes["EWC"]["method"]["lam"] == 1.0 and modes["EWC-apriori"]["method"]["lam"] == 1000.0
    assert payload["setup"]["chosen"]["a_priori_rows"] == ["EWC-apriori"]
    assert payload["per_seed"]["0"]["runs"]["EWC-apriori"]["status"] == "complete"
    # The dev choice against the a-priori values on test: a paired interval, in results.md's pair table.
    chosen_vs_prior = payload["intervals"]["pairs"]["EWC_vs_EWC-apriori"]["final_loss_diff"]
    runs = payload["per_seed"]["0"]["runs"]
    expected = runs["EWC"]["final_loss_mean"] - runs["EWC-apriori"]["final_loss_mean"]  # float32 sums in reports
    assert chosen_vs_prior["value"] == pytest.approx(expected, abs=1e-6)
    assert "| EWC vs EWC-apriori |" in (tmp_path / "test" / "results.md").read_text()
    with pytest.raises(SystemExit):
        continual.parse_args(["--tiny", "--out", "unused", "--chosen", str(grid)])  # not a chosen.json


def test_tiny_sweep_on_the_task_suite_chooses_by_ap_on_the_dev_prompts(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "groups:\n"
        "  REPLAY: {settings: [REPLAY], metric: ap, tolerance: 0.0, a_priori: {replay_ratio: 0.25},\n"
        "           grid: [{replay_ratio: 0.25}, {replay_ratio: 0.5}]}\n"
    )
    out = tmp_path / "sweep"
    chosen = sweep.main(
        ["--tiny", "--grid", str(grid), "--out", str(out), "--", "--suite", "tasks", "--domains", "first", "shift",
         "--seeds", "1", "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    dev = json.loads((out / "dev" / "results.json").read_text())
    assert dev["setup"]["eval_split"] == "dev" and dev["setup"]["suite"] == "tasks"
    assert all(Path(f["holdout_path"]).name == "dev.jsonl" for f in dev["setup"]["domain_files"])
    group = chosen["groups"]["REPLAY"]
    runs = dev["per_seed"]["0"]["runs"]
    values = [runs[p["setting"]]["scores"]["ap"] for p in group["points"]]
    assert [p["value"] for p in group["points"]] == values and None not in values
    best = max(values)
    assert group["chosen"] == (group["a_priori"] if values[0] == best else {"replay_ratio": 0.5})
