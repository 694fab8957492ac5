"""Multi-device training: FSDP2/FSDP1 wrapping of a ``ContinualLM`` and adapter-only sharded checkpoints.

Three ways to train on several devices, all through Lightning's ``Trainer(strategy=...)``:

* ``AdapterModelParallelStrategy`` (FSDP2, recommended): Lightning's ``ModelParallelStrategy`` with
  ``ContinualLM.configure_model`` applying ``fully_shard`` to every decoder block and the root (see
  :func:`apply_fsdp2`). Its checkpoints hold only the adapters and trainable parameters, gathered to
  full tensors and written by rank 0 as one file - the same layout as a single-process checkpoint, so
  either loads into the other.
* ``AdapterFSDPStrategy`` (FSDP1, defined in :mod:`crma_lightning.fsdp1`): Lightning's
  ``FSDPStrategy``; ``configure_model`` wraps each LoRA factor, each CRMA adapter, each block and
  the root as FSDP units (:func:`apply_fsdp1`). Same adapter-only checkpoints, gathering only the
  adapters' units; also runs on CPU (gloo).
* ``strategy="ddp"``: nothing to wrap; ``ContinualLM.state_dict`` already holds only the adapters.

Why strategy subclasses: ``ModelParallelStrategy`` collects checkpoints with ``get_model_state_dict``
and ``FSDPStrategy`` with FSDP1's full state dict; both gather the whole frozen base, and both load
with their own logic that bypasses ``ContinualLM.load_state_dict``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch import nn

from crma_lightning.adapters import adapter_state_dict, save_adapters
from crma_lightning.adapters.serialization import METADATA_KEY, atomic_write
from crma_lightning.checkpoints import SingleFileCheckpoints
from crma_lightning.fsdp1 import AdapterFSDPStrategy, KeepDtypesFSDPPrecision
from crma_lightning.sampling import PaddedEvalLoader, equalize_eval_batches
from crma_lightning.sharding import (
    clean_parameter_name,
    fsdp1_gather_params,
    has_fsdp1_modules,
)

try:  # public from torch 2.5
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


# ---------------------------------------------------------------------- gathering and scattering
def is_dtensor(value: Any) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def has_dtensors(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def gather_full_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Full, detached CPU copies of the tensors of ``state``; sharded ``DTensor`` values are all-gathered.

    A collective when ``state`` holds a ``DTensor``: every rank must call it with the same keys in
    the same order (the module's own order; the state dicts of identical modules agree).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        if is_dtensor(value):
            value = value.full_tensor()
        # clone(): on CPU, .cpu() would alias the live (or, under FSDP1's summon_full_params, soon freed) storage.
        out[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return out


def shard_like(value: Any, param: Any) -> Any:
    """``value`` (a full tensor) as a ``DTensor`` laid out like ``param``; anything else unchanged.

    Every rank holds the full tensor, so each takes its own shard locally (``src_data_rank=None``):
    no communication.
    """
    if not (is_dtensor(param) and isinstance(value, torch.Tensor)) or is_dtensor(value):
        return value
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: saved {tuple(value.shape)} vs model {tuple(param.shape)}")
    return distribute_tensor(
        value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
    )


def load_full_state(module: nn.Module, state: Mapping[str, Any], strict: bool = True) -> Any:
    """Load full (unsharded) tensors into a possibly sharded module through its own ``load_state_dict``.

    The module's ``load_state_dict`` keeps its checks (``ContinualLM`` verifies the adapter keys);
    the values are converted to ``DTensor`` shards matching the parameters first.
    """
    params = dict(module.named_parameters())
    converted = {k: shard_like(v, params[k]) if k in params else v for k, v in state.items()}
    return module.load_state_dict(converted, strict=strict)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (a collective under FSDP2).

    The result has the single-process layout (state keyed by parameter index), so a checkpoint
    written by N processes resumes on M.
    """
    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer._optimizer
    state = optimizer.state_dict()
    gathered = {idx: gather_full_state(dict(sorted(s.items()))) for idx, s in sorted(state["state"].items())}
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a full (single-process layout) optimizer state into an optimizer over sharded parameters."""
    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer._optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(
            f"optimizer state does not match: the checkpoint has "
            f"{sum(len(g['params']) for g in state['param_groups'])} parameters, the optimizer {len(params)}"
        )
    sharded = {
        idx: {k: shard_like(v, params[int(idx)]) if k != "step" else v for k, v in s.items()}
        for idx, s in state["state"].items()
    }
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


# ---------------------------------------------------------------------- adapter files
def export_adapters(
    model: nn.Module, path: str | os.PathLike, metadata: dict | None = None, write: bool = True
) -> Path:
    """Write the adapters of a possibly sharded model as safetensors (the format of ``save_adapters``).

    Call on every rank: sharded adapters are gathered collectively; only ranks with ``write`` (rank 0)
    write the file.
    """
    if not has_dtensors(model) and not has_fsdp1_modules(model):
        if write:
            save_adapters(model, path, metadata=metadata)
        return Path(path)
    if has_fsdp1_modules(model):
        tensors = fsdp1_gather_params(model, [clean_parameter_name(n) for n in adapter_state_dict(model)])
    else:
        tensors = gather_full_state(adapter_state_dict(model))
    if write:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        # Same layout as crma_lightning.adapters.save_adapters, so load_adapters/read_adapter_metadata read it.
        meta = {"format": "pt", METADATA_KEY: json.dumps(metadata or {}, default=str)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


# ---------------------------------------------------------------------- the strategy
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
        # ModelParallelStrategy's "auto" means one data-parallel group per node (tensor parallel inside
        # a node); without tensor parallelism every rank is a data-parallel rank.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # ------------------------------------------------------------------ saving
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        state = gather_full_state(self.lightning_module.state_dict())  # collective: every rank
        return state if self.is_global_zero else {}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = full_optimizer_state(optimizer)  # collective: every rank
        return state if self.is_global_zero else {}

    # ------------------------------------------------------------------ loading
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        load_full_state(self.lightning_module, checkpoint["state_dict"], strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_full_optimizer_state(optimizer, state)

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        return equalize_eval_batches(super().process_dataloader(dataloader))


__all__ = [
    "AdapterFSDPStrategy",
    "AdapterModelParallelStrategy",
    "KeepDtypesFSDPPrecision",
    "PaddedEvalLoader",
    "equalize_eval_batches",
    "export_adapters",
    "full_optimizer_state",
    "gather_full_state",
    "load_full_optimizer_state",
    "load_full_state",
]
