"""Width trend (issue 23, protocol v2): do the CRMA pairs and REPLAY move with the model's width?

Reads the ``results.json`` of ``continual.py`` runs made at several ``--hidden`` sizes with the same protocol
(settings NAIVE FROZEN MODULAR CRMA-shared REPLAY), prints one markdown table - per width and pair: the final
held-out gain of X over its LoRA pair, X's and the pair's mean drift, the plasticity difference, the
stability gain and the step-time ratio, each as mean ± std over seeds (the seed count is in the table) -
and writes one plot of the final held-out gain against width (an SVG, no plotting library needed)::

    python benchmarks/width_trend.py runs/bench/width-h128 runs/bench/width-h256 runs/bench/width-h512 \\
        --svg docs/width_trend.svg
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

PAIRS = (("MODULAR", "FROZEN"), ("CRMA-shared", "NAIVE"), ("REPLAY", "NAIVE"))
"""(X, its plain-LoRA pair), in table order."""
COLOURS = {"MODULAR": "#1b9e77", "CRMA-shared": "#d95f02", "REPLAY": "#7570b3"}


def load(run_dir: Path) -> dict[str, Any]:
    """The numbers of one width: ``{"hidden", "params", "seeds", "pairs": {X: {field: (mean, std)}}}``."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no results.json (expected a finished benchmarks/continual.py --out directory)")
    results = json.loads(path.read_text())
    base = results["setup"]["base_model"]
    agg = results["aggregates"]
    out: dict[str, Any] = {
        "hidden": base["pretrain"]["settings"]["model_config"]["hidden_size"],
        "params": base["pretrain"]["parameters"],
        "seeds": len(results["setup"]["seeds"]),
        "commit": results["setup"]["git"]["at_start"]["commit"][:7],
        "pairs": {},
    }
    for x, ref in PAIRS:
        pair = agg["pairs"].get(f"{x}_vs_{ref}")
        if pair is None:
            continue

        def ms(entry: dict[str, Any] | None) -> tuple[float, float]:
            entry = entry or {}
            mean, std = entry.get("mean"), entry.get("std")
            return (float("nan") if mean is None else mean, 0.0 if std is None else std)

        out["pairs"][x] = {
            "gain": ms(pair["heldout_improvement_pct"]),
            "drift_x": ms(agg["modes"][x]["drift_mean_pct"]),
            "drift_ref": ms(agg["modes"][ref]["drift_mean_pct"]),
            "plasticity": ms(pair["plasticity_rel_diff_pct"]),
            "stability": ms(pair["stability_gain"]),
            "overhead": ms(pair["overhead"]),
        }
    return out


def _f(value: tuple[float, float], spec: str, seeds: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{spec}}" + (f" ± {std:{spec.lstrip('+')}}" if seeds > 1 else "")


def table(widths: list[dict[str, Any]]) -> str:
    """The markdown table, one row per (width, pair)."""
    lines = [
        "| hidden (params) | seeds | X vs pair | final held-out gain % | drift X % | drift pair % | "
        "plasticity diff % | stability gain | step time X / pair |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in widths:
        for x, ref in PAIRS:
            p = w["pairs"].get(x)
            if p is None:
                continue
            s = w["seeds"]
            lines.append(
                f"| {w['hidden']} ({w['params']:,}) | {s} | {x} vs {ref} | {_f(p['gain'], '+.3f', s)} | "
                f"{_f(p['drift_x'], '+.2f', s)} | {_f(p['drift_ref'], '+.2f', s)} | {_f(p['plasticity'], '+.3f', s)} | "
                f"{_f(p['stability'], '+.3f', s)} | {_f(p['overhead'], '.3f', s)} |"
            )
    return "\n".join(lines)


def svg(widths: list[dict[str, Any]], width: int = 560, height: int = 320) -> str:
    """Final held-out gain (mean, ± std bars) against hidden size (log2 axis), one line per pair."""
    left, right, top, bottom = 60, 150, 20, 40
    xs = [math.log2(w["hidden"]) for w in widths]
    values = [
        v
        for w in widths
        for p in w["pairs"].values()
        for v in (p["gain"][0] - p["gain"][1], p["gain"][0] + p["gain"][1])
        if not math.isnan(v)
    ]
    lo, hi = min([0.0, *values]), max([0.0, *values])
    pad = 0.1 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    x0, x1 = min(xs), max(xs)

    def px(x: float) -> float:
        return left + (width - left - right) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def py(y: float) -> float:
        return top + (height - top - bottom) * (hi - y) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{left}" y1="{py(0):.1f}" x2="{width - right}" y2="{py(0):.1f}" stroke="#999" '
        'stroke-dasharray="4 3"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">hidden size</text>',
        f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2})">final held-out gain vs LoRA pair, %</text>',
    ]
    for w, x in zip(widths, xs):
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{w["hidden"]}</text>')
    for tick in (lo + (hi - lo) * i / 4 for i in range(5)):
        parts.append(f'<text x="{left - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:+.2f}</text>')
    for row, (name, _) in enumerate(PAIRS):
        colour = COLOURS[name]
        points = [(px(x), w["pairs"][name]["gain"]) for w, x in zip(widths, xs) if name in w["pairs"]]
        points = [(x, g) for x, g in points if not math.isnan(g[0])]
        if points:
            path = " ".join(f"{x:.1f},{py(g[0]):.1f}" for x, g in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, (mean, std) in points:
            parts.append(f'<circle cx="{x:.1f}" cy="{py(mean):.1f}" r="3.5" fill="{colour}"/>')
            if std:
                parts.append(
                    f'<line x1="{x:.1f}" y1="{py(mean - std):.1f}" x2="{x:.1f}" y2="{py(mean + std):.1f}" '
                    f'stroke="{colour}"/>'
                )
        ly = top + 14 + 16 * row
        parts.append(f'<rect x="{width - right + 10}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{width - right + 24}" y="{ly + 1}">{name} vs {dict(PAIRS)[name]}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="continual.py --out directories, one per width")
    p.add_argument("--svg", type=Path, help="write the plot here")
    args = p.parse_args(argv)
    widths = sorted((load(d) for d in args.runs), key=lambda w: w["hidden"])
    text = table(widths)
    print(text)
    print("commits: " + ", ".join(f"hidden {w['hidden']}: {w['commit']}" for w in widths))
    if args.svg:
        args.svg.write_text(svg(widths))
        print(f"wrote {args.svg}")
    return text


if __name__ == "__main__":
    main()
