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
    """This process's global rank; before a process group exists, the launcher's ``RANK`` (else 0)."""
    if distributed_ready():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (the one that writes files and prints)."""
    return global_rank() == 0


def owns_run_dir() -> bool:
    """Whether this process is the one that locks and writes the run directory: global rank 0 on node 0.

    Before a process group exists a launcher's ``LOCAL_RANK`` alone would make every node's first
    process "rank 0"; ``NODE_RANK``/``GROUP_RANK`` tell them apart (a run directory on a shared file system).
    """
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    return is_global_zero() and node == "0"


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
