"""Lightning callbacks: gradient stability statistics, ZClip clipping, per-domain evaluation, module guards.

They know nothing of the stage driver or of ``ContinualLM``'s class: what they need from the module
they read by attribute (``current_task``, ``nonfinite``, ``activate_task``), so they work on any
``LightningModule`` that has it.
"""

from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient_stability import GradientStability, RunningStats
from crma_lightning.callbacks.guards import RestoreTrainingAdapter, SkipNonFiniteSteps
from crma_lightning.callbacks.train_until_learned import TrainUntilLearned
from crma_lightning.callbacks.zclip import ZClip

__all__ = [
    "DomainEvaluation",
    "GradientStability",
    "RestoreTrainingAdapter",
    "RunningStats",
    "SkipNonFiniteSteps",
    "TrainUntilLearned",
    "ZClip",
]
