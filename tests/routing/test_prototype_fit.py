"""``routing: {mode: prototype}`` end to end through ``crma-lightning fit`` and ``generate`` (DESIGN §3.4).

One tiny 2-domain run (prose, arithmetic: per-task LoRAs), then: the report's routed numbers and confusion,
the statistics in the stage checkpoint and beside the exported adapters, ``generate --routing prototype``
and a mid-stage resume that ends with bit-identical statistics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fit_runs import config, fit, load_checkpoint, report_of, results
from scoring_runs import TRAINER, complete_scores, task_data, task_model

from crma_lightning.cli import main
from crma_lightning.routing.prototype import load_router

DOMAINS = ["prose", "arithmetic"]
ROUTING = {"mode": "prototype", "prefix_tokens": 8}


def proto_config(run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    model = {"adapter": "lora", "task_adapters": "per_task"}
    cfg = config(run_dir, domains=DOMAINS, steps=3, model=model, data={"max_eval_rows": 6}, **kwargs)
    cfg["routing"] = dict(ROUTING)
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prototype")
    assert fit(tmp / "fit.yaml", proto_config(tmp / "run")) == 0
    return tmp / "run"


def test_report_has_routed_numbers_and_a_confusion_matrix(run_dir):
    routing = report_of(run_dir)["routing"]
    assert routing["mode"] == "prototype" and routing["prototype"]["estimator"] == "mahalanobis"
    confusion = routing["confusion_final"]
    assert confusion["candidates"] == DOMAINS
    counts = confusion["counts"]
    accuracy = routing["routing_accuracy_final"]
    for j, domain in enumerate(DOMAINS):  # the accuracy is the confusion's diagonal share
        assert accuracy[domain] == pytest.approx(counts[domain][j] / sum(counts[domain]))
    assert sum(counts["prose"]) > 0 and all(v is not None for v in routing["loss_matrix_routed"][-1])
    markdown = (run_dir / "report.md").read_text()
    assert "prototype routing on the first 8 tokens" in markdown and "routed to" in markdown


def test_statistics_are_in_the_checkpoint_and_beside_the_adapters(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "stage-02-arithmetic.ckpt")["prototype_router"]
    assert ckpt["tasks"] == DOMAINS and ckpt["settings"]["prefix_tokens"] == 8
    first = load_checkpoint(run_dir / "checkpoints" / "stage-01-prose.ckpt")["prototype_router"]
    assert first["tasks"] == ["prose"] and torch.equal(first["sums"][0], ckpt["sums"][0])  # fitted once per task
    exported = load_router(run_dir / "adapters" / "stage-02-arithmetic.router.safetensors")
    assert exported.tasks == DOMAINS and torch.equal(exported.second, ckpt["second"])
    from crma_lightning.run.checkpoints import CheckpointStore

    manifest = CheckpointStore(run_dir).manifest
    assert manifest.is_recorded(run_dir / "adapters" / "stage-02-arithmetic.router.safetensors")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "routing/confusion/text_summary" in events.Tags()["tensors"]


def test_generate_routes_with_one_base_forward(run_dir, capsys):
    prompts = ["12 + 7 = 19\n40 - 8 = 32\n", "The old house stood at the end of the lane."]
    main(["generate", "--run", str(run_dir), "--routing", "prototype", "--max_new_tokens", "2", "--json", *prompts])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for o in out:
        distances = o["prototype_distances"]
        assert set(distances) == set(DOMAINS) and o["task"] == min(distances, key=distances.get)
    from crma_lightning.cli.run_dir import RunDirectory

    run = RunDirectory(run_dir)
    model, _ = run.build()
    run.load(model, run.stage_checkpoint(None).path)
    calls = []
    model.model.register_forward_hook(lambda *_: calls.append(1))
    task, distances = model.route(prompts[0], mode="prototype")
    assert calls == [1] and task == out[0]["task"] and distances == pytest.approx(out[0]["prototype_distances"])


def test_a_mid_stage_resume_ends_with_bit_identical_statistics(tmp_path, run_dir):
    crash = proto_config(tmp_path / "run", model_class="fault_injection.FailingLM", run={"checkpoint_every_n_steps": 1})
    crash["model"]["init_args"].update(fail_task="arithmetic", fail_step=2)
    assert fit(tmp_path / "crash.yaml", crash) == 1
    assert fit(tmp_path / "resume.yaml", proto_config(tmp_path / "run")) == 0
    assert results(report_of(tmp_path / "run")) == results(report_of(run_dir))
    assert report_of(tmp_path / "run")["routing"] == report_of(run_dir)["routing"]
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "stage-02-arithmetic.ckpt")["prototype_router"]
    whole = load_checkpoint(run_dir / "checkpoints" / "stage-02-arithmetic.ckpt")["prototype_router"]
    assert resumed["tasks"] == whole["tasks"]
    for key in ("counts", "sums", "second"):
        assert torch.equal(resumed[key], whole[key])


def test_a_resume_with_other_routing_statistics_settings_is_refused(tmp_path):
    crash = proto_config(tmp_path / "run", model_class="fault_injection.FailingLM", run={"checkpoint_every_n_steps": 1})
    crash["model"]["init_args"].update(fail_task="arithmetic", fail_step=2)
    assert fit(tmp_path / "crash.yaml", crash) == 1
    other = proto_config(tmp_path / "run")
    other["routing"]["pooling"] = "last"
    assert fit(tmp_path / "other.yaml", other) == 2


def test_prototype_routing_gives_routed_task_scores(tmp_path):

    from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
    from crma_lightning.run.runner import ContinualRunner

    runner = ContinualRunner(
        run_dir=tmp_path / "run",
        trainer_kwargs=dict(TRAINER),
        resume="never",
        callbacks=[RoutedEvaluation(mode="prototype", prefix_tokens=8, estimator="nearest")],
    )
    report = runner.run(task_model("lora", "per_task"), task_data())
    oracle, routed = complete_scores(report), report["routing"]["score_matrix_routed"]
    assert len(routed) == 3 and None not in routed[2] and report["routing"]["score_metrics_routed"]["ap"] is not None
    assert routed[1][0] == oracle[1][0]  # after stage 1 there is one candidate: routing has nothing to choose
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "mode: prototype" in config and "estimator: nearest" in config


def test_evaluate_and_compare_use_the_routing(run_dir, tmp_path, capsys, monkeypatch):
    from crma_lightning.routing import prototype

    fitted = report_of(run_dir)["routing"]
    with monkeypatch.context() as patch:  # the checkpoints' statistics are used: nothing is fitted again
        patch.setattr(prototype, "local_task_sums", lambda *a, **k: pytest.fail("statistics fitted again"))
        main(["evaluate", "--run", str(run_dir), "--routing", "prototype", "--out", str(tmp_path / "proto")])
    again = json.loads((tmp_path / "proto" / "report.json").read_text())["routing"]
    assert again["mode"] == "prototype" and again["prefix_tokens"] == 8  # the run's settings by default
    assert again["confusion_final"] == fitted["confusion_final"]  # the checkpoint's statistics, the same choices
    for got, want in zip(again["loss_matrix_routed"], fitted["loss_matrix_routed"], strict=True):
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], rel=1e-6)
    fits = []
    real_sums = prototype.local_task_sums
    with monkeypatch.context() as patch:  # other statistics (P = 4): each task fitted once, not once per row
        patch.setattr(prototype, "local_task_sums", lambda *a, **k: fits.append(1) or real_sums(*a, **k))
        main(["evaluate", "--run", str(run_dir), "--routing", "prototype", "--prefix_tokens", "4"])
    other = json.loads((run_dir / "evaluation" / "report.json").read_text())["routing"]  # refitted at P = 4
    assert other["prefix_tokens"] == 4 and sum(other["confusion_final"]["counts"]["prose"]) == 6
    assert len(fits) == len(DOMAINS) and len(other["loss_matrix_routed"]) == 3
    main(["evaluate", "--run", str(run_dir), "--stage", "2", "--routing", "perplexity", "--out", str(tmp_path / "ppl")])
    ppl = json.loads((tmp_path / "ppl" / "report.json").read_text())["routing"]
    assert ppl["mode"] == "perplexity" and set(ppl["routing_accuracy_final"]) == set(DOMAINS)
    assert ppl["routing_forwards_final"] == 3 and again["routing_forwards_final"] == 2  # K + 1 vs 2 (K = 2)
    # The hybrid with a margin no row reaches falls back on every row: perplexity routing's choices and losses.
    args = ["--stage", "2", "--routing", "prototype", "--fallback_margin", "1e9", "--out", str(tmp_path / "hybrid")]
    main(["evaluate", "--run", str(run_dir), *args])
    hybrid = json.loads((tmp_path / "hybrid" / "report.json").read_text())["routing"]
    assert hybrid["fallback_margin"] == 1e9 and hybrid["fallback_share_final"] == {d: 1.0 for d in DOMAINS}
    assert hybrid["confusion_final"] == ppl["confusion_final"] and hybrid["routing_forwards_final"] == 4
    assert hybrid["loss_matrix_routed"][2] == pytest.approx(ppl["loss_matrix_routed"][2], rel=1e-6)
    assert "(hybrid: perplexity for 1.000 of the sequences)" in (tmp_path / "hybrid" / "report.md").read_text()
    from crma_lightning.cli.compare import compare

    row = compare(["fit"], [report_of(run_dir)])["runs"][0]
    assert row["routing"] == "prototype" and row["drift_mean_routed"] == fitted["metrics_routed"]["drift_mean"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--run", str(run_dir), "--prefix_tokens", "4"])
    assert exit_info.value.code == 2 and "--prefix_tokens needs --routing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--run", str(run_dir), "--routing", "perplexity", "--fallback_margin", "1"])
    assert exit_info.value.code == 2 and "fallback_margin" in capsys.readouterr().err


def test_a_layer_the_model_lacks_is_refused_before_the_first_step(tmp_path):
    cfg = proto_config(tmp_path / "run")
    cfg["routing"]["layer"] = [0, 9]  # the tiny model has hidden_states 0..2
    assert fit(tmp_path / "bad.yaml", cfg) == 2
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))  # nothing trained, nothing written


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_too_wide_features_are_refused_before_anything_is_evaluated(run_dir, tmp_path, capsys, monkeypatch, command):
    from crma_lightning.cli.run_dir import RunDirectory
    from crma_lightning.routing import prototype

    monkeypatch.setattr(prototype, "MAX_FEATURES", 10)  # every setting of the tiny model is now too wide
    loaded = []
    real_load = RunDirectory.load
    monkeypatch.setattr(RunDirectory, "load", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    args = ["--out", str(tmp_path / "out")] if command == "evaluate" else ["hello"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--run", str(run_dir), "--routing", "prototype", *args])
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and "exceed 10" in out.err
    assert loaded == [] and out.out == ""  # no checkpoint loaded, no row evaluated, nothing generated
    assert not (tmp_path / "out").exists()


def test_generate_serves_the_hybrid_by_perplexity_on_the_prefix_for_near_ties(run_dir, capsys):
    from crma_lightning.cli.run_dir import RunDirectory

    run = RunDirectory(run_dir)
    model, _ = run.build()
    run.load(model, run.stage_checkpoint(None).path)
    short, long = "12 + 7", "The old house stood at the end of the lane, and nobody had lived there for years."
    assert len(model.tokenizer(short)["input_ids"]) < ROUTING["prefix_tokens"] < len(model.tokenizer(long)["input_ids"])
    never = model.route(long, mode="prototype", fallback_margin=0.0)  # no margin is below 0: the prototype decides
    assert never.fallback_losses is None and tuple(never) == tuple(model.route(long, mode="prototype"))
    for prompt in (short, long):
        hybrid = model.route(prompt, mode="prototype", fallback_margin=1e9)  # every prompt is a near tie
        losses = hybrid.fallback_losses
        assert set(losses) == set(DOMAINS) and hybrid.task == min(losses, key=losses.get)
        assert hybrid.scores == pytest.approx(model.route(prompt, mode="prototype").scores)  # the distances, still
        whole = model.route(prompt, mode="perplexity").scores  # perplexity over the whole prompt
        if prompt == short:  # shorter than P: the prefix is the whole prompt
            assert losses == pytest.approx(whole, rel=1e-6)
        else:  # only the first P tokens are read
            assert losses != pytest.approx(whole, rel=1e-6)
    capsys.readouterr()
    main(["generate", "--run", str(run_dir), "--routing", "prototype", "--fallback_margin", "1e9", "--json",
          "--max_new_tokens", "1", long])  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert out["fallback"] is True and out["prompt_losses"] == pytest.approx(hybrid.fallback_losses)
    assert out["task"] == hybrid.task
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--run", str(run_dir), "--routing", "perplexity", "--fallback_margin", "1", long])
    assert exit_info.value.code == 2 and "--fallback_margin needs --routing prototype" in capsys.readouterr().err


def test_a_python_run_keeps_its_hybrid_margin_for_evaluate_and_generate(tmp_path, capsys):
    """Routing settings round trip: fit from Python with the hybrid -> config.yaml -> evaluate/generate."""

    from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
    from crma_lightning.cli.evaluate import _routing, build_parser
    from crma_lightning.cli.run_dir import RunDirectory
    from crma_lightning.routing.config import RoutingConfig
    from crma_lightning.run.runner import ContinualRunner

    hybrid = RoutedEvaluation(mode="prototype", prefix_tokens=8, pooling="last", fallback_margin=1e9)
    runner = ContinualRunner(run_dir=tmp_path / "run", trainer_kwargs=dict(TRAINER), resume="never", callbacks=[hybrid])
    runner.run(task_model("lora", "per_task"), task_data())
    run = RunDirectory(tmp_path / "run")
    run.build()  # reads config.yaml, as every command does
    assert run.routing.config == hybrid.config == RoutingConfig("prototype", 8, pooling="last", fallback_margin=1e9)
    again = _routing(run, build_parser().parse_args(["--run", str(tmp_path / "run"), "--routing", "prototype"]))
    assert again.config == hybrid.config  # evaluate routes as the run did, margin included
    override = ["--run", str(tmp_path / "run"), "--routing", "prototype", "--fallback_margin", "0.5"]
    assert _routing(run, build_parser().parse_args(override)).config.fallback_margin == 0.5
    capsys.readouterr()
    main(["generate", "--run", str(tmp_path / "run"), "--routing", "prototype", "--json", "--max_new_tokens", "1",
          "first letter of: kiwi"])  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert out["fallback"] is True  # a margin of 1e9 makes every prompt a near tie: routed by perplexity
