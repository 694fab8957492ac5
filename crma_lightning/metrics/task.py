"""Task metrics: a domain's ``metric:`` setting and the per-row score of a generated answer (docs/metrics.md).

A domain with a ``metric`` is scored by generation after every stage: its held-out prompts (the
unscored part of prompt/response and chat rows) are continued greedily, the text up to the first stop
string is the prediction, and the row's score in ``[0, 1]`` compares it with the reference (the scored
part). The domain's score ``S[s][j]`` is the mean over rows.

Built-in metrics (``name``):

* ``exact_match`` - 1 if the normalised prediction equals the normalised reference.
* ``accuracy`` - classification as generation over a declared label set ``labels``. ``label_mode:
  generate`` (default): the predicted label is the one whose normalised text the normalised prediction
  starts with (the longest such label; none: wrong). ``label_mode: loss``: the label with the lowest
  summed token loss after the prompt (needs no generation; always some label).
* ``rouge_l`` - ROUGE-L F-measure, computed by ``torchmetrics`` (its own normalisation: lower case,
  non-alphanumerics as spaces).
* ``token_f1`` - SQuAD-style bag-of-tokens F1 over whitespace tokens of the normalised texts. Written here
  because torchmetrics only has it inside ``SQuAD``, with fixed English normalisation (articles dropped).
* ``edit_similarity`` - ``2·LCS(p, r) / (|p| + |r|)`` over characters (both empty: 1): the InDel ratio
  that ``fuzz.ratio`` computes when ``fuzzywuzzy`` has ``python-Levenshtein`` (or ``rapidfuzz``), as a fraction.
  TRACE scores its code task (Py150) with ``fuzzywuzzy``'s ``fuzz.ratio``; without ``python-Levenshtein``
  that falls back to ``difflib.SequenceMatcher.ratio``, whose matching blocks are not a longest common
  subsequence (it can score lower), and TRACE rounds to a percentage - so this is close to TRACE's score,
  not guaranteed equal to it. Not normalised.
* any name registered with :func:`register_metric` - a ``callable(prediction, reference) -> float``.

Only ROUGE-L comes from torchmetrics. Exact match and token F1 exist there only inside ``SQuAD``, whose
normalisation is fixed (English articles and punctuation dropped), and label accuracy needs the
generated text mapped to a label first, after which it is a mean of 0/1 row scores; so these are
written here, with the normalisation as options. Every metric is a mean of per-row scores, which is
what makes the sums exact to reduce across processes.

Normalisation (``normalize``, for ``exact_match``, ``accuracy`` and ``token_f1``): ``strip`` (outer
whitespace), ``lowercase``, ``collapse_whitespace`` (runs of whitespace become one space), all on by
default; ``remove_punctuation`` (Unicode punctuation removed) off by default.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

BUILTIN_METRICS = ("exact_match", "accuracy", "rouge_l", "token_f1", "edit_similarity")
LABEL_MODES = ("generate", "loss")
NORMALIZE_OPTIONS = {"strip": True, "lowercase": True, "collapse_whitespace": True, "remove_punctuation": False}
"""The normalisation switches and their defaults."""

_REGISTRY: dict[str, Callable[[str, str], float]] = {}


def register_metric(name: str, fn: Callable[[str, str], float]) -> None:
    """Make ``metric: {name: <name>}`` score each row with ``fn(prediction, reference)`` (a number in [0, 1]).

    The prediction is the generated text up to the first stop string, not normalised (normalise inside
    ``fn`` as you need). Register before the run is built, e.g. in the module that defines your subclass::

        from crma_lightning.metrics.task import register_metric
        register_metric("starts_with", lambda pred, ref: float(pred.strip().startswith(ref.strip())))
    """
    if name in BUILTIN_METRICS:
        raise ValueError(f"metric name {name!r} is built in; register your metric under another name")
    if not callable(fn):
        raise ValueError(f"register_metric({name!r}, ...): expected a callable(prediction, reference), got {fn!r}")
    _REGISTRY[name] = fn


def known_metrics() -> list[str]:
    """The built-in metric names, then the registered ones."""
    return [*BUILTIN_METRICS, *sorted(_REGISTRY)]


@dataclass
class TaskMetric:
    """A domain's ``metric:`` setting.

    Attributes:
        name: ``exact_match``, ``accuracy``, ``rouge_l``, ``token_f1`` or a registered metric.
        normalize: Normalisation switches (see the module docstring); unset keys keep their defaults.
        labels: The label set of ``accuracy``.
        label_mode: ``generate`` (default) or ``loss`` (``accuracy`` only).
        max_new_tokens: Tokens generated per prompt at most.
        stop: Stop strings: the prediction ends before the first one (and generation stops there).
        eval_rows: Held-out rows scored per domain (the first ones, in the held-out order).
    """

    name: str = "exact_match"
    normalize: dict[str, bool] = field(default_factory=dict)
    labels: list[str] | None = None
    label_mode: str = "generate"
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    eval_rows: int = 32

    def validate(self, domain: str) -> None:
        where = f"domain {domain!r}: metric"
        if self.name not in BUILTIN_METRICS and self.name not in _REGISTRY:
            raise ValueError(f"{where} name={self.name!r} is unknown; expected one of {known_metrics()}")
        unknown = sorted(set(self.normalize) - set(NORMALIZE_OPTIONS))
        if unknown:
            raise ValueError(
                f"{where} normalize has unknown keys {unknown}; expected keys among {list(NORMALIZE_OPTIONS)}"
            )
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"{where} label_mode={self.label_mode!r} is invalid; expected one of {list(LABEL_MODES)}")
        if self.name == "accuracy" and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(
                f"{where} 'accuracy' needs `labels`: a list of distinct label strings, got {self.labels!r}"
            )
        if self.name != "accuracy" and self.label_mode != "generate":
            raise ValueError(f"{where} label_mode={self.label_mode!r} applies to 'accuracy' only, not {self.name!r}")
        for key in ("max_new_tokens", "eval_rows"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where} {key}={value!r} is invalid: expected an integer >= 1")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"{where} stop={self.stop!r} is invalid: expected a list of non-empty strings")

    @property
    def options(self) -> dict[str, bool]:
        return {**NORMALIZE_OPTIONS, **self.normalize}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_task_metric(value: Any, domain: str) -> TaskMetric | None:
    """A domain's ``metric`` value (``None``, a metric name, a mapping of :class:`TaskMetric` fields) checked."""
    if value is None or isinstance(value, TaskMetric):
        metric = value
    elif isinstance(value, str):
        metric = TaskMetric(name=value)
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(TaskMetric.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"domain {domain!r}: metric has unknown keys {unknown}; expected keys among "
                f"{list(TaskMetric.__dataclass_fields__)}"
            )
        metric = TaskMetric(**dict(value))
    else:
        raise ValueError(f"domain {domain!r}: metric={value!r} is invalid: expected a metric name or a mapping")
    if metric is not None:
        metric.validate(domain)
    return metric


# ---------------------------------------------------------------------- normalisation and scores
def normalize(text: str, options: Mapping[str, bool] | None = None) -> str:
    """``text`` with the normalisation switches ``options`` applied (defaults: :data:`NORMALIZE_OPTIONS`)."""
    opts = {**NORMALIZE_OPTIONS, **(options or {})}
    if opts["remove_punctuation"]:
        text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    if opts["lowercase"]:
        text = text.lower()
    if opts["collapse_whitespace"]:
        text = re.sub(r"\s+", " ", text)
    if opts["strip"]:
        text = text.strip()
    return text


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    return text[:end]


def exact_match(prediction: str, reference: str, options: Mapping[str, bool] | None = None) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize(prediction, options) == normalize(reference, options))


def token_f1(prediction: str, reference: str, options: Mapping[str, bool] | None = None) -> float:
    """Harmonic mean of token precision and recall (tokens counted with multiplicity, as SQuAD does).

    Both empty: 1.0; one empty: 0.0.
    """
    pred, ref = normalize(prediction, options).split(), normalize(reference, options).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def edit_similarity(prediction: str, reference: str) -> float:
    """``2·LCS / (|prediction| + |reference|)`` over characters: 1 - InDel distance / total length (both empty: 1)."""
    total = len(prediction) + len(reference)
    if total == 0:
        return 1.0
    previous = [0] * (len(reference) + 1)  # LCS by rows: O(|p|·|r|) time, O(|r|) memory
    for a in prediction:
        current = [0]
        for j, b in enumerate(reference):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    return 2 * previous[-1] / total


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each (prediction, reference) pair, from ``torchmetrics``."""
    from torchmetrics.functional.text import rouge_score

    return [float(rouge_score(p, r, rouge_keys="rougeL")["rougeL_fmeasure"]) for p, r in zip(predictions, references)]


def generated_label(prediction: str, labels: list[str], options: Mapping[str, bool] | None = None) -> str | None:
    """The label whose normalised text the normalised prediction starts with (the longest), or ``None``."""
    pred = normalize(prediction, options)
    matches = [label for label in labels if pred.startswith(normalize(label, options))]
    return max(matches, key=lambda label: len(normalize(label, options))) if matches else None


def row_scores(metric: TaskMetric, predictions: list[str], references: list[str]) -> list[float]:
    """One score in [0, 1] per row (``accuracy`` in ``loss`` mode: ``predictions`` are the chosen labels)."""
    opts = metric.options
    if metric.name == "exact_match":
        return [exact_match(p, r, opts) for p, r in zip(predictions, references)]
    if metric.name == "token_f1":
        return [token_f1(p, r, opts) for p, r in zip(predictions, references)]
    if metric.name == "rouge_l":
        return rouge_l(predictions, references)
    if metric.name == "edit_similarity":
        return [edit_similarity(p, r) for p, r in zip(predictions, references)]
    if metric.name == "accuracy":
        out = []
        for p, r in zip(predictions, references):
            label = p if metric.label_mode == "loss" else generated_label(p, metric.labels or [], opts)
            out.append(float(label is not None and normalize(label, opts) == normalize(r, opts)))
        return out
    fn = _REGISTRY[metric.name]
    scores = [float(fn(p, r)) for p, r in zip(predictions, references)]
    bad = [s for s in scores if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"registered metric {metric.name!r} returned {bad[0]!r}: expected a number in [0, 1]")
    return scores
