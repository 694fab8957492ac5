"""ContinualLM(init_on_rank0=True) on a rank other than 0: the model is built on the meta device.

The 2-process runs (rank 0 loads, rank 1 receives its shards; same losses as every rank loading) are in
tests/parallel/test_distributed.py::test_loading_on_rank0_only_gives_the_same_losses.
"""

from __future__ import annotations

import pytest
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.parallel.rank0_init import has_meta_tensors


def _model(**kwargs) -> ContinualLM:
    return ContinualLM(model_config=TINY_LLAMA_CONFIG, crma={"init": "pissa"}, **kwargs)


def test_other_ranks_build_the_same_model_on_the_meta_device(monkeypatch):
    reference = _model()
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets in the second process
    meta = _model(init_on_rank0=True)
    assert has_meta_tensors(meta.model) and not has_meta_tensors(reference.model)
    assert all(p.is_meta for p in meta.model.parameters())  # base and adapters (PiSSA init left to rank 0)
    shapes = {n: (p.shape, p.dtype, p.requires_grad) for n, p in meta.model.named_parameters()}
    assert shapes == {n: (p.shape, p.dtype, p.requires_grad) for n, p in reference.model.named_parameters()}


def test_rank0_builds_the_whole_model():
    model = _model(init_on_rank0=True)  # no launcher variables: this process is rank 0
    assert not has_meta_tensors(model.model)


def test_init_on_rank0_without_a_sharding_strategy_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    model = _model(init_on_rank0=True)
    with pytest.raises(ValueError, match="init_on_rank0=True needs a sharding strategy"):
        model.configure_model()
