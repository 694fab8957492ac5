"""Routing one prompt without a task label: by perplexity (every candidate adapter) or by prototype (one base forward).

What ``ContinualLM.route`` and ``crma-lightning generate --routing`` use; the held-out evaluation routes
whole batches with :func:`crma_lightning.routing.policy.route_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.losses import row_token_losses
from crma_lightning.routing.prototype import PrototypeRouter, adapters_off


@torch.no_grad()
def route_prompt(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    device: torch.device,
    candidates: dict[str, Callable[[], None]],
    max_tokens: int | None = None,
) -> tuple[str, dict[str, float]]:
    """The candidate under which ``prompt`` has the lowest mean next-token loss, and every candidate's loss.

    The routing of ``routing: perplexity`` applied to a prompt: the whole prompt is the prefix (there is
    no scored part), or its first ``max_tokens`` tokens. ``candidates`` maps a name to a function that
    activates its adapter(s). The model's train/eval mode is restored.
    """
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    ids = ids if max_tokens is None else ids[:, :max_tokens]
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


@torch.no_grad()
def prototype_route(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    device: torch.device,
    router: PrototypeRouter | None,
    tasks: list[str],
    activate: Callable[[str | None], None],
) -> tuple[str, dict[str, float]]:
    """Prototype routing of a prompt: one forward of the base model (adapters off) over its first ``P`` tokens.

    Returns the nearest task among ``tasks`` and each one's distance. ``activate``: the host's adapter switch
    (the caller restores the adapter it needs).
    """
    if router is None or not router.tasks:
        raise ValueError(
            "prototype routing needs the routing statistics of a run trained with routing: {mode: prototype}; "
            "this checkpoint has none (use perplexity routing)"
        )
    fitted = [t for t in tasks if t in router.tasks]
    if not fitted:
        raise ValueError(f"no routing statistics for the candidate tasks {tasks}; fitted: {router.tasks}")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.shape[1] < 1:
        raise ValueError(f"routing needs a prompt of at least 1 token, got {prompt!r}")
    was_training = model.training
    model.eval()
    try:
        with adapters_off(model, activate):
            features = router.features(model, ids, None)
    finally:
        model.train(was_training)
    distances = router.distances(features, fitted)[0].tolist()
    scores = dict(zip(fitted, distances, strict=True))
    return min(scores, key=scores.__getitem__), scores


class _RouteFields(NamedTuple):
    task: str
    scores: dict[str, float]


class Route(_RouteFields):
    """What :meth:`TaskGeneration.route` returns: it unpacks into ``(task, scores)``.

    Attributes:
        task: The chosen task.
        scores: Each candidate's routing score (lower wins): prefix losses (perplexity) or distances (prototype).
        fallback_losses: The hybrid (``fallback_margin``): the prefix losses of each candidate when the
            prompt's prototype margin was below the margin and perplexity chose ``task``; else ``None``.
    """

    fallback_losses: dict[str, float] | None = None
