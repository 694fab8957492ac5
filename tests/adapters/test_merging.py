"""Merged adapters (DESIGN §3.4): TIES and mean merges equal a hand computation; the merged adapter equals them."""

from __future__ import annotations

import pytest
import torch
from fit_runs import config, fit
from tiny_models import tiny_llama

from crma_lightning.adapters import LoRAConfig, add_lora_adapter, attach_adapters, lora_layers, set_active_adapter
from crma_lightning.adapters.merging import add_merged_adapter, mean_merge, merged_deltas, task_delta, ties_merge

D1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 1.0]])
D2 = torch.tensor([[-2.0, -3.0, 1.5], [0.7, 1.2, -0.2]])


def test_ties_trims_elects_and_averages_the_agreeing_entries_by_hand():
    # density 0.5 keeps 3 of 6 entries: D1 -> [[3, 0, 0], [2, -4, 0]], D2 -> [[-2, -3, 1.5], [0, 0, 0]].
    # Elected signs of the sums [[1, -3, 1.5], [2, -4, 0]]: + - + / + - 0; the agreeing entries' means:
    expected = torch.tensor([[3.0, -3.0, 1.5], [2.0, -4.0, 0.0]])
    assert torch.equal(ties_merge([D1, D2], density=0.5), expected)
    assert torch.equal(ties_merge([D1, D2], density=0.5, scale=0.5), expected * 0.5)
    # density 1: nothing trimmed; where both agree the mean, else the one of the elected sign.
    full = torch.tensor([[3.0, -2.0, 1.0], [1.35, -4.0, 1.0]])
    assert torch.allclose(ties_merge([D1, D2], density=1.0), full)
    assert torch.equal(mean_merge([D1, D2]), (D1 + D2) / 2)


def _model_with_tasks(n: int = 3):
    model = tiny_llama()
    cfg = LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    attach_adapters(model, "lora", cfg, None, adapter_name="t0")
    for i in range(1, n):
        add_lora_adapter(model, f"t{i}", cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for bank in (layer.lora_A, layer.lora_B):
                for linear in bank.values():
                    linear.weight.normal_(std=0.3)
    return model


@pytest.mark.parametrize("how", ["mean", "ties"])
def test_the_merged_adapter_equals_the_merge_of_the_task_updates(how):
    model = _model_with_tasks()
    tasks = ["t0", "t1", "t2"]
    deltas = add_merged_adapter(model, tasks, how, density=0.3)
    for name, layer in lora_layers(model):
        parts = [task_delta(layer, t) for t in tasks]
        hand = mean_merge(parts) if how == "mean" else ties_merge(parts, density=0.3)
        assert torch.equal(deltas[name], hand)
        assert torch.allclose(task_delta(layer, "merged"), hand, atol=1e-5)
    # In the forward pass: the merged adapter active equals the base with the merged updates added.
    ids = torch.randint(0, 128, (2, 9))
    set_active_adapter(model, "merged")
    merged_logits = model(input_ids=ids).logits
    set_active_adapter(model, None)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.base_layer.weight += deltas[name].to(layer.base_layer.weight.dtype)
    assert torch.allclose(model(input_ids=ids).logits, merged_logits, atol=1e-4)


def test_merging_refuses_one_adapter_and_a_bad_method():
    model = _model_with_tasks(2)
    with pytest.raises(ValueError, match="different task adapters"):
        merged_deltas(model, ["t0", "t0"], "mean")
    with pytest.raises(ValueError, match="merge"):
        merged_deltas(model, ["t0", "t1"], "median")
    with pytest.raises(ValueError, match="density"):
        ties_merge([D1, D2], density=1.5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):

    tmp = tmp_path_factory.mktemp("merge")
    model = {"adapter": "lora", "task_adapters": "per_task"}
    cfg = config(tmp / "run", domains=["prose", "arithmetic"], steps=3, model=model, data={"max_eval_rows": 4})
    assert fit(tmp / "fit.yaml", cfg) == 0
    return tmp / "run"


def _in_memory_merge(run_dir, how, ids):
    from crma_lightning.cli.run_dir import RunDirectory

    run = RunDirectory(run_dir)
    model, _ = run.build()
    run.load(model, run.stage_checkpoint(None).path)
    model.eval()
    add_merged_adapter(model.model, ["prose", "arithmetic"], how, density=0.2)
    set_active_adapter(model.model, "merged")
    with torch.no_grad():
        merged = model.model(input_ids=ids).logits
        set_active_adapter(model.model, "prose")
        prose = model.model(input_ids=ids).logits
    return merged, prose


@pytest.mark.parametrize(("how", "fmt"), [("ties", "merged"), ("mean", "peft"), ("ties", "peft")])
def test_merged_export_logits_equal_the_merged_in_memory_model(run_dir, tmp_path, how, fmt):
    import json

    from transformers import AutoModelForCausalLM

    from crma_lightning.cli import main

    ids = torch.tensor([[72, 101, 108, 108, 111, 32, 49, 43, 50]])
    expected, prose = _in_memory_merge(run_dir, how, ids)
    assert not torch.allclose(expected, prose, atol=1e-4)  # the merge is not one task's adapter
    out = tmp_path / "out"
    main(["export", "--run", str(run_dir), "--merge", how, "--format", fmt, str(out)])
    info = json.loads((out / "crma_lightning_export.json").read_text())
    assert info["merge"] == how and info["merged_tasks"] == ["prose", "arithmetic"]
    if fmt == "merged":
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(out / "base_model")
        got = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-5)


def test_export_merge_refuses_bad_input(run_dir, tmp_path, capsys):
    from crma_lightning.cli import main

    for args, message in [
        (["--merge", "ties", "--density", "0"], "--density 0.0 is invalid"),
        (["--merge", "mean", "--stage", "1"], "at least 2 trained tasks"),
        (["--merge", "mean", "--task", "prose"], "not allowed with argument"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--run", str(run_dir), "--format", "merged", *args, str(tmp_path / "x")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluate_merged_scores_every_domain_with_the_merge_so_far(run_dir, tmp_path):
    import json

    from crma_lightning.cli import main

    main(["evaluate", "--run", str(run_dir), "--merge", "mean", "--out", str(tmp_path / "mean")])
    report = json.loads((tmp_path / "mean" / "report.json").read_text())
    fitted = json.loads((run_dir / "report.json").read_text())["loss_matrix"]["values"]
    merged = report["loss_matrix"]["values"]
    assert report["evaluation"]["merge"] == {"merge": "mean"}
    assert merged[0] == pytest.approx(fitted[0], rel=1e-6)  # row 0: the base model
    assert merged[1][0] == pytest.approx(fitted[1][0], rel=1e-6)  # a mean of one adapter is that adapter
    assert all(v is not None for v in merged[2]) and merged[2] != pytest.approx(fitted[2], rel=1e-6)


def test_generate_prototype_fits_the_statistics_of_a_run_trained_without_them(run_dir, capsys):
    """(In this file for its run: per-task LoRAs trained without ``routing: prototype``.)"""
    import json

    from crma_lightning.cli import main

    prompts = ["12 + 7 = 19\n40 - 8 = 32\n", "The old house stood at the end of the lane."]
    main(["generate", "--run", str(run_dir), "--routing", "prototype", "--max_new_tokens", "2", "--json", *prompts])
    captured = capsys.readouterr()
    assert "statistics fitted on the run's training rows for ['prose', 'arithmetic']" in captured.err
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert [o["task"] for o in out] == ["arithmetic", "prose"]
    assert all(set(o["prototype_distances"]) == {"prose", "arithmetic"} for o in out)
    from crma_lightning.cli.run_dir import RunDirectory

    run = RunDirectory(run_dir)
    model, _ = run.build()
    run.load(model, run.stage_checkpoint(None).path)
    with pytest.raises(ValueError, match="needs the routing statistics"):  # in Python nothing is fitted for you
        model.route(prompts[0], mode="prototype")
    with pytest.raises(ValueError, match="'perplexity' or 'prototype', got 'nearest'"):
        model.route(prompts[0], mode="nearest")
