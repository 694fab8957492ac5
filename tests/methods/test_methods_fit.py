"""Continual-learning methods and routing end to end through ``crma-lightning fit`` (docs/method.md).

One tiny 2-domain run per method (module-scoped, shared by the tests), run in-process through the console
entry point: replay on a shared LoRA with ``routing: none``, EWC on CRMA + per-task LoRAs with perplexity
routing, O-LoRA with ``routing: none``. Mid-stage resumes (a bug raised at step 2 of stage 2, a
checkpoint every step, the same command again) must give bit-identical results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fit_runs import config, fit, load_checkpoint, report_of, results
from safetensors.torch import load_file

from crma_lightning.cli import main

STEPS = 4
METHODS = {
    "replay": (
        {"adapter": "lora", "task_adapters": "shared"},
        {"class_path": "Replay", "init_args": {"buffer_size": 16, "ratio": 0.5}},
        {"mode": "none"},
    ),
    "ewc": (
        {"adapter": "crma", "task_adapters": "per_task"},
        {"class_path": "EWC", "init_args": {"lam": 1.0e4, "fisher_samples": 2}},
        {"mode": "perplexity", "prefix_tokens": 8},
    ),
    "olora": (
        {"adapter": "lora", "task_adapters": "per_task"},
        {"class_path": "crma_lightning.methods.OLoRA", "init_args": {"lam": 0.5}},
        {"mode": "none"},
    ),
}


def method_config(run_dir: Path, name: str, routing: bool = True, **kwargs: Any) -> dict[str, Any]:
    model, method, route = METHODS[name]
    cfg = config(run_dir, steps=STEPS, model={**model, "method": method}, data={"max_eval_rows": 6}, **kwargs)
    cfg["trainer"]["log_every_n_steps"] = 1
    if routing:
        cfg["routing"] = route
    return cfg


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One complete run per method; ``{method: run_dir}``."""
    tmp = tmp_path_factory.mktemp("methods")
    out = {}
    for name in METHODS:
        assert fit(tmp / f"{name}.yaml", method_config(tmp / name, name)) == 0, name
        out[name] = tmp / name
    return out


def test_replay_buffer_is_checkpointed_and_mixed_into_stage_two(runs):
    run_dir = runs["replay"]
    first = load_checkpoint(run_dir / "checkpoints" / "stage-01-prose.ckpt")["continual_method"]
    assert first["name"] == "replay" and set(first["state"]["slot_domains"]) == {"prose"}
    assert len(first["state"]["slot_domains"]) == 16
    last = load_checkpoint(run_dir / "checkpoints" / "stage-02-code.ckpt")["continual_method"]
    assert set(last["state"]["slot_domains"]) == {"prose", "code"}  # reservoir over both domains
    report = report_of(run_dir)
    assert report["status"] == "complete" and len(scalars(run_dir, "train/loss")) == 2 * STEPS
    # The report says which method ran, with its settings, what it holds and the state's size.
    method = report["method"]
    assert method["method"] == "replay" and method["ratio"] == 0.5 and method["buffer_rows"] == 16
    assert method["state_bytes"] > 0 and report["routing"]["mode"] == "none"
    # Text rows carry no labels: the checkpoint holds their ids once (plus lengths and flags), not twice.
    assert method["buffer_bytes"] <= method["state_bytes"] < 1.2 * method["buffer_bytes"]
    assert "- method: `replay`" in (run_dir / "report.md").read_text()


def test_ewc_penalty_is_logged_apart_and_acts_only_after_the_first_stage(runs):
    run_dir = runs["ewc"]
    penalty, lm, total = (scalars(run_dir, t) for t in ("train/penalty", "train/loss_lm", "train/loss"))
    assert len(penalty) == len(lm) == len(total) == 2 * STEPS
    assert penalty[:STEPS] == [0.0] * STEPS and penalty[STEPS] == 0.0  # anchored at stage 1's end
    assert all(p > 0 for p in penalty[STEPS + 1 :])  # the CRMA backbone moved away from its anchor
    assert total == pytest.approx([a + b for a, b in zip(lm, penalty)], rel=1e-5)
    state = load_checkpoint(run_dir / "checkpoints" / "stage-01-prose.ckpt")["continual_method"]["state"]
    assert state["tasks"] == ["prose"] and all(".crma." in n or ".lora_" in n for n in state["fisher"][0])
    assert any(f.sum() > 0 for f in state["fisher"][0].values())


def test_olora_keeps_the_first_adapter_frozen_and_active(runs):
    adapters = runs["olora"] / "adapters"
    s1, s2 = load_file(adapters / "stage-01-prose.safetensors"), load_file(adapters / "stage-02-code.safetensors")
    prose = [k for k in s1 if ".lora_A.prose." in k or ".lora_B.prose." in k]
    code = [k for k in s1 if ".lora_B.code." in k]
    assert prose and code
    assert all(torch.equal(s1[k], s2[k]) for k in prose)  # bit-identical after stage 2
    assert all(s2[k].any() for k in code)
    assert scalars(runs["olora"], "train/penalty")[STEPS + 1] > 0  # A_code pushed away from A_prose
    state = load_checkpoint(runs["olora"] / "checkpoints" / "stage-02-code.ckpt")["continual_method"]["state"]
    assert state["trained"] == ["prose", "code"]


def test_perplexity_routing_reports_accuracy_and_a_routed_matrix(runs):
    run_dir = runs["ewc"]
    routed = load_checkpoint(run_dir / "checkpoints" / "stage-02-code.ckpt")["callbacks"]["RoutedEvaluation"]
    assert routed["mode"] == "perplexity" and routed["prefix_tokens"] == 8
    matrix, accuracy = routed["matrix"], routed["accuracy"]
    assert len(matrix) == 3 and all(v is not None for v in matrix[2]) and matrix[1][1] is None
    assert accuracy[0] == [None, None] and accuracy[1][0] == 1.0  # one adapter trained: nothing to confuse
    assert all(0.0 <= a <= 1.0 for a in accuracy[2])
    # Routing to the domain's own adapter gives its oracle loss on the same targets.
    for j, a in enumerate(accuracy[2]):
        if a == 1.0:
            assert matrix[2][j] == pytest.approx(routed["oracle_matrix"][2][j], abs=1e-6)
    assert len(scalars(run_dir, "cl/drift_mean_routed")) == 1
    # The report carries the routed numbers next to the oracle ones, as the checkpoint holds them.
    report = report_of(run_dir)["routing"]
    assert report["mode"] == "perplexity" and report["loss_matrix_routed"] == matrix
    assert report["routing_accuracy_final"] == dict(zip(["prose", "code"], accuracy[2], strict=True))
    assert set(report["metrics_routed"]) >= {"drift_mean", "bwt"}
    markdown = (run_dir / "report.md").read_text()
    assert "## Task-agnostic evaluation (routing on the first 8 tokens)" in markdown
    assert "routed mean drift" in markdown
    for domain in ("prose", "code"):
        assert scalars(run_dir, f"val/{domain}/routing_accuracy")
        assert len(scalars(run_dir, f"val/{domain}/loss_routed")) >= 2


@pytest.mark.parametrize("name", ["replay", "ewc"])
def test_mid_stage_resume_is_bit_identical(tmp_path, runs, name):
    run_dir = tmp_path / "run"
    # EWC resumes without routing: its oracle numbers equal the routed run's, so routing never touches them.
    crash = method_config(
        run_dir,
        name,
        routing=name == "replay",
        model_class="fault_injection.FailingLM",
        run={"checkpoint_every_n_steps": 1},
    )
    crash["model"]["init_args"].update(fail_task="code", fail_step=2)
    assert fit(tmp_path / "crash.yaml", crash) == 1
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and last["continual_model"]["current_task"] == "code"
    resume = method_config(run_dir, name, routing=name == "replay")
    assert fit(tmp_path / "resume.yaml", resume) == 0
    assert results(report_of(run_dir)) == results(report_of(runs[name]))
    if name == "replay":
        assert (
            load_checkpoint(run_dir / "checkpoints" / "stage-02-code.ckpt")["callbacks"]["RoutedEvaluation"]
            == (load_checkpoint(runs[name] / "checkpoints" / "stage-02-code.ckpt")["callbacks"]["RoutedEvaluation"])
        )


def test_a_resume_with_other_method_settings_is_refused(tmp_path, runs):
    cfg = method_config(runs["replay"], "replay")
    cfg["model"]["init_args"]["method"]["init_args"]["ratio"] = 0.25
    assert fit(tmp_path / "other.yaml", cfg) == 2


def test_methods_that_do_not_suit_the_setup_fail_before_any_work(tmp_path):
    cfg = method_config(tmp_path / "run", "olora")
    cfg["model"]["init_args"]["task_adapters"] = "shared"
    assert fit(tmp_path / "bad.yaml", cfg) == 2
    assert not (tmp_path / "run").exists()


def test_compare_lists_the_method_and_the_routed_numbers(runs, capsys):
    main(["compare", str(runs["replay"]), str(runs["ewc"])])
    markdown = capsys.readouterr().out
    from crma_lightning.cli.compare import compare

    names = ["replay", "ewc"]
    result = compare(names, [report_of(runs[n]) for n in names])
    replay, ewc = result["runs"]
    assert (replay["method"], ewc["method"]) == ("replay", "ewc")
    assert replay["drift_mean_routed"] is None  # routing: none - oracle only
    routed = report_of(runs["ewc"])["routing"]
    assert ewc["drift_mean_routed"] == routed["metrics_routed"]["drift_mean"]
    final = list(routed["routing_accuracy_final"].values())
    assert ewc["routing_accuracy_mean"] == pytest.approx(sum(final) / len(final))
    assert "| method | mean drift % | routed mean drift % | routing accuracy |" in markdown
