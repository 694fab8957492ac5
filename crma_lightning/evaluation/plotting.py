"""The loss matrix as an RGB image for TensorBoard (matplotlib when installed, plain numpy otherwise)."""

from __future__ import annotations

import math

import numpy as np


def _row_labels(n_rows: int, domains: list[str]) -> list[str]:
    return ["base"] + [f"after {i}: {domains[i - 1]}" for i in range(1, n_rows)]


def loss_matrix_image(
    matrix: list[list[float | None]], domains: list[str], higher_is_better: bool = False
) -> np.ndarray:
    """``(H, W, 3)`` uint8 heatmap of ``matrix`` (rows: base, after stage 1..; columns: domains).

    ``higher_is_better``: a score matrix (the colour scale is reversed and the title says "task score").
    Missing entries are grey. With matplotlib the cells are annotated with their values; without it
    the image is a plain colour grid (the numbers are in the text summary and ``report.md``).
    """
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    try:
        return _matplotlib_image(values, domains, higher_is_better)
    except ImportError:
        return _numpy_image(-values if higher_is_better else values)


def _matplotlib_image(values: np.ndarray, domains: list[str], higher_is_better: bool = False) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = values.shape
    fig = Figure(figsize=(1.6 + 1.3 * cols, 1.0 + 0.5 * rows), dpi=100)
    canvas = FigureCanvasAgg(fig)  # an off-screen canvas: no GUI backend, no global pyplot state
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    cmap = "viridis" if higher_is_better else "viridis_r"  # good cells are yellow in both
    image = ax.imshow(masked, cmap=cmap, aspect="auto")
    ax.set_xticks(range(cols), domains, rotation=30, ha="right")
    ax.set_yticks(range(rows), _row_labels(rows, domains))
    lo, hi = np.nanmin(values), np.nanmax(values)
    for r in range(rows):
        for c in range(cols):
            if not math.isnan(values[r, c]):
                share = (values[r, c] - lo) / (hi - lo) if hi > lo else 0.0
                light = hi > lo and (share > 0.5 if higher_is_better else share < 0.5)  # the yellow end
                color = "black" if light else "white"
                ax.text(c, r, f"{values[r, c]:.3f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_title("task score (higher is better)" if higher_is_better else "held-out loss (lower is better)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].copy()


def _numpy_image(values: np.ndarray, cell: int = 24) -> np.ndarray:
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    scale = (values - lo) / (hi - lo if hi > lo else 1.0)
    rgb = np.zeros((*values.shape, 3), dtype=np.uint8)
    ok = np.isfinite(scale)
    rgb[..., 0] = np.where(ok, 255 * np.nan_to_num(scale), 128)  # red = high loss
    rgb[..., 1] = np.where(ok, 64, 128)
    rgb[..., 2] = np.where(ok, 255 * (1 - np.nan_to_num(scale)), 128)  # blue = low loss
    return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))


def save_comparison_chart(path: str, runs: list[str], panels: dict[str, list[float | None]]) -> None:
    """A PNG of one bar chart per metric (``panels``: title -> one value per run, ``None`` = missing).

    Each metric gets its own axis (drift in %, plasticity in loss units and gradient variance differ by
    orders of magnitude). Needs matplotlib (``ImportError`` without it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(runs)) * len(panels) * 0.8, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, values) in enumerate(panels.items(), 1):
        ax = fig.add_subplot(1, len(panels), i)
        heights = [0.0 if v is None or not math.isfinite(v) else float(v) for v in values]
        bars = ax.bar(range(len(runs)), heights, color=[f"C{k % 10}" for k in range(len(runs))])
        for bar, value in zip(bars, values):
            missing = value is None or not math.isfinite(value)
            ax.annotate(
                "n/a" if missing else f"{value:.3g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0.0, color="black", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, format="png")
