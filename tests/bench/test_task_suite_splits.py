"""The task suite's dev / test split (protocol v3): disjoint prompts, deterministic, and the test half is
exactly what the suite always scored, prepared by the library exactly as the built-in task is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.lib.splits import split_task_holdout
from benchmarks.lib.suites import multitask_specs, task_specs, task_split_specs
from crma_lightning.data.builtin_tasks import task_rows
from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.data.domains import BUILTIN_TASK_ROWS

TASKS = ["first", "shift", "sort", "length"]
HELD_OUT = 200  # BUILTIN_TASK_ROWS x the default holdout_fraction 0.1


def _records(path: str | Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _generated_holdout(task: str) -> list[dict[str, str]]:
    rows = task_rows(task, BUILTIN_TASK_ROWS)
    return [{"prompt": p, "response": r} for p, r in list(zip(rows["prompt"], rows["response"]))[:HELD_OUT]]


@pytest.mark.parametrize("task", TASKS)
def test_test_half_is_the_first_held_out_prompts_and_dev_shares_no_prompt(tmp_path, task):
    test, dev = (task_split_specs(task_specs([task], 64), split, tmp_path)[0] for split in ("test", "dev"))
    held = _generated_holdout(task)
    test_rows, dev_rows = _records(test["holdout_path"]), _records(dev["holdout_path"])
    assert test_rows == held[:100]  # in the generated order: the first 64 are the prompts scored since v1
    assert set(map(json.dumps, dev_rows)).isdisjoint(map(json.dumps, test_rows))
    assert [r for r in held[100:] if r not in test_rows] == dev_rows  # the second half, test prompts removed
    assert len(dev_rows) >= 64  # enough for the suite's 64 scored prompts
    # The training rows are the task's, unchanged and in order: the rows after the held-out ones.
    rows = task_rows(task, BUILTIN_TASK_ROWS)
    assert (
        _records(test["path"])
        == [{"prompt": p, "response": r} for p, r in zip(rows["prompt"], rows["response"])][HELD_OUT:]
    )


def test_a_repeated_prompt_goes_to_test_only_and_the_split_is_deterministic(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}", "response": "r"}) for i in (0, 1, 2, 3, 0, 4, 1, 5)]
    hold = tmp_path / "h.jsonl"
    hold.write_text("\n".join(lines) + "\n")
    parts = split_task_holdout(hold, "t", tmp_path / "c1")
    assert [r["prompt"] for r in _records(parts["test"])] == ["p0", "p1", "p2", "p3"]
    assert [r["prompt"] for r in _records(parts["dev"])] == ["p4", "p5"]
    again = split_task_holdout(hold, "t", tmp_path / "c2")
    assert all(parts[k].read_bytes() == again[k].read_bytes() for k in parts)
    hold.write_text("\n".join(lines[:4] + lines[:4]) + "\n")  # the second half repeats the first: no dev left
    with pytest.raises(ValueError, match=r"task 't': 8 held-out record\(s\) leave 4 test and 0 dev"):
        split_task_holdout(hold, "t", tmp_path / "c3")


def test_full_keeps_the_built_in_specs_and_multitask_evaluates_the_split(tmp_path):
    specs = task_specs(TASKS, 64)
    assert task_split_specs(specs, "full", tmp_path) == specs
    dev = task_split_specs(specs, "dev", tmp_path)
    joint = multitask_specs(dev, tmp_path)
    assert [j["holdout_path"] for j in joint] == [d["holdout_path"] for d in dev]
    assert all(j["path"] == [d["path"] for d in dev] for j in joint)  # every stage trains on the union
    assert all(j["metric"] == s["metric"] for j, s in zip(joint, specs))


def _prepared(domains: list, tmp_path: Path) -> SequentialDomainDataModule:
    dm = SequentialDomainDataModule(
        domains, tokenizer="byte", max_length=32, packing=False, max_eval_rows=64, cache_dir=str(tmp_path / "tok")
    )
    dm.prepare()
    return dm


def test_the_test_split_is_prepared_exactly_as_the_built_in_task(tmp_path):
    """Protocol v3's test numbers on the suite are comparable with v1/v2's: same training and scored rows."""
    specs = task_specs(["sort"], 64)
    built_in, files = _prepared(specs, tmp_path), _prepared(task_split_specs(specs, "test", tmp_path), tmp_path)
    for attr in ("train_sets", "eval_sets"):
        a, b = getattr(built_in, attr)["sort"], getattr(files, attr)["sort"]
        assert len(a) == len(b) > 0
        for column in a.column_names:
            assert a[column] == b[column], (attr, column)  # unpacked rows: ragged lists of ids
    assert built_in.score_rows["sort"] == files.score_rows["sort"]
    assert len(built_in.score_rows["sort"]) == 64
