"""Continual-learning metrics on a loss matrix (docs/metrics.md): pure Python, no torch.

The loss matrix is a list of rows ``matrix[s][c]``: row ``s = 0`` is the base model before any
training, row ``s = i`` is right after training stage ``i`` (1-based), so a finished run of ``T``
domains has rows ``0..T``; column ``c = 0..T-1`` is the ``c``-th domain in training order (0-based).
An entry is the mean held-out token cross-entropy of that domain, evaluated with its own adapter.
Entries that were not evaluated (future domains, a stage still running) are ``None`` or NaN.

docs/metrics.md writes ``L[s][j]`` with 1-based domains ``j``; here ``L[s][j] = matrix[s][j - 1]``, so the
loss of domain ``c`` right after it was trained, ``L[j][j]``, is ``matrix[c + 1][c]``.

Every function takes ``upto``: the number of completed stages to evaluate at (default: the number of
rows minus one, i.e. the last row). ``upto`` plays the role of ``T`` in the docs/metrics.md formulas, so the
metrics of a run can be computed after each stage. Missing entries make a per-domain value ``None``,
and means skip ``None`` values (a mean with nothing to average is ``None``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

Matrix = Sequence[Sequence[Any]]


# ---------------------------------------------------------------------- validation
def _entry(value: Any, s: int, c: int) -> float | None:
    if value is None:
        return None
    # bool is an int subclass; a True in a loss matrix is a bug upstream, not a loss of 1.0.
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise ValueError(f"loss matrix entry [{s}][{c}] = {value!r} is not a number or None")
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"loss matrix entry [{s}][{c}] = {value!r} is not a number or None") from err
    return None if math.isnan(x) else x


def _check(matrix: Matrix, upto: int | None) -> tuple[list[list[float | None]], int]:
    """Validated copy of ``matrix`` (NaN -> None, numbers -> float) and the resolved ``upto``."""
    if isinstance(matrix, (str, bytes)) or not hasattr(matrix, "__len__"):
        raise ValueError(f"loss matrix must be a list of rows, got {type(matrix).__name__}")
    if len(matrix) == 0:
        raise ValueError("loss matrix is empty: expected at least row 0 (the base model)")
    rows: list[list[float | None]] = []
    width: int | None = None
    for s, row in enumerate(matrix):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            raise ValueError(f"loss matrix row {s} must be a list of losses, got {type(row).__name__}")
        if width is None:
            width = len(row)
            if width == 0:
                raise ValueError("loss matrix rows are empty: expected one column per domain")
        elif len(row) != width:
            raise ValueError(f"loss matrix is ragged: row 0 has {width} columns (domains) but row {s} has {len(row)}")
        rows.append([_entry(v, s, c) for c, v in enumerate(row)])
    assert width is not None
    if len(rows) > width + 1:
        raise ValueError(
            f"loss matrix has {len(rows)} rows but only {width} domains: expected at most {width + 1} rows "
            "(row 0 = base model, row i = after stage i)"
        )
    completed = len(rows) - 1
    if upto is None:
        upto = completed
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= completed:
        raise ValueError(f"upto={upto!r} is invalid: expected an integer in [0, {completed}] (completed stages)")
    return rows, upto


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _relative(new: float | None, ref: float | None) -> float | None:
    if new is None or ref is None or ref == 0:
        return None  # undefined rather than a division by zero
    return 100.0 * (new - ref) / ref


# ---------------------------------------------------------------------- forgetting
def drift(matrix: Matrix, upto: int | None = None) -> list[float | None]:
    """Loss-relative backward transfer per earlier domain, in percent.

    ``drift_c = 100 · (M[upto][c] − M[c+1][c]) / M[c+1][c]`` for ``c < upto − 1`` (docs/metrics.md:
    ``100 · (L[T][j] − L[j][j]) / L[j][j]`` for ``j < T``). Positive means forgetting.

    Args:
        matrix: Loss matrix (see module docstring).
        upto: Number of completed stages (default: ``len(matrix) - 1``).

    Returns:
        One value per domain trained before the last completed one; ``None`` where an entry is missing
        or the reference loss is 0.

    Raises:
        ValueError: Ragged or invalid matrix, or ``upto`` out of range.
    """
    rows, upto = _check(matrix, upto)
    return [_relative(rows[upto][c], rows[c + 1][c]) for c in range(upto - 1)]


def mean_drift(matrix: Matrix, upto: int | None = None) -> float | None:
    """Mean of :func:`drift` over the domains where it is defined (``None`` if none, e.g. one stage)."""
    return _mean(drift(matrix, upto))


def base_relative_forgetting(matrix: Matrix, upto: int | None = None) -> list[float | None]:
    """Forgetting relative to the base model, in percent.

    ``f_c = 100 · (M[upto][c] − M[0][c]) / M[0][c]`` for ``c < upto − 1`` (docs/metrics.md:
    ``100 · (L[T][j] − L[0][j]) / L[0][j]``). Positive means worse than never training at all.

    Args:
        matrix: Loss matrix.
        upto: Number of completed stages (default: ``len(matrix) - 1``).

    Returns:
        One value per domain trained before the last completed one; ``None`` where undefined.

    Raises:
        ValueError: Ragged or invalid matrix, or ``upto`` out of range.
    """
    rows, upto = _check(matrix, upto)
    return [_relative(rows[upto][c], rows[0][c]) for c in range(upto - 1)]


def mean_base_relative_forgetting(matrix: Matrix, upto: int | None = None) -> float | None:
    """Mean of :func:`base_relative_forgetting` over the domains where it is defined."""
    return _mean(base_relative_forgetting(matrix, upto))


def bwt(matrix: Matrix, upto: int | None = None) -> float | None:
    """Backward transfer in loss units.

    ``BWT = mean over c < upto − 1 of (M[c+1][c] − M[upto][c])`` (docs/metrics.md: mean over ``j < T`` of
    ``L[j][j] − L[T][j]``). Negative means forgetting. Missing entries are skipped.

    Args:
        matrix: Loss matrix.
        upto: Number of completed stages (default: ``len(matrix) - 1``).

    Returns:
        The mean, or ``None`` when no earlier domain has both entries (e.g. a single stage).

    Raises:
        ValueError: Ragged or invalid matrix, or ``upto`` out of range.
    """
    rows, upto = _check(matrix, upto)
    diffs = [
        rows[c + 1][c] - rows[upto][c]
        for c in range(upto - 1)
        if rows[c + 1][c] is not None and rows[upto][c] is not None
    ]
    return _mean(diffs)


def fwt(matrix: Matrix, upto: int | None = None) -> float | None:
    """Forward transfer in loss units (needs future domains evaluated before they are trained).

    ``FWT = mean over 1 ≤ c < upto of (M[0][c] − M[c][c])`` (docs/metrics.md: mean over ``j > 1`` of
    ``L[0][j] − L[j−1][j]``): how much training the earlier domains already lowered domain ``c``'s loss.
    Positive means the earlier domains helped.

    Args:
        matrix: Loss matrix.
        upto: Number of completed stages (default: ``len(matrix) - 1``).

    Returns:
        The mean over the domains with both entries, or ``None`` when there are none (future domains
        were not evaluated, or fewer than two stages).

    Raises:
        ValueError: Ragged or invalid matrix, or ``upto`` out of range.
    """
    rows, upto = _check(matrix, upto)
    diffs = [rows[0][c] - rows[c][c] for c in range(1, upto) if rows[0][c] is not None and rows[c][c] is not None]
    return _mean(diffs)


def plasticity(matrix: Matrix, upto: int | None = None) -> list[float | None]:
    """How well each domain was learned: ``M[c+1][c]`` for ``c < upto`` (docs/metrics.md: ``L[j][j]``).

    Args:
        matrix: Loss matrix.
        upto: Number of completed stages (default: ``len(matrix) - 1``).

    Returns:
        One loss per trained domain; ``None`` where it was not evaluated.

    Raises:
        ValueError: Ragged or invalid matrix, or ``upto`` out of range.
    """
    rows, upto = _check(matrix, upto)
    return [rows[c + 1][c] for c in range(upto)]


def mean_plasticity(matrix: Matrix, upto: int | None = None) -> float | None:
    """Mean of :func:`plasticity` over the domains where it is defined."""
    return _mean(plasticity(matrix, upto))


# ---------------------------------------------------------------------- stability and cost
def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}={value!r} is not a number") from err
    return None if math.isnan(x) else x


def stability_gain(var_x: float | None, var_lora: float | None) -> float | None:
    """Stability gain of method X over LoRA: ``1 − var_X / var_LoRA``.

    The variances are of the per-step gradient norm over a stage (see ``GradientStability``). ``0.39``
    reads "39% more stable"; negative means X is less stable.

    Args:
        var_x: Gradient-norm variance of method X.
        var_lora: Gradient-norm variance of LoRA on the same model, data and schedule.

    Returns:
        The gain, or ``None`` if either variance is missing or ``var_lora`` is 0.

    Raises:
        ValueError: A variance that is not a number.
    """
    vx, vl = _number(var_x, "var_x"), _number(var_lora, "var_lora")
    if vx is None or vl is None or vl == 0:
        return None
    return 1.0 - vx / vl


def _median_time(value: Any, name: str) -> float | None:
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return _number(value, name)  # a single time (a string raises with a clear message)
    times = [t for t in (_number(v, name) for v in value) if t is not None]
    return statistics.median(times) if times else None


def overhead(time_x: float | Sequence[float] | None, time_lora: float | Sequence[float] | None) -> float | None:
    """Wall-clock overhead of method X over LoRA: ``median step time of X / median step time of LoRA``.

    Args:
        time_x: Median step time of X (seconds), or the per-step times themselves (their median is taken).
        time_lora: The same for LoRA, measured on the same model, data and machine.

    Returns:
        The ratio (``1.15`` = 15% slower), or ``None`` if a time is missing or LoRA's is 0.

    Raises:
        ValueError: A time that is not a number.
    """
    tx, tl = _median_time(time_x, "time_x"), _median_time(time_lora, "time_lora")
    if tx is None or tl is None or tl == 0:
        return None
    return tx / tl


# ---------------------------------------------------------------------- everything at once
def summarize(matrix: Matrix, domains: Sequence[str], upto: int | None = None) -> dict[str, Any]:
    """All loss-matrix metrics at ``upto`` completed stages, as a JSON-serialisable dict.

    Args:
        matrix: Loss matrix (see module docstring).
        domains: Domain names in training order, one per column.
        upto: Number of completed stages (default: ``len(matrix) - 1``).

    Returns:
        ``{"stages_completed", "domains", "loss_matrix", "drift", "drift_mean",
        "base_relative_forgetting", "base_relative_forgetting_mean", "bwt", "fwt", "plasticity",
        "plasticity_mean"}``; per-domain values are dicts keyed by domain name, ``None`` where undefined.
        ``loss_matrix`` is the validated matrix with missing entries as ``None``.

    Raises:
        ValueError: Invalid matrix or ``upto``, or ``domains`` not one distinct name per column.
    """
    rows, upto = _check(matrix, upto)
    names = [str(d) for d in domains] if not isinstance(domains, str) else [domains]
    if len(names) != len(rows[0]):
        raise ValueError(f"got {len(names)} domain names {names} for a loss matrix with {len(rows[0])} columns")
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be distinct, got {names}")

    def keyed(values: list[float | None]) -> dict[str, float | None]:
        return dict(zip(names, values))

    d = drift(rows, upto)
    f = base_relative_forgetting(rows, upto)
    p = plasticity(rows, upto)
    return {
        "stages_completed": upto,
        "domains": names,
        "loss_matrix": rows,
        "drift": keyed(d),
        "drift_mean": _mean(d),
        "base_relative_forgetting": keyed(f),
        "base_relative_forgetting_mean": _mean(f),
        "bwt": bwt(rows, upto),
        "fwt": fwt(rows, upto),
        "plasticity": keyed(p),
        "plasticity_mean": _mean(p),
    }


# ---------------------------------------------------------------------- task scores
def summarize_scores(matrix: Matrix, domains: Sequence[str], upto: int | None = None) -> dict[str, Any]:
    """The task-score metrics of a score matrix ``S`` (same layout as the loss matrix; higher is better).

    docs/metrics.md, with ``T = upto``: ``ap`` = mean over trained ``j`` of ``S[T][j]``; ``bwt_score`` = mean
    over ``j < T`` of ``S[T][j] − S[j][j]`` (negative = forgetting); ``forgetting[j]`` =
    ``max_{j ≤ s < T} S[s][j] − S[T][j]`` for ``j < T``; ``fwt_score`` = mean over ``j > 1`` of
    ``S[j−1][j] − S[0][j]`` (needs future domains evaluated); ``score_plasticity[j]`` = ``S[j][j]``.
    Domains without a metric have ``None`` entries, and every mean skips them.

    Raises:
        ValueError: Invalid matrix or ``upto``, or ``domains`` not one name per column.
    """
    rows, upto = _check(matrix, upto)
    names = [str(d) for d in domains]
    if len(names) != len(rows[0]):
        raise ValueError(f"got {len(names)} domain names {names} for a score matrix with {len(rows[0])} columns")

    def keyed(values: list[float | None]) -> dict[str, float | None]:
        return dict(zip(names, values))

    def forgetting_of(c: int) -> float | None:
        past = [rows[s][c] for s in range(c + 1, upto) if rows[s][c] is not None]
        return None if not past or rows[upto][c] is None else max(past) - rows[upto][c]

    changes = [
        rows[upto][c] - rows[c + 1][c]
        for c in range(upto - 1)
        if rows[upto][c] is not None and rows[c + 1][c] is not None
    ]
    forward = [rows[c][c] - rows[0][c] for c in range(1, upto) if rows[c][c] is not None and rows[0][c] is not None]
    forgetting = [forgetting_of(c) for c in range(upto - 1)]
    plastic = [rows[c + 1][c] for c in range(upto)]
    return {
        "score_matrix": rows,
        "ap": _mean([rows[upto][c] for c in range(upto)]),
        "bwt_score": _mean(changes),
        "fwt_score": _mean(forward),
        "forgetting": keyed(forgetting),
        "forgetting_mean": _mean(forgetting),
        "score_plasticity": keyed(plastic),
        "score_plasticity_mean": _mean(plastic),
    }


__all__ = [
    "base_relative_forgetting",
    "bwt",
    "drift",
    "fwt",
    "mean_base_relative_forgetting",
    "mean_drift",
    "mean_plasticity",
    "overhead",
    "plasticity",
    "stability_gain",
    "summarize",
    "summarize_scores",
]
