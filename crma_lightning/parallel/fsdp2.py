"""FSDP2 (``fully_shard``) for a ``ContinualLM``'s model: the unit layout and mixed precision.

Called by :class:`~crma_lightning.parallel.strategies.AdapterModelParallelStrategy` (and, with a
warning, under Lightning's plain ``ModelParallelStrategy``) from ``ContinualLM.configure_model``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crma_lightning import _compat
from crma_lightning.adapters import CRMABlock, find_decoder_layers
from crma_lightning.parallel.rank0_init import fill_from_rank0, full_state_on_rank0

# fp16 is left out on purpose: FSDP2's policy has no loss scaling, and fp16 gradients underflow without it.
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def fsdp2_mixed_precision(name: str | None) -> Any:
    """``MixedPrecisionPolicy`` for ``name`` (``"bf16"``; ``None``: no policy).

    Parameters are all-gathered and computed in the low-precision dtype; gradients are reduced in
    float32, and the sharded parameters (hence the optimizer) stay in their own dtype - float32 for
    the adapters.
    """
    if name is None:
        return None
    if name not in MIXED_PRECISION_DTYPES:
        raise ValueError(
            f"fsdp_mixed_precision={name!r} is invalid: expected one of {sorted(MIXED_PRECISION_DTYPES)} or None"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=MIXED_PRECISION_DTYPES[name], reduce_dtype=torch.float32)


def _float32_policy() -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)


def is_fsdp2_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was already applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def apply_fsdp2(
    model: nn.Module,
    mesh: Any,
    mixed_precision: str | None = None,
    activation_checkpointing: bool = False,
    init_on_rank0: bool = False,
) -> int:
    """``fully_shard`` every decoder block, then the root; returns how many modules were newly sharded.

    A block is the :class:`CRMABlock` wrapper when CRMA is attached; each CRMA adapter is a float32 unit of
    its own inside it, gathered with all other blocks' adapters in one collective at the model's
    pre-forward (:mod:`crma_lightning.adapters.crma_shards`) rather than by FSDP2. LoRA factors live inside
    the block's linears and are sharded with it.
    Idempotent: the stage driver builds a new ``Trainer`` per stage and Lightning calls
    ``configure_model`` for every ``fit``/``validate``, so modules already sharded are skipped.

    Frozen base weights and trainable adapters share an FSDP2 unit without cost: FSDP2 keeps one
    ``DTensor`` per parameter and only allocates and reduce-scatters gradients of parameters that
    require them, re-reading ``requires_grad`` at every all-gather - so flipping it between stages
    (stage 2 trains adapter ``b`` while ``a`` is frozen) needs no re-wrapping. The one thing FSDP2
    fixes at the first forward, each unit's gradient dtypes, is refreshed on every call (see
    :func:`refresh_fsdp2_gradient_dtypes`).

    Args:
        model: The Hugging Face model (``ContinualLM.model``).
        mesh: A 1-D device mesh over the data-parallel ranks.
        mixed_precision: See :func:`fsdp2_mixed_precision`.
        activation_checkpointing: Recompute each block's activations in the backward pass (torch's
            composable ``checkpoint``, which keeps parameter names unchanged - checkpoints stay
            interchangeable with unsharded runs).
        init_on_rank0: The model is complete on rank 0 only (on the meta device elsewhere): fill every
            rank's shards from rank 0 when the root is first sharded (:mod:`.rank0_init`). A collective.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    policy = fsdp2_mixed_precision(mixed_precision)
    if policy is not None:
        kwargs["mp_policy"] = policy
    _, layers = find_decoder_layers(model)
    full_state = None
    if init_on_rank0 and not is_fsdp2_module(model):  # rank 0: references kept alive through the sharding
        full_state = full_state_on_rank0(model, mesh.get_rank())
    count = 0
    for block in layers:
        if is_fsdp2_module(block):
            continue
        if isinstance(block, CRMABlock):
            # Its own unit, so that the block's all-gather does not carry it: all blocks' CRMA shards are
            # gathered together for the batched factors (adapters/crma_shards.py), and the block applies them
            # without calling the adapter, whose unit is then never gathered (only when a block computes its
            # own factors). Float32 also under mixed precision: CRMA's Sinkhorn and norm constraints run in
            # float32 by design (the structural bound needs exact unit row/column sums), and its mixing
            # product needs one dtype; inputs stay in the compute dtype, and so does its output.
            fully_shard(block.crma, mesh=mesh, mp_policy=_float32_policy())
            count += 1
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        fully_shard(block, **kwargs)
        count += 1
    if not is_fsdp2_module(model):
        fully_shard(model, **kwargs)
        count += 1
        if full_state is not None:
            fill_from_rank0(model, full_state, _mesh_device(mesh))
            del full_state  # rank 0's full copy is released here
    refresh_fsdp2_gradient_dtypes(model, required=policy is not None)
    return count


def _mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def refresh_fsdp2_gradient_dtypes(model: nn.Module, required: bool = True) -> None:
    """Make FSDP2 re-derive each unit's gradient dtypes from the parameters that train *now*.

    Why: FSDP2 fixes a unit's original/reduce dtypes once, at its first forward, from the parameters
    that require grad at that moment (``FSDPParamGroup._init_mp_dtypes``, called from ``lazy_init``).
    In a continual run the first forward is the base-model evaluation, when most adapters are
    frozen; a unit with no trainable parameter then gets ``None`` for both, and under a mixed
    precision policy its gradients would later be reduced in bf16 and assigned to float32 parameters
    (``RuntimeError: attempting to assign a gradient with dtype BFloat16 ...``). Re-running that
    initialisation after ``requires_grad`` changed (every ``fit``, via ``configure_model``) fixes it.
    Without a mixed precision policy gradients already have the parameters' dtype and nothing changes.

    Uses FSDP2 internals (torch >= 2.6); with ``required`` a missing internal raises instead of
    failing later with the error above.
    """
    for module in model.modules():
        if is_fsdp2_module(module) and not _compat.refresh_fsdp2_gradient_dtypes(module, required):
            return


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel sub-mesh of Lightning's 2-D ``(data_parallel, tensor_parallel)`` mesh.

    Raises:
        ValueError: Tensor parallelism was requested; ``ContinualLM`` has no tensor-parallel plan.
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported: ContinualLM shards "
            "with FSDP2 over the data-parallel dimension only; use tensor_parallel_size=1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh
