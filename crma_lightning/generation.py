"""Text generation with a chosen or routed task adapter (``ContinualLM.generate``/``route``, the CLI's ``generate``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from crma_lightning.losses import row_token_losses
from crma_lightning.prototype import PrototypeRouter, adapters_off, margins


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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

    def route(
        self,
        prompt: str,
        tasks: list[str] | None = None,
        mode: str = "perplexity",
        fallback_margin: float | None = None,
    ) -> Route:
        """The task chosen for ``prompt`` without a task label, and each candidate's routing score (lower wins).

        ``mode``: ``perplexity`` - the task whose adapter gives the prompt the lowest mean loss (one forward
        per task; the score is that loss); ``prototype`` - the task whose training rows' base-model features
        are nearest to the prompt's first ``P`` tokens' (one base forward; the score is the squared
        Mahalanobis or Euclidean distance; needs a run trained with ``routing: {mode: prototype}``).
        ``tasks``: the candidates (default: every task up to the current one, or all when none is current).
        ``fallback_margin`` (``prototype``, the hybrid of the routed evaluation): a prompt whose two nearest
        tasks are within the margin (:func:`~crma_lightning.prototype.margins`) is routed by perplexity on
        its first ``P`` tokens instead (one more forward per task; a prompt of one token keeps the
        prototype's choice). The active adapter is restored.
        """
        if mode not in ("perplexity", "prototype"):
            raise ValueError(f"routing mode must be 'perplexity' or 'prototype', got {mode!r}")
        if fallback_margin is not None:
            from crma_lightning.routing import validate_routing

            estimator = self.router.estimator if self.router is not None else "mahalanobis"
            prefix = self.router.prefix_tokens if self.router is not None else 2
            validate_routing(mode, prefix, fallback_margin, estimator)
        if tasks is None:  # the tasks trained so far (all of them when none is current, e.g. after loading)
            current = self.current_task
            tasks = self.tasks if current is None else self.tasks[: self.tasks.index(current) + 1]
        previous = self.current_task
        try:
            if mode == "prototype":
                task, scores = prototype_route(
                    self.model, self.tokenizer, prompt, self.device, self.router, tasks, self.activate_task
                )
                if fallback_margin is None or len(scores) < 2:
                    return Route(task, scores)
                margin = float(margins(torch.tensor([list(scores.values())], dtype=torch.float64))[0])
                tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                if margin >= fallback_margin or tokens < 2:
                    return Route(task, scores)
                candidates = {t: (lambda t=t: self.activate_task(t)) for t in scores}  # the fitted candidates
                p = self.router.prefix_tokens
                task, losses = route_prompt(self.model, self.tokenizer, prompt, self.device, candidates, p)
                out = Route(task, scores)
                out.fallback_losses = losses
                return out
            candidates = {t: (lambda t=t: self.activate_task(t)) for t in tasks}
            return Route(*route_prompt(self.model, self.tokenizer, prompt, self.device, candidates))
        finally:
            self.activate_task(previous)
