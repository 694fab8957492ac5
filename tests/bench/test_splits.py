"""Dev / test split of held-out files (benchmarks/lib/splits.py): disjoint, deterministic, by document."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.lib.splits import dev_records, split_holdout, with_eval_split


def _write(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _specs(root: Path, domains: dict[str, list[str]]) -> list[dict]:
    return [
        {
            "name": n,
            "path": str(_write(root / n / "train.jsonl", ["t"])),
            "holdout_path": str(_write(root / n / "holdout.jsonl", t)),
        }
        for n, t in domains.items()
    ]


def test_parts_are_disjoint_whole_documents_in_file_order(tmp_path):
    texts = [f"document {i} " + "x" * i for i in range(21)]
    holdout = _write(tmp_path / "a" / "holdout.jsonl", texts)
    parts = split_holdout(holdout, "a", tmp_path / "cache")
    dev, test = _lines(parts["dev"]), _lines(parts["test"])
    assert not set(dev) & set(test)
    # Every record lands whole on exactly one side (no document straddles), in the file's order.
    assert sorted(dev + test) == sorted(_lines(holdout))
    order = _lines(holdout)
    assert dev == [r for r in order if r in dev] and test == [r for r in order if r in test]
    assert len(dev) == round(0.5 * 21)  # round half to even: 10 of 21


def test_split_is_deterministic_and_independent_of_row_order(tmp_path):
    texts = [f"doc {i}" for i in range(40)]
    first = split_holdout(_write(tmp_path / "a" / "holdout.jsonl", texts), "a", tmp_path / "c1")
    again = split_holdout(_write(tmp_path / "b" / "holdout.jsonl", texts), "a", tmp_path / "c2")
    assert _lines(first["dev"]) == _lines(again["dev"])
    shuffled = texts[:]
    random.Random(3).shuffle(shuffled)
    moved = split_holdout(_write(tmp_path / "s" / "holdout.jsonl", shuffled), "a", tmp_path / "c3")
    assert set(_lines(moved["dev"])) == set(_lines(first["dev"]))
    # The rule itself, pinned (sha256 keys): these 40 documents give this dev set on every machine.
    dev = sorted(int(json.loads(r)["text"].split()[1]) for r in _lines(first["dev"]))
    assert dev == [0, 1, 7, 8, 9, 10, 12, 13, 15, 16, 17, 24, 25, 26, 30, 31, 33, 34, 36, 37]


def test_domain_split_ignores_the_other_domains(tmp_path):
    a = [f"alpha {i}" for i in range(12)]
    b = [f"beta {i}" for i in range(9)]
    one = with_eval_split(_specs(tmp_path / "r1", {"a": a, "b": b}), "test", tmp_path / "cache1")
    b_shuffled = [*b[::-1], "beta extra"]
    two = with_eval_split(_specs(tmp_path / "r2", {"b": b_shuffled, "a": a}), "test", tmp_path / "cache2")
    a1 = next(s for s in one if s["name"] == "a")
    a2 = next(s for s in two if s["name"] == "a")
    assert Path(a1["holdout_path"]).read_bytes() == Path(a2["holdout_path"]).read_bytes()
    assert a1["path"].endswith("train.jsonl")  # training files untouched
    dev = with_eval_split(_specs(tmp_path / "r1", {"a": a, "b": b}), "dev", tmp_path / "cache1")
    assert not set(_lines(Path(dev[0]["holdout_path"]))) & set(_lines(Path(one[0]["holdout_path"])))
    assert with_eval_split(one, "full", tmp_path / "cache1") == one


def test_duplicates_stay_together_and_too_small_files_are_refused(tmp_path):
    texts = ["same", "other", "same", "third", "same"]
    parts = split_holdout(_write(tmp_path / "d" / "holdout.jsonl", texts), "d", tmp_path / "cache")
    dev, test = _lines(parts["dev"]), _lines(parts["test"])
    assert len(set(dev)) == 2 and len(set(test)) == 1  # round(0.5 * 3 distinct) = 2 distinct records in dev
    same = json.dumps({"text": "same"})
    assert (dev.count(same), test.count(same)) in ((3, 0), (0, 3))  # repeats never straddle the split
    with pytest.raises(ValueError, match=r"domain 'solo': its held-out file has 1 distinct record"):
        dev_records(['{"text": "only"}'] * 4, domain="solo")
    with pytest.raises(ValueError, match="--eval-split"):
        with_eval_split([{"name": "x", "path": "t.jsonl", "holdout_path": None}], "dev", tmp_path)
    with pytest.raises(ValueError, match="expected one of"):
        with_eval_split([], "validation", tmp_path)
