"""After training: `crma-lightning evaluate`, `generate`, `export` and `compare` on tiny finished runs.

Two runs are trained once for the whole module (in-process, a few seconds each): a LoRA run on two
domains and a CRMA run on one. Every subcommand is run once as a subprocess; the remaining cases call
the same entry point in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:--data domains differ")

ROOT = Path(__file__).resolve().parents[2]


def _fit(tmp: Path, name: str, adapter: str, domains: list[str], steps: int) -> Path:
    run_dir = tmp / name
    cfg = {
        "seed_everything": 0,
        "run": {"dir": str(run_dir)},
        "trainer": {"accelerator": "cpu", "max_steps": steps, "enable_progress_bar": False, "logger": False},
        "model": {
            "class_path": "crma_lightning.ContinualLM",
            "init_args": {"model_config": TINY_LLAMA_CONFIG, "adapter": adapter, "seed": 3},
        },
        "data": {
            "domains": domains,
            "max_length": 32,
            "batch_size": 4,
            "max_chars_per_domain": 6000,
            "max_eval_rows": 8,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path), "--trainer.enable_model_summary=false"])
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "lora": _fit(tmp, "lora", "lora", ["prose", "arithmetic"], steps=3),
        "crma": _fit(tmp, "crma", "crma", ["prose"], steps=2),
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "crma_lightning", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def fails(capsys, *args: str) -> str:
    """Run in-process; it must fail with exit code 2 and one error line, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[crma_lightning] error")]
    assert len(lines) == 1
    return lines[0]


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[crma_lightning] error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr[-2000:]


def matrix(path: Path) -> list[list[float | None]]:
    return json.loads(path.read_text())["loss_matrix"]["values"]


def assert_same_matrix(got, expected, rows=None) -> None:
    rows = range(len(expected)) if rows is None else rows
    for r in rows:
        for g, e in zip(got[r], expected[r]):
            assert (g is None) == (e is None), (got, expected)
            assert g is None or abs(g - e) < 1e-5, (got, expected)  # same batches, same order: float noise only


def run_model(run_dir: Path, task: str):
    """The run's model after its newest stage, with ``task``'s adapter active (eval mode)."""
    from crma_lightning.cli.run_dir import RunDirectory

    run = RunDirectory(run_dir)
    model, _ = run.build()
    ckpt = run.stage_checkpoint(None)
    run.load(model, ckpt.path)
    model.activate_task(task)
    return model.eval()


TOKENS = torch.tensor([[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


# ---------------------------------------------------------------------- evaluate
def test_evaluate_reproduces_the_run_report(runs):
    proc = run_cli("evaluate", "--run", str(runs["lora"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| after stage | prose | arithmetic |" in proc.stdout
    got = json.loads((runs["lora"] / "evaluation" / "report.json").read_text())
    report = json.loads((runs["lora"] / "report.json").read_text())
    assert_same_matrix(got["loss_matrix"]["values"], report["loss_matrix"]["values"])
    for key in ("drift_mean", "bwt", "plasticity_mean", "base_relative_forgetting_mean"):
        assert got["metrics"][key] == pytest.approx(report["metrics"][key], abs=1e-4), key
    assert (runs["lora"] / "evaluation" / "report.md").read_text().startswith("# crma_lightning evaluation")


def test_evaluate_crma_run_one_stage_and_partial_run(runs, tmp_path):
    out = tmp_path / "crma-eval"
    main(["evaluate", "--run", str(runs["crma"]), "--out", str(out)])
    assert_same_matrix(matrix(out / "report.json"), matrix(runs["crma"] / "report.json"))
    main(["evaluate", "--run", str(runs["lora"]), "--stage", "2", "--out", str(tmp_path / "stage2")])
    assert_same_matrix(matrix(tmp_path / "stage2" / "report.json"), matrix(runs["lora"] / "report.json"), rows=[2])
    # A partial run: the second stage's checkpoint is gone; rows 0 and 1 are still evaluated.
    partial = tmp_path / "partial"
    shutil.copytree(runs["lora"], partial, ignore=shutil.ignore_patterns("evaluation", "adapters"))
    (partial / "checkpoints" / "stage-02-arithmetic.ckpt").unlink()
    main(["evaluate", "--run", str(partial)])
    got = json.loads((partial / "evaluation" / "report.json").read_text())
    assert got["completed_stages"] == 1 and len(got["loss_matrix"]["values"]) == 2
    assert_same_matrix(got["loss_matrix"]["values"], matrix(runs["lora"] / "report.json"), rows=[0, 1])


def test_evaluate_other_data_and_adapter_choice(runs, tmp_path):
    data = [
        "prose",
        {"name": "as_prose", "builtin": "prose", "task": "prose"},  # prose's held-out rows, prose's adapter
        {"name": "lora_off", "builtin": "prose"},  # not a task: LoRA off, i.e. the frozen base model
    ]
    main(["evaluate", "--run", str(runs["lora"]), "--data", json.dumps(data), "--out", str(tmp_path)])
    got = json.loads((tmp_path / "report.json").read_text())
    values = got["loss_matrix"]["values"]
    assert got["domains"] == ["prose", "as_prose", "lora_off"] and len(values) == 3 and got["metrics"] == {}
    reference = matrix(runs["lora"] / "report.json")
    for r in range(3):
        assert values[r][0] == pytest.approx(reference[r][0], abs=1e-5)
        assert values[r][1] == pytest.approx(values[r][0], abs=1e-6)
        assert values[r][2] == pytest.approx(reference[0][0], abs=1e-5)  # the base never changes in a LoRA run
    assert "lora_off: LoRA off" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------- generate
def test_generate(runs):
    proc = run_cli("generate", "--run", str(runs["lora"]), "--task", "arithmetic", "--max_new_tokens", "5", "--json",
                   "--do_sample", "--temperature", "0.7", "--top_p", "0.9", "12 + 7 =", "The")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [o["prompt"] for o in out] == ["12 + 7 =", "The"] and all(isinstance(o["text"], str) for o in out)
    proc = run_cli("generate", "--run", str(runs["lora"]), "--task", "medical", "hello")
    assert_one_line_error(proc, "unknown task 'medical'")


def test_generate_with_routing_picks_the_task_with_the_lowest_prompt_loss(runs, capsys):
    prompts = ["12 + 7 = 19\n40 - 8 = 32\n", "The old house stood at the end of the lane."]
    main(["generate", "--run", str(runs["lora"]), "--routing", "--max_new_tokens", "3", "--json", *prompts])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [o["prompt"] for o in out] == prompts
    for o in out:
        losses = o["prompt_losses"]
        assert set(losses) == {"prose", "arithmetic"}  # both trained tasks were candidates
        assert o["task"] == min(losses, key=losses.get)
    # The prompt losses are the model's own: the chosen adapter's loss, computed directly, agrees.
    from crma_lightning.cli.run_dir import RunDirectory

    run = RunDirectory(runs["lora"])
    model, _ = run.build()
    run.load(model, run.stage_checkpoint(None).path)
    task, losses = model.route(prompts[0], ["prose", "arithmetic"])
    assert losses == pytest.approx(out[0]["prompt_losses"], rel=1e-5) and task == out[0]["task"]


def test_generate_bad_input(runs, capsys, tmp_path):
    lora = str(runs["lora"])
    assert "at least 2 tokens" in fails(capsys, "generate", "--run", lora, "--routing", "h")
    assert "trained in stage 2" in fails(capsys, "generate", "--run", lora, "--task", "arithmetic", "--stage", "1", "x")
    assert "no checkpoint for stage 7" in fails(
        capsys, "generate", "--run", lora, "--task", "prose", "--stage", "7", "x"
    )
    assert "one of the arguments --task --routing" in fails(capsys, "generate", "--run", lora, "hi")
    empty = tmp_path / "no-checkpoints"
    empty.mkdir()
    shutil.copy(runs["lora"] / "config.yaml", empty / "config.yaml")
    assert "has no stage checkpoints" in fails(capsys, "generate", "--run", str(empty), "--task", "prose", "x")


# ---------------------------------------------------------------------- export
def test_export_merged_matches_the_run(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    proc = run_cli("export", "--run", str(runs["lora"]), "--task", "prose", "--format", "merged", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)  # the byte tokenizer saves and loads like any other
    assert tokenizer.decode(tokenizer("héllo")["input_ids"]) == "héllo"
    with torch.no_grad():
        expected = run_model(runs["lora"], "prose")(TOKENS)
        got = merged(input_ids=TOKENS).logits
        base = run_model(runs["lora"], None)(TOKENS)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter did change the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # float32: merging reorders sums only
    info = json.loads((out / "crma_lightning_export.json").read_text())
    assert info["task"] == "prose" and info["stage"] == 2 and not info["crma_dropped"]
    proc = run_cli("export", "--run", str(runs["lora"]), "--task", "prose", "--format", "onnx", str(tmp_path / "x"))
    assert_one_line_error(proc, "invalid choice: 'onnx'")


def test_export_peft_loads_in_peft(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from crma_lightning.data.tokenizer import byte_tokenizer
    from crma_lightning.model.base_model import build_model

    out = tmp_path / "peft"
    main(["export", "--run", str(runs["lora"]), "--task", "arithmetic", "--format", "peft", str(out)])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    torch.manual_seed(3)  # the run's model.seed: ContinualLM builds the base under torch.manual_seed(seed)
    base = build_model(None, TINY_LLAMA_CONFIG, byte_tokenizer()).eval()
    saved = AutoModelForCausalLM.from_pretrained(out / "base_model")
    for (name, p), (_, q) in zip(base.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(p, q), name  # OUT/base_model is exactly the run's seeded base
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=TOKENS).logits, run_model(runs["lora"], "arithmetic")(TOKENS))


def test_export_bad_input(runs, capsys, tmp_path):
    lora, crma = str(runs["lora"]), str(runs["crma"])
    out = str(tmp_path / "out")
    message = fails(capsys, "export", "--run", crma, "--task", "prose", "--format", "merged", out)
    assert "uses CRMA adapters" in message and "--drop_crma" in message
    assert "unknown task 'code'" in fails(capsys, "export", "--run", lora, "--task", "code", "--format", "peft", out)
    assert "does not exist" in fails(capsys, "export", "--run", str(tmp_path / "nope"), "--task", "prose",
                                     "--format", "peft", out)  # fmt: skip
    Path(out).mkdir()
    (Path(out) / "keep.txt").write_text("mine")
    assert "not empty" in fails(capsys, "export", "--run", lora, "--task", "prose", "--format", "peft", out)
    main(["export", "--run", crma, "--task", "prose", "--format", "merged", "--drop_crma", str(tmp_path / "lora-only")])
    assert json.loads((tmp_path / "lora-only" / "crma_lightning_export.json").read_text())["crma_dropped"]


# ---------------------------------------------------------------------- compare
def test_compare(runs, tmp_path):
    out = tmp_path / "cmp"
    proc = run_cli("compare", str(runs["lora"]), str(runs["crma"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The runs have different domains" in proc.stdout
    result = json.loads((out / "comparison.json").read_text())
    assert [r["run"] for r in result["runs"]] == ["lora", "crma"] and not result["same_domains"]
    assert result["settings_that_differ"]["model.adapter"] == ["lora", "crma"]
    assert result["runs"][0]["grad_norm_var"] is not None and result["runs"][0]["grad_norm_cv"] > 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `model.adapter` | lora | crma |" in (out / "comparison.md").read_text()


def test_compare_bad_input(runs, capsys, tmp_path):
    assert "missing does not exist" in fails(capsys, "compare", str(runs["lora"]), str(tmp_path / "missing"))
    (tmp_path / "report.json").write_text("{not json")
    assert "is not a crma_lightning report" in fails(capsys, "compare", str(tmp_path))


# ---------------------------------------------------------------------- bad input shared by the commands
def test_bad_run_directories_and_outputs(runs, capsys, tmp_path):
    lora = str(runs["lora"])
    proc = run_cli("evaluate", "--run", str(tmp_path / "missing-run"))
    assert_one_line_error(proc, "missing-run does not exist")
    assert "has no config.yaml" in fails(capsys, "evaluate", "--run", str(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "cannot write the output directory" in fails(capsys, "evaluate", "--run", lora, "--out", str(blocker / "x"))
    assert "no checkpoint for stage 3" in fails(capsys, "evaluate", "--run", lora, "--stage", "3")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((runs["lora"] / "checkpoints" / "stage-01-prose.ckpt").read_bytes()[:1000])
    assert "not a complete PyTorch checkpoint" in fails(capsys, "evaluate", "--run", lora, "--ckpt", str(truncated))
    assert "expected a non-empty list" in fails(capsys, "evaluate", "--run", lora, "--data", "{name: x}")
    assert "no report.json" in fails(capsys, "compare", str(tmp_path))
