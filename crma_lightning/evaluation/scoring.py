"""Task scores of held-out prompts: one domain's score with the active adapter, or routed, summed over ranks.

A domain with a ``metric`` (:mod:`crma_lightning.metrics.task`) keeps, besides its tokenised held-out
rows, up to ``eval_rows`` *score rows*: the prompt's token ids - exactly the ids the training rows
carry, each segment tokenised on its own - and the reference text (the last scored segment, cut at the
first stop string). :func:`domain_score_sums` continues the prompts greedily (or ranks the labels by
loss) with whatever adapter the caller activated and returns the summed row scores and the row count.

Across processes each rank scores rows ``rank, rank + world, ...``; every rank runs as many batches
(a short shard is padded with a repeated row that counts for nothing) and generation keeps every rank
stepping until all are done (``synced_gpus``), so sharded models (FSDP) see matching collectives. The
caller sums the returned pairs over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.data.sampling import right_padded
from crma_lightning.data.tokenizer import pad_id
from crma_lightning.generation.decode import generate_from_ids
from crma_lightning.losses import row_token_losses
from crma_lightning.metrics.task import TaskMetric, cut_at_stop, row_scores
from crma_lightning.parallel.dist import distributed_ready


def shard_rows(rows: list[dict[str, Any]], world: int, rank: int, batch_size: int) -> tuple[list[dict], list[bool]]:
    """This rank's rows, padded to the same number of batches on every rank; and which rows count."""
    mine = rows[rank::world]
    longest = len(rows[0::world])
    batches = -(-longest // batch_size)
    pad = batches * batch_size - len(mine) if batches else 0
    filler = mine[-1] if mine else rows[0]
    return mine + [filler] * pad, [True] * len(mine) + [False] * pad


@torch.no_grad()
def _label_choices(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], labels: list[str], device: torch.device
) -> list[str]:
    """Per row, the label with the lowest summed token loss after the prompt (one forward per row)."""
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    pad = pad_id(tokenizer)
    chosen = []
    for row in rows:
        seqs = [row["prompt_ids"] + ids for ids in label_ids]
        ids, mask = right_padded(seqs, pad, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        start = len(row["prompt_ids"])
        totals = []
        for k, lab in enumerate(label_ids):
            pos = torch.arange(start - 1, start - 1 + len(lab), device=device)
            totals.append(-logp[k, pos, torch.tensor(lab, device=device)].sum())
        chosen.append(labels[int(torch.stack(totals).argmin())])
    return chosen


def predictions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    metric: TaskMetric,
    rows: list[dict[str, Any]],
    device: torch.device,
    batch_size: int,
    synced: bool = False,
) -> list[str]:
    """The prediction of each row: generated text cut at the first stop string, or (``loss`` mode) a label."""
    if metric.name == "accuracy" and metric.label_mode == "loss":
        return _label_choices(model, tokenizer, rows, metric.labels or [], device)
    out: list[str] = []
    for i in range(0, len(rows), batch_size):
        batch = [r["prompt_ids"] for r in rows[i : i + batch_size]]
        texts = generate_from_ids(
            model, tokenizer, batch, device, max_new_tokens=metric.max_new_tokens, stop=metric.stop, synced_gpus=synced
        )
        out.extend(cut_at_stop(t, metric.stop) for t in texts)
    return out


def shard_row_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    metric: TaskMetric,
    rows: list[dict[str, Any]],
    device: torch.device,
    batch_size: int,
    world: int = 1,
    rank: int = 0,
) -> tuple[list[int], list[float]]:
    """(indices into ``rows``, scores) of this rank's shard, with the currently active adapter (padding left out)."""
    mine, counts = shard_rows(rows, world, rank, batch_size)
    # Ranks step generation together only in a real process group (a simulated shard has none).
    preds = predictions(model, tokenizer, metric, mine, device, batch_size, synced=world > 1 and distributed_ready())
    scores = row_scores(metric, preds, [r["reference"] for r in mine])
    kept = [s for s, c in zip(scores, counts) if c]
    return [rank + k * world for k in range(len(kept))], kept


def domain_score_sums(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    metric: TaskMetric,
    rows: list[dict[str, Any]],
    device: torch.device,
    batch_size: int,
    world: int = 1,
    rank: int = 0,
) -> tuple[float, int]:
    """(sum of row scores, rows scored) of this rank's shard, with the currently active adapter."""
    _, scores = shard_row_scores(model, tokenizer, metric, rows, device, batch_size, world, rank)
    return float(sum(scores)), len(scores)


@torch.no_grad()
def prompt_losses(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], device: torch.device, batch_size: int
) -> torch.Tensor:
    """Mean next-token loss of each row's prompt ``(N,)`` with the active adapter (0 for a 1-token prompt)."""
    pad = pad_id(tokenizer)
    out = []
    for i in range(0, len(rows), batch_size):
        prompts = [r["prompt_ids"] for r in rows[i : i + batch_size]]
        ids, mask = right_padded(prompts, pad, device)
        labels = ids.masked_fill(mask == 0, -100)
        total, count = row_token_losses(model(input_ids=ids, attention_mask=mask).logits, labels)
        out.append(total / count.clamp_min(1))
    return torch.cat(out).cpu()


def routed_score_sums(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    metric: TaskMetric,
    rows: list[dict[str, Any]],
    device: torch.device,
    batch_size: int,
    candidates: dict[str, Callable[[], None]],
    world: int = 1,
    rank: int = 0,
    choose: Callable[[list[dict[str, Any]]], list[int]] | None = None,
    fallback: bool = False,
) -> tuple[float, int]:
    """:func:`domain_score_sums` with each prompt answered by the adapter chosen by perplexity routing.

    The chosen adapter is the candidate under which the whole prompt has the lowest mean loss. Every
    candidate answers every row of the shard and the routed one's answer is kept: the same forwards on
    every rank whatever the routing chose (sharded models need that), at the price of one generation
    per candidate. ``choose``: instead of the prompt losses, a function giving each row's candidate index
    (prototype routing: from the base model's features of the prompt). ``fallback``: ``choose`` may give
    -1 for a row (the hybrid's near-ties), which then goes by the prompt losses, computed for every row.
    """
    mine, counts = shard_rows(rows, world, rank, batch_size)
    synced = world > 1 and distributed_ready()
    losses, answers = [], []
    chosen = None
    if choose is not None:  # in batches, so every rank runs as many routing forwards
        chosen = [k for i in range(0, len(mine), batch_size) for k in choose(mine[i : i + batch_size])]
    for activate in candidates.values():
        activate()
        if chosen is None or fallback:
            losses.append(prompt_losses(model, tokenizer, mine, device, batch_size))
        answers.append(predictions(model, tokenizer, metric, mine, device, batch_size, synced=synced))
    by_loss = torch.stack(losses).argmin(dim=0).tolist() if losses else []
    choice = by_loss if chosen is None else [k if k >= 0 else by_loss[i] for i, k in enumerate(chosen)]
    routed = [answers[k][i] for i, k in enumerate(choice)]
    scores = row_scores(metric, routed, [r["reference"] for r in mine])
    return float(sum(s for s, c in zip(scores, counts) if c)), sum(counts)
