"""Decoding: continue token-id prompts in one left-padded batch, with stop strings (pure torch + transformers).

The caller activates the adapter; :mod:`crma_lightning.model.task_generation` (``ContinualLM.generate``)
and task scoring (:mod:`crma_lightning.evaluation.scoring`) both decode through :func:`generate_from_ids`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from crma_lightning.data.tokenizer import pad_id


class StopOnStrings(StoppingCriteria):
    """Per row: done once the text generated after the prompt holds one of ``stop`` (decoded as it grows)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int, stop: list[str]) -> None:
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, list(stop)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_from_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    device: torch.device,
    stop: list[str] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Continue each prompt (token ids) with ``model.generate`` in one left-padded batch; returns the new text.

    Greedy unless ``generate_kwargs`` say otherwise. ``stop``: a row stops once its new text holds one of
    these strings (the text is returned whole; cut it with ``task_metrics.cut_at_stop``). The caller
    activates the adapter. ``max_new_tokens`` defaults to 32, ``pad_token_id`` to the tokenizer's (or
    EOS). The model's train/eval mode is restored whatever happens.
    """
    pad = pad_id(tokenizer)
    width = max(len(p) for p in prompt_ids)
    # Left padding: every row's next token follows its last prompt token.
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], dtype=torch.long, device=device)
    generate_kwargs.setdefault("max_new_tokens", 32)
    generate_kwargs.setdefault("pad_token_id", pad)
    generate_kwargs.setdefault("do_sample", False)
    if stop:
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, width, stop)])
    was_training = model.training
    model.eval()
    try:
        if _is_fsdp1_root(model):  # its `generate` is the inner model's, which skips the root's unsharding
            out = _greedy_through_forward(model, ids, mask, generate_kwargs, tokenizer.eos_token_id)
        else:
            out = model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)


def _is_fsdp1_root(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _greedy_through_forward(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any], eos: int | None
) -> torch.Tensor:
    """Greedy decoding by full forwards of ``model`` itself (no KV cache): for wrappers such as an FSDP1 root.

    Exactly ``max_new_tokens`` steps on every process (sharded forwards must match across ranks; the
    caller cuts the text at its stop strings). Left padding is handled with explicit position ids, as
    ``generate`` does. Rows that produced EOS continue with padding (dropped when decoding).
    """
    if kwargs.get("do_sample"):
        raise ValueError("sampling is not supported for an FSDP1-wrapped model; generate greedily")
    pad = kwargs["pad_token_id"]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(kwargs["max_new_tokens"]):
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1].argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        if eos is not None:
            done |= token == eos
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # what follows EOS is discarded anyway
    return ids


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
    defaults to 32, ``pad_token_id`` to the tokenizer's). See :func:`generate_from_ids`.
    """
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return generate_from_ids(model, tokenizer, ids, device, **generate_kwargs)
