"""A research subclass of ContinualLM: anchor the shared CRMA backbone to where each task started.

MODULAR keeps training the CRMA backbone in every stage; its drift is bounded by construction, but
a user may want it smaller still. This subclass adds ``anchor · ||θ_crma − θ_crma(task start)||²``
to the loss - an L2-SP style penalty - using two of the module's hooks, in a dozen lines.

Run it from YAML (the ``model.class_path`` selects it):

    PYTHONPATH=examples crma-lightning fit --config configs/demo.yaml --config examples/anchored_crma.yaml
"""

from __future__ import annotations

import torch

from crma_lightning import ContinualLM


class AnchoredCRMA(ContinualLM):
    """ContinualLM plus an L2 pull of the CRMA parameters towards their values at task start.

    Args:
        anchor: Weight of the penalty (0 disables it).
        **kwargs: Everything :class:`ContinualLM` takes.
    """

    def __init__(self, anchor: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.anchor = anchor
        self._start: dict[str, torch.Tensor] = {}

    def on_task_start(self, task: str, index: int) -> None:
        # Snapshot the shared backbone as this task begins training.
        self._start = {n: p.detach().clone() for n, p in self.trainable_parameters() if ".crma." in n}

    # The anchor is per-task state: keep it in checkpoints, so a stage resumed mid-way (where
    # on_task_start does not run again) pulls towards the same values as an uninterrupted run.
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["anchor_start"] = {n: t.cpu() for n, t in self._start.items()}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self._start = dict(checkpoint.get("anchor_start", {}))

    def compute_loss(self, batch, logits):
        loss = super().compute_loss(batch, logits)
        if not self.anchor or not self._start:
            return loss
        params = dict(self.trainable_parameters())
        penalty = sum((params[n] - start.to(params[n].device)).pow(2).sum() for n, start in self._start.items())
        self.log("train/anchor_penalty", penalty, batch_size=batch["input_ids"].size(0))
        return loss + self.anchor * penalty
