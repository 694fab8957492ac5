"""Did each stage learn its own domain? A flag per domain, so that "no forgetting" cannot hide "nothing learned".

A domain that was never learned cannot be forgotten: its drift and BWT are ~0 whatever the method
does, and averaging them in makes a run look stable. So after every stage the domain just trained is
compared with the base model (docs/metrics.md, "Did it learn"):

* a domain with a task metric (a score matrix column): **learned** when
  ``S[j][j] - S[0][j] >= score_margin`` (absolute, in score units; default 0.05);
* otherwise by held-out loss: **learned** when ``(L[0][j] - L[j][j]) / L[0][j] >= loss_margin``
  (relative; default 0.01, i.e. 1 %).

The binding metrics (drift, BWT, AP, BWT_score, ...) keep their definitions over all domains; the
``learned_only`` means beside them average only the domains that learned, and the report marks every
number that rests on an unlearned domain. Pure Python, like the rest of :mod:`crma_lightning.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DEFAULT_LOSS_MARGIN = 0.01
"""Relative held-out loss improvement over the base that counts as learned (1 %)."""
DEFAULT_SCORE_MARGIN = 0.05
"""Absolute task-score improvement over the base that counts as learned."""


def check_margins(loss_margin: float, score_margin: float) -> None:
    """Both margins are finite and non-negative (raise ``ValueError`` naming the bad one)."""
    for name, value in (("learn_loss_margin", loss_margin), ("learn_score_margin", score_margin)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, str):  # None: not evaluated; a string: a non-finite marker
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def learning_flags(
    loss_matrix: Sequence[Sequence[Any]],
    domains: Sequence[str],
    upto: int,
    score_matrix: Sequence[Sequence[Any]] | None = None,
    loss_margin: float = DEFAULT_LOSS_MARGIN,
    score_margin: float = DEFAULT_SCORE_MARGIN,
) -> dict[str, dict[str, Any]]:
    """Per trained domain (the first ``upto``): whether its own stage learned it, and on what evidence.

    Returns ``{domain: {"learned", "signal", "base", "after_own_stage", "gain", "margin"}}``: ``signal`` is
    ``"score"`` (the domain has a task score) or ``"loss"``; ``gain`` is the score gain or the relative
    loss improvement; ``learned`` is ``None`` when a needed entry is missing or not finite.
    """
    check_margins(loss_margin, score_margin)
    out: dict[str, dict[str, Any]] = {}
    for c in range(min(upto, len(domains))):
        has_score = score_matrix is not None and len(score_matrix) > c + 1 and score_matrix[0][c] is not None
        if has_score:
            base, after = _number(score_matrix[0][c]), _number(score_matrix[c + 1][c])
            gain = None if base is None or after is None else after - base
            margin = score_margin
        else:
            base, after = _number(loss_matrix[0][c]), _number(loss_matrix[c + 1][c])
            gain = None if base is None or after is None or base == 0 else (base - after) / base
            margin = loss_margin
        out[str(domains[c])] = {
            "learned": None if gain is None else gain >= margin,
            "signal": "score" if has_score else "loss",
            "base": base,
            "after_own_stage": after,
            "gain": gain,
            "margin": margin,
        }
    return out


def learned_only_means(
    flags: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    score_matrix: Sequence[Sequence[Any]] | None,
    domains: Sequence[str],
    upto: int,
) -> dict[str, Any]:
    """Mean drift and BWT_score over the domains that learned (``None`` where no such domain has the number).

    ``summary``: :func:`crma_lightning.metrics.continual.summarize`'s dict (its per-domain ``drift``);
    ``score_matrix``: the score matrix, for ``BWT_score = mean_j (S[T][j] - S[j][j])`` over learned ``j < T``.
    """
    learned = [c for c, d in enumerate(domains[:upto]) if (flags.get(str(d)) or {}).get("learned")]
    drifts = [_number((summary.get("drift") or {}).get(str(domains[c]))) for c in learned]
    out: dict[str, Any] = {"domains": [str(domains[c]) for c in learned], "drift_mean": _mean(drifts)}
    if score_matrix is not None:
        changes = [
            None if a is None or b is None else a - b
            for c in learned
            if c < upto - 1
            for a, b in [(_number(score_matrix[upto][c]), _number(score_matrix[c + 1][c]))]
        ]
        out["bwt_score"] = _mean(changes)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def unlearned_line(domain: str, flag: dict[str, Any]) -> str:
    """One sentence for the console and report.md: ``stage 'x' did not learn: exact_match 0.000 -> 0.000 ...``."""
    if flag["signal"] == "score":
        change = f"task score {flag['base']:.3f} -> {flag['after_own_stage']:.3f}"
        need = f"needs +{flag['margin']:.3f} over the base"
    else:
        change = f"held-out loss {flag['base']:.4f} -> {flag['after_own_stage']:.4f}"
        need = f"needs a {100 * flag['margin']:.1f} % improvement over the base"
    return f"domain {domain!r} did not learn in its own stage: {change} ({need})"
