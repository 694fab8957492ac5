"""One test per private-attribute accessor of ``crma_lightning._compat``, on the real installed libraries.

If a Lightning/torch/datasets upgrade moves one of these internals, exactly one of these tests fails,
naming the accessor - instead of a callback somewhere silently logging at the wrong step.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from crma_lightning import _compat


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    return L.Trainer(**{**defaults, **kwargs})


def test_logging_step_counts_optimizer_steps_and_can_be_set(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    _compat.set_logging_step(trainer, 10)
    assert _compat.logging_step(trainer) == 10
    trainer.fit(BoringModel())
    assert _compat.logging_step(trainer) == 13  # continued from 10: three optimizer steps


def test_saved_logging_step_reads_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(BoringModel())
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    assert _compat.saved_logging_step(torch.load(path, weights_only=False)) == 2


def test_is_accumulating_follows_accumulate_grad_batches(tmp_path):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(_compat.is_accumulating(trainer))

    trainer = _trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(BoringModel())
    assert seen == [True, False, True, False]


def test_clear_received_sigterm_resets_lightnings_flag(tmp_path):
    trainer = _trainer(tmp_path)
    connector = trainer._signal_connector
    connector.received_sigterm = True
    _compat.clear_received_sigterm(trainer)
    assert connector.received_sigterm is False


def test_unwrap_optimizer_returns_the_torch_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert _compat.unwrap_optimizer(LightningOptimizer(opt)) is opt
    assert _compat.unwrap_optimizer(opt) is opt


def test_resolve_auto_data_parallel_size_means_every_rank():
    from crma_lightning.parallel import AdapterModelParallelStrategy

    strategy = AdapterModelParallelStrategy()
    strategy.num_nodes = 2
    strategy.parallel_devices = [torch.device("cpu")] * 3
    _compat.resolve_auto_data_parallel_size(strategy)
    assert strategy._data_parallel_size == 6


def test_foreach_norm_matches_per_tensor_norms():
    tensors = [torch.randn(5, 3), torch.randn(7, dtype=torch.bfloat16)]
    norms = _compat.foreach_norm(tensors, dtype=torch.float32)
    for t, n in zip(tensors, norms):
        assert n.dtype == torch.float32
        assert torch.allclose(n, t.float().norm(), rtol=1e-2)


def test_fused_optimizer_devices_include_this_machines_cpu():
    devices = _compat.fused_optimizer_devices()
    assert "cpu" in devices and "cuda" in devices  # torch 2.4+ has fused Adam(W) kernels for both


def test_is_compiled_follows_module_compile():
    layer = torch.nn.Linear(2, 2)
    assert not _compat.is_compiled(layer)
    layer.compile(backend="aot_eager")  # lazy: nothing is traced until the first call
    assert _compat.is_compiled(layer) and not _compat.is_compiled(torch.nn.Linear(2, 2))


def test_tensor_version_counts_in_place_changes():
    t = torch.zeros(3)
    before = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == before + 1
    t + 1  # out of place: unchanged
    assert _compat.tensor_version(t) == before + 1


@pytest.mark.distributed
def test_refresh_fsdp2_gradient_dtypes_reaches_the_param_groups(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(4, 4)
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        layer(torch.randn(2, 4))  # lazy init
        assert _compat.refresh_fsdp2_gradient_dtypes(layer, required=True) is True
    finally:
        dist.destroy_process_group()


def test_dataset_fingerprint_changes_with_content():
    from datasets import Dataset

    a = Dataset.from_dict({"x": [1, 2]})
    b = Dataset.from_dict({"x": [1, 3]})
    assert isinstance(_compat.dataset_fingerprint(a), str)
    assert _compat.dataset_fingerprint(a) != _compat.dataset_fingerprint(b)


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({"RANK": "3", "LOCAL_RANK": "1", "NODE_RANK": "1"}, 3),
        ({"LOCAL_RANK": "1"}, 1),
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 4),
        ({"LOCAL_RANK": "0", "NODE_RANK": "2"}, 2),  # width unknown: still not rank 0
        ({"LOCAL_RANK": "0", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2),
        ({}, 0),
    ],
)
def test_global_rank_before_a_process_group_tells_nodes_apart(monkeypatch, env, rank):
    # Lightning's launcher sets LOCAL_RANK and NODE_RANK, not RANK: node 1's first process is not rank 0,
    # so it neither takes the run directory's lock nor writes config.yaml or moves checkpoints.
    from crma_lightning.parallel import dist

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dist.global_rank() == rank
    assert dist.is_global_zero() == (rank == 0) == dist.owns_run_dir()
