"""Random-number-generator state as plain tensors and lists, for weights-only checkpoints.

Saved in every checkpoint and restored on resume, so that a stage resumed mid-way sees the same
random numbers (dropout, sampling) as an uninterrupted run.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy generator states, in weights-only-loadable types."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": dict(zip(("kind", "keys", "pos", "has_gauss", "gauss"), _plain(np.random.get_state()))),
    }


def _plain(np_state: tuple) -> tuple:
    kind, keys, pos, has_gauss, gauss = np_state
    return kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)


def set_rng_state(state: dict[str, Any] | None) -> None:
    """Restore what :func:`rng_state` saved (``None`` or ``{}``: nothing to restore)."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
