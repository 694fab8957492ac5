"""The benchmark's intervals: bootstrap intervals of every headline number, from the runs' ``heldout_rows.json``.

Per setting: the final mean held-out loss, mean drift, mean base-relative forgetting and mean plasticity
(oracle evaluation), and with task metrics on every domain AP, BWT_score and mean forgetting; per pair
(a setting vs its plain-LoRA setting, :data:`results.LORA_PAIRS`): the final held-out gain and the
differences of final loss, drift and forgetting (and of AP and BWT_score), on the same documents and
seeds (a paired bootstrap); per setting evaluated routed (per-task adapters, ``heldout_rows.json``'s
``routed`` section): the routed mean drift, base-relative forgetting and plasticity (of the routed matrix
``L~``, positions ``>= P``) and the mean final routing accuracy, and per pair whose settings were both
routed (MODULAR vs FROZEN) the routed drift difference. The method is :mod:`stats`'s: documents and seeds
resampled independently, one draw per replicate shared by every setting (and by the oracle and the routed
numbers), percentile intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crma_lightning.callbacks.row_losses import ROW_LOSSES_FILE, read_row_losses

from .results import Null
from .stats import (
    PAIR_STATS,
    ROUTED_PAIR_STATS,
    ROUTED_STATS,
    RUN_STATS,
    SCORE_PAIR_STATS,
    SCORE_STATS,
    RoutedRows,
    RunRows,
    check_rows,
    from_matrices,
    row_draws,
    seed_draws_for,
)

METHOD = (
    "percentile bootstrap over held-out documents and seeds (benchmarks/lib/stats.py): per replicate, each domain's "
    "held-out documents (the packed rows that start in one document, summed) drawn with replacement (one draw "
    "shared by every stage, seed and setting: paired) and, with several seeds, the seeds drawn with replacement; "
    "the replicate is the mean over the drawn seeds"
)


def _content(run: dict[str, Any]) -> dict[str, Any] | Null:
    run_dir = run.get("run_dir")
    if run.get("status") != "complete" or not run_dir:
        return Null("the run did not complete")
    path = Path(run_dir) / ROW_LOSSES_FILE
    if not path.is_file():
        return Null(f"the run wrote no {ROW_LOSSES_FILE}")
    return read_row_losses(path)


def _scores(content: dict[str, Any] | Null) -> RunRows | Null:
    if isinstance(content, Null):
        return content
    try:
        return RunRows.from_scores(content)
    except ValueError as err:
        return Null(f"no task-score intervals: {err}")


def _routed(content: dict[str, Any] | Null, run: dict[str, Any]) -> RoutedRows | Null:
    if isinstance(content, Null):
        return content
    if content.get("routed"):
        try:
            return RunRows.from_routed(content)
        except ValueError as err:
            return Null(f"no routed intervals: {err}")
    mode = (run.get("routing") or {}).get("mode", "oracle")
    if mode in ("none", "merged"):
        return Null(f"routing mode {mode!r}: no task identity needed, routed = oracle (the oracle interval applies)")
    return Null(f"not evaluated routed (routing mode {mode!r}), or the run wrote no routed rows")


def _block(
    rows: dict[str, list[RunRows | Null]],
    pairs: list[tuple[str, str]],
    run_stats: dict[str, Any],
    pair_stats: dict[str, Any],
    resamples: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """``{"units_per_domain", "modes", "pairs"}`` of one kind of per-row number (losses or task scores)."""
    modes = list(rows)
    usable = [r for m in modes for r in rows[m] if not isinstance(r, Null)]
    if not usable:
        why = next(r for m in modes for r in rows[m])
        return {"modes": {m: why for m in modes}, "pairs": {}}
    sizes = check_rows([usable])
    rng = np.random.default_rng(seed)
    draws = row_draws(sizes, resamples, rng)
    seed_draws = seed_draws_for(len(rows[modes[0]]), resamples, rng)
    full_draw = [None] * len(sizes)
    full = {m: [None if isinstance(r, Null) else r.matrix(full_draw) for r in rows[m]] for m in modes}
    boot = {m: [None if isinstance(r, Null) else r.matrix(draws) for r in rows[m]] for m in modes}

    def missing(*names: str) -> Null | None:
        for m in names:
            bad = next((r for r in rows[m] if isinstance(r, Null)), None)
            if bad is not None:
                return Null(f"{m}: {bad.reason}")
        return None

    out: dict[str, Any] = {"units_per_domain": dict(zip(usable[0].domains, sizes)), "modes": {}, "pairs": {}}
    for m in modes:
        why = missing(m)
        out["modes"][m] = {
            name: why or from_matrices(stat, [[x] for x in full[m]], [[x] for x in boot[m]], seed_draws, level)
            for name, stat in run_stats.items()
        }
    for x, ref in pairs:
        if x not in modes or ref not in modes:
            continue
        why = missing(x, ref)
        f = [[a, b] for a, b in zip(full[x], full[ref])]
        b = [[a, c] for a, c in zip(boot[x], boot[ref])]
        out["pairs"][f"{x}_vs_{ref}"] = {
            name: why or from_matrices(stat, f, b, seed_draws, level) for name, stat in pair_stats.items()
        }
    return out


def benchmark_intervals(
    per_seed: dict[str, dict[str, Any]],
    pairs: dict[str, str],
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """Intervals of every setting and pair of one benchmark run.

    Args:
        per_seed: ``results.json``'s ``per_seed``: per seed, ``runs`` (setting -> run numbers, with ``run_dir``).
        pairs: Setting -> its plain-LoRA pair (only pairs whose settings both ran are computed). A setting
            with an ``<SETTING>-apriori`` row (``--chosen``) is also paired with it (``X_vs_X-apriori``).
        resamples: Bootstrap replicates.
        seed: Seed of the resampling.
        level: Coverage.

    Returns:
        ``{"method", "level", "resamples", "seed", "seeds", "units_per_domain", "modes": {setting: {stat:
        interval}}, "pairs": {...}, "routed": {...}, "scores": {...}}``: losses; the routed numbers
        (:data:`stats.ROUTED_STATS`, the settings evaluated routed, and :data:`stats.ROUTED_PAIR_STATS` of
        pairs routed on both sides); and (when every domain has a task metric) the task scores' ``ap``,
        ``bwt_score``, ``forgetting_mean`` and pair differences; a :class:`~results.Null` where a run has no
        per-row numbers.
    """
    seeds = list(per_seed)
    modes = list(per_seed[seeds[0]]["runs"])
    # Every dev-chosen setting also against its a-priori row (--chosen): does the choice hold on test?
    pairs = [*pairs.items(), *((m, f"{m}-apriori") for m in modes if f"{m}-apriori" in modes)]
    contents = {m: [_content(per_seed[s]["runs"][m]) for s in seeds] for m in modes}
    losses = {m: [c if isinstance(c, Null) else RunRows.from_file_content(c) for c in contents[m]] for m in modes}
    out: dict[str, Any] = {"method": METHOD, "level": level, "resamples": resamples, "seed": seed, "seeds": len(seeds)}
    out.update(_block(losses, pairs, RUN_STATS, PAIR_STATS, resamples, seed, level))
    routed = {m: [_routed(c, per_seed[s]["runs"][m]) for c, s in zip(contents[m], seeds)] for m in modes}
    routed = {m: rs for m, rs in routed.items() if any(not isinstance(r, Null) for r in rs)}
    if routed:
        out["routed"] = _block(routed, pairs, ROUTED_STATS, ROUTED_PAIR_STATS, resamples, seed, level)
    else:
        out["routed"] = Null("no setting was evaluated routed (per-task adapters with a router)")
    scores = {m: [_scores(c) for c in contents[m]] for m in modes}
    if any(not isinstance(r, Null) for rs in scores.values() for r in rs):
        out["scores"] = _block(scores, pairs, SCORE_STATS, SCORE_PAIR_STATS, resamples, seed, level)
    else:
        out["scores"] = Null("no run has task scores for every domain (loss-only domains)")
    return out


def _ci(entry: Any, spec: str) -> str:
    """``value [low, high]`` (``—`` when missing)."""
    if isinstance(entry, Null) or not isinstance(entry, dict):
        return "—"
    if not np.isfinite(entry["value"]):
        return "—"
    if not (np.isfinite(entry["low"]) and np.isfinite(entry["high"])):
        return format(entry["value"], spec)
    return f"{format(entry['value'], spec)} [{format(entry['low'], spec)}, {format(entry['high'], spec)}]"


def _verdict(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("excludes_zero") is None:
        return "—"
    return "**differs**" if entry["excludes_zero"] else "no difference"


def render_intervals(intervals: dict[str, Any]) -> str:
    """The Markdown section of ``results.md`` with every headline number and its interval."""
    level = round(100 * intervals["level"])
    lines = [
        "",
        f"## {level} % intervals (held-out documents{' and seeds' if intervals['seeds'] > 1 else ''})",
        "",
        f"Value [low, high]: {intervals['method']}; B = {intervals['resamples']}, resampling seed "
        f"{intervals['seed']}; documents per domain {intervals.get('units_per_domain')}. Oracle evaluation (the "
        "routed numbers follow).",
        "",
        "| setting | final mean held-out loss | mean drift % | base-rel. forgetting % | plasticity (mean L[j][j]) |",
        "|---|---|---|---|---|",
    ]
    columns = [("final_loss_mean", ".4f"), ("drift_mean_pct", "+.3f"), ("base_relative_forgetting_mean_pct", "+.2f")]
    lines += _mode_rows(intervals["modes"], [*columns, ("plasticity_mean", ".4f")])
    if intervals["pairs"]:
        lines += [
            "",
            "Pairs, paired on the same documents and seeds (a difference only when its interval excludes 0):",
            "",
            "| pair | final held-out gain % (positive: X lower) | | final loss X − pair | drift X − pair (pp) | "
            "| forgetting X − pair (pp) |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, p in intervals["pairs"].items():
            lines.append(
                f"| {key.replace('_vs_', ' vs ')} | {_ci(p['heldout_improvement_pct'], '+.3f')} "
                f"| {_verdict(p['heldout_improvement_pct'])} | {_ci(p['final_loss_diff'], '+.4f')} "
                f"| {_ci(p['drift_mean_diff_pp'], '+.3f')} | {_verdict(p['drift_mean_diff_pp'])} "
                f"| {_ci(p['base_relative_forgetting_diff_pp'], '+.2f')} |"
            )
    lines += _render_routed(intervals.get("routed"))
    scores = intervals.get("scores")
    if isinstance(scores, dict):
        lines += [
            "",
            f"Task scores (score rows as units: {scores.get('units_per_domain')}):",
            "",
            "| setting | AP | BWT_score | forgetting (mean) |",
            "|---|---|---|---|",
        ]
        lines += _mode_rows(scores["modes"], [("ap", ".3f"), ("bwt_score", "+.3f"), ("forgetting_mean", ".3f")])
        for key, p in scores["pairs"].items():
            lines.append(
                f"- {key.replace('_vs_', ' vs ')}: AP difference {_ci(p['ap_diff'], '+.3f')} "
                f"({_verdict(p['ap_diff'])}), BWT_score difference {_ci(p['bwt_score_diff'], '+.3f')} "
                f"({_verdict(p['bwt_score_diff'])})"
            )
    return "\n".join(lines) + "\n"


def _mode_rows(modes: dict[str, Any], columns: list[tuple[str, str]]) -> list[str]:
    """One table row per setting: ``value [low, high]`` of each ``(statistic, format)``; a Null row says why."""
    lines = []
    for mode, row in modes.items():
        if isinstance(row, Null):
            lines.append(f"| {mode} | — ({row.reason}) |" + " — |" * (len(columns) - 1))
        else:
            lines.append(f"| {mode} | " + " | ".join(_ci(row[key], spec) for key, spec in columns) + " |")
    return lines


def _render_routed(routed: Any) -> list[str]:
    """The routed rows of the intervals section (nothing when no setting was evaluated routed)."""
    if not isinstance(routed, dict):
        return []
    lines = [
        "",
        "Routed evaluation (targets at positions >= P, the same documents and seeds; drift and forgetting of the "
        "routed matrix L~):",
        "",
        "| setting | routed mean drift % | routed base-rel. forgetting % | routed plasticity | routing accuracy |",
        "|---|---|---|---|---|",
    ]
    columns = [("drift_mean_routed_pct", "+.3f"), ("base_relative_forgetting_mean_routed_pct", "+.2f")]
    lines += _mode_rows(
        routed["modes"], [*columns, ("plasticity_mean_routed", ".4f"), ("routing_accuracy_mean", ".3f")]
    )
    for key, p in routed["pairs"].items():
        entry = p["drift_mean_routed_diff_pp"]
        lines.append(
            f"- {key.replace('_vs_', ' vs ')}, routed: drift difference (pp) {_ci(entry, '+.3f')} ({_verdict(entry)})"
        )
    return lines
