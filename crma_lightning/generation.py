"""Text generation with a chosen task adapter (``ContinualLM.generate`` and ``crma-lightning generate``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    device: torch.device,
    **generate_kwargs: Any,
) -> list[str]:
    """Continue each prompt with ``model.generate`` (eval mode, left padding); returns only the new text.

    The caller activates the adapter. ``generate_kwargs`` are ``transformers``' (``max_new_tokens``
    defaults to 32, ``pad_token_id`` to the tokenizer's). The model's train/eval mode and the
    tokenizer's padding side are restored whatever happens.
    """
    was_training = model.training
    side = tokenizer.padding_side
    model.eval()
    try:
        tokenizer.padding_side = "left"  # generation continues after the last token of every row
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generate_kwargs.setdefault("max_new_tokens", 32)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        out = model.generate(**enc, **generate_kwargs)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
