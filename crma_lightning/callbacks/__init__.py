"""Lightning callbacks: gradient stability statistics, ZClip clipping, per-domain evaluation."""

from crma_lightning.callbacks.evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient import GradientStability
from crma_lightning.callbacks.zclip import ZClip

__all__ = ["DomainEvaluation", "GradientStability", "ZClip"]
