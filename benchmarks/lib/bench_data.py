"""Domains of the continual benchmark: which ones, in what order, and their train/held-out files.

Every domain reaches the benchmark as a pair of local JSON Lines files (``train.jsonl``,
``holdout.jsonl``) given to :class:`~crma_lightning.data.datamodule.DomainSpec` as ``path``/``holdout_path``:

* ``--data-dir DIR``: ``DIR/<domain>/train.jsonl`` and ``DIR/<domain>/holdout.jsonl`` as they are.
* built-in demo domains: their documents are split once (the library's own ``load_raw`` split with
  seed 0) and written to the cache. Why not ``DomainSpec(builtin=...)`` directly: its held-out split
  follows the datamodule's seed, so every benchmark seed would hold out different rows - and the
  pretrained base model (trained on the training split of seed 0) would have seen some of the other
  seeds' held-out rows. Fixed files keep the held-out rows unseen by everything, for every seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from crma_lightning.data.builtin_domains import BUILTIN_DOMAINS
from crma_lightning.data.datamodule import DEFAULT_DOMAINS, DomainSpec, load_raw

SPLIT_FILES = ("train.jsonl", "holdout.jsonl")


def resolve_domains(data_dir: Path | None, names: list[str] | None) -> list[str]:
    """Domain names in training order.

    Args:
        data_dir: Directory with one sub-directory per domain, or ``None`` for the built-in domains.
        names: Requested domains in order (``--domains``); ``None`` = all of them (built-in: the
            library's default order; a data directory: alphabetical).

    Returns:
        The names, in training order.

    Raises:
        ValueError: Unknown or duplicate names, fewer than two domains, or a domain without both files.
    """
    if data_dir is None:
        available = list(DEFAULT_DOMAINS)
        where = "built-in domains"
    else:
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir} is not a directory")
        available = sorted(d.name for d in data_dir.iterdir() if all((d / f).is_file() for f in SPLIT_FILES))
        where = f"domains in {data_dir} (sub-directories with {' and '.join(SPLIT_FILES)})"
        if not available:
            raise ValueError(f"{data_dir} holds no domain: expected <domain>/{SPLIT_FILES[0]} and {SPLIT_FILES[1]}")
    chosen = list(names) if names else available
    unknown = [n for n in chosen if n not in available and not (data_dir is None and n in BUILTIN_DOMAINS)]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; available {where}: {available}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--domains lists a domain twice: {chosen}")
    if len(chosen) < 2:
        raise ValueError(f"forgetting needs at least two domains, got {chosen}")
    return chosen


def check_pretrain_disjoint(domains: list[str], pretrain: list[str] | None) -> None:
    """Refuse ``--pretrain-builtin`` names that are not built-in domains or that are benchmark domains.

    Protocol v2's point is a base that has never seen the benchmark's text; a built-in domain that is also
    a benchmark domain would be pretrained on. Called before any work (no directory touched).

    Raises:
        ValueError: An unknown, repeated or overlapping name (the message names it).
    """
    if not pretrain:
        return
    unknown = [n for n in pretrain if n not in BUILTIN_DOMAINS]
    if unknown:
        raise ValueError(
            f"--pretrain-builtin {unknown}: not built-in domains; expected some of {sorted(BUILTIN_DOMAINS)}"
        )
    if len(set(pretrain)) != len(pretrain):
        raise ValueError(f"--pretrain-builtin lists a domain twice: {pretrain}")
    overlap = [n for n in pretrain if n in domains]
    if overlap:
        raise ValueError(
            f"--pretrain-builtin {overlap} overlaps the benchmark domains {domains}: the base would be pretrained "
            "on the text it is tested on; pretrain on built-in domains outside --domains"
        )


def _texts(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {json.loads(line)["text"] for line in f if line.strip()}


def check_texts_disjoint(general: list[dict[str, Any]], specs: list[dict[str, Any]]) -> None:
    """Refuse a pretraining mix that shares a text record with a benchmark domain (train or held-out file).

    The name check (:func:`check_pretrain_disjoint`) misses a ``--data-dir`` domain that holds a copy of a
    built-in one under another name; this compares the records themselves. Called before the base is
    pretrained.

    Raises:
        ValueError: Names the pretraining domain, the benchmark domain and the number of shared records.
    """
    for g in general:
        seen = _texts(g["path"])
        for spec in specs:
            shared = sum(len(seen & _texts(spec[key])) for key in ("path", "holdout_path"))
            if shared:
                raise ValueError(
                    f"--pretrain-builtin {g['name']!r} shares {shared} text record(s) with benchmark domain "
                    f"{spec['name']!r}: the base would be pretrained on the text it is tested on"
                )


def _write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def materialize_builtin(name: str, cache_dir: Path, max_chars: int) -> Path:
    """Write built-in domain ``name``'s fixed train/held-out split as JSON Lines; returns its directory.

    The split is the library's (``load_raw`` with seed 0, 10% held out). The directory name holds
    the Python version (the built-in text comes from the standard library) and the size cap.
    """
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    out = cache_dir / "data" / f"builtin-{version}-{max_chars}" / name
    if all((out / f).is_file() for f in SPLIT_FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    train, holdout = load_raw(DomainSpec(name=name, builtin=name), seed=0, max_chars=max_chars)
    _write_jsonl(out / "holdout.jsonl", list(holdout["text"]))
    _write_jsonl(out / "train.jsonl", list(train["text"]))  # written last: its presence marks completion
    return out


def domain_specs(
    names: list[str], data_dir: Path | None, cache_dir: Path, max_chars: int, max_train_rows: int | None = None
) -> list[dict[str, Any]]:
    """``DomainSpec`` fields (dicts, JSON-friendly) of every domain, in training order.

    Args:
        names: Domains in training order (see :func:`resolve_domains`).
        data_dir: Directory of the domains' files, or ``None`` for the built-in ones.
        cache_dir: Where built-in domains' files are written.
        max_chars: Size cap of each built-in domain (characters, before the split).
        max_train_rows: Keep at most this many training records per domain (``None``: all).

    Returns:
        One dict per domain: ``name``, ``path``, ``holdout_path`` (and ``max_examples`` when capped).
    """
    specs = []
    for name in names:
        folder = data_dir / name if data_dir is not None else materialize_builtin(name, cache_dir, max_chars)
        spec: dict[str, Any] = {
            "name": name,
            "path": str(folder / SPLIT_FILES[0]),
            "holdout_path": str(folder / SPLIT_FILES[1]),
        }
        if max_train_rows is not None:
            spec["max_examples"] = max_train_rows
        specs.append(spec)
    return specs


def fingerprint(specs: list[dict[str, Any]]) -> str:
    """SHA-256 over the domains' names and training files (what the base model is pretrained on)."""
    h = hashlib.sha256()
    for spec in sorted(specs, key=lambda s: s["name"]):
        h.update(spec["name"].encode())
        h.update(str(spec.get("max_examples")).encode())
        h.update(Path(spec["path"]).read_bytes())
    return h.hexdigest()
