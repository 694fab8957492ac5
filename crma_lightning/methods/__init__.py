"""Continual-learning methods (docs/method.md): strategy objects with hooks the module and runner call.

``build_method("replay", ratio=0.25)`` makes one from its YAML name and hyper-parameters. To add a
method: subclass :class:`ContinualMethod` (see ``base.py`` for when each hook runs), give it a
``name``, and register it in :data:`METHODS`.
"""

from __future__ import annotations

import inspect
from typing import Any

from crma_lightning.methods.base import ContinualMethod
from crma_lightning.methods.ewc import EWC, fisher_diagonal
from crma_lightning.methods.olora import OLoRA, l2_penalty, orthogonality_penalty
from crma_lightning.methods.replay import Replay, ReplayDataset, ReplaySampler, replay_indices

METHODS: dict[str, type[ContinualMethod]] = {"none": ContinualMethod, "replay": Replay, "ewc": EWC, "olora": OLoRA}


def build_method(name: str, **kwargs: Any) -> ContinualMethod:
    """The method registered as ``name``, built with ``kwargs`` (validated by its constructor).

    Raises:
        ValueError: Unknown name (the message lists the valid ones) or unknown/bad hyper-parameter.
    """
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown: expected one of {sorted(METHODS)}")
    cls = METHODS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"method {name!r} has no hyper-parameter(s) {unknown}; it accepts {accepted}")
    return cls(**kwargs)


__all__ = [
    "EWC",
    "METHODS",
    "ContinualMethod",
    "OLoRA",
    "Replay",
    "ReplayDataset",
    "ReplaySampler",
    "build_method",
    "fisher_diagonal",
    "l2_penalty",
    "orthogonality_penalty",
    "replay_indices",
]
