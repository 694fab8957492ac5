"""Domains: where each domain's text comes from, how it is checked, tokenised and packed.

A domain is a name plus a source - a built-in demo domain, local files (jsonl/json/csv/parquet/txt,
read by ``datasets``) or a dataset on the Hugging Face Hub - and a held-out split (an explicit file
or split, or a fixed-seed fraction). Tokenisation and packing run through ``datasets.map`` (batched,
cached when ``cache_dir`` is set). Problems are reported with the domain, file and row.

Rows come in three formats (see :func:`row_format`):

* **text** - a field (``text_field``) or a ``str.format`` ``template`` over the row; every token is
  scored by the loss.
* **prompt/response** - ``response_field`` set: the prompt (``prompt_field``, or ``template``
  rendered over the row) followed directly by the response; only the response and the EOS after
  it are scored (labels -100 on the prompt).
* **chat** - a list of ``{"role", "content"}`` messages in ``messages_field`` (default
  ``"messages"``, picked up when the rows have no text field): rendered with the tokenizer's chat
  template when it has one, else with :func:`fallback_chat_segments`; only the assistant turns are
  scored.

Masked rows (prompt/response and chat) are turned into *segments*, each scored or not. Each segment
is tokenised on its own, so a token never straddles prompt and response: the mask is exact and a
change in the prompt cannot change the response's tokens. With packing, the per-token mask travels
with the tokens into the packed rows (a packed row may start in the middle of a response).
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_dataset, load_from_disk

from crma_lightning.data.builtin_domains import BUILTIN_DOMAINS, builtin_documents
from crma_lightning.data.builtin_tasks import TASKS, task_rows
from crma_lightning.metrics.task import as_task_metric

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
ROW_COLUMN = "__crma_row__"
"""Column that carries each row's position in its source through the held-out split (for messages)."""
SEGMENTS_COLUMN = "segments"
"""Column of masked rows after :func:`extract_text`: the row's text as a list of segments."""
_Scalar = str | int | float | bool | None
DomainValue = _Scalar | list[_Scalar] | dict[str, _Scalar | list[_Scalar] | dict[str, _Scalar | list[_Scalar]]]
"""A value in a domain mapping (``data.domains`` entries), typed for the config parser.

Not ``Any``: jsonargparse parses a string typed ``Any`` as YAML, so a template ``"Text: {text}"`` or a
stop string ``"Q: "`` would arrive as a mapping. ``str`` first in each union keeps strings as written.
"""

SCORED_COLUMN = "scored"
"""Column of masked rows: per segment after :func:`extract_text`, per token after :func:`tokenize`."""
ROW_FORMATS = ("text", "prompt_response", "chat")
"""Row formats; :func:`row_format` tells which one a domain's rows have."""
SCORED = {"text": "all", "prompt_response": "response", "chat": "assistant"}
"""Which tokens the loss scores, per row format (the report's ``scored`` entry)."""


@dataclass
class DomainSpec:
    r"""One domain of the sequence. Exactly one of ``builtin``, ``path`` or ``hub`` is the source.

    Attributes:
        name: Unique name; used for the domain's adapter, log keys and report columns.
        builtin: Name of a built-in demo domain (``prose``, ``code``, ``arithmetic``, ``unicode``) or of a
            built-in task (``first``, ``last``, ``length``, ``reverse``, ``shift``, ``sort``:
            :mod:`crma_lightning.data.builtin_tasks`; prompt/response rows, ``exact_match`` unless ``metric`` says
            otherwise, :data:`BUILTIN_TASK_ROWS` rows of which the first ``holdout_fraction`` are held out).
        path: Local file, glob or list of files; format from the extension unless ``format`` is set.
        hub: Dataset id on the Hugging Face Hub (``datasets.load_dataset(hub, hub_config, split=split)``).
        hub_config: Configuration name of the hub dataset.
        revision: Git revision of the hub dataset (pin it for reproducible runs).
        split: Split that holds the training rows.
        format: ``json``, ``csv``, ``parquet`` or ``text`` for local files with another extension.
        text_field: Column holding the text (ignored when ``template`` is set).
        template: ``str.format`` template over the row's columns, e.g. ``"Q: {question}\\nA: {answer}"``.
            With ``response_field`` it renders the *prompt* only (e.g. ``"Q: {question}\\nA: "``).
        prompt_field: Column holding the prompt of prompt/response rows (not scored). Needs ``response_field``.
        response_field: Column holding the response: makes the domain a prompt/response domain whose
            loss covers the response and its EOS only. The prompt is ``prompt_field``'s value or the
            ``template`` rendered over the row (exactly one of the two), and the response follows it
            directly, so put any separator (``"\\nAnswer: "``) at the end of the prompt.
        response_labels: The words of a class-index response column: ``response_field`` holds integers (a
            ``datasets.ClassLabel``, as in ``ag_news``) and row ``i``'s response is ``response_labels[label]``,
            e.g. the label words of an instruction benchmark. ``None``: the column holds the response text.
        messages_field: Column holding chat rows: a list of ``{"role": str, "content": str}`` messages.
            Used when the rows have no ``text_field`` column (and neither ``template`` nor
            ``response_field`` is set); only the assistant messages are scored.
        holdout_path: Local file(s) with the held-out rows.
        holdout_split: Split with the held-out rows (hub datasets, or local files with named splits).
        holdout_fraction: Otherwise, this fraction of the training rows is held out (fixed seed).
        shuffle_holdout: Shuffle the rows of ``holdout_path`` / ``holdout_split`` (with the run's seed)
            before anything takes the first of them (``max_eval_rows``, a metric's ``eval_rows``). Off by
            default (the file's order, so existing numbers stay); turn it on for a source stored in class
            blocks, e.g. the Hub's ``dbpedia_14`` test split, whose first 500 rows are all one class.
        max_examples: Keep at most this many training rows (after the held-out split).
        max_steps: Optimizer steps for this domain's stage (overrides the trainer's ``max_steps``).
        metric: Task metric scored by generation after every stage (prompt/response and chat rows): a
            name (``exact_match``, ``accuracy``, ``rouge_l``, ``token_f1``, a registered one) or a mapping of
            :class:`~crma_lightning.metrics.task.TaskMetric` fields (``normalize``, ``labels``,
            ``label_mode``, ``max_new_tokens``, ``stop``, ``eval_rows``). ``None``: loss only.
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
    prompt_field: str | None = None
    response_field: str | None = None
    response_labels: list[str] | None = None
    messages_field: str = "messages"
    holdout_path: str | list[str] | None = None
    holdout_split: str | None = None
    holdout_fraction: float = 0.1
    shuffle_holdout: bool = False
    max_examples: int | None = None
    max_steps: int | None = None
    metric: str | dict[str, Any] | None = None

    def source(self) -> str:
        """Human-readable description of where the rows come from (for messages and the report)."""
        if self.builtin:
            return f"built-in domain {self.builtin!r}"
        if self.path:
            return f"file(s) {self.path}"
        return f"hub dataset {self.hub!r}" + (f" ({self.hub_config})" if self.hub_config else "")


BUILTIN_TASK_ROWS = 2000
"""Rows generated per built-in task (training and held-out together)."""


def _task_defaults(spec: DomainSpec) -> DomainSpec:
    """A built-in task's row format and metric, where the spec leaves them unset."""
    if spec.builtin not in TASKS or spec.response_field:
        return spec
    from dataclasses import replace

    return replace(spec, prompt_field="prompt", response_field="response", metric=spec.metric or "exact_match")


def as_domain_spec(value: DomainSpec | str | dict) -> DomainSpec:
    """Accept a :class:`DomainSpec`, a dict of its fields, or a built-in domain's or task's name."""
    if isinstance(value, DomainSpec):
        return _task_defaults(value)
    if isinstance(value, str):
        return _task_defaults(DomainSpec(name=value, builtin=value))
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(DomainSpec.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"domain {value.get('name', value)!r} has unknown keys {unknown}; "
                f"expected keys among {sorted(DomainSpec.__dataclass_fields__)}"
            )
        if "name" not in value:
            raise ValueError(f"domain {value!r} has no `name`: every domain needs one")
        for key, given in value.items():
            if not _has_type(given, _FIELD_TYPES[key]):
                raise ValueError(f"domain {value['name']!r}: {key}={given!r} is invalid: expected {_FIELD_TYPES[key]}")
        return _task_defaults(DomainSpec(**value))
    raise ValueError(f"domain {value!r} is invalid: expected a built-in name, a mapping or a DomainSpec")


_FIELD_TYPES = typing.get_type_hints(DomainSpec)
"""Each :class:`DomainSpec` field's type: a domain given as a mapping is checked against it."""


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (the few type forms :class:`DomainSpec` uses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def domain_config(spec: DomainSpec) -> str | dict[str, Any]:
    """``spec`` as a ``data.domains`` entry: a built-in's name, or the fields that differ from their defaults."""
    if spec == DomainSpec(name=spec.name, builtin=spec.name):
        return spec.name
    defaults = DomainSpec(name=spec.name)
    return {k: v for k, v in asdict(spec).items() if k == "name" or v != getattr(defaults, k)}


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
        if spec.builtin and spec.builtin not in BUILTIN_DOMAINS and spec.builtin not in TASKS:
            raise ValueError(
                f"domain {spec.name!r}: unknown built-in domain {spec.builtin!r}; expected one of "
                f"{sorted(BUILTIN_DOMAINS)} or a built-in task among {sorted(TASKS)}, or give a `path` or `hub` source"
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
        if spec.shuffle_holdout and not (spec.holdout_path or spec.holdout_split):
            raise ValueError(
                f"domain {spec.name!r}: shuffle_holdout=True needs holdout_path or holdout_split (rows held out "
                "by holdout_fraction are drawn at random already)"
            )
        if spec.prompt_field and not spec.response_field:
            raise ValueError(
                f"domain {spec.name!r}: prompt_field={spec.prompt_field!r} needs a response_field (the column "
                "whose text is scored)"
            )
        if spec.response_field and bool(spec.prompt_field) == (spec.template is not None):
            raise ValueError(
                f"domain {spec.name!r}: response_field={spec.response_field!r} needs exactly one prompt source: "
                "`prompt_field` (a column) or `template` (rendered over the row)"
                + (", not both" if spec.prompt_field else "")
            )
        if spec.response_labels is not None:
            labels = spec.response_labels
            if not spec.response_field:
                raise ValueError(
                    f"domain {spec.name!r}: response_labels needs a response_field (the column of class indices)"
                )
            blank = not all(isinstance(x, str) and x.strip() for x in labels)
            if not labels or len(set(labels)) != len(labels) or blank:
                raise ValueError(
                    f"domain {spec.name!r}: response_labels={labels!r} is invalid: expected distinct non-blank strings"
                )
            metric = as_task_metric(spec.metric, spec.name)
            missing = [x for x in labels if metric is not None and metric.name == "accuracy" and x not in metric.labels]
            if missing:  # such rows could never be scored right: their reference is no label of the metric
                raise ValueError(
                    f"domain {spec.name!r}: response_labels {missing!r} are not in the accuracy metric's labels "
                    f"{metric.labels!r}; expected every response label among them"
                )
        as_task_metric(spec.metric, spec.name)
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
    content = False
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"domain {domain!r}: {file} line {lineno} is not valid UTF-8 ({err.reason} at byte "
                    f"{err.start}); re-encode the file as UTF-8"
                ) from None
            content = content or bool(line.strip())
            if suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    # `msg` alone can end mid-sentence ("Invalid control character at"): add the column.
                    raise ValueError(
                        f"domain {domain!r}: {file} line {lineno} is not valid JSON: "
                        f"{err.msg.removesuffix(' at')} at column {err.colno}"
                    ) from None
    if not content:
        raise ValueError(f"domain {domain!r}: file {file} holds only whitespace (no rows)")


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


def _load_hub(spec: DomainSpec, split: str) -> Dataset:
    """``split`` of a ``hub`` source: a Hub dataset id, a local dataset directory, or a ``save_to_disk`` directory.

    ``datasets.load_dataset`` reads Hub ids and local directories of data files; a directory written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` needs ``load_from_disk`` instead.
    """
    local = Path(os.path.expanduser(spec.hub))
    if (local / "state.json").is_file():  # a Dataset.save_to_disk directory: it is one split
        if spec.holdout_split:
            raise ValueError(
                f"{local} holds one split (Dataset.save_to_disk), so holdout_split={spec.holdout_split!r} cannot "
                "name another: use holdout_fraction, or save a DatasetDict with both splits"
            )
        return load_from_disk(str(local))
    if (local / "dataset_dict.json").is_file():  # a DatasetDict.save_to_disk directory
        splits = load_from_disk(str(local))
        if split not in splits:
            raise ValueError(f"{local} has splits {sorted(splits)}, not {split!r}")
        return splits[split]
    return load_dataset(spec.hub, spec.hub_config, split=split, revision=spec.revision)


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
    if spec.builtin in TASKS:  # generated rows; the first ones held out (no shuffle: the LCG's order)
        full = _numbered(Dataset.from_dict(task_rows(spec.builtin, BUILTIN_TASK_ROWS)))
        n_hold = max(1, round(BUILTIN_TASK_ROWS * spec.holdout_fraction))
        holdout, train = full.select(range(n_hold)), full.select(range(n_hold, len(full)))
        if spec.max_examples is not None:
            train = train.select(range(min(spec.max_examples, len(train))))
        return train, holdout
    if spec.builtin:
        full = Dataset.from_dict({"text": builtin_documents(spec.builtin, max_chars)})
    elif spec.path:
        full = _numbered(_load_files(spec, spec.path))
    else:
        try:
            full = _numbered(_load_hub(spec, spec.split))
        except Exception as err:
            raise ValueError(f"domain {spec.name!r}: could not load {spec.source()}: {err}") from err
    if spec.holdout_path:
        holdout = _numbered(_load_files(spec, spec.holdout_path))
        train = full
    elif spec.holdout_split:
        try:
            holdout = _numbered(_load_hub(spec, spec.holdout_split))
        except Exception as err:
            raise ValueError(f"domain {spec.name!r}: could not load split {spec.holdout_split!r}: {err}") from err
        train = full
    else:
        if len(full) < 2:
            raise ValueError(f"domain {spec.name!r} ({spec.source()}) has {len(full)} rows: too few to hold some out")
        parts = full.train_test_split(test_size=spec.holdout_fraction, seed=seed, shuffle=True)
        train, holdout = parts["train"], parts["test"]
    for part in (train, holdout):
        _check_label_count(spec, part)
    if spec.shuffle_holdout and (spec.holdout_path or spec.holdout_split):
        holdout = holdout.shuffle(seed=seed)  # ROW_COLUMN keeps each row's place in its source
    if spec.max_examples is not None:
        train = train.select(range(min(spec.max_examples, len(train))))
    return train, holdout


def _check_label_count(spec: DomainSpec, ds: Dataset) -> None:
    """``response_labels`` must name every class of a ``ClassLabel`` response column, no more, no fewer.

    Checked right after loading, so a list that is one word short (or long) fails before any training,
    rather than on the first row whose index it misses - or never, mapping classes to the wrong words.
    """
    feature = ds.features.get(spec.response_field) if spec.response_labels is not None else None
    classes = getattr(feature, "num_classes", None)
    if classes is not None and classes != len(spec.response_labels):
        raise ValueError(
            f"domain {spec.name!r}: response_labels has {len(spec.response_labels)} words, but column "
            f"{spec.response_field!r} has {classes} classes ({feature.names!r}); expected one word per class"
        )


# Fields added after checkpoints recorded sources: left out while at their defaults, so older runs resume.
_LATER_FIELDS = {
    "prompt_field": None,
    "response_field": None,
    "response_labels": None,
    "messages_field": "messages",
    "metric": None,
    "shuffle_holdout": False,
}


def source_identity(spec: DomainSpec) -> dict[str, Any]:
    """The fields of ``spec`` that define its data (a resume must agree on them); budgets are left out."""
    fields = asdict(spec)
    return {k: v for k, v in fields.items() if k != "max_steps" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
