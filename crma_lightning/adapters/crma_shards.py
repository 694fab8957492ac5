"""All CRMA adapters' FSDP2 shards gathered in one collective, their gradients reduce-scattered in one.

Why: under FSDP2 (``fully_shard``) each adapter's parameters are ``DTensor`` shards when the model's forward
starts; FSDP2 all-gathers them block by block, inside each block's forward - too late for the factors of
all blocks to be computed together (:mod:`crma_lightning.adapters.crma_batch`). CRMA's parameters are tiny
(``2·n·k·d + n² + 1`` values per block), so the batched path gathers them itself: one
``all_gather_into_tensor`` of every adapter's local shards (stacked per parameter name, so the op count does
not grow with depth) at the model's pre-forward, and, in the backward, one ``reduce_scatter_tensor`` of
their gradients, averaged over the ranks as FSDP2 averages its own. The gradients arrive on the sharded
parameters as ``DTensor`` gradients (through ``to_local``'s backward), so the optimizer, gradient clipping
and checkpoints see exactly what FSDP2 would have produced. Each adapter is an FSDP2 unit of its own
(:func:`~crma_lightning.parallel.fsdp2.apply_fsdp2`), which :class:`~crma_lightning.adapters.crma.CRMABlock`
does not call while the batched factors are valid: FSDP2 then never gathers it nor reduces a gradient for it.

Only 1-D meshes with ``Shard(0)`` placements (FSDP2's layout over the data-parallel ranks) are gathered
here; any other layout (HSDP, tensor parallelism) keeps the per-block path. Pure PyTorch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_fsdp2_shard(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` sharded along dim 0 over a 1-D mesh (FSDP2's data-parallel layout)."""
    # No DTensor exists unless its module was imported: a single-process model does not pay for importing it.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return (
        dtensor is not None
        and isinstance(p, dtensor.DTensor)
        and p.device_mesh.ndim == 1
        and tuple(p.placements) == (dtensor.Shard(0),)
        and p.ndim >= 1
    )


class _GatherStacked(torch.autograd.Function):
    """Full ``(L, D, ...)`` stacks from stacks of dim-0 shards ``(L, local, ...)``: one all-gather, one reduce-scatter.

    Each input stacks the local shards of ``L`` parameters of one global shape ``(D, ...)``. Shards follow
    ``torch.chunk`` (FSDP2's and ``Shard(0)``'s layout): rank ``j`` holds rows ``[j·c, min((j+1)·c, D))`` with
    ``c = ceil(D / world)``, possibly none. Each is padded to ``c`` rows, so every rank sends a buffer of the
    same size; the gathered buffer, read rank by rank, holds every stack's rows in order, followed by padding.
    The op count does not depend on ``L``: one pad, one reorder per stack.
    """

    @staticmethod
    def forward(ctx, group, shapes: Sequence[torch.Size], *stacks: torch.Tensor):
        world = dist.get_world_size(group)
        chunks = [math.ceil(shape[0] / world) for shape in shapes]
        ctx.group, ctx.world, ctx.chunks, ctx.shapes = group, world, chunks, shapes
        ctx.local_rows = [x.shape[1] for x in stacks]
        ctx.full_shapes = [(x.shape[0], *shape) for x, shape in zip(stacks, shapes)]
        mine = torch.cat([_pad_rows(x, c).reshape(-1) for x, c in zip(stacks, chunks)])
        gathered = mine.new_empty(world * mine.numel())
        dist.all_gather_into_tensor(gathered, mine, group=group)
        per_rank = gathered.view(world, mine.numel())
        full, offset = [], 0
        for x, shape, c in zip(stacks, shapes, chunks):
            size = x.shape[0] * c * math.prod(shape[1:])
            piece = per_rank[:, offset : offset + size].view(world, x.shape[0], c, *shape[1:])
            full.append(piece.transpose(0, 1).reshape(x.shape[0], world * c, *shape[1:])[:, : shape[0]].contiguous())
            offset += size
        return tuple(full)

    @staticmethod
    def backward(ctx, *grads):
        world, parts = ctx.world, []
        like = next(g for g in grads if g is not None)
        grads = [like.new_zeros(full) if g is None else g for g, full in zip(grads, ctx.full_shapes)]
        for grad, c in zip(grads, ctx.chunks):
            # (L, D, ...) -> rows padded to world·c -> (world, L·c·...): rank j's rows [j·c, (j+1)·c) of every block
            padded = _pad_rows(grad, world * c)
            parts.append(padded.reshape(grad.shape[0], world, -1).transpose(0, 1).reshape(world, -1))
        # (world, total): what rank j receives is row j. Summed in float32 whatever the gradients' dtype, as the
        # adapter's FSDP2 unit would reduce (parallel/fsdp2.py gives it reduce_dtype float32); tiny, so cheap.
        flat = torch.cat(parts, dim=1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        mine = flat.new_empty(flat.shape[1])
        dist.reduce_scatter_tensor(mine, flat.view(-1), group=ctx.group)
        mine = (mine / world).to(like.dtype)  # FSDP2 averages gradients over the data-parallel ranks
        out, offset = [], 0
        for grad, shape, c, local in zip(grads, ctx.shapes, ctx.chunks, ctx.local_rows):
            size = grad.shape[0] * c * math.prod(shape[1:])
            out.append(mine[offset : offset + size].view(grad.shape[0], c, *shape[1:])[:, :local])
            offset += size
        return (None, None, *out)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ``(L, r, ...)`` with zero rows appended along dim 1 up to ``rows``."""
    missing = rows - x.shape[1]
    return x if missing == 0 else torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)


def gather_stacked(params: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per inner sequence of FSDP2 shards of one global shape, their full tensors stacked ``(L, ...)``.

    With autograd; one collective for all (all shards on one mesh, one dtype): every rank must call it with
    the same parameters in the same order. The gradients of the results are averaged over the ranks and
    land, sharded, on ``params``.
    """
    group = params[0][0].device_mesh.get_group()
    stacks = [torch.stack([p.to_local() for p in same]) for same in params]
    return list(_GatherStacked.apply(group, [same[0].shape for same in params], *stacks))
