"""The continual benchmark (benchmarks/continual.py) end to end at smoke-test size: runs, files, fields."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
MODES = ["NAIVE", "FROZEN", "MODULAR", "CRMA-shared", "REPLAY", "EWC", "O-LORA"]  # the default settings
ROUTED = ["FROZEN", "MODULAR"]  # evaluated task-agnostically too (perplexity routing)
SEQUENTIAL = ["NAIVE", "MODULAR", "REPLAY", "EWC"]  # the interleaving check: adapters, CRMA, a sampler, a Fisher


def _load_benchmark():
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
    from benchmarks.lib import runs as _runs

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

    from benchmarks.lib.bench_data import check_texts_disjoint

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


def test_merged_settings_merge_the_frozen_adapters_and_the_hybrid_is_selectable(tiny_results, tmp_path):
    """MERGED-mean/-ties evaluate FROZEN's adapters merged (no training); a merge of one adapter is that adapter."""
    bench, _, _, payload = tiny_results
    from benchmarks.lib import merged as _merged
    from benchmarks.lib import results as _results
    from benchmarks.lib import runs as _runs

    frozen = payload["per_seed"]["0"]["runs"]["FROZEN"]
    raw = {"report": {}, "run_dir": frozen["run_dir"], "error": None}
    numbers = {how: _results.run_numbers(_merged.merged_raw(f"MERGED-{how}", how, 0, raw, tmp_path), 3)
               for how in ("mean", "ties")}  # fmt: skip
    for how, run in numbers.items():
        assert run["status"] == "complete" and (tmp_path / "seed0" / f"MERGED-{how}" / "report.json").is_file()
        assert run["routing"]["mode"] == "merged" and run["routing"]["drift_mean_routed"] == run["drift_mean"]
        assert math.isfinite(run["final_loss_mean"]) and isinstance(run["grad"]["var_stage_mean"], _results.Null)
    # After stage 1 the mean merge is the first task's adapter alone: FROZEN's own loss on domain 0.
    assert numbers["mean"]["loss_matrix"][1][0] == pytest.approx(frozen["loss_matrix"][1][0], rel=1e-5)
    assert numbers["ties"]["loss_matrix"][2] != numbers["mean"]["loss_matrix"][2]
    failed = _merged.merged_raw("MERGED-mean", "mean", 0, {"report": None, "error": "boom"}, tmp_path)
    assert failed["report"] is None and "FROZEN did not complete: boom" in failed["error"]
    base = ["--tiny", "--out", "unused"]
    with pytest.raises(SystemExit):  # the merge needs FROZEN's run
        bench.parse_args([*base, "--settings", "MERGED-mean"])
    assert bench.parse_args([*base, "--settings", "MERGED-ties", "FROZEN"]).settings == ["FROZEN", "MERGED-ties"]
    hybrid = {"router": "hybrid", "fallback_margin": 2.0}
    assert _runs.routing_mode("FROZEN", hybrid) == "prototype" and _runs.fallback_margin("FROZEN", hybrid) == 2.0
    assert _runs.fallback_margin("NAIVE", hybrid) is None and _runs.describe("MERGED-mean", hybrid)["merge"]["how"]


# ---------------------------------------------------------------------- protocol v3: orders, MULTITASK, task suite
def test_task_orders_are_fixed_permutations_starting_with_the_given_one():
    from benchmarks.lib.orders import task_orders

    domains = ["a", "b", "c", "d"]
    orders = task_orders(domains, 3)
    assert orders == [domains, ["d", "c", "b", "a"], ["c", "d", "a", "b"]]  # given, reversal, half rotation
    assert task_orders(domains, 3) == orders and task_orders(domains, 1) == [domains]  # deterministic, a prefix
    every = task_orders(domains, 8)  # the dihedral family: 2 T distinct orders
    assert all(sorted(o) == domains for o in every) and len({tuple(o) for o in every}) == 8
    # Orders 1-3: every domain first at most once and last at most once.
    assert len({o[0] for o in orders}) == 3 and len({o[-1] for o in orders}) == 3
    assert task_orders(["x", "y"], 2) == [["x", "y"], ["y", "x"]]
    with pytest.raises(ValueError, match=r"--orders 3: only 2 distinct fixed orders exist for 2 domains"):
        task_orders(["x", "y"], 3)
    with pytest.raises(ValueError, match=r"--orders 9: only 8 distinct"):
        task_orders(domains, 9)
    with pytest.raises(ValueError, match=r"--orders 0: expected a number of task orders >= 1"):
        task_orders(domains, 0)


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    """The task suite at smoke size, two task orders, NAIVE / FROZEN / MULTITASK, one seed."""
    bench = _load_benchmark()
    root = tmp_path_factory.mktemp("bench-v3")
    argv = ["--tiny", "--suite", "tasks", "--domains", "first", "shift", "--orders", "2", "--seeds", "1",
            "--settings", "NAIVE", "FROZEN", "MULTITASK"]  # fmt: skip
    argv += ["--out", str(root / "out"), "--cache-dir", str(root / "cache")]
    return bench, root, bench.main(argv)


def test_orders_run_in_their_own_directories_and_are_reported_per_order(tiny_v3, tiny_results):
    _, root, payload = tiny_v3
    out = root / "out"
    assert payload["setup"]["orders"] == [["first", "shift"], ["shift", "first"]]
    assert list(payload["per_seed"]) == ["order1/seed0", "order2/seed0"]
    for k, order in ((1, ["first", "shift"]), (2, ["shift", "first"])):
        group = payload["per_seed"][f"order{k}/seed0"]
        assert group["domains"] == order
        for mode, run in group["runs"].items():
            assert Path(run["run_dir"]) == out / f"order{k}" / "seed0" / mode and run["domains"] == order
            assert (Path(run["run_dir"]) / "report.json").is_file()
    # One order keeps the layout of earlier versions: <out>/seed<s>/<SETTING>, groups keyed by seed.
    _, one_root, _, one = tiny_results
    assert Path(one["per_seed"]["0"]["runs"]["NAIVE"]["run_dir"]) == one_root / "out" / "seed0" / "NAIVE"
    assert "per_order" not in one and one["setup"]["orders"] == [["prose", "code"]]
    # Per order: the order's own seed mean; over orders: their mean.
    over = payload["over_orders"]["NAIVE"]["final_loss_mean"]
    finals = [payload["per_seed"][f"order{k}/seed0"]["runs"]["NAIVE"]["final_loss_mean"] for k in (1, 2)]
    assert over["per_order"] == pytest.approx(finals) and over["mean"] == pytest.approx(sum(finals) / 2)
    assert payload["per_order"]["2"]["domains"] == ["shift", "first"]
    table = (out / "results.md").read_text()
    assert "1. first -> shift" in table and "2. shift -> first" in table
    assert "mean final held-out loss: o1 / o2" in table


def test_multitask_trains_on_the_union_and_is_read_against(tiny_v3):
    _, _, payload = tiny_v3
    g1, g2 = (payload["per_seed"][f"order{k}/seed0"]["runs"] for k in (1, 2))
    joint, naive, frozen = g1["MULTITASK"], g1["NAIVE"], g1["FROZEN"]
    assert payload["setup"]["modes"]["MULTITASK"]["data"].startswith("every stage trains on the union")
    files = payload["setup"]["multitask_domain_files"]
    assert [f["name"] for f in files] == ["first", "shift"] and all(len(f["path"]) == 2 for f in files)
    # Same base and the same held-out rows as the sequential settings: the base row is identical.
    assert joint["loss_matrix"][0] == naive["loss_matrix"][0]
    assert joint["scores"]["matrix"][0] == naive["scores"]["matrix"][0]
    # Joint training does not depend on the task order (same union, same seeds): same final losses by domain.
    assert g2["MULTITASK"]["final_losses"] == joint["final_losses"]
    # Gap to joint training closed, by hand: (NAIVE - X) / (NAIVE - MULTITASK) on the mean final loss.
    n, x, j = naive["final_loss_mean"], frozen["final_loss_mean"], joint["final_loss_mean"]
    assert n == pytest.approx(sum(naive["final_losses"].values()) / 2)
    assert frozen["gap_to_joint"]["loss"] == pytest.approx((n - x) / (n - j))
    assert naive["gap_to_joint"]["loss"] == 0.0 and joint["gap_to_joint"]["loss"] == pytest.approx(1.0)


def test_task_suite_results_carry_the_score_matrix(tiny_v3, tiny_results):
    _, root, payload = tiny_v3
    assert payload["setup"]["suite"] == "tasks" and not payload["setup"]["routing"]["enabled"]
    assert (
        payload["setup"]["routing"]["router"] is None
        and "routing is off" in payload["null_reasons"]["/setup/routing/router"]
    )
    # The suite reports its test half by default: the first 100 generated held-out prompts of each task.
    assert payload["setup"]["eval_split"] == "test"
    assert all(Path(f["holdout_path"]).name == "test.jsonl" for f in payload["setup"]["domain_files"])
    for key, group in payload["per_seed"].items():
        for mode, run in group["runs"].items():
            scores = run["scores"]
            matrix = scores["matrix"]  # S[s][j] for the domains seen by stage s (future ones: null)
            assert (
                len(matrix) == 3
                and matrix[1][1] is None
                and "not evaluated" in payload["null_reasons"][f"/per_seed/{key}/runs/{mode}/scores/matrix/1/1"]
            )
            assert all(0.0 <= v <= 1.0 for row in matrix for v in row if v is not None) and None not in matrix[2]
            assert scores["ap"] == pytest.approx(sum(scores["matrix"][-1]) / 2), mode
            assert scores["bwt_score"] == pytest.approx(scores["matrix"][2][0] - scores["matrix"][1][0]), mode
            assert scores["final"] == dict(zip(group["domains"], scores["matrix"][-1]))
    agg = payload["aggregates"]["modes"]["FROZEN"]
    assert agg["ap"]["n"] == 2 and set(agg["final_score"]) == {"first", "shift"}
    table = (root / "out" / "results.md").read_text()
    assert "| AP | BWT_score |" in table and "final score: first / shift" in table
    # Loss domains have no metric: the score fields are null with the reason.
    loss_only = tiny_results[3]
    assert loss_only["per_seed"]["0"]["runs"]["NAIVE"]["scores"]["ap"] is None
    assert "no domain has a task metric" in loss_only["null_reasons"]["/per_seed/0/runs/NAIVE/scores/ap"]


def test_finished_runs_rebuilds_the_v3_tables_from_the_run_directories(tiny_v3):
    _, root, _ = tiny_v3
    from benchmarks import finished_runs

    text = finished_runs.main(["--out", str(root / "out")])
    written = (root / "out" / "results.md").read_text()
    start = written.index("\nTask orders (fixed")
    end = written.index("\n\n\nOrder 1:")  # the bootstrap intervals follow: finished_runs.py does not compute them
    assert text.startswith("Complete orders: 1, 2 (2 runs of each setting).")
    assert text[text.index("\nTask orders (fixed") :].rstrip("\n") == written[start:end].rstrip("\n")
    # --intervals: each order's bootstrap intervals, the same as the benchmark wrote (same draws).
    with_intervals = finished_runs.main(["--out", str(root / "out"), "--intervals"])
    assert with_intervals[with_intervals.index("\n\n\nOrder 1:") :].strip() == written[end:].strip()
    # Orders run apart (e.g. --chosen's a-priori rows in order 1 only): such rows stay out of the pooled tables.
    import shutil

    combo = root / "combo"
    shutil.copytree(root / "out" / "order1", combo / "order1", symlinks=True)
    shutil.copytree(combo / "order1" / "seed0" / "FROZEN", combo / "order1" / "seed0" / "FROZEN-apriori")
    (combo / "order2").symlink_to(root / "out" / "order2")
    mixed = finished_runs.main(["--out", str(combo)])
    assert "Not in every order, so left out of these tables: FROZEN-apriori." in mixed
    assert mixed[mixed.index("\nTask orders (fixed") :] == text[text.index("\nTask orders (fixed") :]


def test_test_split_and_intervals(tiny_results):
    """Protocol v3: runs evaluate the test part of each held-out file, and every headline number has an interval."""
    _, root, _, payload = tiny_results
    setup = payload["setup"]
    assert setup["eval_split"] == "test"
    assert all(Path(f["holdout_path"]).name == "test.jsonl" for f in setup["domain_files"])
    intervals, agg = payload["intervals"], payload["aggregates"]
    assert intervals["resamples"] == 2000 and intervals["seeds"] == 2
    for mode in MODES:
        row = intervals["modes"][mode]
        for key in ("drift_mean_pct", "base_relative_forgetting_mean_pct", "plasticity_mean"):
            entry = row[key]
            # The point value is the aggregate's seed mean (per-row sums: equal up to float rounding).
            assert entry["value"] == pytest.approx(agg["modes"][mode][key]["mean"], rel=1e-4, abs=1e-4), (mode, key)
            assert entry["low"] <= entry["value"] + 1e-9 and entry["value"] <= entry["high"] + 1e-9, (mode, key)
        assert (Path(payload["per_seed"]["0"]["runs"][mode]["run_dir"]) / "heldout_rows.json").is_file()
    for pair in ("CRMA-shared_vs_NAIVE", "MODULAR_vs_FROZEN", "REPLAY_vs_NAIVE", "EWC_vs_NAIVE", "O-LORA_vs_FROZEN"):
        entry = intervals["pairs"][pair]["heldout_improvement_pct"]
        assert entry["value"] == pytest.approx(agg["pairs"][pair]["heldout_improvement_pct"]["mean"], abs=1e-3)
        assert isinstance(entry["excludes_zero"], bool)
    table = (root / "out" / "results.md").read_text()
    assert "95 % intervals (held-out documents and seeds)" in table and "| MODULAR vs FROZEN |" in table
    # Routed numbers (FROZEN and MODULAR, routed by perplexity): their point values are the aggregates' seed means.
    routed = intervals["routed"]
    assert list(routed["modes"]) == ROUTED and list(routed["pairs"]) == ["MODULAR_vs_FROZEN"]
    for mode in ROUTED:
        for key in ("drift_mean_routed_pct", "base_relative_forgetting_mean_routed_pct", "plasticity_mean_routed",
                    "routing_accuracy_mean"):  # fmt: skip
            entry = routed["modes"][mode][key]
            assert entry["seeds"] == 2 and entry["low"] - 1e-9 <= entry["value"] <= entry["high"] + 1e-9, (mode, key)
            assert entry["value"] == pytest.approx(agg["modes"][mode][key]["mean"], rel=1e-4, abs=1e-4), (mode, key)
    diff = routed["pairs"]["MODULAR_vs_FROZEN"]["drift_mean_routed_diff_pp"]
    means = [agg["modes"][m]["drift_mean_routed_pct"]["mean"] for m in ROUTED]
    assert diff["value"] == pytest.approx(means[1] - means[0], abs=1e-4) and isinstance(diff["excludes_zero"], bool)
    assert "| routed mean drift % |" in table and "MODULAR vs FROZEN, routed: drift difference" in table


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


def test_merged_drift_has_its_footnote_and_routing_table_reuses_only_same_settings(tiny_results, tmp_path, monkeypatch):
    """MERGED's drift (own diagonal, all positions) is footnoted; --reuse re-runs an evaluation with other settings."""
    _, _, _, payload = tiny_results
    from benchmarks import routing_table
    from benchmarks.lib import table as _table

    setup = copy.deepcopy(payload["setup"])
    results = {**payload, "setup": setup}
    assert _table.MERGED_DRIFT_NOTE not in _table.render(results, payload["aggregates"], {})
    setup["modes"][next(iter(payload["aggregates"]["modes"]))]["routing"]["mode"] = "merged"
    assert _table.MERGED_DRIFT_NOTE in _table.render(results, payload["aggregates"], {})
    run = tmp_path / "run"
    (run / "evaluation-hybrid").mkdir(parents=True)
    calls = []

    def fake_evaluate(args):
        calls.append(args)
        routing = {"mode": "prototype", "prefix_tokens": int(args[args.index("--prefix_tokens") + 1]),
                   "fallback_margin": float(args[-1]), "prototype": dict(PROTOTYPE_DEFAULTS)}  # fmt: skip
        (run / "evaluation-hybrid" / "report.json").write_text(json.dumps({"routing": routing}))

    from crma_lightning.routing import prototype

    PROTOTYPE_DEFAULTS = {"layer": prototype.DEFAULT_LAYER, "pooling": prototype.DEFAULT_POOLING,
                          "estimator": "mahalanobis", "shrinkage": prototype.DEFAULT_SHRINKAGE}  # fmt: skip
    monkeypatch.setattr(routing_table, "run_evaluate", fake_evaluate)
    assert routing_table._evaluate(run, "hybrid", 16, 2.0, reuse=True)["prefix_tokens"] == 16 and len(calls) == 1
    assert routing_table._evaluate(run, "hybrid", 16, 2.0, reuse=True)["fallback_margin"] == 2.0 and len(calls) == 1
    for prefix, margin in ((32, 2.0), (32, 3.0)):  # another prefix, another margin: evaluated again
        got = routing_table._evaluate(run, "hybrid", prefix, margin, reuse=True)
        assert (got["prefix_tokens"], got["fallback_margin"]) == (prefix, margin)
    assert len(calls) == 3


def test_task_suite_routes_on_request_and_reports_the_routed_ap(tmp_path):
    """--suite tasks routes only when --router is given; the routed AP is the report's routed score matrix's."""
    bench = _load_benchmark()
    argv = ["--tiny", "--suite", "tasks", "--domains", "first", "shift", "--seeds", "1", "--settings", "FROZEN",
            "--router", "prototype"]  # fmt: skip
    argv += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    payload = bench.main(argv)
    assert payload["setup"]["routing"]["enabled"] and payload["setup"]["routing"]["router"] == "prototype"
    run = payload["per_seed"]["0"]["runs"]["FROZEN"]
    report = json.loads((Path(run["run_dir"]) / "report.json").read_text())
    final = report["routing"]["score_matrix_routed"][-1]
    assert run["routing"]["ap_routed"] == pytest.approx(sum(final) / len(final))
    assert run["routing"]["routing_accuracy_mean"] is not None
    agg = payload["aggregates"]["modes"]["FROZEN"]
    assert agg["ap_routed"]["mean"] == pytest.approx(run["routing"]["ap_routed"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "routed AP" in table and "each prompt routed by the base model's features of its first 8 tokens" in table
