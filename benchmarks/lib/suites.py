"""The benchmark's two data suites (loss domains, the built-in task suite) and the MULTITASK data.

* ``--suite domains`` (default): text domains given as train/held-out files (``bench_data``); loss only.
* ``--suite tasks``: the built-in task suite of ``configs/tasks.yaml`` (:mod:`crma_lightning.data.builtin_tasks`):
  prompt/response rows scored by exact match after every stage, so every run has a score matrix
  ``S[s][j]`` beside its loss matrix. The domains are ``DomainSpec(builtin=<task>)`` exactly as in the
  config (the held-out rows of a built-in task are its first rows, the same for every seed).

MULTITASK (the joint-training upper bound) runs through the same user code path as every other
setting: a sequential run with one shared LoRA whose stage ``i`` is named after domain ``i`` and
evaluates every domain on its own held-out rows, but whose *training* rows are, at every stage, the
union of all domains' training rows (a list of files as the domain's ``path``). After ``T`` stages
of ``steps`` steps, the LoRA has seen ``T x steps`` batches drawn from the union - the same total
budget as the sequential settings - and ``L[T][j]`` is joint training's final held-out loss on
domain ``j``. No library feature is needed: a user gets the same with ``path: [a.jsonl, b.jsonl, ...]``
and ``holdout_path`` per domain.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from crma_lightning.data.builtin_tasks import FAMILIES, PRETRAIN_FAMILIES, TASKS, task_rows
from crma_lightning.data.domains import BUILTIN_TASK_ROWS, DomainSpec, load_raw

from .splits import split_task_holdout

SUITES = ("domains", "tasks")
TASK_SUITE = ("first", "shift", "sort", "length")
"""The built-in task suite in ``configs/tasks.yaml``'s order."""
TASK_METRIC = {"name": "exact_match", "eval_rows": 64, "max_new_tokens": 8}
"""``configs/tasks.yaml``'s metric of every task (``eval_rows`` is capped by ``--max-eval-rows``)."""


def resolve_tasks(names: list[str] | None) -> list[str]:
    """Task names in training order (default: :data:`TASK_SUITE`); raises ``ValueError`` on a bad list."""
    chosen = list(names) if names else list(TASK_SUITE)
    unknown = [n for n in chosen if n not in TASKS or n == "copy"]
    if unknown:
        raise ValueError(
            f"unknown task(s) {unknown} for --suite tasks; expected built-in tasks among "
            f"{sorted(t for t in TASKS if t != 'copy')} ('copy' is what the base is pretrained on)"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--domains lists a task twice: {chosen}")
    if len(chosen) < 2:
        raise ValueError(f"forgetting needs at least two tasks, got {chosen}")
    return chosen


def task_specs(names: list[str], eval_rows: int) -> list[dict[str, Any]]:
    """``DomainSpec`` fields of the built-in tasks ``names`` (configs/tasks.yaml's, ``eval_rows`` prompts scored)."""
    metric = {**TASK_METRIC, "eval_rows": min(TASK_METRIC["eval_rows"], eval_rows)}
    return [{"name": n, "builtin": n, "metric": dict(metric)} for n in names]


def task_split_specs(specs: list[dict[str, Any]], split: str, cache_dir: Path) -> list[dict[str, Any]]:
    """The suite's domains evaluated on the ``split`` part of each task's held-out rows (protocol v3).

    ``full`` returns ``specs`` (built-in domains, every held-out row). ``test`` / ``dev`` turn each task
    into the same rows as prompt/response files - the training rows unchanged and in the same order, the
    held-out rows of :func:`splits.split_task_holdout` - which is what a user with their own dev/test
    files would configure (the library prepares both forms alike: ``tests/bench/test_task_suite_splits.py``).
    """
    if split == "full":
        return specs
    out = []
    for spec in specs:
        train, hold = _task_files(spec, cache_dir)
        part = split_task_holdout(hold, spec["name"], cache_dir)[split]
        fields = {"prompt_field": "prompt", "response_field": "response", "metric": dict(spec["metric"])}
        out.append({"name": spec["name"], "path": str(train), "holdout_path": str(part), **fields})
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none


def _task_files(spec: dict[str, Any], cache_dir: Path) -> tuple[Path, Path]:
    """A built-in task's training and held-out rows as prompt/response JSON Lines (the library's split)."""
    out = cache_dir / "data" / f"tasks-{BUILTIN_TASK_ROWS}" / spec["builtin"]
    train_file, hold_file = out / "train.jsonl", out / "holdout.jsonl"
    if not (train_file.is_file() and hold_file.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        train, holdout = load_raw(DomainSpec(name=spec["name"], builtin=spec["builtin"]))
        for path, ds in ((hold_file, holdout), (train_file, train)):
            _write_jsonl(path, [{"prompt": p, "response": r} for p, r in zip(ds["prompt"], ds["response"])])
    return train_file, hold_file


def multitask_specs(specs: list[dict[str, Any]], cache_dir: Path) -> list[dict[str, Any]]:
    """The MULTITASK setting's domains: each domain's held-out rows, every stage trained on the union.

    Args:
        specs: The benchmark's domains in training order (file domains with ``path``/``holdout_path``, or
            built-in tasks, which are written to ``cache_dir`` first as prompt/response files).
        cache_dir: Benchmark cache (built-in tasks' files).

    Returns:
        One spec per domain, same names, order and metric; ``path`` = every domain's training file(s).
    """
    files: list[tuple[str, str, dict[str, Any]]] = []  # (train, holdout, format fields) per domain
    for spec in specs:
        if spec.get("builtin"):
            train, hold = _task_files(spec, cache_dir)
            fields = {"prompt_field": "prompt", "response_field": "response"}
            files.append((str(train), str(hold), fields))
        else:
            fields = {k: spec[k] for k in ("prompt_field", "response_field", "text_field") if k in spec}
            train = spec["path"]
            if spec.get("max_examples") is not None:  # the union holds each domain's capped rows, not the first N
                train = str(_first_rows(Path(train), spec["max_examples"], cache_dir))
            files.append((train, spec["holdout_path"], fields))
    union = [train for train, _, _ in files]
    out = []
    for spec, (_, hold, fields) in zip(specs, files):
        joint = {"name": spec["name"], "path": union, "holdout_path": hold, **fields}
        if "metric" in spec:
            joint["metric"] = spec["metric"]
        out.append(joint)
    return out


def _first_rows(path: Path, count: int, cache_dir: Path) -> Path:
    """The first ``count`` records of a JSON Lines file (what ``max_examples`` keeps), written to the cache."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # content, not name: an edited file is rewritten
    out = cache_dir / "data" / "capped" / f"{path.parent.name}-{digest}-{count}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out, [json.loads(line) for line in lines])
    return out


def task_fingerprint() -> str:
    """SHA-256 of the rows the task suite's base is pretrained on (every pretraining-family task): its cache key."""
    rows = {t: task_rows(t, BUILTIN_TASK_ROWS) for f in PRETRAIN_FAMILIES for t in FAMILIES[f]}
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
