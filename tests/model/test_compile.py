"""``ContinualLM(compile=True)``: decoder layers compiled in place, no graph break, the eager numbers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG
from torch._dynamo.utils import counters

from crma_lightning.model import compile as compiling
from crma_lightning.model.continual_lm import ContinualLM


def _model(**kwargs) -> ContinualLM:
    return ContinualLM(model_config=TINY_LLAMA_CONFIG, adapter="crma", task_adapters="shared", **kwargs)


@pytest.fixture
def aot_eager(monkeypatch):
    # The same dynamo graphs as inductor, without generating and compiling C++ (tens of seconds per graph).
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _step(model: ContinualLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model.model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.model.named_parameters() if p.grad is not None}


def test_compiled_layers_give_the_eager_losses_without_graph_breaks(aot_eager):
    eager, compiled = _model(), _model(compile=True)
    eager.configure_model()
    compiled.configure_model()
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # names unchanged
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second step runs the cached graphs
        loss, grads = _step(eager, ids)
        compiled_loss, compiled_grads = _step(compiled, ids)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
        for name in grads:
            torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers really went through dynamo
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiling_twice_is_a_no_op(aot_eager):
    model = _model(compile=True)
    assert compiling.compile_decoder_layers(model.model) == 2
    assert compiling.compile_decoder_layers(model.model) == 0  # e.g. configure_model of the next stage
