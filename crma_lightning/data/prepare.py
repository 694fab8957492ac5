"""One domain, loaded, checked and tokenised: what ``SequentialDomainDataModule.prepare`` does per domain.

Every check that can fail on the data runs here, before any training: no training sequence, no held-out
token, rows dropped because they are blank or have nothing to score (counted and warned about).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from crma_lightning.data.domains import SCORED, DomainSpec, load_raw
from crma_lightning.data.packing import scored_targets, tokenize
from crma_lightning.data.row_formats import extract_text
from crma_lightning.data.scored_prompts import score_rows
from crma_lightning.metrics.task import TaskMetric, as_task_metric


@dataclass
class PreparedDomain:
    """A domain ready for the loaders.

    Attributes:
        train: Tokenised training rows (``input_ids``, and ``scored`` for masked formats).
        holdout: Tokenised held-out rows (at most ``max_eval_rows``).
        holdout_tokens: Tokens in ``holdout`` (counted once, for the report).
        dropped: Rows dropped per reason (``train_blank``, ``holdout_too_short``, ...); only non-zero counts.
        row_format: ``rows`` (``text``, ``prompt_response`` or ``chat``), what was ``scored``, the chat
            template used and the scored token counts.
        metric: The domain's task metric (``None``: loss only).
        score_rows: Held-out prompts and references scored with ``metric``
            (:func:`crma_lightning.data.scored_prompts.score_rows`).
    """

    train: Dataset
    holdout: Dataset
    holdout_tokens: int
    dropped: dict[str, int]
    row_format: dict[str, Any]
    metric: TaskMetric | None = None
    score_rows: list[dict[str, Any]] = field(default_factory=list)


def prepare_domain(
    spec: DomainSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    max_chars: int | None,
    max_length: int,
    packing: bool,
    max_eval_rows: int | None,
    cache_dir: str | None,
) -> PreparedDomain:
    """Load ``spec``'s rows, render and tokenise them, and check that training and evaluation have data.

    Raises:
        ValueError: The training rows give no sequence, or the held-out rows give no tokens (names the
            domain and its files).
    """
    train_raw, holdout_raw = load_raw(spec, seed, max_chars)
    train_stats: dict[str, Any] = {}
    holdout_stats: dict[str, Any] = {}
    train_text = extract_text(spec, train_raw, "train", train_stats, tokenizer)
    holdout_text = extract_text(spec, holdout_raw, "holdout", holdout_stats, tokenizer)
    train = tokenize(train_text, tokenizer, max_length, packing, True, cache_dir)
    held = tokenize(holdout_text, tokenizer, max_length, packing, False, cache_dir)
    fmt = train_stats["rows"]
    masked = fmt != "text"
    counts = {"train_blank": train_stats.get("dropped", 0), "holdout_blank": holdout_stats.get("dropped", 0)}
    if not packing:  # one row per text: texts of a single token have no next token to learn
        # Masked rows also go when max_length leaves no scored token (a prompt that fills the row).
        key = "no_scored_token" if masked else "too_short"
        counts[f"train_{key}"] = len(train_text) - len(train)
        counts[f"holdout_{key}"] = len(holdout_text) - len(held)
        short = counts[f"train_{key}"] + counts[f"holdout_{key}"]
        if short:
            what = (
                f"rows with no scored token within max_length={max_length} (the prompt fills the row)"
                if masked
                else "texts shorter than 2 tokens after tokenisation"
            )
            warnings.warn(f"domain {spec.name!r} ({spec.source()}): dropped {short} {what}", stacklevel=3)
    if len(train) == 0:
        raise ValueError(
            f"domain {spec.name!r} ({spec.source()}): the training rows give no sequence of "
            f"{max_length} tokens; add data or lower max_length / disable packing"
        )
    if len(held) == 0:
        raise ValueError(f"domain {spec.name!r} ({spec.source()}): the held-out rows give no tokens")
    if max_eval_rows is not None:
        held = held.select(range(min(max_eval_rows, len(held))))
    row_format = {
        "rows": fmt,
        "scored": SCORED[fmt],
        **({"chat_template": train_stats["chat_template"]} if fmt == "chat" else {}),
        "train_scored_tokens": scored_targets(train),
        "holdout_scored_tokens": scored_targets(held),
    }
    metric = as_task_metric(spec.metric, spec.name)
    return PreparedDomain(
        metric=metric,
        score_rows=[] if metric is None else score_rows(holdout_text, tokenizer, metric, spec.name, max_length),
        train=train,
        holdout=held,
        holdout_tokens=int(sum(len(x) for x in held["input_ids"])),  # a pass over the token lists, once
        dropped={k: v for k, v in counts.items() if v},
        row_format=row_format,
    )


def rows_digest(*datasets: Dataset) -> str:
    """sha256 (first 16 hex digits) of the rows of ``datasets``, in order: every column, as Arrow IPC bytes.

    The rows as the loaders serve them (any index mapping applied), so equal digests mean equal training
    and held-out tokens.
    """
    import hashlib

    import pyarrow as pa

    digest = hashlib.sha256()
    for ds in datasets:
        table = ds.with_format("arrow")[:].combine_chunks() if len(ds) else ds.data.table.slice(0, 0)
        table = table.replace_schema_metadata(None)  # the features' JSON: same rows, same digest
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()[:16]
