"""Text generation with a chosen or routed task adapter (``ContinualLM.generate``/``route``, the CLI's ``generate``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.losses import row_token_losses


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


@torch.no_grad()
def route_prompt(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    device: torch.device,
    candidates: dict[str, Callable[[], None]],
) -> tuple[str, dict[str, float]]:
    """The candidate under which ``prompt`` has the lowest mean next-token loss, and every candidate's loss.

    The routing of ``routing: perplexity`` applied to a prompt: the whole prompt is the prefix (there is
    no scored part). ``candidates`` maps a name to a function that activates its adapter(s). The model's
    train/eval mode is restored.
    """
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.shape[1] < 2:
        raise ValueError(f"routing needs a prompt of at least 2 tokens to score, got {prompt!r}")
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    try:
        for name, activate in candidates.items():
            activate()
            total, count = row_token_losses(model(input_ids=ids).logits, ids)
            losses[name] = float(total[0] / count[0])
    finally:
        model.train(was_training)
    return min(losses, key=losses.__getitem__), losses


class TaskGeneration:
    """``generate`` and ``route``, mixed into :class:`~crma_lightning.module.ContinualLM`.

    The host provides ``model``, ``tokenizer``, ``device``, ``tasks``, ``current_task`` and ``activate_task``.
    """

    def generate(self, prompt: str | list[str], task: str | None = None, **generate_kwargs: Any) -> list[str]:
        """Continue ``prompt`` with ``task``'s adapter (default: the current task); returns the new text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        previous = self.current_task
        self.activate_task(task if task is not None else previous)
        try:
            return generate_text(self.model, self.tokenizer, prompts, self.device, **generate_kwargs)
        finally:
            self.activate_task(previous)

    def route(self, prompt: str, tasks: list[str] | None = None) -> tuple[str, dict[str, float]]:
        """The task whose adapter gives ``prompt`` the lowest mean loss (perplexity routing), and each task's loss.

        ``tasks``: the candidates (default: every task up to the current one, or all when none is current).
        The active adapter is restored.
        """
        if tasks is None:  # the tasks trained so far (all of them when none is current, e.g. after loading)
            current = self.current_task
            tasks = self.tasks if current is None else self.tasks[: self.tasks.index(current) + 1]
        previous = self.current_task
        try:
            candidates = {t: (lambda t=t: self.activate_task(t)) for t in tasks}
            return route_prompt(self.model, self.tokenizer, prompt, self.device, candidates)
        finally:
            self.activate_task(previous)
