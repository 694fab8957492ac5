"""The held-out prompts a domain with a ``metric`` is scored on: prompt token ids and reference text per row.

Computed once when the domain is prepared (:mod:`crma_lightning.data.prepare`) and kept by the data
module (``score_rows``); :mod:`crma_lightning.evaluation.scoring` continues the prompts with the model.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from crma_lightning.data.domains import SCORED_COLUMN, SEGMENTS_COLUMN
from crma_lightning.metrics.task import TaskMetric, cut_at_stop


def score_rows(
    held_text: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    metric: TaskMetric,
    domain: str,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """The first ``metric.eval_rows`` held-out rows as ``{"prompt_ids", "reference"}``.

    ``held_text``: the held-out rows after :func:`~crma_lightning.data.row_formats.extract_text` (segments and
    scored flags). The prompt is every segment before the last scored one; the reference is that segment.
    With ``max_length`` a prompt is cut from the left to its last ``max_length - room`` tokens, so prompt
    and answer fit the length the model trains at (the end of the prompt - the question and ``Answer:`` -
    is what the answer depends on most); ``room`` is ``metric.max_new_tokens`` when generating, the
    longest label's tokens when ranking labels by loss (``label_mode: loss``); when ``room`` is not below
    ``max_length``, the prompt keeps its last ``max_length - 1`` tokens.
    """
    if SEGMENTS_COLUMN not in held_text.column_names:
        raise ValueError(
            f"domain {domain!r}: metric {metric.name!r} needs prompt/response or chat rows (a prompt to continue "
            "and a reference to compare with); its rows are plain text"
        )
    keep = None
    if max_length is not None:
        by_loss = metric.name == "accuracy" and metric.label_mode == "loss"
        room = (
            max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in metric.labels or [""])
            if by_loss
            else metric.max_new_tokens
        )
        # An answer budget at least max_length cannot fit anyway: then the prompt alone is cut to fit.
        keep = max_length - room if room < max_length else max_length - 1
    rows = []
    part = held_text.select(range(min(metric.eval_rows, len(held_text))))
    for segments, scored in zip(part[SEGMENTS_COLUMN], part[SCORED_COLUMN]):
        last = max(i for i, flag in enumerate(scored) if flag)
        prompt = segments[:last]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        prompt_ids = [t for x in ids for t in x]
        if keep is not None:
            prompt_ids = prompt_ids[-keep:]
        rows.append({"prompt_ids": prompt_ids, "reference": cut_at_stop(segments[last], metric.stop)})
    if not any(r["prompt_ids"] for r in rows):
        raise ValueError(f"domain {domain!r}: metric {metric.name!r}: the held-out rows have empty prompts")
    return rows
