"""Lazy package exports: a name resolves to its module's attribute on first access (PEP 562).

Packages use it so that importing a light piece (``crma_lightning.adapters``, ``crma_lightning.metrics``)
does not pull in Lightning through a heavy sibling.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` resolving ``exports`` (name -> module path) on first access."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
