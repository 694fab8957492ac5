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
    "second": "d9382ab027d9a7e07b84f4263a2a355a0939d51dd1022049fe697a1e5d05097a",
    "third": "0a320ffa01394e6308149062d33f733938be9b1987a32fced588cb7c206b2155",
    "penultimate": "07676afe893c30a499e4fcb37512c9007752a0d637208b55e9f5bbab7b48bce9",
    "rotate_left": "eb4ca7f549bba66de3e81c841b011fd1ea86a53b1f547eac46146f9350a379d8",
    "rotate_right": "9182a9ba349b6f181c9a388edafb7fbfc20d2c5e9ce37663d7a4019b712bbe4d",
    "swap_ends": "2542b010d6965f2e5e3609e31a4857f7b5d3a45340d686d846c3669781fff552",
    "sort_desc": "7ad19b79e3441dff2b2efa00dfff03d07ab4780d12ccbc052f4213f2b3755989",
    "shift2": "841035c96cba6a41045d7418644f5975578685b0dcdc6812a671334123106563",
    "unshift": "50a66bb59f88634e92ba5a5ba67b092f7886e904ef33b73441b6f77659775118",
    "upper": "f6058df12b2e52f0464fff7eb004e90b3a04e1be5b49ae04793ef6d2800fd803",
    "mirror": "078046b9745d983528d41e45814bec7695ca927457818a4f1be5bf27ab4e81a5",
    "count_a": "3d8589301f309fbf9668127e4407efd13f74029b3bfaf7461aaa76dc1dab3761",
    "distinct": "91bac2e76c52e906f642406e74c9bdc916d12677600e03dbc4408f3bc12d3550",
    "vowels": "658518c05022e6c9d06d481c485a54996770b3c7c6953c2844df965d5914bd7f",
    "drop_first": "72bf85a80bdbc76672d1a0a606136ca95ac037122c32f67e01059092577dca51",
    "drop_last": "59a41166e9cc3c90d1b87575f0b2d1ce5f662c06f0240277fc900d29bfd31644",
    "double": "f4d036c4465c1f5fb6f54928f83a41bd167c4ee24c7d388f8f8264403b79b8d8",
    "repeat": "9f58ebb57a741bfccb6bc7e137c128626c611c2a945a4ba92e2202c834909bd9",
    "dedupe": "12d865e2fc04f8965e7b8b79ec57b1c835b248c2e4abcfc65d0add4adb4d2603",
    "has_c": "2d5d5a806147474d174cc444d91fd4816245e4baa7840f17ef8c7d0c6abea87a",
    "is_sorted": "6918ba6d5c8f978bd831a2fa1a6a5cb466f6b86e75b848906c0540803612e794",
    "same_ends": "73e89233207f91a4597d82047256957197f76a9a0e7f7b7580007f2b64da1ca3",
    "max_letter": "4698d1ee136c751fd1ac609aa0e0fe95b58fb4f2c2f7fc1dd535bd4024174fa2",
    "min_letter": "eead75450859c00aa5225902ed5fb51c6720b14d7021ccd50e1e8999cdf32b80",
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


def test_families_partition_the_tasks_and_the_suite_uses_only_held_out_families():
    from crma_lightning.data.builtin_tasks import FAMILIES, HELD_OUT_FAMILIES, PRETRAIN_FAMILIES

    members = [t for family in FAMILIES.values() for t in family]
    assert sorted(members) == sorted(TASKS) and len(members) == len(set(members))
    assert set(PRETRAIN_FAMILIES).isdisjoint(HELD_OUT_FAMILIES) and set(PRETRAIN_FAMILIES) | set(
        HELD_OUT_FAMILIES
    ) <= set(FAMILIES)
    held_out = {t for f in HELD_OUT_FAMILIES for t in FAMILIES[f]}
    from pathlib import Path

    import yaml

    root = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
    suite = yaml.safe_load((root / "configs" / "tasks.yaml").read_text())
    assert {d["builtin"] for d in suite["data"]["domains"]} <= held_out  # new to the pretrained base
