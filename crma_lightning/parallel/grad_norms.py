"""Gradient norms per optimizer param group, on the device, exact under FSDP1/FSDP2/DDP. Pure torch."""

from __future__ import annotations

from typing import Any

import torch

from crma_lightning import _compat
from crma_lightning.parallel.dist import is_dtensor


def group_grad_square_sums(
    optimizer: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    local_shards_group: Any = None,
) -> tuple[list[str], torch.Tensor]:
    """Sum of squared gradient entries per optimizer param group, over the whole (unsharded) model.

    Runs entirely on the device: no host synchronisation. Squares are accumulated in float32 whatever
    the gradient dtype. Sharded gradients are reduced so that every rank gets the single-process value:

    * DTensor gradients (FSDP2 ``fully_shard``, tensor parallel): the local shards' sums are
      all-reduced over the mesh dimensions the tensor is sharded on (replicated dimensions hold
      copies and are not summed).
    * Plain local-shard gradients (FSDP1, Lightning's ``FSDPStrategy``): pass the sharding process
      group as ``local_shards_group`` and the sums are all-reduced over it.
    * Replicated gradients (single device, DDP after its all-reduce): used as they are.

    Every rank must call this together when a reduction is needed (it issues collectives).

    Args:
        optimizer: The optimizer about to step; gradients of its parameters (``None`` grads skipped).
        device: Device of the result when there are no gradients at all.
        local_shards_group: Process group over which plain-tensor gradients are shards (FSDP1), or
            ``None`` when plain gradients are complete.

    Returns:
        Group names (the group's ``"name"`` key, else ``"group{i}"``) and a float32 tensor of their
        squared-gradient sums, in ``optimizer.param_groups`` order.
    """
    groups = optimizer.param_groups
    names = [str(g.get("name", f"group{i}")) for i, g in enumerate(groups)]
    # Bucket the gradients by the process groups their squares must be summed over.
    buckets: dict[tuple[Any, ...], list[list[torch.Tensor]]] = {}
    for i, group in enumerate(groups):
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if is_dtensor(g):
                mesh = g.device_mesh
                key = tuple(mesh.get_group(d) for d, pl in enumerate(g.placements) if pl.is_shard())
                g = g.to_local()
            else:
                key = () if local_shards_group is None else (local_shards_group,)
            buckets.setdefault(key, [[] for _ in groups])[i].append(g)
    total: torch.Tensor | None = None
    for key, per_group in buckets.items():
        flat = [g for gs in per_group for g in gs]
        # One fused kernel for all per-tensor norms, accumulated in float32.
        squares = torch.stack(_compat.foreach_norm(flat, dtype=torch.float32)).square()
        sums = torch.stack([part.sum() for part in squares.split([len(gs) for gs in per_group])])
        for process_group in key:
            torch.distributed.all_reduce(sums, group=process_group)
        total = sums if total is None else total + sums.to(total.device)
    if total is None:
        total = torch.zeros(len(groups), dtype=torch.float32, device=device)
    return names, total
