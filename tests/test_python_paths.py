"""The paths users take from Python: a plain ``trainer.fit`` loop, the stage driver, subclasses.

docs/subclassing.md, "Training from Python".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning import ContinualLM, SequentialDomainDataModule
from crma_lightning.adapters import lora_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


def doc_python_blocks(doc: str, section: str) -> list[str]:
    """The fenced ``python`` blocks of one ``##`` section of a docs/ file."""
    text = (ROOT / "docs" / doc).read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_stage_driver_recipe_in_the_docs_writes_a_run_the_after_training_commands_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = doc_python_blocks("subclassing.md", "Training from Python")[0]
    scope: dict = {}
    exec(compile(recipe, "docs/subclassing.md", "exec"), scope)
    assert scope["report"]["status"] == "complete" and len(scope["report"]["loss_matrix"]["values"]) == 3
    saved = yaml.safe_load((tmp_path / "runs" / "python" / "config.yaml").read_text())
    assert saved["data"]["domains"] == ["prose", "arithmetic"] and saved["model"]["init_args"]["adapter"] == "crma"


def lora_b(model: ContinualLM, adapter: str) -> torch.Tensor:
    return torch.cat([layer.lora_B[adapter].weight.detach().flatten() for _, layer in lora_layers(model.model)])


def test_the_plain_lightning_recipe_in_the_docs_trains_every_domain_and_evaluates():
    """`dm.set_stage(i); trainer.fit(model, datamodule=dm)` trains task i; validate returns per-domain losses."""
    recipe = doc_python_blocks("subclassing.md", "Training from Python")[-1]
    scope: dict = {}
    exec(compile(recipe, "docs/subclassing.md", "exec"), scope)
    losses, model = scope["losses"], scope["model"]
    assert set(losses[0]) == {"val/prose/loss", "val/prose/ppl"}
    assert {"val/prose/loss", "val/arithmetic/loss"} <= set(losses[1])
    assert all(0 < v < 20 for k, v in losses[1].items() if k.endswith("/loss"))
    assert model.tasks == ["prose", "arithmetic"] and model.current_task == "arithmetic"
    for task in model.tasks:  # each stage trained its own adapter (B starts at zero)
        assert lora_b(model, task).abs().sum() > 0, task
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad and "lora" in n}
    assert trainable and all(".arithmetic." in n for n in trainable)  # the earlier task's adapter is frozen


def tiny_dm(**kw) -> SequentialDomainDataModule:
    return SequentialDomainDataModule(
        ["prose", "arithmetic"], max_length=32, batch_size=4, max_chars_per_domain=6000, max_eval_rows=8, **kw
    )


def test_a_plain_fit_ends_the_stage_with_the_methods_hook():
    from crma_lightning.methods import EWC

    model = ContinualLM(
        model_config=TINY_LLAMA_CONFIG, adapter="lora", task_adapters="shared", method=EWC(fisher_samples=1)
    )
    dm = tiny_dm()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    assert model.method.tasks == ["prose"] and model.method.fisher  # EWC's Fisher was estimated at the fit's end


def test_errors_point_to_the_python_recipe():
    model = ContinualLM(model_config=TINY_LLAMA_CONFIG, adapter="lora")
    with pytest.raises(ValueError, match=r"trainer\.fit\(model, datamodule=dm\).*Training from Python"):
        model.configure_optimizers()
    with pytest.raises(ValueError, match=r"dm\.prepare\(model\.tokenizer\).*Training from Python"):
        tiny_dm().setup("fit")


SUBCLASS_MODULE = '''
from crma_lightning import ContinualLM


class Scaled(ContinualLM):
    """A research subclass with an argument of its own."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def compute_loss(self, batch, logits):
        return self.scale * super().compute_loss(batch, logits)
'''


@pytest.fixture
def python_run(tmp_path_factory):
    """A run made from Python (``ContinualRunner``) with a subclass from an importable module of its own."""
    from functools import partial

    from crma_lightning import ContinualRunner
    from crma_lightning.methods import EWC

    root = tmp_path_factory.mktemp("python_run")
    (root / "pkg").mkdir()
    (root / "pkg" / "my_research.py").write_text(SUBCLASS_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "pkg"))
        from my_research import Scaled

        model = Scaled(
            model_config=TINY_LLAMA_CONFIG,
            adapter="lora",
            scale=0.25,
            method=EWC(lam=3.0, fisher_samples=1),
            optimizer=partial(torch.optim.AdamW, lr=0.01),
        )
        trainer_kwargs = {"max_steps": 1, "accelerator": "cpu", "enable_progress_bar": False, "logger": False}
        report = ContinualRunner(root / "run", trainer_kwargs=trainer_kwargs).run(model, tiny_dm())
        yield root, report


def _cli(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), pythonpath) if p)}
    return subprocess.run(
        [sys.executable, "-m", "crma_lightning", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_evaluate_reads_a_run_made_from_python(python_run):
    root, report = python_run
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "my_research.Scaled" and saved["model"]["init_args"]["scale"] == 0.25
    assert saved["model"]["init_args"]["method"]["init_args"]["lam"] == 3.0
    proc = _cli("evaluate", "--run", str(root / "run"), pythonpath=str(root / "pkg"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((root / "run" / "evaluation" / "report.json").read_text())
    for row, expected in zip(again["loss_matrix"]["values"], report["loss_matrix"]["values"], strict=True):
        assert [v is None for v in row] == [v is None for v in expected]
        assert [v for v in row if v is not None] == pytest.approx([v for v in expected if v is not None], abs=1e-5)


def test_a_subclass_that_does_not_import_is_named_with_the_fix_on_one_line(python_run):
    root, _ = python_run
    proc = _cli("evaluate", "--run", str(root / "run"))  # no PYTHONPATH to my_research
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert "'my_research.Scaled' is not importable" in error and "set PYTHONPATH" in error
    assert "install your package" in error and "Union" not in proc.stderr


def test_load_from_checkpoint_on_a_subclass_checkpoint_keeps_the_subclass_and_its_arguments(python_run, monkeypatch):
    root, _ = python_run
    monkeypatch.syspath_prepend(str(root / "pkg"))
    path = next((root / "run" / "checkpoints").glob("stage-02-*.ckpt"))
    restored = ContinualLM.load_from_checkpoint(path, weights_only=True)
    assert type(restored).__name__ == "Scaled" and restored.scale == 0.25 and restored.hparams["scale"] == 0.25
    assert restored.method.config()["lam"] == 3.0 and restored.tasks == ["prose", "arithmetic"]
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in saved.items())


def test_load_from_checkpoint_refuses_a_subclass_it_cannot_import(tmp_path):
    class Local(ContinualLM):  # defined in a function: no other process (or module) can import it
        def __init__(self, *args, extra: int = 1, **kwargs):
            super().__init__(*args, **kwargs)

    model = Local(model_config=TINY_LLAMA_CONFIG, adapter="lora", extra=3)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_dm())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert Local.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).hparams["extra"] == 3
    with pytest.raises(ValueError, match=r"written by .*Local, which is not importable here .*set PYTHONPATH"):
        ContinualLM.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
