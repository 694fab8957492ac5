"""The built-in task suite: the same rows on every run, platform and Python version; the answers are right."""

from __future__ import annotations

import hashlib
import json

import pytest

from crma_lightning.data.builtin_tasks import ALPHABET, TASKS, task_rows, words
from crma_lightning.data.domains import BUILTIN_TASK_ROWS, as_domain_spec, load_raw

DIGESTS = {
    "copy": "48d1de39ff279309c753b79b031dfe379fedef4328d9c0d71a3f8e982ab2e872",
    "first": "a6ebb433898046be130ec2fe92080edda9f2d51ee47b31422724879195660dc0",
    "last": "428f0612645a676d571ea93262089d50154a6e9bb0f6f36954caf1ced65777e8",
    "length": "9973d708971e5f8c2abb83166cd1c2f2934ef5f97dd89fa5c7ac675ec8b4bf57",
    "reverse": "e70fe25027f793e1b4e48ca2e296b68e971fd8ad4b924018f3fea25c1341c903",
    "shift": "fb0d5dd445ac8a3467d000fe8979d41141319f05fb3b435af25347961773c04e",
    "sort": "d5ed32c13e23663fb6db3aa17bf0c72986e8c5a2d31fb3748205836927a5f98e",
}
"""sha256 of each task's 2000 rows (JSON, sorted keys), computed once: any change to the generator shows here."""


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_generates_the_pinned_rows(task):
    rows = task_rows(task, BUILTIN_TASK_ROWS)
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() == DIGESTS[task]


def test_answers_are_the_tasks_mappings():
    w = "hcfa"
    assert [TASKS[t][1](w) for t in ("first", "last", "length", "reverse", "shift", "sort")] == [
        "h",
        "a",
        "4",
        "afch",
        "adgb",
        "acfh",
    ]
    rows = task_rows("sort", 50)
    for prompt, response in zip(rows["prompt"], rows["response"]):
        word = prompt.removeprefix("sort ").removesuffix("\n= ")
        assert response == "".join(sorted(word)) + "\n" and set(word) <= set(ALPHABET) and 3 <= len(word) <= 5


def test_words_cover_the_alphabet_and_lengths_evenly():
    ws = words(7, 4000)
    letters = "".join(ws)
    shares = [letters.count(c) / len(letters) for c in ALPHABET]
    assert max(shares) - min(shares) < 0.02
    assert {len(w) for w in ws} == {3, 4, 5}


def test_a_task_name_is_a_masked_domain_scored_by_exact_match_with_the_first_rows_held_out():
    spec = as_domain_spec("shift")
    assert (spec.prompt_field, spec.response_field, spec.metric) == ("prompt", "response", "exact_match")
    train, holdout = load_raw(spec)
    assert len(holdout) == round(BUILTIN_TASK_ROWS * spec.holdout_fraction) and len(train) + len(holdout) == 2000
    assert holdout["prompt"] == task_rows("shift", len(holdout))["prompt"]
    custom = as_domain_spec({"name": "s", "builtin": "sort", "metric": {"name": "token_f1"}})
    assert custom.metric == {"name": "token_f1"}
