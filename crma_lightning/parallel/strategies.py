"""The Lightning strategies that shard a ``ContinualLM`` and keep its checkpoints adapter-only.

* :class:`AdapterModelParallelStrategy` (FSDP2, recommended): Lightning's ``ModelParallelStrategy``;
  ``fully_shard`` on every decoder block and the root (:mod:`crma_lightning.parallel.fsdp2`).
* :class:`~crma_lightning.parallel.fsdp1_strategy.AdapterFSDPStrategy` (FSDP1): Lightning's
  ``FSDPStrategy``; every LoRA factor, CRMA adapter, block and the root is a unit
  (:mod:`crma_lightning.parallel.fsdp1`); also runs on CPU. It shares this file's checkpoint loader.
* ``strategy="ddp"``: nothing to wrap; ``ContinualLM.state_dict`` already holds only the adapters.

Why subclasses: Lightning's strategies collect checkpoints by gathering the whole model (frozen base
included) and load with their own logic, bypassing ``ContinualLM.load_state_dict``. Both strategies
here write one file of full adapter tensors in the single-process layout, so any checkpoint loads
under any strategy and world size.

The module and the strategies meet through two duck-typed contracts, neither importing the other:
a strategy that has ``shard_continual_model(module)`` shards the module's model itself (called from
``ContinualLM.configure_model``), and a module that satisfies :class:`AdapterCheckpointing` tells
the strategies which parameters a checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from crma_lightning import _compat
from crma_lightning.data.sampling import equalize_eval_batches
from crma_lightning.parallel.fsdp2 import apply_fsdp2, data_parallel_mesh
from crma_lightning.parallel.gather import (
    full_optimizer_state,
    gather_full_state,
    load_full_optimizer_state,
    load_full_state,
)

try:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
except ImportError:  # pragma: no cover - torch without distributed support
    DeviceMesh = CPUOffload = MixedPrecision = ShardingStrategy = None  # type: ignore[assignment,misc]


@runtime_checkable
class AdapterCheckpointing(Protocol):
    """What the adapter strategies need from a module (``ContinualLM`` satisfies it)."""

    model: nn.Module

    def checkpoint_parameter_names(self) -> list[str]:
        """``state_dict`` keys of what a checkpoint holds (adapters and trainable parameters)."""

    def check_checkpoint_keys(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` has exactly the module's checkpoint keys."""

    def own_state_dict(self) -> dict[str, Any]:
        """State outside ``model`` (a subclass's own parameters and buffers)."""

    def load_own_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`own_state_dict` returned."""


class SingleFileCheckpoints:
    """Strategy mixin: every rank reads the one-file adapter checkpoint and takes what it holds.

    The strategy loads the optimizer state itself in ``load_optimizer_state_dict``.
    """

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise ValueError(
                f"{path} is a sharded (distributed) checkpoint folder; {type(self).__name__} reads the "
                "single-file adapter checkpoints it writes (or any single-process ContinualLM checkpoint)"
            )
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # Lightning calls load_optimizer_state_dict (the FSDP parents load it in load_checkpoint)


class AdapterModelParallelStrategy(SingleFileCheckpoints, ModelParallelStrategy):
    """FSDP2 data parallelism for :class:`~crma_lightning.ContinualLM` with adapter-only checkpoints.

    Lightning's ``ModelParallelStrategy`` with three changes:

    * Checkpoints hold what ``lightning_module.state_dict()`` holds (for ``ContinualLM``: adapters and
      trainable parameters, never the frozen base), gathered to full tensors, plus the optimizer state
      in the single-process layout; rank 0 writes one file. A checkpoint from N processes therefore
      loads on M processes or on one, and a single-process checkpoint loads here.
    * Loading goes through the module's own ``load_state_dict`` (key checks included), with each
      rank taking its shard of the full tensors locally.
    * Evaluation loaders over :class:`EvalShardSampler` shards are padded to the same number of
      batches on every rank (see :class:`PaddedEvalLoader`).

    Args:
        data_parallel_size: Ranks that shard the model; ``"auto"``: all of them (devices × nodes).
        tensor_parallel_size: Must be 1 (``ContinualLM`` has no tensor-parallel plan).
        process_group_backend: ``"nccl"``, ``"gloo"``, ... (default: the device's).
        timeout: Timeout of collective operations.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size not in (1, "auto"):
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size!r} is not supported: ContinualLM shards with "
                "FSDP2 over the data-parallel dimension only; use 1"
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        _compat.resolve_auto_data_parallel_size(self)
        super().setup_environment()

    def shard_continual_model(self, module: Any) -> None:
        """``fully_shard`` every decoder block, then the root (:func:`~crma_lightning.parallel.fsdp2.apply_fsdp2`)."""
        apply_fsdp2(
            module.model,
            data_parallel_mesh(self.device_mesh),
            module.fsdp_mixed_precision,
            module.fsdp_activation_checkpointing,
            getattr(module, "init_on_rank0", False),
        )

    # ------------------------------------------------------------------ saving
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        state = gather_full_state(self.lightning_module.state_dict())  # collective: every rank
        return state if self.is_global_zero else {}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = full_optimizer_state(_compat.unwrap_optimizer(optimizer))  # collective: every rank
        return state if self.is_global_zero else {}

    # ------------------------------------------------------------------ loading
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        load_full_state(self.lightning_module, checkpoint["state_dict"], strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_full_optimizer_state(_compat.unwrap_optimizer(optimizer), state)

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        return equalize_eval_batches(super().process_dataloader(dataloader))


__all__ = ["AdapterCheckpointing", "AdapterModelParallelStrategy", "SingleFileCheckpoints"]
