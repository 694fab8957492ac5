"""Dev sweep of the methods' hyper-parameters (protocol v3): run a written-down grid on dev, pick by a fixed rule.

The grid and the selection rule live in a committed file (``benchmarks/sweep_grid.yaml``: EWC lambda,
replay buffer and ratio, O-LoRA lambda, the routing prefix P; ``benchmarks/sweep_grid_tasks.yaml`` for the
task suite, chosen by AP), written before the sweep ran. Every
grid point becomes a variant of its setting (:mod:`variants`), and all of them run in one
``continual.py`` benchmark on the **dev** part of each held-out file (``--eval-split dev``), with any
other benchmark options passed through (after ``--``). Writes into ``--out``:

* ``dev/``: the benchmark's run directories, ``results.json`` and ``results.md`` (dev numbers);
* ``chosen.json``: per group the grid, each point's dev number, the a-priori and the chosen values -
  the file ``continual.py --chosen`` reads to report test numbers at the chosen values (with the
  a-priori values as a second row);
* ``sweep.md``: the same as a table.

Examples::

    python benchmarks/sweep.py --out runs/bench/sweep-real -- --data-dir ../shared/data/domains \\
        --domains medical legal finance science --seeds 1
    python benchmarks/continual.py --chosen runs/bench/sweep-real/chosen.json --data-dir ../shared/data/domains \\
        --domains medical legal finance science --out runs/bench/v3-real
    python benchmarks/sweep.py --grid benchmarks/sweep_grid_tasks.yaml --out runs/bench/sweep-tasks -- \
        --suite tasks --router prototype --seeds 1
    python benchmarks/sweep.py --tiny --out /tmp/sweep-tiny -- --domains prose code --seeds 1   # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py`: the repo root

from benchmarks.lib.variants import PARAMS, register

GRID = Path(__file__).with_name("sweep_grid.yaml")
METRICS = {"final_loss_mean": "min", "routing_accuracy_mean": "max", "ap": "max"}
RESERVED = ("--eval-split", "--settings", "--out", "--chosen")


def load_grid(path: Path) -> dict[str, Any]:
    """The sweep's groups, checked.

    Raises:
        ValueError: A group without settings or grid, an unknown metric, parameter or tie break, or an
            a-priori value that is not a grid point.
    """
    groups = (yaml.safe_load(Path(path).read_text()) or {}).get("groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{path}: expected a 'groups:' mapping of group name -> settings, metric, a_priori, grid")
    for name, g in groups.items():
        where = f"{path}: group {name!r}"
        if not g.get("settings") or not g.get("grid"):
            raise ValueError(f"{where}: needs 'settings' and a non-empty 'grid'")
        if g.get("metric") not in METRICS:
            raise ValueError(f"{where}: metric {g.get('metric')!r}; expected one of {list(METRICS)}")
        if g.get("tie_break", "a_priori") not in ("a_priori", "first"):
            raise ValueError(f"{where}: tie_break {g['tie_break']!r}; expected 'a_priori' or 'first'")
        for point in [*g["grid"], g.get("a_priori", {})]:
            if not isinstance(point, dict) or not point or set(point) - set(PARAMS):
                raise ValueError(f"{where}: grid point {point!r}; expected a mapping of some of {list(PARAMS)}")
        if g.get("a_priori") not in g["grid"]:
            raise ValueError(f"{where}: the a-priori values {g.get('a_priori')!r} must be one of the grid points")
    return groups


def select(values: list[float | None], metric: str, tolerance: float, a_priori: int, tie_break: str) -> int:
    """Index of the chosen grid point (see ``sweep_grid.yaml`` for the rule).

    Args:
        values: The metric of each grid point (``None``: the point did not complete).
        metric: ``final_loss_mean`` (lower is better), ``routing_accuracy_mean`` or ``ap`` (higher is better).
        tolerance: Points within this of the best are tied.
        a_priori: Index of the a-priori point.
        tie_break: ``a_priori`` (the a-priori point if tied, else the first tied) or ``first``.

    Raises:
        ValueError: No point has a value.
    """
    done = [v for v in values if v is not None]
    if not done:
        raise ValueError("no grid point completed: nothing to choose from")
    best = min(done) if METRICS[metric] == "min" else max(done)
    tied = [i for i, v in enumerate(values) if v is not None and abs(v - best) <= tolerance]
    return a_priori if tie_break == "a_priori" and a_priori in tied else tied[0]


def point_value(payload: dict[str, Any], setting: str, metric: str) -> tuple[float | None, list[float | None]]:
    """``(mean over seeds, per seed)`` of ``metric`` for ``setting`` in a ``results.json`` payload."""
    per_seed: list[float | None] = []
    for seed in payload["per_seed"].values():
        run = seed["runs"][setting]
        if metric == "final_loss_mean":
            losses = list((run.get("final_losses") or {}).values())
            per_seed.append(statistics.fmean(losses) if losses and None not in losses else None)
        elif metric == "ap":  # the task suite's average final score (needs a metric on every domain)
            per_seed.append((run.get("scores") or {}).get("ap"))
        else:
            per_seed.append((run.get("routing") or {}).get("routing_accuracy_mean"))
    mean = statistics.fmean(per_seed) if per_seed and None not in per_seed else None
    return mean, per_seed


def _markdown(result: dict[str, Any]) -> str:
    sha = result["grid_sha256"][:12]
    lines = [f"Dev sweep: `{result['command']}`; grid `{result['grid_file']}` (sha256 {sha})", ""]
    for name, g in result["groups"].items():
        lines += [f"{name} ({', '.join(g['settings'])}; {g['metric']}, {METRICS[g['metric']]}imise):", ""]
        lines += ["| values | dev value (mean over seeds) | per seed | |", "|---|---|---|---|"]
        for p in g["points"]:
            marks = (("a priori", p["params"] == g["a_priori"]), ("**chosen**", p["chosen"]))
            tag = " ".join(t for t, on in marks if on)
            cells = ", ".join("—" if v is None else f"{v:.4f}" for v in p["per_seed"])
            value = "—" if p["value"] is None else f"{p['value']:.4f}"
            lines.append(f"| {p['params']} | {value} | {cells} | {tag} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the content of ``chosen.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (dev runs, chosen.json, sweep.md)")
    p.add_argument("--grid", type=Path, default=GRID, help="the grid and rule (default: benchmarks/sweep_grid.yaml)")
    p.add_argument("--groups", nargs="+", help="sweep only these groups of the grid (default: all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="passed to continual.py (smoke test: seconds)")
    size.add_argument("--quick", action="store_true", help="passed to continual.py")
    p.add_argument("--overwrite", action="store_true", help="passed to continual.py")
    args = p.parse_args(own)
    taken = [a for a in bench_args if a.split("=")[0] in RESERVED]
    if taken:
        p.error(f"{taken}: the sweep sets these itself (it runs the grid on --eval-split dev into --out/dev)")
    try:
        groups = load_grid(args.grid)
    except ValueError as err:
        p.error(str(err))
    if args.groups:
        unknown = [g for g in args.groups if g not in groups]
        if unknown:
            p.error(f"--groups {unknown}: not in {args.grid}; expected some of {list(groups)}")
        groups = {k: v for k, v in groups.items() if k in args.groups}
    names = {g: [register(v["settings"][0], point) for point in v["grid"]] for g, v in groups.items()}
    from benchmarks import continual  # after the variants exist: its option parser checks --settings against them

    flags = [f"--{f}" for f in ("tiny", "quick", "overwrite") if getattr(args, f)]
    every = [n for g in names.values() for n in g]
    bench_argv = [*flags, *bench_args, "--eval-split", "dev", "--out", str(args.out / "dev"), "--settings", *every]
    payload = continual.main(bench_argv)
    result: dict[str, Any] = {
        "command": "python benchmarks/sweep.py " + " ".join(argv),
        "grid_file": str(args.grid),
        "grid_sha256": hashlib.sha256(Path(args.grid).read_bytes()).hexdigest(),
        "selection": f"{args.grid.name}: final_loss_mean minimised / routing_accuracy_mean and ap maximised over the "
        "grid on dev, mean over the sweep's seeds; ties within the group's tolerance go to the a-priori value (or "
        "the first grid point with tie_break: first)",
        "benchmark_argv": bench_argv,
        "seeds": payload["setup"]["seeds"],
        "dev_results": str(args.out / "dev" / "results.json"),
        "groups": {},
    }
    for g, spec in groups.items():
        measured = [point_value(payload, n, spec["metric"]) for n in names[g]]
        i = select(
            [m for m, _ in measured],
            spec["metric"],
            float(spec.get("tolerance", 0.0)),
            spec["grid"].index(spec["a_priori"]),
            spec.get("tie_break", "a_priori"),
        )
        result["groups"][g] = {
            "settings": list(spec["settings"]),
            "metric": spec["metric"],
            "tolerance": spec.get("tolerance", 0.0),
            "a_priori": dict(spec["a_priori"]),
            "chosen": dict(spec["grid"][i]),
            "points": [
                {"params": dict(point), "setting": n, "value": m, "per_seed": per, "chosen": k == i}
                for k, (point, n, (m, per)) in enumerate(zip(spec["grid"], names[g], measured))
            ],
        }
    (args.out / "chosen.json").write_text(json.dumps(result, indent=1))
    table = _markdown(result)
    (args.out / "sweep.md").write_text(table)
    print("\n" + table)
    print(f"wrote {args.out / 'chosen.json'} and {args.out / 'sweep.md'}")
    return result


if __name__ == "__main__":
    main()
