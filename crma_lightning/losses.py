"""The next-token loss, written once: summed over a batch (training, evaluation) or per row (routing).

Position ``t`` predicts ``labels[t + 1]``; labels ``-100`` (padding, prompts of prompt/response rows,
non-assistant chat turns) are not scored. Logits are upcast to float32 first, so a bf16 model's loss
is computed in full precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T-1, V)`` float logits and the ``(B, T-1)`` targets they predict, on the logits' device."""
    return logits[:, :-1].float(), labels[:, 1:].to(logits.device)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the batch and the number of scored targets."""
    shift_logits, shift_labels = _shifted(logits, labels)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, (shift_labels != -100).sum()


def row_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy ``(B,)`` and per-row scored-target counts ``(B,)``."""
    shift_logits, shift_labels = _shifted(logits, labels)
    losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    return losses.sum(dim=1), (shift_labels != -100).sum(dim=1)
