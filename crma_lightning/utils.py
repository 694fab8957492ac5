"""Small helpers shared by the driver, the CLI and the report."""

from __future__ import annotations

import os

import torch


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (also before a process group exists, from the launcher's env)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0
