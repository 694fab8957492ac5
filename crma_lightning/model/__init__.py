"""The model: ``ContinualLM``, the LightningModule, and the pieces it is made of.

What its checkpoint holds and its identity, loading the base model, task-adapter bookkeeping,
hyper-parameters, optimizer groups, the non-finite step guard, generation with a task adapter and
``torch.compile`` of the decoder layers.

``crma_lightning.model.ContinualLM`` is the YAML ``class_path``.
"""

from __future__ import annotations

from crma_lightning._lazy import lazy_exports

_LAZY = {"ContinualLM": "crma_lightning.model.continual_lm"}

__all__ = list(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
