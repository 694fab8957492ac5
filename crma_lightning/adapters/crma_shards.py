"""All CRMA adapters' FSDP2 shards gathered in one collective, their gradients reduce-scattered in one.

Why: under FSDP2 (``fully_shard``) each adapter's parameters are ``DTensor`` shards when the model's forward
starts; FSDP2 all-gathers them block by block, inside each block's forward - too late for the factors of
all blocks to be computed together (:mod:`crma_lightning.adapters.crma_batch`). CRMA's parameters are tiny
(``2·n·k·d + n² + 1`` values per block), so the batched path gathers them itself: one
``all_gather_into_tensor`` of every adapter's local shard at the model's pre-forward, and, in the backward,
one ``reduce_scatter_tensor`` of their gradients, averaged over the ranks as FSDP2 averages its own. The
gradients arrive on the sharded parameters as ``DTensor`` gradients (through ``to_local``'s backward), so
the optimizer, gradient clipping and checkpoints see exactly what FSDP2 would have produced. The block's
own all-gather still carries the adapter's shards (FSDP2 gathers a unit's parameters together), but its
forward no longer reads them, so FSDP2 reduces no gradient for them.

Only 1-D meshes with ``Shard(0)`` placements (FSDP2's layout over the data-parallel ranks) are gathered
here; any other layout (HSDP, tensor parallelism) keeps the per-block path. Pure PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

try:  # torch without distributed support has no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - every torch build the project supports has it
    dist, DTensor, Shard = None, None, None


def is_fsdp2_shard(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` sharded along dim 0 over a 1-D mesh (FSDP2's data-parallel layout)."""
    return (
        DTensor is not None
        and isinstance(p, DTensor)
        and p.device_mesh.ndim == 1
        and tuple(p.placements) == (Shard(0),)
        and p.ndim >= 1
    )


class _GatherShards(torch.autograd.Function):
    """Full tensors from the local dim-0 shards of several parameters: one all-gather, one reduce-scatter back.

    Shards follow ``torch.chunk`` (FSDP2's and ``Shard(0)``'s layout): rank ``j`` holds rows
    ``[j·c, min((j+1)·c, D))`` with ``c = ceil(D / world)``, possibly none. Each is padded to ``c`` rows, so
    every rank contributes a buffer of the same size and the gathered buffer, read rank by rank, is each
    full tensor followed by its padding.
    """

    @staticmethod
    def forward(ctx, group, shapes: Sequence[torch.Size], *shards: torch.Tensor):
        world = dist.get_world_size(group)
        chunks = [math.ceil(s[0] / world) for s in shapes]
        rows = [math.prod(s[1:]) for s in shapes]
        ctx.group, ctx.world, ctx.chunks, ctx.rows, ctx.shapes = group, world, chunks, rows, shapes
        ctx.local_rows = [x.shape[0] for x in shards]
        mine = torch.cat([_padded(x.reshape(-1), c * r) for x, c, r in zip(shards, chunks, rows)])
        gathered = mine.new_empty(world * mine.numel())
        dist.all_gather_into_tensor(gathered, mine, group=group)
        per_rank = gathered.view(world, mine.numel())
        full, offset = [], 0
        for shape, c, r in zip(shapes, chunks, rows):
            piece = per_rank[:, offset : offset + c * r].reshape(world * c, *shape[1:])[: shape[0]]
            full.append(piece.contiguous())
            offset += c * r
        return tuple(full)

    @staticmethod
    def backward(ctx, *grads):
        world, parts = ctx.world, []
        for grad, c, r in zip(grads, ctx.chunks, ctx.rows):
            if grad is None:
                parts.append(torch.zeros(world, c * r, dtype=_dtype(grads), device=_device(grads)))
            else:  # rows padded to world·c, then rank j's block is rows [j·c, (j+1)·c)
                parts.append(_padded(grad.reshape(-1), world * c * r).view(world, c * r))
        flat = torch.cat(parts, dim=1).contiguous()  # (world, total): rank j's slice is row j
        mine = flat.new_empty(flat.shape[1])
        dist.reduce_scatter_tensor(mine, flat.view(-1), group=ctx.group)
        mine = mine / world  # FSDP2 averages gradients over the data-parallel ranks
        out, offset = [], 0
        for shape, c, r, local in zip(ctx.shapes, ctx.chunks, ctx.rows, ctx.local_rows):
            out.append(mine[offset : offset + local * r].view(local, *shape[1:]))
            offset += c * r
        return (None, None, *out)


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.numel() == size else torch.cat([x, x.new_zeros(size - x.numel())])


def _dtype(grads) -> torch.dtype:
    return next(g.dtype for g in grads if g is not None)


def _device(grads) -> torch.device:
    return next(g.device for g in grads if g is not None)


def gather_full(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Full tensors of FSDP2 shards ``params`` (all on one mesh, one dtype), with autograd; a collective.

    Every rank must call it with the same parameters in the same order. The gradients of the results are
    averaged over the ranks and land, sharded, on ``params``.
    """
    group = params[0].device_mesh.get_group()
    shards = [p.to_local() for p in params]
    return list(_GatherShards.apply(group, [p.shape for p in params], *shards))
