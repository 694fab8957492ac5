"""Plot a run's loss matrix (from report.json) and its gradient curves (from TensorBoard) with matplotlib.

python examples/plot_report.py runs/demo              # writes runs/demo/loss_matrix.png, gradients.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def plot_loss_matrix(report: dict, out: Path) -> Path:
    matrix = report["loss_matrix"]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix["values"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * values.shape[1], 1.2 + 0.5 * values.shape[0]))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(values.shape[1]), matrix["columns"], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), matrix["rows"])
    lo, hi = np.nanmin(values), np.nanmax(values)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            light = hi > lo and (v - lo) / (hi - lo) < 0.5  # viridis_r is light at low losses
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="black" if light else "white", fontsize=8)
    drift = report.get("metrics", {}).get("drift_mean")
    ax.set_title("held-out loss" + (f" (mean drift {drift:+.2f}%)" if drift is not None else ""))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = out / "loss_matrix.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gradients(run_dir: Path, out: Path) -> Path:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for ax, tag in zip(axes, ("grad/norm", "grad/var")):
        if tag in events.Tags()["scalars"]:
            points = events.Scalars(tag)
            ax.plot([p.step for p in points], [p.value for p in points], lw=0.8)
        ax.set_ylabel(tag)
    axes[-1].set_xlabel("optimizer step (continuous across stages)")
    fig.tight_layout()
    path = out / "gradients.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: the run directory)")
    args = parser.parse_args()
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads((args.run_dir / "report.json").read_text())
    for path in (plot_loss_matrix(report, out), plot_gradients(args.run_dir, out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
