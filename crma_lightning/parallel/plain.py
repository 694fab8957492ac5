"""Sharding a ``ContinualLM`` under Lightning's own ``ModelParallelStrategy`` / ``FSDPStrategy``.

The adapter strategies (:mod:`crma_lightning.parallel.strategies`) shard the module themselves. Under
Lightning's plain ones the same unit layout is applied, with a warning: their checkpoints gather the
whole frozen base model. Duck-typed, so nothing here imports a Lightning strategy.
"""

from __future__ import annotations

import warnings
from typing import Any

from crma_lightning.parallel.fsdp1 import apply_fsdp1
from crma_lightning.parallel.fsdp2 import apply_fsdp2, data_parallel_mesh


def shard_under_plain_strategy(module: Any, strategy: Any) -> None:
    """Apply the FSDP2 layout when ``module.device_mesh`` is set, the FSDP1 one under an FSDP1 strategy.

    ``module`` has ``model``, ``device_mesh``, ``fsdp_mixed_precision`` and ``fsdp_activation_checkpointing``
    (``ContinualLM``). Anything else (one device, DDP): nothing to do.
    """
    if module.device_mesh is not None:  # ModelParallelStrategy
        warnings.warn(
            "ContinualLM under a plain ModelParallelStrategy: its checkpoints gather the whole frozen base "
            "model, and uneven evaluation shards can hang. Use "
            "crma_lightning.parallel.AdapterModelParallelStrategy instead.",
            stacklevel=3,
        )
        mesh = data_parallel_mesh(module.device_mesh)
        apply_fsdp2(
            module.model,
            mesh,
            module.fsdp_mixed_precision,
            module.fsdp_activation_checkpointing,
            getattr(module, "init_on_rank0", False),
        )
    elif getattr(strategy, "sharding_strategy", None) is not None:  # FSDPStrategy (FSDP1)
        warnings.warn(
            "ContinualLM under a plain FSDPStrategy: its checkpoints gather the whole frozen base model "
            "onto rank 0. Use crma_lightning.parallel.AdapterFSDPStrategy instead.",
            stacklevel=3,
        )
        if "auto_wrap_policy" in getattr(strategy, "kwargs", {}):
            raise ValueError(
                "FSDPStrategy(auto_wrap_policy=...) with ContinualLM: leave auto_wrap_policy unset, "
                "configure_model wraps adapters and blocks itself"
            )
        module.model = apply_fsdp1(
            module.model,
            module.fsdp_activation_checkpointing,
            getattr(module, "init_on_rank0", False),
            getattr(strategy, "root_device", None),
        )
