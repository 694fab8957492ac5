"""Task-agnostic evaluation: pick each held-out sequence's adapter without being told its domain (docs/method.md).

An evaluation policy, not a continual-learning method: the ``routing:`` callback
(:mod:`crma_lightning.callbacks.routed_evaluation`) and ``generate --routing``
(:mod:`crma_lightning.model.task_generation`) use it.

``evaluation.routing`` modes:

* ``oracle`` - domain ``j`` is evaluated with domain ``j``'s adapter (task identity given; the default).
* ``perplexity`` - per sequence, the first ``P`` tokens (``prefix_tokens``, default
  :data:`DEFAULT_PREFIX_TOKENS` = 32) are scored under every task adapter; the adapter with the lowest
  mean loss on them is chosen and scores the *rest* of the sequence (targets at positions ``≥ P``).
* ``prototype`` - per sequence, one forward of the frozen base model (adapters off) over the same ``P``
  tokens gives pooled hidden states; the task with the nearest training-set mean (shared shrunk
  covariance, :mod:`crma_lightning.routing.prototype`) is chosen and scores the rest: 2 forwards per sequence
  at serving time whatever the number of tasks. With ``fallback_margin`` (the hybrid), the sequences whose
  two nearest tasks are within the margin (log-odds, :func:`crma_lightning.routing.prototype.margins`) are routed
  by perplexity instead: between 2 and ``T + 2`` forwards per sequence.
* ``none`` - the method needs no routing: one adapter (``shared``) or all of them at once (O-LoRA).

No peeking, by construction: the routing losses come from a forward pass over the prefix *alone*
(``input_ids[:, :P]``), so nothing after position ``P`` can reach the choice - even through a model that
is not causal - and the scored loss has every label before position ``P`` set to -100, so the prefix
that chose the adapter is never part of the routed number. Compare routed numbers with oracle numbers
on the same targets: :func:`scored_labels` gives the oracle pass the same mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from crma_lightning.checks import check_choice, check_number
from crma_lightning.losses import row_token_losses

ORACLE = "oracle"
PERPLEXITY = "perplexity"
PROTOTYPE = "prototype"
NONE = "none"
ROUTING_MODES = (ORACLE, PERPLEXITY, PROTOTYPE, NONE)
DEFAULT_PREFIX_TOKENS = 32
"""Tokens read to choose an adapter: enough for a clear signal on text, a quarter of a 128-token row."""

ModelFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (input_ids, attention_mask) -> logits
ScoresFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # prefix (ids, mask) -> (B, K), lower wins


class _RoutedFields(NamedTuple):
    choices: list[str]
    loss_sum: torch.Tensor
    tokens: torch.Tensor
    prefix_losses: torch.Tensor
    scored_sums: torch.Tensor | None = None


class RoutedBatch(_RoutedFields):
    """What :func:`route_batch` returns (a named tuple: ``routed.choices``, ``routed.loss_sum``, ...).

    It unpacks into its first five attributes; ``fallback`` and ``row_tokens`` are attributes only (not tuple
    fields).

    Attributes:
        choices: The chosen adapter of each row, ``len == B``.
        loss_sum: Summed cross-entropy of the scored targets (positions ``≥ P``) under each row's choice.
        tokens: Number of scored targets (prefix and padding excluded).
        prefix_losses: ``(B, K)`` routing score of each row for each of the ``K`` adapters, lowest chosen:
            the mean prefix loss (perplexity) or the distance to the task's prototype (``scores_fn``).
        scored_sums: ``(B, K)`` summed loss of each row's scored targets under each adapter (column ``k``
            summed: the oracle loss on the same targets when adapter ``k`` is the rows' own).
        fallback: ``(B,)`` bool, the rows a hybrid routed by perplexity (``None`` without ``fallback_margin``).
        row_tokens: ``(B,)`` scored targets of each row (``tokens`` is their sum).
    """

    fallback: torch.Tensor | None = None
    row_tokens: torch.Tensor | None = None


def validate_routing(
    mode: str,
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
    fallback_margin: float | None = None,
    estimator: str = "mahalanobis",
) -> None:
    """Raise ``ValueError`` naming a bad ``mode``, ``prefix_tokens`` or ``fallback_margin``.

    ``prefix_tokens`` ≥ 2 (at least one prefix target); ``fallback_margin`` ≥ 0, with prototype routing and the
    ``mahalanobis`` estimator only (the margin is a log-odds only for Mahalanobis distances; a Euclidean gap
    has the features' scale, which no single margin fits).
    """
    check_choice("evaluation.routing", mode, ROUTING_MODES)
    check_number("evaluation.prefix_tokens", prefix_tokens, 2, integer=True)
    if fallback_margin is not None:
        if mode != PROTOTYPE:
            raise ValueError(f"routing.fallback_margin {fallback_margin} needs mode 'prototype', got mode {mode!r}")
        if estimator != "mahalanobis":
            raise ValueError(
                f"routing.fallback_margin {fallback_margin} needs estimator 'mahalanobis' (a log-odds margin), "
                f"got estimator {estimator!r}"
            )
        check_number("routing.fallback_margin", fallback_margin, 0.0)


def scored_labels(labels: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """``labels`` with positions ``< prefix_tokens`` set to -100: the targets a routed evaluation scores."""
    out = labels.clone()
    out[:, :prefix_tokens] = -100
    return out


@torch.no_grad()
def route_batch(
    model_fn: ModelFn,
    batch: dict[str, Any],
    adapters: Sequence[str],
    prefix_tokens: int,
    activate: Callable[[str], None],
    scores_fn: ScoresFn | None = None,
    fallback_margin: float | None = None,
) -> RoutedBatch:
    """Perplexity routing of one batch: choose per row on the prefix, score the rest with the choice.

    Every adapter runs one prefix forward and one full forward on the *whole* batch, whatever the
    choices: every process then runs the same number of forwards (FSDP forwards are collectives), and a
    row's routed loss is bit-identical to its loss under the chosen adapter in an oracle pass.

    Args:
        model_fn: ``(input_ids, attention_mask) -> logits (B, T, V)`` of the model with its adapters.
        batch: ``input_ids``/``attention_mask``/``labels`` ``(B, T)``, right-padded (labels -100 on padding).
            The prefix's targets are its own tokens where the mask is 1 (a padded batch needs its mask;
            without one every token counts, as the model then attends to every token).
        adapters: Candidate adapters, e.g. one per task trained so far. Ties go to the earliest listed;
            a row with no prefix target (shorter than 2 tokens) gets the first adapter.
        prefix_tokens: ``P``, the tokens read to choose; targets at positions ``≥ P`` are scored.
        activate: Makes adapter ``name`` the active one. It stays on the last adapter tried: the caller
            restores what it needs.
        scores_fn: Instead of the prefix losses, ``(prefix_ids, prefix_mask) -> (B, K)`` scores (lower wins)
            from the prefix alone, e.g. prototype distances: then no adapter runs on the prefix.
        fallback_margin: With ``scores_fn``: rows whose :func:`~crma_lightning.routing.prototype.margins` is below
            it are routed by their prefix losses instead (the hybrid). The prefix losses are computed for
            every row (the same forwards on every process); the serving cost counts only the fallback rows.

    Returns:
        The choices, the summed scored loss, the scored token count and the prefix losses.
    """
    if not adapters:
        raise ValueError("route_batch needs at least one adapter to route between")
    check_number("prefix_tokens", prefix_tokens, 2, integer=True)
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    prefix_ids = ids[:, :prefix_tokens]  # (B, P) - the routing pass cannot see past position P
    prefix_mask = None if mask is None else mask[:, :prefix_tokens]
    # The prefix's own tokens are its targets, not the training labels: a prompt/response row labels only
    # its response, yet the prompt is what routing reads (as at serving time, where there are no labels).
    prefix_labels = prefix_ids if prefix_mask is None else prefix_ids.masked_fill(prefix_mask == 0, -100)
    rest_labels = scored_labels(labels, prefix_tokens)  # (B, T)

    prefix_losses, row_sums = [], []
    given = None if scores_fn is None else scores_fn(prefix_ids, prefix_mask)  # (B, K)
    hybrid = given is not None and fallback_margin is not None
    for name in adapters:
        activate(name)
        if given is None or hybrid:
            total, count = row_token_losses(model_fn(prefix_ids, prefix_mask), prefix_labels)
            prefix_losses.append(total / count.clamp_min(1))  # (B,) mean over the prefix's targets
        row_sums.append(row_token_losses(model_fn(ids, mask), rest_labels))
    losses = torch.stack(prefix_losses, dim=1) if given is None else given  # (B, K)
    fallback = None
    if hybrid:
        from crma_lightning.routing.prototype import margins

        fallback = margins(given) < fallback_margin  # (B,) near-ties of the prototype: perplexity decides
        ppl = torch.stack(prefix_losses, dim=1).to(given.device, given.dtype)
        losses = torch.where(fallback[:, None], ppl, given)
    choice = losses.argmin(dim=1)  # (B,); argmin returns the first of equal minima
    sums = torch.stack([s for s, _ in row_sums], dim=1)  # (B, K)
    counts = row_sums[0][1]  # (B,) the same targets under every adapter
    chosen_sum = sums.gather(1, choice[:, None].to(sums.device)).sum()
    out = RoutedBatch([adapters[i] for i in choice.tolist()], chosen_sum, counts.sum(), losses, sums)
    out.fallback, out.row_tokens = fallback, counts
    return out


def routing_accuracy(choices: Sequence[str], expected: str) -> float:
    """Fraction of rows routed to ``expected`` (the domain's own adapter)."""
    return sum(c == expected for c in choices) / max(1, len(choices))
