"""The CRMA v2 ablation table and its decision rule, from a methods run and an ablation run of continual.py.

The write+spectral variant (v2's default) is the MODULAR / CRMA-shared row of the methods run; the other
variants (``-v1``: write + Frobenius norm, ``-mix``: mix form) come from ``--settings ablation``. Both runs
must share the base model, data and budgets; the script checks that their FROZEN and NAIVE references
have bit-identical loss matrices on the seeds they share, and uses only those seeds.

The rule (docs/benchmarks.md, written before the results): the default ``(form, norm)`` is the variant
with the largest MODULAR-vs-FROZEN final held-out gain (seed mean); it replaces write+spectral only if
that gain exceeds v1/write's by more than the seed standard deviation of write+spectral's gain.

Example::

    python benchmarks/ablation_table.py runs/bench/methods-real runs/bench/ablation-real
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

VARIANTS = {"write + frobenius (v1)": "-v1", "write + spectral (v2 default)": "", "mix (g_max 0.5)": "-mix"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads((path / "results.json").read_text())


def _ms(xs: list[float], spec: str) -> str:
    if not xs:
        return "—"
    text = format(statistics.fmean(xs), spec)
    return text + (f" ± {format(statistics.stdev(xs), spec.lstrip('+'))}" if len(xs) > 1 else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("methods", type=Path, help="--out of the methods run (has MODULAR, CRMA-shared, FROZEN, NAIVE)")
    p.add_argument("ablation", type=Path, help="--out of the --settings ablation run")
    args = p.parse_args(argv)
    runs = {"methods": _load(args.methods), "ablation": _load(args.ablation)}
    seeds = [s for s in runs["ablation"]["per_seed"] if s in runs["methods"]["per_seed"]]
    identical = {}
    for ref in ("FROZEN", "NAIVE"):
        identical[ref] = all(
            runs["methods"]["per_seed"][s]["runs"][ref]["loss_matrix"]
            == runs["ablation"]["per_seed"][s]["runs"][ref]["loss_matrix"]
            for s in seeds
        )

    def per_seed(setting: str, field: str, pair: str | None = None) -> list[float]:
        src = runs["ablation" if setting not in ("MODULAR", "CRMA-shared") else "methods"]["per_seed"]
        out = []
        for s in seeds:
            if pair is not None:
                value = (src[s]["pairs"].get(f"{setting}_vs_{pair}") or {}).get(field)
            else:
                value = src[s]["runs"][setting]
                for key in field.split("/"):
                    value = (value or {}).get(key)
            if isinstance(value, (int, float)):
                out.append(float(value))
        return out

    rows, gains = [], {}
    for label, suffix in VARIANTS.items():
        mod, shared = f"MODULAR{suffix}", f"CRMA-shared{suffix}"
        gains[label] = per_seed(mod, "heldout_improvement_pct", "FROZEN")
        shared_gain = per_seed(shared, "heldout_improvement_pct", "NAIVE")
        rows.append(
            f"| {label} | {_ms(gains[label], '+.4f')} | {_ms(shared_gain, '+.4f')} "
            f"| {_ms(per_seed(mod, 'drift_mean'), '+.4f')} | {_ms(per_seed(shared, 'drift_mean'), '+.3f')} "
            f"| {_ms(per_seed(mod, 'plasticity_rel_diff_pct', 'FROZEN'), '+.4f')} "
            f"| {_ms(per_seed(mod, 'stability_gain', 'FROZEN'), '+.3f')} "
            f"| {_ms(per_seed(mod, 'crma_effect/rel_update_mean'), '.2e')} "
            f"| {_ms(per_seed(mod, 'overhead', 'FROZEN'), '.3f')} |"
        )
    ref = "write + spectral (v2 default)"
    std = statistics.stdev(gains[ref]) if len(gains[ref]) > 1 else None
    means = {k: statistics.fmean(v) for k, v in gains.items() if v}
    winner = max(means, key=means.get)
    v1 = means["write + frobenius (v1)"]
    if std is None:
        verdict = f"the rule needs >= 2 seeds of {ref} (has {len(gains[ref])}); no verdict"
        default = None
    elif winner != ref and means[winner] - v1 > std:
        default = winner
        verdict = (
            f"largest gain: {winner} ({means[winner]:+.4f} %); it beats v1/write ({v1:+.4f} %) by "
            f"{means[winner] - v1:.4f} > seed std {std:.4f}: the default becomes {winner}"
        )
    else:
        default = ref
        verdict = (
            f"largest gain: {winner} ({means[winner]:+.4f} %); margin over v1/write ({v1:+.4f} %) = "
            f"{means[winner] - v1:.4f} {'<=' if means[winner] - v1 <= (std or 0) else '>'} seed std of {ref} "
            f"({std:.4f})"
            + ("" if winner != ref else " (the winner is the current default)")
            + f": the default stays {ref}"
        )
    lines = [
        f"Seeds {seeds}; FROZEN references identical in both runs: {identical['FROZEN']}; NAIVE: {identical['NAIVE']}.",
        "",
        "| CRMA variant | MODULAR vs FROZEN final held-out gain % | CRMA-shared vs NAIVE final held-out gain % "
        "| MODULAR mean drift % | CRMA-shared mean drift % | MODULAR plasticity diff vs FROZEN % "
        "| MODULAR stability gain vs FROZEN | MODULAR ‖h′−h‖/‖h‖ | MODULAR step time vs FROZEN |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Rule: {verdict}.",
    ]
    print("\n".join(lines))
    return {"seeds": seeds, "identical_refs": identical, "gains": gains, "default": default, "verdict": verdict}


if __name__ == "__main__":
    main()
