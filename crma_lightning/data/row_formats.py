"""Row formats: text, prompt/response and chat rows turned into (scored) text segments.

See :mod:`crma_lightning.data.domains` for the formats; :func:`extract_text` turns a domain's raw rows into
a ``text`` column (text rows) or into segments with per-segment scored flags (masked rows), which
:func:`~crma_lightning.data.packing.tokenize` tokenises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from crma_lightning.data.domains import (
    ROW_COLUMN,
    SCORED_COLUMN,
    SEGMENTS_COLUMN,
    DomainSpec,
    describe_row,
)


def row_format(spec: DomainSpec, columns: Sequence[str]) -> str:
    """Which of :data:`ROW_FORMATS` a domain's rows are in, given the rows' columns.

    ``response_field`` set: ``"prompt_response"``. Otherwise a ``template`` or a present
    ``text_field`` column: ``"text"`` (so existing text datasets never change meaning). Otherwise a
    present ``messages_field`` column: ``"chat"``. Anything else is ``"text"``, and
    :func:`extract_text` reports the missing text field.
    """
    if spec.response_field:
        return "prompt_response"
    if spec.template is not None or spec.text_field in columns:
        return "text"
    if spec.messages_field in columns:
        return "chat"
    return "text"


def _merge(segments: list[str], scored: list[bool]) -> tuple[list[str], list[bool]]:
    """Drop empty segments and join neighbours with the same flag (fewer, longer pieces to tokenise)."""
    out: list[str] = []
    flags: list[bool] = []
    for text, flag in zip(segments, scored):
        if not text:
            continue
        if flags and flags[-1] == flag:
            out[-1] += text
        else:
            out.append(text)
            flags.append(flag)
    return out, flags


def fallback_chat_segments(messages: list[dict[str, str]]) -> tuple[list[str], list[bool]]:
    r"""Render chat messages for a tokenizer without a chat template.

    Each message becomes ``<|role|>\n{content}\n`` (e.g. ``<|user|>\nHi\n<|assistant|>\nHello!\n``).
    Scored: each assistant message's ``{content}\n``; its ``<|assistant|>\n`` header is prompt, as are
    all other roles' messages. The EOS that ends every row is scored when the last message is the
    assistant's.

    Returns:
        ``(segments, scored)``: the text in pieces, and whether each piece is scored.
    """
    segments: list[str] = []
    scored: list[bool] = []
    for message in messages:
        header = f"<|{message['role']}|>\n"
        if message["role"] == "assistant":
            segments += [header, message["content"] + "\n"]
            scored += [False, True]
        else:
            segments.append(header + message["content"] + "\n")
            scored.append(False)
    return _merge(segments, scored)


def template_chat_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[str], list[bool]]:
    """Render chat messages with the tokenizer's own chat template and find the assistant turns in it.

    Assistant message ``i`` spans from the end of the conversation up to it rendered *with* the
    generation prompt (so the assistant header is prompt) to the end of the conversation rendered
    through message ``i`` (so the template's end-of-turn marker is scored). This needs a template
    that renders a conversation as a sequence of turns, each rendering a prefix of the next, as the
    common templates do; otherwise a ``ValueError`` says so.

    Returns:
        ``(segments, scored)``: the text in pieces, and whether each piece is scored.
    """

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    full = render(len(messages), False)
    segments: list[str] = []
    scored: list[bool] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(i, True) if i else ""
        through = render(i + 1, False)
        if not (through.startswith(before) and full.startswith(through) and pos <= len(before)):
            raise ValueError(
                f"the tokenizer's chat template does not render message {i} as a continuation of the turns "
                "before it, so the assistant turns cannot be located; render the rows yourself and use "
                "prompt_field/response_field"
            )
        segments += [full[pos : len(before)], full[len(before) : len(through)]]
        scored += [False, True]
        pos = len(through)
    segments.append(full[pos:])
    scored.append(False)
    return _merge(segments, scored)


def chat_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[list[str], list[bool]]:
    """Chat messages as ``(segments, scored)``: the tokenizer's chat template if it has one, else the fallback.

    See :func:`template_chat_segments` and :func:`fallback_chat_segments`.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return template_chat_segments(messages, tokenizer)
    return fallback_chat_segments(messages)


class _RowPlace:
    """``domain 'x' (part): <file> row <n>``, rendered only when an error message formats it.

    :func:`describe_row` counts the rows of each file of a multi-file domain (one ``load_dataset`` per
    file), affordable for one message but not for every row of a map: built eagerly, it made a
    prompt/response domain with ``path: [a.jsonl, b.jsonl]`` load every file once per row.
    """

    __slots__ = ("part", "row", "spec")

    def __init__(self, spec: DomainSpec, part: str, row: int) -> None:
        self.spec, self.part, self.row = spec, part, row

    def __str__(self) -> str:
        return f"domain {self.spec.name!r} ({self.part}): {describe_row(self.spec, self.part, self.row)}"

    def __format__(self, format_spec: str) -> str:  # f"{where}: ..." renders it only when the error is raised
        return format(str(self), format_spec)


def _check_messages(value: Any, field: str, where: str | _RowPlace) -> list[dict[str, str]]:
    """``value`` as a list of ``{"role", "content"}`` dicts, or a ``ValueError`` that starts with ``where``."""
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: field {field!r} is {type(value).__name__}, expected a list of "
            "{'role': ..., 'content': ...} messages"
        )
    if not value:
        raise ValueError(f"{where}: field {field!r} is an empty list: a chat row needs messages")
    messages = []
    for j, message in enumerate(value):
        ok = isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        if not ok:
            shown = repr(message)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ValueError(
                f"{where}: message {j} of field {field!r} is {shown}: expected "
                "{'role': <string>, 'content': <string>}"
            )
        # Only role and content reach the template: Arrow gives every message the union of all keys
        # (absent ones as None), which some templates would render.
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError(f"{where}: no assistant message with content: nothing to score")
    return messages


def _label_word(value: Any, labels: list[str], field: str, where: str) -> str:
    """``labels[value]`` for a class-index response (``response_labels``); a clear error for anything else."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(labels):
        raise ValueError(
            f"{where}: field {field!r} is {value!r}, expected a class index in [0, {len(labels) - 1}] "
            f"(response_labels has {len(labels)} words)"
        )
    return labels[value]


def _extract_masked(
    spec: DomainSpec,
    ds: Dataset,
    part: str,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase | None,
) -> Dataset:
    """Prompt/response or chat rows as :data:`SEGMENTS_COLUMN` / :data:`SCORED_COLUMN` (see :func:`extract_text`)."""
    numbered = ROW_COLUMN in ds.column_names
    columns = [c for c in ds.column_names if c != ROW_COLUMN]
    render_chat: Callable[[list[dict[str, str]]], tuple[list[str], list[bool]]] = (
        (lambda messages: chat_segments(messages, tokenizer)) if fmt == "chat" else fallback_chat_segments
    )

    def string(value: Any, field: str, where: str | _RowPlace, allow_blank: bool) -> str:
        if value is None:
            raise ValueError(f"{where}: field {field!r} is missing or null")
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
        if not allow_blank and not value.strip():
            raise ValueError(f"{where}: field {field!r} is blank: the response is what the loss scores")
        return value

    def to_segments(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        all_segments, all_scored = [], []
        rows = batch[ROW_COLUMN] if numbered else indices
        for i, row in enumerate(rows):
            where = _RowPlace(spec, part, row)
            if fmt == "prompt_response":
                if spec.template is not None:
                    prompt = spec.template.format(**{k: batch[k][i] for k in columns})
                else:
                    prompt = string(batch[spec.prompt_field][i], spec.prompt_field, where, allow_blank=True)
                value = batch[spec.response_field][i]
                if spec.response_labels is not None:
                    value = _label_word(value, spec.response_labels, spec.response_field, where)
                response = string(value, spec.response_field, where, allow_blank=False)
                segments, scored = _merge([prompt, response], [False, True])
            else:
                messages = _check_messages(batch[spec.messages_field][i], spec.messages_field, where)
                try:
                    segments, scored = render_chat(messages)
                except Exception as err:  # jinja raises its own types (e.g. roles a template refuses)
                    raise ValueError(f"{where}: cannot render the chat messages: {type(err).__name__}: {err}") from err
            all_segments.append(segments)
            all_scored.append(scored)
        return {SEGMENTS_COLUMN: all_segments, SCORED_COLUMN: all_scored}

    return ds.map(
        to_segments, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"{spec.name}: {fmt}"
    )


def extract_text(
    spec: DomainSpec,
    ds: Dataset,
    part: str,
    stats: dict[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Dataset:
    """The rows' text, ready for :func:`tokenize`.

    Text rows give a dataset with a single ``text`` column (template applied). Rows whose text is
    missing, null or blank are dropped: a warning names the domain, the file and the first such rows,
    and ``stats["dropped"]`` (when ``stats`` is given) counts them. A text field that holds something
    other than a string is an error naming its file and row, and so is a domain with no text left.

    Prompt/response and chat rows (see :func:`row_format`) give :data:`SEGMENTS_COLUMN` (the text in
    pieces) and :data:`SCORED_COLUMN` (whether the loss scores each piece). Nothing is dropped: a
    missing, null or non-string prompt or response, a blank response, a messages field that is not a
    non-empty list of ``{"role": str, "content": str}`` or has no assistant content, are errors that
    name the domain, file and row.

    Args:
        spec: The domain.
        ds: Its raw rows (from :func:`load_raw`).
        part: ``"train"`` or ``"holdout"`` (for messages).
        stats: Filled with ``dropped`` (blank text rows), ``rows`` (the row format) and, for chat rows,
            ``chat_template`` (``"tokenizer"`` or ``"fallback"``).
        tokenizer: Renders chat rows with its chat template; without one, or when it has none, chat rows
            use :func:`fallback_chat_segments`.
    """
    numbered = ROW_COLUMN in ds.column_names
    columns = [c for c in ds.column_names if c != ROW_COLUMN]
    fmt = row_format(spec, columns)
    if stats is not None:
        stats["rows"] = fmt
        stats["dropped"] = 0
        if fmt == "chat":
            has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
            stats["chat_template"] = "tokenizer" if has_template else "fallback"
    if fmt == "text" and spec.template is None and spec.text_field not in columns:
        raise ValueError(
            f"domain {spec.name!r} ({part}, {spec.source()}): no text field {spec.text_field!r}; "
            f"the rows have fields {columns}. Set `text_field` or a `template`, `prompt_field`/`response_field` "
            f"for prompt/response rows, or `messages_field` for chat rows."
        )
    if fmt == "prompt_response":
        needed = [spec.response_field] + ([spec.prompt_field] if spec.prompt_field else [])
        missing = [f for f in needed if f not in columns]
        if missing:
            raise ValueError(
                f"domain {spec.name!r} ({part}, {spec.source()}): no field {missing[0]!r} for the "
                f"{'prompt' if missing[0] == spec.prompt_field else 'response'}; the rows have fields {columns}"
            )
    if spec.template is not None:
        import string

        needed_fields = {f for _, f, _, _ in string.Formatter().parse(spec.template) if f}
        missing = sorted(needed_fields - set(columns))
        if missing:
            raise ValueError(
                f"domain {spec.name!r} ({part}): template uses fields {missing} that the rows do not have; "
                f"available fields: {columns}"
            )
    if fmt != "text":
        return _extract_masked(spec, ds, part, fmt, tokenizer)

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
