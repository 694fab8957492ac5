"""FSDP1: :class:`AdapterFSDPStrategy` (Lightning's ``FSDPStrategy``, adapter-only checkpoints) and its precision.

The module contract and the single-file checkpoint loader it shares with FSDP2 live in :mod:`.strategies`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from crma_lightning import _compat
from crma_lightning.data.sampling import equalize_eval_batches
from crma_lightning.parallel.fsdp1 import (
    apply_fsdp1,
    fsdp1_full_optimizer_state,
    fsdp1_gather_params,
    fsdp1_load_full_optimizer_state,
    fsdp1_load_params,
)

try:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
except ImportError:  # pragma: no cover - torch without distributed support
    DeviceMesh = CPUOffload = MixedPrecision = ShardingStrategy = None  # type: ignore[assignment,misc]
from crma_lightning.parallel.strategies import AdapterCheckpointing, SingleFileCheckpoints


class KeepDtypesFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` whose ``"32-true"`` keeps every parameter's own dtype and asks FSDP for no casting.

    Lightning's ``"32-true"`` under FSDP1 casts the whole model to float32 (``convert_module``) and
    gives every unit a float32 ``MixedPrecision``: a bf16 base (``ContinualLM(dtype="bfloat16")``)
    would be stored, all-gathered and computed in float32, at twice its memory. Everywhere else
    (one device, DDP, FSDP2) ``"32-true"`` with a bf16 base means float32 adapters on a bf16 base.
    Other precisions behave as in ``FSDPPrecision``.
    """

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module if self.precision == "32-true" else super().convert_module(module)

    @property
    def mixed_precision_config(self) -> Any:
        return None if self.precision == "32-true" else super().mixed_precision_config


class AdapterFSDPStrategy(SingleFileCheckpoints, FSDPStrategy):
    """FSDP1 (Lightning's ``FSDPStrategy``) for :class:`~crma_lightning.ContinualLM`, adapter-only checkpoints.

    ``ContinualLM.configure_model`` makes every LoRA factor, every CRMA adapter, every decoder block
    and the root an FSDP unit (:func:`~crma_lightning.parallel.fsdp1.apply_fsdp1`). The changes to
    ``FSDPStrategy``:

    * Checkpoints as for :class:`AdapterModelParallelStrategy`, gathering only the units that own
      adapter parameters (``FSDPStrategy``'s full state dict gathers the whole base onto rank 0's CPU);
      loading writes the full tensors back into those units' shards.
    * On CPU the units get ``device_id=cpu`` (torch's FSDP1 then runs on gloo), so this path is
      tested without a GPU; Lightning's ``FSDPStrategy`` itself refuses the CPU accelerator.
    * Evaluation loaders over uneven shards are padded, as under FSDP2.

    The wrapping is ``configure_model``'s, so ``auto_wrap_policy`` and ``activation_checkpointing*``
    are refused (use ``ContinualLM(fsdp_activation_checkpointing=True)``), as are
    ``use_orig_params=False`` (per-task freezing needs the original parameters) and
    ``state_dict_type="sharded"`` (checkpoints are always one adapter-only file).

    Precision: with the trainer's ``precision="32-true"`` every parameter keeps its own dtype - a bf16
    base stays bf16 (stored, gathered and computed), adapters stay float32 - as on one device and
    under FSDP2 (:class:`KeepDtypesFSDPPrecision`; Lightning's ``FSDPStrategy`` would cast the whole
    model to float32). A ``mixed_precision`` policy applies to the base's units only: the adapters'
    units keep float32 (:func:`~crma_lightning.parallel.fsdp1.apply_fsdp1`).

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout: As for :class:`AdapterModelParallelStrategy` / any strategy.
        cpu_offload: Keep sharded parameters (and gradients) in CPU memory (FSDP1's ``CPUOffload``).
        mixed_precision: FSDP1 ``MixedPrecision`` policy for the base's units (default: none).
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"NO_SHARD"`` or ``"HYBRID_SHARD"``
            (with ``device_mesh``).
        device_mesh: For hybrid sharding: ``(replicas, shards)`` or a ``DeviceMesh``.
        **kwargs: Other ``FullyShardedDataParallel`` arguments (``limit_all_gathers``, ...).
    """

    _REFUSED = ("auto_wrap_policy", "activation_checkpointing", "activation_checkpointing_policy", "state_dict_type")

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        cpu_offload: bool | CPUOffload | None = None,
        mixed_precision: MixedPrecision | None = None,
        sharding_strategy: ShardingStrategy | Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = (
            "FULL_SHARD"
        ),
        device_mesh: tuple[int, int] | DeviceMesh | None = None,
        **kwargs: Any,
    ) -> None:
        refused = [
            f"{k}={kwargs[k]!r}"
            for k in self._REFUSED
            if kwargs.get(k) not in (None, "full" if k == "state_dict_type" else None)
        ]
        if refused:
            raise ValueError(
                f"AdapterFSDPStrategy does not take {', '.join(refused)}: ContinualLM.configure_model wraps the "
                "adapters and blocks itself (activation checkpointing: ContinualLM(fsdp_activation_checkpointing="
                "True)), and checkpoints are always one adapter-only file (state_dict_type='full')"
            )
        if kwargs.get("use_orig_params", True) is not True:
            raise ValueError(
                f"use_orig_params={kwargs['use_orig_params']!r} is not supported: per-task adapters freeze and "
                "unfreeze original parameters between stages; use True (the default)"
            )
        for key in self._REFUSED:
            kwargs.pop(key, None)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            cpu_offload=cpu_offload,
            mixed_precision=mixed_precision,
            sharding_strategy=sharding_strategy,
            device_mesh=device_mesh,
            **kwargs,
        )

    @property
    def precision_plugin(self) -> FSDPPrecision:
        plugin = FSDPStrategy.precision_plugin.fget(self)
        if type(plugin) is FSDPPrecision and plugin.precision == "32-true":
            plugin = KeepDtypesFSDPPrecision("32-true")
            FSDPStrategy.precision_plugin.fset(self, plugin)
        return plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: FSDPPrecision | None) -> None:
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def setup(self, trainer: L.Trainer) -> None:
        if not isinstance(self.lightning_module, AdapterCheckpointing):
            raise TypeError(
                f"AdapterFSDPStrategy trains crma_lightning.ContinualLM (or a subclass), got "
                f"{type(self.lightning_module).__name__}; use Lightning's FSDPStrategy for other modules"
            )
        super().setup(trainer)

    def shard_continual_model(self, module: Any) -> None:
        """Wrap adapters, blocks and the root as FSDP1 units (:func:`~crma_lightning.parallel.fsdp1.apply_fsdp1`)."""
        module.model = apply_fsdp1(
            module.model,
            module.fsdp_activation_checkpointing,
            getattr(module, "init_on_rank0", False),
            self.root_device,
        )

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        device = self.root_device
        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            # FSDPStrategy passes device.index, which is None on CPU: FSDP1 would then look for an accelerator.
            device_id=device if device.type == "cpu" else device.index,
            **self.kwargs,
        ):
            yield

    # ------------------------------------------------------------------ saving
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        names = [n.removeprefix("model.") for n in module.checkpoint_parameter_names()]
        gathered = fsdp1_gather_params(module.model, names)  # collective; full tensors on rank 0 only
        if not self.is_global_zero:
            return {}
        state = {f"model.{n}": value for n, value in gathered.items()}
        state.update({k: v.detach().to("cpu", copy=True) for k, v in module.own_state_dict().items()})
        return state

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = fsdp1_full_optimizer_state(self.lightning_module, _compat.unwrap_optimizer(optimizer))  # collective
        return state if self.is_global_zero else {}

    # ------------------------------------------------------------------ loading
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        if strict:
            module.check_checkpoint_keys(state)
        values = {k.removeprefix("model."): state[k] for k in module.checkpoint_parameter_names() if k in state}
        # Only the adapters' units are gathered and written back; the frozen base is never touched.
        fsdp1_load_params(module.model, values)  # collective
        module.load_own_state_dict(state)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint has {len(states)} optimizer states, the module {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states):
            fsdp1_load_full_optimizer_state(self.lightning_module, _compat.unwrap_optimizer(optimizer), state)

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        return equalize_eval_batches(super().process_dataloader(dataloader))


__all__ = ["AdapterFSDPStrategy", "KeepDtypesFSDPPrecision"]
