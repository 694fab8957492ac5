"""Multi-device training: FSDP2/FSDP1 layouts, gathering, and the Lightning strategies that use them.

``dist``, ``gather``, ``fsdp1``, ``fsdp2`` and ``export`` are pure torch; ``strategies`` and
``fsdp1_strategy`` hold the Lightning strategies (imported lazily, so that the pure helpers do not pull
in Lightning). In YAML:
``trainer.strategy.class_path: crma_lightning.parallel.AdapterModelParallelStrategy``.
"""

from __future__ import annotations

from crma_lightning._lazy import lazy_exports

_LAZY = {
    "AdapterModelParallelStrategy": "crma_lightning.parallel.strategies",
    "AdapterFSDPStrategy": "crma_lightning.parallel.fsdp1_strategy",
    "KeepDtypesFSDPPrecision": "crma_lightning.parallel.fsdp1_strategy",
    "AdapterCheckpointing": "crma_lightning.parallel.strategies",
    "export_adapters": "crma_lightning.parallel.export",
}

__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
