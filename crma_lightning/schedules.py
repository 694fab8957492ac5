"""Learning-rate schedules usable from YAML (``model.init_args.lr_scheduler.class_path``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it.

    The driver builds a new optimizer and scheduler for every stage, so ``total_steps`` is the
    per-stage budget (``trainer.max_steps``) and every stage warms up again.

    Args:
        optimizer: The wrapped optimizer (LightningCLI passes it).
        warmup_steps: Steps of linear warm-up from 0.
        total_steps: Steps after which the rate stays at ``min_ratio``.
        min_ratio: Final learning rate as a fraction of the base rate.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1000, min_ratio: float = 0.1):
        if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(
                f"WarmupCosine(warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}) is "
                "invalid: expected warmup_steps >= 0, total_steps >= 1 and 0 <= min_ratio <= 1"
            )

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
