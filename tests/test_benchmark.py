"""The continual benchmark (benchmarks/continual.py) end to end at smoke-test size: runs, files, fields."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
MODES = ["NAIVE", "FROZEN", "MODULAR", "CRMA-shared", "REPLAY", "EWC", "O-LORA"]  # the default settings
ROUTED = ["FROZEN", "MODULAR"]  # evaluated task-agnostically too (perplexity routing)
SEQUENTIAL = ["NAIVE", "MODULAR", "REPLAY", "EWC"]  # the interleaving check: adapters, CRMA, a sampler, a Fisher


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
    for pair in ("CRMA-shared_vs_NAIVE", "MODULAR_vs_FROZEN", "REPLAY_vs_NAIVE", "EWC_vs_NAIVE", "O-LORA_vs_FROZEN"):
        for key in ("heldout_improvement_pct", "stability_gain", "plasticity_rel_diff_pct", "overhead"):
            assert math.isfinite(agg["pairs"][pair][key]["mean"]), (pair, key)
    # FROZEN trains each domain's own LoRA once and never touches it again: zero drift by construction.
    assert abs(agg["modes"]["FROZEN"]["drift_mean_pct"]["mean"]) < 1e-3
    assert all(isinstance(v["met"], bool) for v in payload["targets"].values())
    table = (root / "out" / "results.md").read_text()
    assert all(f"| {mode} |" in table for mode in MODES)


def test_methods_and_routing_are_reported(tiny_results):
    _, root, _, payload = tiny_results
    agg, runs = payload["aggregates"], payload["per_seed"]["0"]["runs"]
    for mode in ROUTED:  # per-task adapters: routed numbers next to the oracle ones
        routing = runs[mode]["routing"]
        assert routing["mode"] == "perplexity" and routing["prefix_tokens"] == 8
        assert 0.0 <= routing["routing_accuracy_mean"] <= 1.0
        assert math.isfinite(routing["drift_mean_routed"]) and math.isfinite(routing["drift_mean_oracle_same_targets"])
        assert len(routing["loss_matrix_routed"]) == 3
        assert agg["modes"][mode]["routing_accuracy_mean"]["n"] == 2
    for mode in ("NAIVE", "CRMA-shared", "REPLAY", "EWC", "O-LORA"):  # no task identity needed: routed = oracle
        routing = runs[mode]["routing"]
        assert routing["mode"] == "none" and routing["drift_mean_routed"] == runs[mode]["drift_mean"]
        assert routing["routing_accuracy_mean"] is None
    # Method state: the replay buffer and EWC's Fisher + anchors take memory; plain LoRA has no method.
    assert runs["REPLAY"]["method"]["name"] == "replay" and runs["REPLAY"]["method"]["state_bytes"] > 0
    assert runs["EWC"]["method"]["name"] == "ewc" and runs["EWC"]["method"]["state_bytes"] > 0
    assert runs["O-LORA"]["method"]["name"] == "olora"
    assert runs["NAIVE"]["method"]["state_bytes"] is None
    assert "no method" in payload["null_reasons"]["/per_seed/0/runs/NAIVE/method/state_bytes"]
    # Each method has its cost against its plain-LoRA counterpart.
    for pair in ("REPLAY_vs_NAIVE", "EWC_vs_NAIVE", "O-LORA_vs_FROZEN"):
        assert math.isfinite(agg["pairs"][pair]["overhead"]["mean"]), pair
    setup = payload["setup"]["modes"]
    assert setup["REPLAY"]["method"]["buffer_size"] == 16 and setup["EWC"]["method"]["lam"] == 1000.0
    assert setup["MODULAR"]["crma"] == {"form": "write", "norm": "spectral", "g_max": 0.1}
    table = (root / "out" / "results.md").read_text()
    assert "= oracle (no routing needed)" in table and "Routed evaluation" in table


def test_settings_are_selectable(tiny_results):
    bench = tiny_results[0]
    base = ["--tiny", "--out", "unused"]
    assert bench.parse_args(base).settings == MODES
    assert bench.parse_args([*base, "--settings", "MODULAR,NAIVE", "EWC"]).settings == ["NAIVE", "MODULAR", "EWC"]
    ablation = bench.parse_args([*base, "--settings", "ablation"]).settings
    assert ablation == ["NAIVE", "FROZEN", "MODULAR-v1", "MODULAR-mix", "CRMA-shared-v1", "CRMA-shared-mix"]
    with pytest.raises(SystemExit):
        bench.parse_args([*base, "--settings", "NOPE"])
    import _runs  # the helpers the benchmark imported (on sys.path)

    cfg = {"mix_g_max": 0.5}
    mix, v1 = _runs.crma_config("MODULAR-mix", cfg), _runs.crma_config("CRMA-shared-v1", cfg)
    assert (mix.form, mix.g_max) == ("mix", 0.5) and (v1.form, v1.norm, v1.g_max) == ("write", "frobenius", 0.1)


def test_step_interleaving_does_not_change_the_numbers(tiny_results):
    """Round-robin threads give the same losses as one run after another (nothing global leaks)."""
    bench, root, argv, payload = tiny_results
    sequential = bench.main([*argv[:-4], "--seeds", "1", "--interleave", "run", "--settings", *SEQUENTIAL,
                             "--out", str(root / "seq"), "--cache-dir", str(root / "cache")])  # fmt: skip
    assert sequential["setup"]["base_model"]["pretrain"]["cached"] is True
    for mode in SEQUENTIAL:
        a = payload["per_seed"]["0"]["runs"][mode]
        b = sequential["per_seed"]["0"]["runs"][mode]
        assert a["loss_matrix"] == b["loss_matrix"], mode
        assert a["grad"]["var_run"] == pytest.approx(b["grad"]["var_run"], rel=1e-6), mode


def test_refuses_to_mix_with_earlier_runs(tiny_results):
    bench, _, argv, _ = tiny_results
    with pytest.raises(SystemExit, match="already holds runs"):
        bench.main(argv)


def test_base_l0_is_reported_per_domain(tiny_results):
    _, root, _, payload = tiny_results
    l0 = {d: [] for d in ("prose", "code")}
    for seed in payload["per_seed"].values():
        for run in seed["runs"].values():
            assert run["base_losses"] == dict(zip(run["domains"], run["loss_matrix"][0]))  # row 0 = base
            for d, v in run["base_losses"].items():
                l0[d].append(v)
    base = payload["aggregates"]["base_loss"]
    for d, values in l0.items():
        assert base[d]["n"] == len(values) == 2 * len(MODES)
        assert base[d]["mean"] == pytest.approx(sum(values) / len(values))
        # One base, one held-out set per seed: an adapter at initialisation changes nothing.
        assert base[d]["max"] - base[d]["min"] < 1e-4
    table = (root / "out" / "results.md").read_text()
    assert (
        f"Base L[0] (held-out loss of the base before any stage, per domain): prose {base['prose']['mean']:.4f}"
        in table
    )


def test_pretrain_builtin_must_be_disjoint_from_the_domains(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "out"
    argv = ["--tiny", "--domains", "prose", "code", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(
        ValueError, match=r"--pretrain-builtin \['code'\] overlaps the benchmark domains \['prose', 'code'\]"
    ):
        bench.main([*argv, "--pretrain-builtin", "arithmetic", "code"])
    with pytest.raises(ValueError, match=r"--pretrain-builtin \['medical'\]: not built-in domains"):
        bench.main([*argv, "--pretrain-builtin", "medical"])
    assert not out.exists() and not (tmp_path / "cache").exists()  # refused before any work

    from _bench_data import check_texts_disjoint

    def write(name, texts):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return str(path)

    general = [{"name": "prose", "path": write("prose", ["a b c", "d e f"])}]
    clean = {"name": "medical", "path": write("m-train", ["x"]), "holdout_path": write("m-hold", ["y"])}
    check_texts_disjoint(general, [clean])  # nothing shared: passes
    copy = {"name": "prose2", "path": write("p-train", ["z"]), "holdout_path": write("p-hold", ["d e f", "q"])}
    with pytest.raises(ValueError, match=r"'prose' shares 1 text record\(s\) with benchmark domain 'prose2'"):
        check_texts_disjoint(general, [clean, copy])


def test_a_refused_overwrite_run_keeps_the_previous_results(tmp_path, monkeypatch):
    bench = _load_benchmark()
    out = tmp_path / "out"
    (out / "seed0").mkdir(parents=True)
    (out / "seed0" / "report.json").write_text("{}")  # a finished earlier run

    def shared(general, specs):
        raise ValueError("--pretrain-builtin 'arithmetic' shares 1 text record(s) with benchmark domain 'prose'")

    monkeypatch.setattr(bench, "check_texts_disjoint", shared)
    argv = ["--tiny", "--domains", "prose", "code", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match=r"shares 1 text record"):
        bench.main([*argv, "--pretrain-builtin", "arithmetic", "--overwrite"])
    assert (out / "seed0" / "report.json").read_text() == "{}"  # refused before the old runs were deleted
