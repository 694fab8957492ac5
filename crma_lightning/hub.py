"""Where a pretrained model or tokenizer comes from: a local directory or the Hugging Face Hub.

Every error here is one the user fixes outside the program, so it is a ``ValueError`` with one line
naming the path (exit 2 from the CLI): a local path that does not exist ("no such directory", never
sent to the Hub as a repo id), or a Hub id that is not cached while the Hub cannot be reached. An
unreachable Hub is detected up front (``HF_HUB_OFFLINE=1``, or a 3 s connection check), and the files
are then taken from the local cache only - no minute of retries.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id (``name`` or ``org/name``)."""
    return name.startswith(PATH_PREFIXES) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def pretrained_kwargs(name: str, what: str) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained(name)``: ``local_files_only`` when the Hub is out of reach.

    Raises:
        ValueError: ``name`` is a path that is not a directory.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return {}
    if os.path.exists(path):
        raise ValueError(f"{what}={name!r} is a file: expected a model directory (with config.json) or a Hub id")
    if looks_like_path(name):
        raise ValueError(f"{what}={name!r}: no such directory")
    if hub_offline() or not hub_reachable():
        return {"local_files_only": True}
    return {}


def load_pretrained(load: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """``load(name, **kwargs)`` (a ``from_pretrained``), its "not found" errors turned into one line."""
    extra = pretrained_kwargs(name, what)
    try:
        return load(os.path.expanduser(name), **extra, **kwargs)
    except OSError as err:
        if extra.get("local_files_only"):
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
            raise ValueError(
                f"{what}={name!r} is not a local directory nor in the Hugging Face cache, and {why}: "
                "download it once with network access or give a local directory"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what}={name!r} could not be loaded: {first}") from err


__all__ = ["hub_offline", "hub_reachable", "load_pretrained", "looks_like_path", "pretrained_kwargs"]
