"""Dev / test split of every benchmark domain's held-out file (protocol v3).

The held-out file of a domain (``holdout.jsonl``: ``--data-dir`` corpora as given, built-in domains as
:func:`bench_data.materialize_builtin` writes them) is split **by document** - one JSON Lines record -
into a *dev* part, on which hyper-parameters are chosen (``benchmarks/sweep.py``), and a *test* part,
on which the tables report. The split happens before tokenisation and packing (the library packs each
file on its own), so no packed row holds text of both parts.

The rule, per domain: every distinct record (its exact line of JSON, whitespace stripped) gets the key
``sha256(SALT + line)``; the ``round(DEV_FRACTION * n)`` distinct records with the smallest keys (at
least one, at most ``n - 1``) are dev, the rest are test. So the split is deterministic, depends on
nothing but the file's own records (not on their order, another domain, a seed or the machine), puts
repeated records on one side, and keeps both sides non-empty. Each part keeps the file's record order.
``--eval-split full`` evaluates the whole held-out file: the held-out set of protocols v1 and v2.

The built-in task suite (``--suite tasks``) has another rule, :func:`split_task_holdout`, because its
held-out rows are not documents of a corpus but generated prompts, already a random sample (the task's
LCG stream) and short enough to be one row each: the **first half** of a task's held-out rows (in the
generated order) is test, the **second half** without any record that also occurs in the first (a word
can be drawn twice) is dev. So test holds exactly the prompts the suite has always scored (the first
``eval_rows``), the protocol-v1/v2 numbers of the suite are test numbers, and no dev prompt is a test
prompt.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

SALT = b"crma-lightning dev/test split v1\n"
DEV_FRACTION = 0.5
"""Share of a held-out file's distinct records that go to dev."""

EVAL_SPLITS = ("test", "dev", "full")


def _records(path: Path) -> list[str]:
    """The file's non-blank lines (one record each), stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def dev_records(records: list[str], fraction: float = DEV_FRACTION, domain: str = "?") -> set[str]:
    """The records of ``records`` that belong to dev (see the module docstring for the rule).

    Raises:
        ValueError: Fewer than two distinct records (no split leaves both parts non-empty).
    """
    unique = sorted(set(records), key=lambda r: hashlib.sha256(SALT + r.encode("utf-8")).digest())
    if len(unique) < 2:
        raise ValueError(
            f"domain {domain!r}: its held-out file has {len(unique)} distinct record(s); a dev/test split needs "
            "at least 2 (add held-out documents, raise --max-chars, or pass --eval-split full)"
        )
    n_dev = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    return set(unique[:n_dev])


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def _part_paths(holdout: Path, name: str, cache_dir: Path) -> dict[str, Path]:
    """Where ``holdout``'s dev and test parts are cached: a folder named by ``name`` and the file's content."""
    folder = cache_dir / "data" / "splits" / f"{name}-{hashlib.sha256(SALT + holdout.read_bytes()).hexdigest()[:16]}"
    return {"dev": folder / "dev.jsonl", "test": folder / "test.jsonl"}


def split_holdout(holdout: Path, domain: str, cache_dir: Path) -> dict[str, Path]:
    """Write ``holdout``'s dev and test parts (once; cached by the file's content); returns their paths.

    Args:
        holdout: The domain's held-out JSON Lines file.
        domain: The domain's name (for messages and the cache folder's name).
        cache_dir: The benchmark's cache directory (``--cache-dir``).

    Returns:
        ``{"dev": path, "test": path}``.
    """
    paths = _part_paths(holdout, domain, cache_dir)
    if all(p.is_file() for p in paths.values()):
        return paths
    records = _records(holdout)
    dev = dev_records(records, domain=domain)
    _write(paths["dev"], [r for r in records if r in dev])
    _write(paths["test"], [r for r in records if r not in dev])
    return paths


def split_task_holdout(holdout: Path, domain: str, cache_dir: Path) -> dict[str, Path]:
    """Write a built-in task's dev and test rows (once; cached by content); returns their paths.

    Args:
        holdout: The task's held-out rows as JSON Lines, in the generated order (``suites._task_files``).
        domain: The task's name (messages, cache folder).
        cache_dir: The benchmark's cache directory.

    Returns:
        ``{"dev": path, "test": path}``: test = the first ``n // 2`` records, dev = the others that are not
        also test records (see the module docstring).

    Raises:
        ValueError: Fewer than two held-out records, or no dev record left.
    """
    paths = _part_paths(holdout, f"task-{domain}", cache_dir)
    if all(p.is_file() for p in paths.values()):
        return paths
    records = _records(holdout)
    test = records[: len(records) // 2]
    seen = set(test)
    dev = [r for r in records[len(records) // 2 :] if r not in seen]
    if not test or not dev:
        raise ValueError(
            f"task {domain!r}: {len(records)} held-out record(s) leave {len(test)} test and {len(dev)} dev record(s); "
            "a dev/test split needs at least one of each (raise the held-out rows, or pass --eval-split full)"
        )
    _write(paths["dev"], dev)
    _write(paths["test"], test)
    return paths


def with_eval_split(specs: list[dict[str, Any]], split: str, cache_dir: Path) -> list[dict[str, Any]]:
    """The domain specs with ``holdout_path`` pointing at the ``split`` part of each held-out file.

    ``full`` returns the specs unchanged. The training files are never touched.

    Raises:
        ValueError: An unknown split, a domain without a held-out JSON Lines file, or one with fewer than
            two held-out records.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"--eval-split {split!r}: expected one of {list(EVAL_SPLITS)}")
    if split == "full":
        return specs
    out = []
    for spec in specs:
        path = spec.get("holdout_path")
        if not isinstance(path, str) or not path.endswith(".jsonl"):
            raise ValueError(
                f"domain {spec['name']!r}: --eval-split {split} splits a held-out JSON Lines file, and this domain "
                f"has holdout_path={path!r}; pass --eval-split full"
            )
        parts = split_holdout(Path(path), spec["name"], cache_dir)
        out.append({**spec, "holdout_path": str(parts[split])})
    return out
