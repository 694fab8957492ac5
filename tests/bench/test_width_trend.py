"""benchmarks/width_trend.py: the width table and plot read the benchmark's results.json as written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _width_trend():
    spec = importlib.util.spec_from_file_location("width_trend", BENCH / "width_trend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path: Path, hidden: int, seeds: int, gain: float) -> Path:
    def s(mean, std=0.1):
        return {"n": seeds, "mean": mean, "std": std if seeds > 1 else None}

    pair = {"heldout_improvement_pct": s(gain), "plasticity_rel_diff_pct": s(-0.1), "stability_gain": s(0.01),
            "overhead": s(1.1)}  # fmt: skip
    modes = {m: {"drift_mean_pct": s(d)} for m, d in
             {"NAIVE": 17.0, "FROZEN": 0.0, "MODULAR": 0.05, "CRMA-shared": 16.9, "REPLAY": 7.5}.items()}  # fmt: skip
    payload = {
        "setup": {
            "seeds": list(range(seeds)),
            "git": {"at_start": {"commit": "abcdef0123"}},
            "base_model": {
                "pretrain": {"settings": {"model_config": {"hidden_size": hidden}}, "parameters": hidden * 10}
            },
        },
        "aggregates": {
            "modes": modes,
            "pairs": {"MODULAR_vs_FROZEN": pair, "CRMA-shared_vs_NAIVE": pair, "REPLAY_vs_NAIVE": pair},
        },
    }
    path.mkdir()
    (path / "results.json").write_text(json.dumps(payload))
    return path


def test_width_table_and_plot(tmp_path):
    wt = _width_trend()
    wide = _results(tmp_path / "h256", 256, 1, -0.2)
    narrow = _results(tmp_path / "h128", 128, 3, 0.092)
    text = wt.main([str(wide), str(narrow), "--svg", str(tmp_path / "trend.svg")])
    rows = text.splitlines()
    # Sorted by width; a single seed shows no ± (no spread to show), several do.
    assert rows[2] == ("| 128 (1,280) | 3 | MODULAR vs FROZEN | +0.092 ± 0.100 | +0.05 ± 0.10 | +0.00 ± 0.10 | "
                       "-0.100 ± 0.100 | +0.010 ± 0.100 | 1.100 ± 0.100 |")  # fmt: skip
    assert rows[5].startswith("| 256 (2,560) | 1 | MODULAR vs FROZEN | -0.200 | +0.05 | +0.00 |")
    svg = (tmp_path / "trend.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3 and svg.count("<circle") == 6
    with pytest.raises(SystemExit, match=r"no results\.json"):
        wt.main([str(tmp_path / "missing")])
