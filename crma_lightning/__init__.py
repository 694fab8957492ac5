"""crma_lightning: continual parameter-efficient fine-tuning of Hugging Face causal LMs on Lightning.

The adapters (``crma_lightning.adapters``) are pure PyTorch. Importing the package root pulls in
Lightning for the module, the data module and the stage driver, lazily, on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ContinualLM": "crma_lightning.module",
    "SequentialDomainDataModule": "crma_lightning.data",
    "DomainSpec": "crma_lightning.data",
    "ContinualRunner": "crma_lightning.runner",
    "RunInterrupted": "crma_lightning.interrupts",
    "GradientStability": "crma_lightning.callbacks",
    "DomainEvaluation": "crma_lightning.callbacks",
    "ZClip": "crma_lightning.callbacks",
    "LoRAConfig": "crma_lightning.adapters",
    "CRMAConfig": "crma_lightning.adapters",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crma_lightning' has no attribute {name!r}")
