"""Metrics, pure Python: of a loss or score matrix, and of one generated answer.

The continual-learning metrics of a loss or score matrix (:mod:`.continual`) and the task metrics that
score one generated answer (:mod:`.task`). Definitions: docs/metrics.md.

They sit below ``data`` because a domain names its ``metric``; nothing here imports torch models.
``from crma_lightning.metrics import summarize`` keeps working (the names of :mod:`.continual`).
"""

from crma_lightning.metrics.continual import (
    base_relative_forgetting,
    bwt,
    drift,
    fwt,
    mean_base_relative_forgetting,
    mean_drift,
    mean_plasticity,
    overhead,
    plasticity,
    stability_gain,
    summarize,
    summarize_scores,
)

__all__ = [
    "base_relative_forgetting",
    "bwt",
    "drift",
    "fwt",
    "mean_base_relative_forgetting",
    "mean_drift",
    "mean_plasticity",
    "overhead",
    "plasticity",
    "stability_gain",
    "summarize",
    "summarize_scores",
]
