"""Text generation with a chosen or routed task adapter (``ContinualLM.generate``/``route``, the CLI's ``generate``)."""

from __future__ import annotations

from typing import Any

import torch

from crma_lightning.generation.decode import generate_text
from crma_lightning.routing.prompts import Route, prototype_route, route_prompt
from crma_lightning.routing.prototype import margins


class TaskGeneration:
    """``generate`` and ``route``, mixed into :class:`~crma_lightning.model.continual_lm.ContinualLM`.

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
        tasks are within the margin (:func:`~crma_lightning.routing.prototype.margins`) is routed by perplexity on
        its first ``P`` tokens instead (one more forward per task; a prompt of one token keeps the
        prototype's choice). The active adapter is restored.
        """
        if mode not in ("perplexity", "prototype"):
            raise ValueError(f"routing mode must be 'perplexity' or 'prototype', got {mode!r}")
        if fallback_margin is not None:
            from crma_lightning.routing.policy import validate_routing

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
