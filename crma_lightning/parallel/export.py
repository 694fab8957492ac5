"""Adapter files from a possibly sharded model: gather the adapters, then call the one writer."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from crma_lightning.adapters import adapter_state_dict
from crma_lightning.adapters.serialization import crma_config_of, write_adapter_file
from crma_lightning.parallel.dist import has_dtensors
from crma_lightning.parallel.fsdp1 import fsdp1_gather_params, has_fsdp1_modules
from crma_lightning.parallel.gather import clean_parameter_name, gather_full_state


def export_adapters(
    model: nn.Module, path: str | os.PathLike, metadata: dict | None = None, write: bool = True
) -> Path:
    """Write the adapters of a possibly sharded model with :func:`~crma_lightning.adapters.save_adapters`' layout.

    Call on every rank: sharded adapters (FSDP1 units, FSDP2 ``DTensor``) are gathered collectively;
    only ranks with ``write`` (rank 0) write the file.
    """
    if has_fsdp1_modules(model):
        tensors = fsdp1_gather_params(model, [clean_parameter_name(n) for n in adapter_state_dict(model)])
    elif has_dtensors(model):
        tensors = gather_full_state(adapter_state_dict(model))
    else:
        tensors = adapter_state_dict(model)
    if write:
        write_adapter_file(tensors, path, metadata, crma=crma_config_of(model))
    return Path(path)
