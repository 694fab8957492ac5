"""Tokenising and packing a domain's text (or scored segments) into training and held-out rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from crma_lightning import _compat
from crma_lightning.data.domains import SCORED_COLUMN, SEGMENTS_COLUMN


def _cut(stream: list, max_length: int, drop_last: bool) -> list[list]:
    """``stream`` in rows of ``max_length``; the last partial row only if ``not drop_last``."""
    n_full = len(stream) // max_length
    rows = [stream[i * max_length : (i + 1) * max_length] for i in range(n_full)]
    if not drop_last and len(stream) > n_full * max_length:
        rows.append(stream[n_full * max_length :])
    return rows


def tokenize(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    packing: bool,
    drop_last: bool,
    cache_dir: str | None = None,
) -> Dataset:
    """Token ids in rows of ``max_length``.

    ``packing``: texts joined with EOS and cut into full rows (the last partial row is kept only if
    ``not drop_last``); else each text is truncated to one row. Rows are padded later, in the collator.

    Masked rows (:data:`SEGMENTS_COLUMN`, from :func:`extract_text`) also get a per-token
    :data:`SCORED_COLUMN` (the collator turns unscored tokens into label -100). Each segment is
    tokenised separately, and the EOS after a row is scored when its last segment is. Packing cuts
    the ids and the flags together; a truncated unpacked row's final EOS is not scored (the response
    did not end there). Rows with no scored next-token target (e.g. a prompt longer than
    ``max_length``, or a packed row of prompt tokens only) are dropped.
    """
    eos = tokenizer.eos_token_id
    masked = SEGMENTS_COLUMN in ds.column_names
    fingerprint = Hasher.hash(
        (_compat.dataset_fingerprint(ds), tokenizer.name_or_path, len(tokenizer), max_length, packing, drop_last)
    )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if not packing:
            return {"input_ids": [[*x[: max_length - 1], eos] if eos is not None else x[:max_length] for x in ids]}
        stream: list[int] = []
        for x in ids:
            stream.extend(x)
            if eos is not None:
                stream.append(eos)
        return {"input_ids": _cut(stream, max_length, drop_last)}

    def encode_masked(batch: dict[str, list]) -> dict[str, list]:
        # One tokenizer call for all segments of the batch (fast tokenizers batch in Rust).
        flat = [text for segments in batch[SEGMENTS_COLUMN] for text in segments]
        flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        seqs, masks = [], []
        for flags in batch[SCORED_COLUMN]:
            ids: list[int] = []
            scored: list[bool] = []
            for flag in flags:
                x = next(flat_ids)
                ids.extend(x)
                scored.extend([bool(flag)] * len(x))
            if eos is not None:
                ids.append(eos)
                scored.append(bool(flags[-1]))
            seqs.append(ids)
            masks.append(scored)
        if not packing:
            rows, row_scored = [], []
            for ids, scored in zip(seqs, masks):
                if len(ids) > max_length:
                    keep = max_length - 1 if eos is not None else max_length
                    ids = ids[:keep] + ([eos] if eos is not None else [])
                    scored = scored[:keep] + ([False] if eos is not None else [])
                rows.append(ids)
                row_scored.append(scored)
            return {"input_ids": rows, SCORED_COLUMN: row_scored}
        stream = [t for ids in seqs for t in ids]
        flags_stream = [f for scored in masks for f in scored]
        return {
            "input_ids": _cut(stream, max_length, drop_last),
            SCORED_COLUMN: _cut(flags_stream, max_length, drop_last),
        }

    kwargs: dict[str, Any] = {"batched": True, "batch_size": 1000, "remove_columns": ds.column_names}
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"tokens-{fingerprint}.arrow")
    out = ds.map(encode_masked if masked else encode, new_fingerprint=fingerprint, desc="tokenize", **kwargs)
    if masked:
        # The first token of a row is never a target (labels are shifted by one), hence [1:].
        return out.filter(
            lambda batch: [len(x) > 1 and any(s[1:]) for x, s in zip(batch["input_ids"], batch[SCORED_COLUMN])],
            batched=True,
        )
    return out.filter(lambda batch: [len(x) > 1 for x in batch["input_ids"]], batched=True)


def scored_targets(ds: Dataset) -> int:
    """Next-token targets the loss scores in a tokenised dataset: per row, tokens 2.. that are scored."""
    masked = SCORED_COLUMN in ds.column_names
    column = SCORED_COLUMN if masked else "input_ids"
    total = 0
    # Batched iteration keeps memory bounded on large training sets.
    for batch in ds.select_columns([column]).iter(batch_size=4096):
        if masked:
            total += sum(sum(s[1:]) for s in batch[column])
        else:
            total += sum(max(len(x) - 1, 0) for x in batch[column])
    return int(total)
