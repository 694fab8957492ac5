"""crma_lightning: continual parameter-efficient fine-tuning of Hugging Face causal LMs on Lightning.

The adapters (``crma_lightning.adapters``) are pure PyTorch. Importing the package root pulls in
Lightning for the module, the data module and the stage driver, lazily, on first attribute access.
The folders are the architecture (docs/architecture.md); import paths from before the layout keep
working (:mod:`crma_lightning._moved`).
"""

from __future__ import annotations

from crma_lightning import _moved
from crma_lightning._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "ContinualLM": "crma_lightning.model.continual_lm",
    "SequentialDomainDataModule": "crma_lightning.data.datamodule",
    "DomainSpec": "crma_lightning.data.domains",
    "ContinualRunner": "crma_lightning.run.runner",
    "RunInterrupted": "crma_lightning.run.interrupts",
    "GradientStability": "crma_lightning.callbacks.gradient_stability",
    "DomainEvaluation": "crma_lightning.callbacks.domain_evaluation",
    "ZClip": "crma_lightning.callbacks.zclip",
    "LoRAConfig": "crma_lightning.adapters",
    "CRMAConfig": "crma_lightning.adapters",
}

__all__ = [*_LAZY, "__version__"]
__getattr__ = lazy_exports(__name__, _LAZY)
_moved.install()
