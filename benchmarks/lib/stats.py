"""Percentile bootstrap intervals over held-out rows and seeds, and paired intervals of two settings.

Input: per run, the per-row held-out numbers of every matrix row (``heldout_rows.json``, written with
``DomainEvaluation(row_losses=True)``): for stage row ``s`` and domain ``j``, each held-out row's summed
loss and scored-token count. ``L[s][j] = sum(loss_sum) / sum(tokens)`` is the token-weighted loss of
the loss matrix, so a statistic of the matrix (final mean loss, mean drift, ...) is a function of the rows.
The unit resampled is a **document** by default: the rows that start in one held-out document (the file's
``documents``) are summed into one unit, since a document spans several packed rows and its rows are
not independent samples; ``unit="row"`` resamples packed rows.

One bootstrap replicate:

* **rows** (units): per domain, ``n_j`` unit indices drawn with replacement from its ``n_j`` units. The
  draw is shared by every stage row ``s`` (``L[T][j]`` and ``L[j][j]`` are measured on the same rows),
  by every seed (all seeds are evaluated on the same held-out rows: a fixed sample of the domain's
  documents, which more seeds do not average away), and by both settings of a pair (a paired bootstrap).
* **seeds** (when there are several): ``k`` seeds drawn with replacement from the ``k`` seeds; the
  replicate's value is the mean over the drawn seeds of the statistic of each seed's runs.

Seeds and rows are thus resampled independently (a crossed design). The interval is the percentile
interval of the replicates: ``numpy.percentile`` (linear interpolation) at ``(1 - level) / 2`` and
``(1 + level) / 2``. The point value is the statistic on all rows, averaged over all seeds (what the
benchmark's tables report as the mean). A difference is called a difference only when its interval
excludes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _units(values: list[float], documents: list[int] | None) -> np.ndarray:
    """``values`` per row, or summed per document (in document order) when ``documents`` is given."""
    x = np.asarray(values, dtype=float)
    if documents is None:
        return x
    if len(documents) != len(x):
        raise ValueError(f"{len(documents)} document indices for {len(x)} held-out rows")
    _, unit = np.unique(np.asarray(documents), return_inverse=True)
    return np.bincount(unit, weights=x)


@dataclass(frozen=True)
class RunRows:
    """One run's per-row numbers: ``loss_sum[s][j]`` and ``tokens[s][j]`` are arrays over held-out rows.

    ``None`` where domain ``j`` was not evaluated after stage ``s``. Domains in training order.
    """

    domains: list[str]
    loss_sum: list[list[np.ndarray | None]]
    tokens: list[list[np.ndarray | None]]

    @classmethod
    def from_file_content(cls, data: dict[str, Any], unit: str = "document") -> RunRows:
        """From the content of a ``heldout_rows.json``.

        Args:
            data: The file's content.
            unit: ``document``: the rows of each document (the one a row starts in, the file's
                ``documents``) are summed into one unit, so the bootstrap resamples documents - rows of
                one document are not independent; ``row``: every packed row is a unit. A file without
                ``documents`` gives rows.
        """
        if unit not in ("document", "row"):
            raise ValueError(f"unit={unit!r}: expected 'document' or 'row'")
        domains = list(data["domains"])
        stages = sorted(int(s) for s in data["rows"])
        documents = (data.get("documents") or {}) if unit == "document" else {}
        sums, toks = [], []
        for s in range(max(stages) + 1):
            row = data["rows"].get(str(s), {})
            sums.append([_units(row[d]["loss_sum"], documents.get(d)) if d in row else None for d in domains])
            toks.append([_units(row[d]["tokens"], documents.get(d)) if d in row else None for d in domains])
        return cls(domains, sums, toks)

    @classmethod
    def from_scores(cls, data: dict[str, Any]) -> RunRows:
        """The task scores of a ``heldout_rows.json``: each score row is a unit with "tokens" 1, so the
        matrix of :meth:`matrix` is the score matrix ``S[s][j]`` (mean over score rows).

        Raises:
            ValueError: A domain has no score at all (no task metric): score statistics need every domain.
        """
        domains = list(data["domains"])
        scores = data.get("scores") or {}
        unscored = [d for d in domains if not any(d in row for row in scores.values())]
        if unscored:
            raise ValueError(f"domains {unscored} have no task score")
        sums, toks = [], []
        for s in range(max(int(k) for k in scores) + 1):
            row = scores.get(str(s), {})
            sums.append([np.asarray(row[d], dtype=float) if d in row else None for d in domains])
            toks.append([np.ones(len(row[d])) if d in row else None for d in domains])
        return cls(domains, sums, toks)

    @classmethod
    def from_routed(cls, data: dict[str, Any], unit: str = "document") -> RoutedRows:
        """The routed evaluation's rows of a ``heldout_rows.json`` (its ``routed`` section, docs/metrics.md).

        Units as in :meth:`from_file_content` (the same held-out rows and documents as the oracle ones).

        Raises:
            ValueError: The file has no routed rows (the run was not evaluated routed), or not for every
                matrix row that has oracle rows.
        """
        if unit not in ("document", "row"):
            raise ValueError(f"unit={unit!r}: expected 'document' or 'row'")
        routed = data.get("routed") or {}
        if not routed:
            raise ValueError("the run has no routed per-row numbers (no routed evaluation)")
        expected = sorted(int(k) for k in data.get("rows") or {})
        # e.g. a run resumed from a version without routed rows: only the later stages have them
        if expected and sorted(int(k) for k in routed) != expected:
            raise ValueError(
                f"routed rows for matrix rows {sorted(int(k) for k in routed)}, oracle rows for {expected}: "
                "expected the same matrix rows (a stage was evaluated without routed per-row numbers)"
            )
        domains = list(data["domains"])
        documents = (data.get("documents") or {}) if unit == "document" else {}
        tables: dict[str, list[list[np.ndarray | None]]] = {k: [] for k in ("loss", "tokens", "correct", "routed")}
        for s in range(max(int(k) for k in routed) + 1):
            row = routed.get(str(s), {})
            for key in tables:
                tables[key].append([])
            for d in domains:
                cell, docs = row.get(d), documents.get(d)
                flags = None if cell is None else cell["correct"]
                judged = flags is not None and any(c is not None for c in flags)
                tables["loss"][-1].append(None if cell is None else _units(cell["loss_sum"], docs))
                tables["tokens"][-1].append(None if cell is None else _units(cell["tokens"], docs))
                # Accuracy per unit: right choices over routed rows (rows with a null flag count in neither).
                tables["correct"][-1].append(_units([c is True for c in flags], docs) if judged else None)
                tables["routed"][-1].append(_units([c is not None for c in flags], docs) if judged else None)
        return RoutedRows(
            cls(domains, tables["loss"], tables["tokens"]), cls(domains, tables["correct"], tables["routed"])
        )

    def rows_per_domain(self) -> list[int]:
        """Held-out rows of each domain (the same after every stage)."""
        out = []
        for j, d in enumerate(self.domains):
            sizes = {len(r[j]) for r in self.loss_sum if r[j] is not None}
            if len(sizes) != 1:
                raise ValueError(f"domain {d!r}: the stages hold different numbers of held-out rows {sorted(sizes)}")
            out.append(sizes.pop())
        return out

    def matrix(self, draws: Sequence[np.ndarray | None]) -> np.ndarray:
        """``L[s][j]`` of every replicate, shape ``(stages + 1, domains, B)`` (NaN: not evaluated).

        Args:
            draws: Per domain, a ``(B, n_j)`` array of row indices (one replicate per line); ``None``
                gives the loss on all rows (``B = 1``).
        """
        b = next((len(d) for d in draws if d is not None), 1)
        out = np.full((len(self.loss_sum), len(self.domains), b), np.nan)
        for s, (sums, toks) in enumerate(zip(self.loss_sum, self.tokens)):
            for j, (ls, tk) in enumerate(zip(sums, toks)):
                if ls is None:
                    continue
                idx = draws[j]
                out[s, j] = ls.sum() / tk.sum() if idx is None else ls[idx].sum(axis=1) / tk[idx].sum(axis=1)
        return out


@dataclass(frozen=True)
class RoutedRows:
    """One run's routed per-row numbers: the routed loss matrix ``L~`` and the routing-accuracy matrix.

    ``loss``: routed loss sums over the scored tokens (positions ``>= P``), so its matrix is ``L~[s][j]``;
    ``accuracy``: per unit the rows routed to their own adapter over the rows routed, so its matrix is the
    routing accuracy (NaN for the base row and domains not trained yet). Both on the same units.
    """

    loss: RunRows
    accuracy: RunRows

    @property
    def domains(self) -> list[str]:
        return self.loss.domains

    def rows_per_domain(self) -> list[int]:
        return self.loss.rows_per_domain()

    def matrix(self, draws: Sequence[np.ndarray | None]) -> np.ndarray:
        """``(2, stages + 1, domains, B)``: ``L~`` then the accuracy, from the same row draws."""
        return np.stack([self.loss.matrix(draws), self.accuracy.matrix(draws)])


# ---------------------------------------------------------------------- statistics of a loss matrix
# Each takes M of shape (stages + 1, domains, B) - rows 0 (base) .. T - and returns shape (B,).
def _last(m: np.ndarray) -> int:
    """T: the last stage row with any evaluated domain."""
    done = [s for s in range(m.shape[0]) if not np.all(np.isnan(m[s]))]
    return done[-1]


def final_loss_mean(m: np.ndarray) -> np.ndarray:
    """Mean over domains of the final held-out loss ``L[T][j]``."""
    return m[_last(m)].mean(axis=0)


def _earlier(m: np.ndarray, ref: Callable[[int], np.ndarray]) -> np.ndarray:
    t = _last(m)
    cols = range(min(t, m.shape[1]) - 1)  # j < T
    if not cols:
        return np.full(m.shape[2], np.nan)
    return np.mean([100.0 * (m[t, j] - ref(j)) / ref(j) for j in cols], axis=0)


def drift_mean_pct(m: np.ndarray) -> np.ndarray:
    """Mean over j < T of ``100 (L[T][j] - L[j][j]) / L[j][j]`` (docs/metrics.md)."""
    return _earlier(m, lambda j: m[j + 1, j])


def base_relative_forgetting_mean_pct(m: np.ndarray) -> np.ndarray:
    """Mean over j < T of ``100 (L[T][j] - L[0][j]) / L[0][j]``."""
    return _earlier(m, lambda j: m[0, j])


def plasticity_mean(m: np.ndarray) -> np.ndarray:
    """Mean over trained domains of ``L[j][j]``."""
    t = _last(m)
    return np.mean([m[j + 1, j] for j in range(min(t, m.shape[1]))], axis=0)


RUN_STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "final_loss_mean": final_loss_mean,
    "drift_mean_pct": drift_mean_pct,
    "base_relative_forgetting_mean_pct": base_relative_forgetting_mean_pct,
    "plasticity_mean": plasticity_mean,
}
"""The headline numbers of one setting that have intervals."""


def heldout_improvement_pct(mx: np.ndarray, mref: np.ndarray) -> np.ndarray:
    """Mean over domains of ``100 (L_ref[T][j] - L_X[T][j]) / L_ref[T][j]`` (positive: X ends lower)."""
    tx, tr = _last(mx), _last(mref)
    return (100.0 * (mref[tr] - mx[tx]) / mref[tr]).mean(axis=0)


PAIR_STATS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "heldout_improvement_pct": heldout_improvement_pct,
    "final_loss_diff": lambda mx, mref: final_loss_mean(mx) - final_loss_mean(mref),
    "drift_mean_diff_pp": lambda mx, mref: drift_mean_pct(mx) - drift_mean_pct(mref),
    "base_relative_forgetting_diff_pp": lambda mx, mref: (
        base_relative_forgetting_mean_pct(mx) - base_relative_forgetting_mean_pct(mref)
    ),
}
"""Differences of a setting X and its pair on the same rows (and seeds): X minus the pair, except the
held-out improvement (the benchmark's sign: positive when X ends lower)."""


def bwt_score(m: np.ndarray) -> np.ndarray:
    """BWT_score of a score matrix: mean over j < T of ``S[T][j] - S[j][j]`` (negative = forgetting)."""
    t = _last(m)
    cols = range(min(t, m.shape[1]) - 1)
    if not cols:
        return np.full(m.shape[2], np.nan)
    return np.mean([m[t, j] - m[j + 1, j] for j in cols], axis=0)


def forgetting_mean(m: np.ndarray) -> np.ndarray:
    """Mean over j < T of ``max_{j <= s < T} S[s][j] - S[T][j]`` (docs/metrics.md)."""
    t = _last(m)
    cols = range(min(t, m.shape[1]) - 1)
    if not cols:
        return np.full(m.shape[2], np.nan)
    return np.mean([m[j + 1 : t, j].max(axis=0) - m[t, j] for j in cols], axis=0)


SCORE_STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ap": final_loss_mean,  # the mean over domains of the final row, here of scores: AP
    "bwt_score": bwt_score,
    "forgetting_mean": forgetting_mean,
}
"""Task-score headline numbers (of :meth:`RunRows.from_scores` matrices)."""

SCORE_PAIR_STATS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ap_diff": lambda mx, mref: final_loss_mean(mx) - final_loss_mean(mref),
    "bwt_score_diff": lambda mx, mref: bwt_score(mx) - bwt_score(mref),
}
"""X minus its pair, on the same score rows and seeds."""


def routing_accuracy_mean(m: np.ndarray) -> np.ndarray:
    """Mean over the trained domains of the final row's routing accuracy (``m``: an accuracy matrix)."""
    final = m[_last(m)]
    return final[~np.all(np.isnan(final), axis=1)].mean(axis=0)


ROUTED_STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "drift_mean_routed_pct": lambda r: drift_mean_pct(r[0]),
    "base_relative_forgetting_mean_routed_pct": lambda r: base_relative_forgetting_mean_pct(r[0]),
    "plasticity_mean_routed": lambda r: plasticity_mean(r[0]),
    "routing_accuracy_mean": lambda r: routing_accuracy_mean(r[1]),
}
"""Routed headline numbers (of :meth:`RoutedRows.matrix` arrays): the drift, base-relative forgetting and
plasticity of the routed matrix ``L~`` (as ``report.json``'s ``metrics_routed``) and the mean final routing
accuracy."""

ROUTED_PAIR_STATS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "drift_mean_routed_diff_pp": lambda rx, rref: drift_mean_pct(rx[0]) - drift_mean_pct(rref[0]),
}
"""X minus its pair, routed, on the same documents and seeds."""


# ---------------------------------------------------------------------- the bootstrap
def row_draws(rows_per_domain: Sequence[int], resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per domain, ``(resamples, n_j)`` row indices drawn with replacement."""
    return [rng.integers(0, n, size=(resamples, n)) for n in rows_per_domain]


def summarize(replicates: np.ndarray, value: float, level: float = LEVEL, seeds: int = 1) -> dict[str, Any]:
    """``{"value", "low", "high", "level", "resamples", "seeds", "excludes_zero"}`` of bootstrap replicates.

    The bounds are ``numpy.percentile`` (linear interpolation) of the replicates at ``50 (1 -+ level)``;
    NaN when any replicate is NaN (the statistic is undefined). ``excludes_zero``: ``None`` then.
    """
    if np.any(np.isnan(replicates)):
        low = high = float("nan")
    else:
        low, high = (float(x) for x in np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)]))
    finite = bool(np.isfinite(low) and np.isfinite(high))
    return {
        "value": float(value),
        "low": low,
        "high": high,
        "level": level,
        "resamples": len(replicates),
        "seeds": seeds,
        "excludes_zero": bool(low > 0 or high < 0) if finite else None,
    }


def seed_draws_for(k: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, k)`` seed indices drawn with replacement (all zeros for one seed: nothing to draw)."""
    return np.zeros((resamples, 1), dtype=int) if k == 1 else rng.integers(0, k, size=(resamples, k))


def from_matrices(
    stat: Callable[..., np.ndarray],
    full: Sequence[Sequence[np.ndarray]],
    boot: Sequence[Sequence[np.ndarray]],
    seed_draws: np.ndarray,
    level: float = LEVEL,
) -> dict[str, Any]:
    """:func:`summarize` of ``stat`` given each seed's run matrices on all rows (``full``) and per replicate
    (``boot``, from the same row draws), and the seed draws."""
    per_seed = np.stack([stat(*runs) for runs in boot])  # (k, B)
    replicates = np.take_along_axis(per_seed.T, seed_draws, axis=1).mean(axis=1)
    value = float(np.mean([stat(*runs)[0] for runs in full]))
    return summarize(replicates, value, level, seeds=len(full))


def check_rows(seeds: Sequence[Sequence[RunRows]]) -> list[int]:
    """Rows per domain, the same in every run (else the rows cannot be paired).

    Raises:
        ValueError: No run, or runs with different held-out rows.
    """
    if not seeds or not seeds[0]:
        raise ValueError("no run to bootstrap over")
    sizes = seeds[0][0].rows_per_domain()
    for runs in seeds:
        for run in runs:
            if run.rows_per_domain() != sizes or run.domains != seeds[0][0].domains:
                raise ValueError(
                    f"runs hold different held-out rows: {run.domains} {run.rows_per_domain()} vs "
                    f"{seeds[0][0].domains} {sizes}"
                )
    return sizes


def interval(
    stat: Callable[..., np.ndarray],
    seeds: Sequence[Sequence[RunRows]],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    draws: list[np.ndarray] | None = None,
    seed_draws: np.ndarray | None = None,
) -> dict[str, Any]:
    """Point value and percentile bootstrap interval of ``stat`` over held-out rows and seeds.

    Args:
        stat: A statistic of one loss matrix (:data:`RUN_STATS`) or, for paired intervals, of two
            (:data:`PAIR_STATS`): it gets one ``(stages + 1, domains, B)`` array per run of a seed.
        seeds: Per seed, the runs ``stat`` takes (one run, or X and its pair), all on the same rows.
        resamples: Bootstrap replicates B.
        level: Coverage of the interval.
        seed: Seed of the resampling (``numpy.random.default_rng``): the interval is reproducible. The row
            draws come first, then the seed draws.
        draws: Explicit row draws per domain (``(B, n_j)`` each) instead of random ones (tests).
        seed_draws: Explicit seed draws ``(B, k)`` (indices into ``seeds``) instead of random ones.

    Returns:
        See :func:`summarize`.
    """
    sizes = check_rows(seeds)
    rng = np.random.default_rng(seed)
    draws = row_draws(sizes, resamples, rng) if draws is None else draws
    seed_draws = seed_draws_for(len(seeds), len(draws[0]), rng) if seed_draws is None else seed_draws
    full = [[run.matrix([None] * len(sizes)) for run in runs] for runs in seeds]
    boot = [[run.matrix(draws) for run in runs] for runs in seeds]
    return from_matrices(stat, full, boot, seed_draws, level)
