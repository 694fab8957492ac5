"""Which process am I, and is this tensor sharded: the one definition of each, pure torch.

Everything in the package that asks "is this global rank 0?" or "is this a ``DTensor``?" asks here,
so the answer cannot differ between the report writer, the checkpoint store and the callbacks.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # public from torch 2.5; FSDP2 (fully_shard) parameters and gradients are DTensors
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def distributed_ready() -> bool:
    """Whether a default process group exists (collectives can run)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    """This process's global rank; before a process group exists, what the launcher's variables say.

    ``RANK`` when set (torchrun). Lightning's own launcher sets only ``LOCAL_RANK`` and ``NODE_RANK``
    (``GROUP_RANK`` under torchelastic): on node ``n > 0`` the rank is ``n * LOCAL_WORLD_SIZE + LOCAL_RANK``,
    and never 0 even when the node's width is unknown - so no other node's first process takes itself for
    rank 0 and writes the run directory (on a shared file system) before the process group exists.
    """
    if distributed_ready():
        return torch.distributed.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    if node == 0:
        return local
    return node * (int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or local + 1) + local


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (the one that writes files and prints)."""
    return global_rank() == 0


def owns_run_dir() -> bool:
    """Whether this process is the one that locks and writes the run directory: global rank 0."""
    return is_global_zero()


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``DTensor`` (an FSDP2 / tensor-parallel shard)."""
    return DTensor is not None and isinstance(value, DTensor)


def to_local(value: torch.Tensor) -> torch.Tensor:
    """This rank's local shard of a ``DTensor``; any other tensor unchanged."""
    return value.to_local() if is_dtensor(value) else value


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank must call it); others unchanged."""
    return value.full_tensor() if is_dtensor(value) else value


def has_dtensors(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (the module was sharded with FSDP2)."""
    return any(is_dtensor(p) for p in module.parameters())
