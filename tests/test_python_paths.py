"""The paths users take from Python: a plain ``trainer.fit`` loop, the stage driver, subclasses.

docs/subclassing.md, "Training from Python".
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA_CONFIG

from crma_lightning import ContinualLM, SequentialDomainDataModule
from crma_lightning.adapters import lora_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


def doc_python_blocks(doc: str, section: str) -> list[str]:
    """The fenced ``python`` blocks of one ``##`` section of a docs/ file."""
    text = (ROOT / "docs" / doc).read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


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
