"""Domains: where each domain's text comes from, how it is checked, tokenised and packed.

A domain is a name plus a source - a built-in demo domain, local files (jsonl/json/csv/parquet/txt,
read by ``datasets``) or a dataset on the Hugging Face Hub - and a held-out split (an explicit file
or split, or a fixed-seed fraction). Text comes from a field or a ``str.format`` template over the
row; tokenisation and packing run through ``datasets.map`` (batched, cached when ``cache_dir`` is
set). Problems are reported with the domain, file and row.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from crma_lightning.builtin_domains import BUILTIN_DOMAINS, builtin_documents

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
ROW_COLUMN = "__crma_row__"
"""Column that carries each row's position in its source through the held-out split (for messages)."""


@dataclass
class DomainSpec:
    r"""One domain of the sequence. Exactly one of ``builtin``, ``path`` or ``hub`` is the source.

    Attributes:
        name: Unique name; used for the domain's adapter, log keys and report columns.
        builtin: Name of a built-in demo domain (``prose``, ``code``, ``arithmetic``, ``unicode``).
        path: Local file, glob or list of files; format from the extension unless ``format`` is set.
        hub: Dataset id on the Hugging Face Hub (``datasets.load_dataset(hub, hub_config, split=split)``).
        hub_config: Configuration name of the hub dataset.
        revision: Git revision of the hub dataset (pin it for reproducible runs).
        split: Split that holds the training rows.
        format: ``json``, ``csv``, ``parquet`` or ``text`` for local files with another extension.
        text_field: Column holding the text (ignored when ``template`` is set).
        template: ``str.format`` template over the row's columns, e.g. ``"Q: {question}\\nA: {answer}"``.
        holdout_path: Local file(s) with the held-out rows.
        holdout_split: Split with the held-out rows (hub datasets, or local files with named splits).
        holdout_fraction: Otherwise, this fraction of the training rows is held out (fixed seed).
        max_examples: Keep at most this many training rows (after the held-out split).
        max_steps: Optimizer steps for this domain's stage (overrides the trainer's ``max_steps``).
    """

    name: str
    builtin: str | None = None
    path: str | list[str] | None = None
    hub: str | None = None
    hub_config: str | None = None
    revision: str | None = None
    split: str = "train"
    format: str | None = None
    text_field: str = "text"
    template: str | None = None
    holdout_path: str | list[str] | None = None
    holdout_split: str | None = None
    holdout_fraction: float = 0.1
    max_examples: int | None = None
    max_steps: int | None = None

    def source(self) -> str:
        """Human-readable description of where the rows come from (for messages and the report)."""
        if self.builtin:
            return f"built-in domain {self.builtin!r}"
        if self.path:
            return f"file(s) {self.path}"
        return f"hub dataset {self.hub!r}" + (f" ({self.hub_config})" if self.hub_config else "")


def as_domain_spec(value: DomainSpec | str | dict) -> DomainSpec:
    """Accept a :class:`DomainSpec`, a dict of its fields, or a built-in domain's name."""
    if isinstance(value, DomainSpec):
        return value
    if isinstance(value, str):
        return DomainSpec(name=value, builtin=value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(DomainSpec.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"domain {value.get('name', value)!r} has unknown keys {unknown}; "
                f"expected keys among {sorted(DomainSpec.__dataclass_fields__)}"
            )
        return DomainSpec(**value)
    raise ValueError(f"domain {value!r} is invalid: expected a built-in name, a mapping or a DomainSpec")


def validate_domains(specs: Sequence[DomainSpec]) -> None:
    """Check names, sources and fractions of all domains; raise ``ValueError`` on the first problem."""
    if not specs:
        raise ValueError("no domains given: expected at least one domain")
    seen: set[str] = set()
    for spec in specs:
        if not spec.name or not all(c.isalnum() or c in "_-" for c in spec.name):
            raise ValueError(f"domain name {spec.name!r} is invalid: expected letters, digits, '_' or '-'")
        if spec.name in seen:
            names = [s.name for s in specs]
            raise ValueError(f"duplicate domain name {spec.name!r} in {names}: every stage needs its own name")
        seen.add(spec.name)
        sources = [k for k in ("builtin", "path", "hub") if getattr(spec, k)]
        if len(sources) != 1:
            raise ValueError(
                f"domain {spec.name!r} must have exactly one source among builtin/path/hub, got {sources or 'none'}"
            )
        if spec.builtin and spec.builtin not in BUILTIN_DOMAINS:
            raise ValueError(
                f"domain {spec.name!r}: unknown built-in domain {spec.builtin!r}; expected one of "
                f"{sorted(BUILTIN_DOMAINS)}, or give a `path` or `hub` source"
            )
        if spec.format and spec.format not in set(_FILE_BUILDERS.values()):
            raise ValueError(
                f"domain {spec.name!r}: format={spec.format!r} is not supported; expected one of "
                f"{sorted(set(_FILE_BUILDERS.values()))}"
            )
        if not (spec.holdout_path or spec.holdout_split) and not 0.0 < spec.holdout_fraction < 1.0:
            raise ValueError(
                f"domain {spec.name!r}: holdout_fraction={spec.holdout_fraction!r} must be in (0, 1) "
                "when no holdout_path/holdout_split is given"
            )
        for key in ("max_examples", "max_steps"):
            value = getattr(spec, key)
            if value is not None and value < 1:
                raise ValueError(f"domain {spec.name!r}: {key}={value!r} is invalid: expected an integer >= 1")


# ---------------------------------------------------------------------- loading raw rows
def _expand(path: str | list[str]) -> list[str]:
    import glob

    paths = [path] if isinstance(path, str) else list(path)
    files: list[str] = []
    for p in paths:
        matched = sorted(glob.glob(os.path.expanduser(p)))
        if not matched:
            raise ValueError(f"file {p!r} does not exist (no file matches it)")
        files.extend(matched)
    return files


def _check_text_file(domain: str, file: str) -> None:
    """Scan a JSON Lines or text file for bytes that are not UTF-8 and lines that are not JSON.

    ``datasets`` reports such problems without the line number; this names domain, file and line.
    """
    suffix = Path(file).suffix
    if suffix not in (".jsonl", ".txt", ".json"):
        return
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"domain {domain!r}: {file} line {lineno} is not valid UTF-8 ({err.reason} at byte "
                    f"{err.start}); re-encode the file as UTF-8"
                ) from None
            if suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"domain {domain!r}: {file} line {lineno} is not valid JSON: {err.msg}") from None


def _builder(spec: DomainSpec, files: list[str]) -> str:
    builder = spec.format or _FILE_BUILDERS.get(Path(files[0]).suffix)
    if builder is None:
        raise ValueError(
            f"domain {spec.name!r}: cannot tell the format of {files[0]}; expected one of the extensions "
            f"{sorted(_FILE_BUILDERS)} or set `format`"
        )
    return builder


def _load_files(spec: DomainSpec, path: str | list[str]) -> Dataset:
    files = _expand(path)
    for file in files:
        if os.path.getsize(file) == 0:
            raise ValueError(f"domain {spec.name!r}: file {file} is empty")
        _check_text_file(spec.name, file)
    builder = _builder(spec, files)
    try:
        return load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # datasets raises many types; name the domain and files
        raise ValueError(f"domain {spec.name!r}: could not read {files} as {builder}: {err}") from err


def _numbered(ds: Dataset) -> Dataset:
    """``ds`` plus :data:`ROW_COLUMN`: the row's position in its source, kept through shuffling."""
    return ds.add_column(ROW_COLUMN, np.arange(len(ds)))


def describe_row(spec: DomainSpec, part: str, row: int) -> str:
    """Where row ``row`` (0-based, in source order) of the domain's ``part`` comes from.

    For local files: the file and the row within it (for JSON Lines without blank lines, line
    ``row + 1``). Only error and warning messages call this, so counting the rows of each file when
    a domain has several is affordable.
    """
    if spec.path:
        source = spec.holdout_path if part == "holdout" and spec.holdout_path else spec.path
        files = _expand(source)
        if len(files) > 1:
            builder = _builder(spec, files)
            for file in files[:-1]:
                size = len(load_dataset(builder, data_files=[file], split="train"))
                if row < size:
                    return f"{file} row {row}"
                row -= size
        return f"{files[-1]} row {row}"
    if spec.hub:
        split = spec.holdout_split if part == "holdout" and spec.holdout_split else spec.split
        return f"hub dataset {spec.hub!r} split {split!r} row {row}"
    return f"{spec.source()} row {row}"


def load_raw(spec: DomainSpec, seed: int = 0, max_chars: int | None = None) -> tuple[Dataset, Dataset]:
    """``(train, holdout)`` rows of one domain, before text extraction."""
    if spec.builtin:
        full = Dataset.from_dict({"text": builtin_documents(spec.builtin, max_chars)})
    elif spec.path:
        full = _numbered(_load_files(spec, spec.path))
    else:
        try:
            full = _numbered(load_dataset(spec.hub, spec.hub_config, split=spec.split, revision=spec.revision))
        except Exception as err:
            raise ValueError(f"domain {spec.name!r}: could not load {spec.source()}: {err}") from err
    if spec.holdout_path:
        holdout = _numbered(_load_files(spec, spec.holdout_path))
        train = full
    elif spec.holdout_split:
        try:
            holdout = _numbered(
                load_dataset(spec.hub, spec.hub_config, split=spec.holdout_split, revision=spec.revision)
            )
        except Exception as err:
            raise ValueError(f"domain {spec.name!r}: could not load split {spec.holdout_split!r}: {err}") from err
        train = full
    else:
        if len(full) < 2:
            raise ValueError(f"domain {spec.name!r} ({spec.source()}) has {len(full)} rows: too few to hold some out")
        parts = full.train_test_split(test_size=spec.holdout_fraction, seed=seed, shuffle=True)
        train, holdout = parts["train"], parts["test"]
    if spec.max_examples is not None:
        train = train.select(range(min(spec.max_examples, len(train))))
    return train, holdout


def extract_text(spec: DomainSpec, ds: Dataset, part: str, stats: dict[str, int] | None = None) -> Dataset:
    """A dataset with a single ``text`` column (template applied).

    Rows whose text is missing, null or blank are dropped: a warning names the domain, the file and
    the first such rows, and ``stats["dropped"]`` (when ``stats`` is given) counts them. A text field
    that holds something other than a string is an error naming its file and row, and so is a domain
    with no text left at all.
    """
    numbered = ROW_COLUMN in ds.column_names
    columns = [c for c in ds.column_names if c != ROW_COLUMN]
    if spec.template is None and spec.text_field not in columns:
        raise ValueError(
            f"domain {spec.name!r} ({part}, {spec.source()}): no text field {spec.text_field!r}; "
            f"the rows have fields {columns}. Set `text_field` or a `template`."
        )
    if spec.template is not None:
        import string

        needed = {f for _, f, _, _ in string.Formatter().parse(spec.template) if f}
        missing = sorted(needed - set(columns))
        if missing:
            raise ValueError(
                f"domain {spec.name!r} ({part}): template uses fields {missing} that the rows do not have; "
                f"available fields: {columns}"
            )

    def to_text(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = []
        # Row numbers in source order: the held-out split shuffled the rows.
        rows = batch[ROW_COLUMN] if numbered else indices
        for i, row in enumerate(rows):
            if spec.template is not None:
                texts.append(spec.template.format(**{k: batch[k][i] for k in columns}))
                continue
            value = batch[spec.text_field][i]
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"domain {spec.name!r} ({part}): {describe_row(spec, part, row)}: field {spec.text_field!r} "
                    f"is {type(value).__name__}, expected a string"
                )
            texts.append(value or "")
        return {"text": texts}

    total = len(ds)
    ds = ds.map(to_text, batched=True, with_indices=True, remove_columns=columns, desc=f"{spec.name}: text")
    blank = ds.filter(lambda batch: [not t.strip() for t in batch["text"]], batched=True)
    ds = ds.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise ValueError(
            f"domain {spec.name!r} ({part}, {spec.source()}) has no non-empty text after filtering; "
            f"check `text_field`={spec.text_field!r} / `template`"
        )
    if len(blank):
        rows = blank[:3][ROW_COLUMN] if numbered else []
        where = f" (e.g. {', '.join(describe_row(spec, part, r) for r in rows)})" if rows else ""
        what = "template's text" if spec.template is not None else f"field {spec.text_field!r}"
        warnings.warn(
            f"domain {spec.name!r} ({part}): dropped {len(blank)} of {total} rows whose {what} is missing, "
            f"null or blank{where}",
            stacklevel=2,
        )
    if numbered:
        ds = ds.remove_columns(ROW_COLUMN)
    if stats is not None:
        stats["dropped"] = len(blank)
    return ds


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
    """
    eos = tokenizer.eos_token_id
    fingerprint = Hasher.hash((ds._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length, packing, drop_last))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if not packing:
            return {"input_ids": [[*x[: max_length - 1], eos] if eos is not None else x[:max_length] for x in ids]}
        stream: list[int] = []
        for x in ids:
            stream.extend(x)
            if eos is not None:
                stream.append(eos)
        n_full = len(stream) // max_length
        rows = [stream[i * max_length : (i + 1) * max_length] for i in range(n_full)]
        if not drop_last and len(stream) > n_full * max_length:
            rows.append(stream[n_full * max_length :])
        return {"input_ids": rows}

    kwargs: dict[str, Any] = {"batched": True, "batch_size": 1000, "remove_columns": ds.column_names}
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"tokens-{fingerprint}.arrow")
    out = ds.map(encode, new_fingerprint=fingerprint, desc="tokenize", **kwargs)
    return out.filter(lambda batch: [len(x) > 1 for x in batch["input_ids"]], batched=True)
