"""Domains, sources, tokenisation/packing, samplers and the DataModule's contract."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from crma_lightning.data.builtin_domains import BUILTIN_DOMAINS, builtin_documents
from crma_lightning.data.datamodule import DomainSpec, SequentialDomainDataModule
from crma_lightning.data.sampling import EvalShardSampler, GlobalBatchSampler
from crma_lightning.data.tokenizer import byte_tokenizer


def _rows(n: int, prefix: str) -> list[dict]:
    return [{"text": f"{prefix} example number {i} " * 6, "other": i} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _dm(domains, **kw):
    kw.setdefault("max_length", 32)
    kw.setdefault("batch_size", 2)
    return SequentialDomainDataModule(domains=domains, tokenizer="byte", **kw)


def test_builtin_domains_are_deterministic_distinct_and_large_enough():
    sizes = {}
    for name in BUILTIN_DOMAINS:
        first = builtin_documents(name, max_chars=50_000)
        assert first == builtin_documents(name, max_chars=50_000)
        assert sum(map(len, first)) >= 40_000, name
        sizes[name] = first
    # Clearly different: the byte histograms of the domains differ a lot.
    hist = {}
    for name, docs in sizes.items():
        counts = torch.bincount(torch.tensor(list("".join(docs).encode())), minlength=256).float()
        hist[name] = counts / counts.sum()
    names = sorted(hist)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert 0.5 * (hist[a] - hist[b]).abs().sum() > 0.15, (a, b)  # total variation distance


# sha256 of the built-in domains' documents ("\x1e"-joined UTF-8), written down here independently of
# the module's own FROZEN_SHA256: the frozen text must never change silently (the README's numbers
# are measured on it). The 200k hashes are the demo's size (configs/demo.yaml), which CPython 3.11
# produced from its stdlib before the text was frozen.
FROZEN_ALL = {
    "prose": "f8afa9f772a106f9028632ccc0bf7a986c616ad1c221b1f70153c09eda6c080b",
    "code": "3dbf92f1de8987b794aba07673df8a237bfc112bc2f20eff014e36f1519efe34",
    "arithmetic": "9fcafb03722410871c417d6fa7a809360c5c427452529c5b6fd54e4e49a2758e",
    "unicode": "df4eebbd29e9fa4ce70c76499ff6cd4692544f2508bc56a005fac0dc6da3f55b",
}
FROZEN_DEMO_200K = {
    "prose": "d0af088a021f58a356e1f172f49df65a8ca97b27ab75e694e829cfab7efe8804",
    "code": "0f89104669d161281f47bf4822a827a3b867abe4340aaff438b7e9a7ecc5dc0b",
    "arithmetic": "2f191b88d9cdac72c7496f20e3480d7538973c04bc2256fc5e97f95f9d83319b",
    "unicode": "7c26dab63e41350e93f6f6e3317244f10193d6967114550328d06d0d03b35940",
}


def _sha(docs):
    return hashlib.sha256("\x1e".join(docs).encode("utf-8")).hexdigest()


def test_builtin_domains_are_the_frozen_text_on_every_python():
    from crma_lightning.data import builtin_domains

    assert sorted(BUILTIN_DOMAINS) == sorted(FROZEN_ALL)
    texts = {}
    for name in BUILTIN_DOMAINS:
        everything = builtin_documents(name)
        assert _sha(everything) == FROZEN_ALL[name] == builtin_domains.FROZEN_SHA256[name], name
        assert _sha(builtin_documents(name, 200_000)) == FROZEN_DEMO_200K[name], name
        # Every cap up to the frozen size is a prefix, as the stdlib generators gave it.
        assert sum(map(len, everything)) >= builtin_domains.FROZEN_CHARS, name
        assert builtin_documents(name, 400_000) == everything, name
        assert builtin_documents(name, 10**9) == everything, name
        assert all(d.strip() for d in everything), name
        texts[name] = "".join(everything)
    assert len(set(texts.values())) == len(texts)  # four different domains


def test_builtin_domains_never_read_the_running_pythons_stdlib(monkeypatch):
    from crma_lightning.data import builtin_domains

    # If loading fell back to the generators (which read pydoc_data, unicodedata, ...), these would run.
    def forbidden():
        raise AssertionError("a stdlib generator ran")

    monkeypatch.setattr(builtin_domains, "_GENERATORS", dict.fromkeys(builtin_domains._GENERATORS, forbidden))
    builtin_domains._frozen.cache_clear()
    try:
        assert _sha(builtin_documents("unicode")) == FROZEN_ALL["unicode"]
    finally:
        builtin_domains._frozen.cache_clear()


def test_corrupt_frozen_data_is_refused(monkeypatch):
    from crma_lightning.data import builtin_domains

    monkeypatch.setitem(builtin_domains.FROZEN_SHA256, "prose", "0" * 64)
    builtin_domains._frozen.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="does not match its pinned sha256"):
            builtin_documents("prose")
    finally:
        monkeypatch.undo()
        builtin_domains._frozen.cache_clear()


def test_frozen_files_are_package_data():
    """Each frozen file is matched by pyproject's package-data, so wheels (not only editable installs) ship it."""
    import fnmatch
    from pathlib import Path

    from crma_lightning.data import builtin_domains

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = Path(builtin_domains.__file__).parent
    for name in BUILTIN_DOMAINS:
        rel = "/".join((*builtin_domains.FROZEN_DIR, f"{name}.json.xz"))
        assert (package / rel).is_file(), rel
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns["crma_lightning.data"]), rel
    total = sum(p.stat().st_size for p in package.joinpath(*builtin_domains.FROZEN_DIR).glob("*.json.xz"))
    assert total < 400_000  # small: a few hundred KB in the repository


def test_each_local_source_kind_loads(tmp_path):
    import pandas as pd

    rows = _rows(40, "alpha")
    jsonl = _write_jsonl(tmp_path / "a.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("\n".join(r["text"] for r in rows))
    (tmp_path / "e.json").write_text(json.dumps(rows))
    specs = [
        {"name": "jsonl", "path": jsonl},
        {"name": "csv", "path": str(tmp_path / "b.csv")},
        {"name": "parquet", "path": str(tmp_path / "c.parquet")},
        {"name": "txt", "path": str(tmp_path / "d.txt")},
        {"name": "json", "path": str(tmp_path / "e.json")},
        {"name": "builtin", "builtin": "arithmetic"},
    ]
    dm = _dm(specs, max_chars_per_domain=5000)
    dm.prepare()
    for name in dm.domain_names:
        assert len(dm.train_sets[name]) > 0 and len(dm.eval_sets[name]) > 0, name
        # Packed training rows are exactly max_length tokens long.
        assert {len(x) for x in dm.train_sets[name]["input_ids"]} == {32}, name


def test_template_and_explicit_holdout(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"q": f"question {i}?", "a": f"answer {i}."} for i in range(60)])
    hold = _write_jsonl(tmp_path / "h.jsonl", [{"q": "held?", "a": "out."}] * 5)
    dm = _dm([{"name": "qa", "path": train, "holdout_path": hold, "template": "Q: {q}\nA: {a}"}])
    dm.prepare()
    tok = byte_tokenizer()
    held_text = tok.decode(dm.eval_sets["qa"][0]["input_ids"])
    assert held_text.startswith("Q: held?\nA: out.")


def test_holdout_fraction_is_fixed_seed_and_disjoint(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"text": f"document {i} " * 5} for i in range(100)])
    a, b = _dm([{"name": "x", "path": path, "holdout_fraction": 0.2}], packing=False), None
    a.prepare()
    b = _dm([{"name": "x", "path": path, "holdout_fraction": 0.2}], packing=False)
    b.prepare()
    assert a.eval_sets["x"]["input_ids"] == b.eval_sets["x"]["input_ids"]
    assert len(a.eval_sets["x"]) == 20 and len(a.train_sets["x"]) == 80
    train_texts = {tuple(x) for x in a.train_sets["x"]["input_ids"]}
    assert not train_texts & {tuple(x) for x in a.eval_sets["x"]["input_ids"]}


def test_collated_labels_mask_padding():
    dm = _dm(["arithmetic"], packing=False, max_chars_per_domain=3000)
    dm.prepare()
    loader = dm.val_dataloader()[0]
    batch = next(iter(loader))
    assert batch["domain"] == "arithmetic"
    pad = batch["attention_mask"] == 0
    assert torch.all(batch["labels"][pad] == -100)
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])


def test_stage_selects_train_domain_and_seen_validation():
    dm = _dm(["prose", "code", "arithmetic"], max_chars_per_domain=4000)
    dm.prepare()
    dm.set_stage(1)
    assert next(iter(dm.train_dataloader()))["domain"] == "code"
    assert [next(iter(dl))["domain"] for dl in dm.val_dataloader()] == ["prose", "code"]
    with dm.evaluating_all_domains():
        assert len(dm.val_dataloader()) == 3
    dm_all = _dm(["prose", "code", "arithmetic"], max_chars_per_domain=4000, eval_domains="all")
    assert dm_all.eval_domain_names(0) == ["prose", "code", "arithmetic"]
    state = dm.state_dict()
    other = _dm(["prose", "code", "arithmetic"])
    other.load_state_dict(state)
    assert other.stage == 1
    with pytest.raises(ValueError, match="domains"):
        _dm(["prose", "code"]).load_state_dict(state)


def test_global_batches_match_across_world_sizes_and_resume():
    data = list(range(50))
    single = list(GlobalBatchSampler(data, batch_size=8, num_replicas=1, rank=0, seed=3))
    r0 = list(GlobalBatchSampler(data, batch_size=4, num_replicas=2, rank=0, seed=3))
    r1 = list(GlobalBatchSampler(data, batch_size=4, num_replicas=2, rank=1, seed=3))
    for i in range(len(single) // 8):
        assert sorted(single[i * 8 : (i + 1) * 8]) == sorted(r0[i * 4 : (i + 1) * 4] + r1[i * 4 : (i + 1) * 4])
    resumed = GlobalBatchSampler(data, batch_size=8, seed=3)
    resumed.skip_batches(2)
    assert list(resumed) == single[16:]
    assert list(resumed) == single  # the skip applies to one iteration only
    shards = [list(EvalShardSampler(list(range(7)), 2, r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # every example exactly once, no padding


@pytest.mark.parametrize(
    ("domains", "match"),
    [
        ([{"name": "x", "source": "s3"}], r"unknown keys \['source'\]"),
        ([{"name": "x", "builtin": "klingon"}], r"unknown built-in domain 'klingon'"),
        ([{"name": "x"}], "exactly one source"),
        (["prose", "prose"], "duplicate domain name 'prose'"),
        ([{"name": "a b", "builtin": "prose"}], "domain name 'a b' is invalid"),
        ([{"name": "x", "builtin": "prose", "holdout_fraction": 1.5}], r"holdout_fraction=1.5"),
        ([{"name": "x", "builtin": "prose", "max_steps": 0}], r"max_steps=0"),
        ([], "no domains"),
    ],
)
def test_bad_domain_specs_fail_at_construction(domains, match):
    with pytest.raises(ValueError, match=match):
        _dm(domains)


def test_missing_text_field_lists_existing_fields(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"body": "hello there " * 5, "id": i} for i in range(20)])
    dm = _dm([{"name": "x", "path": path}])
    with pytest.raises(ValueError, match=r"no text field 'text'.*\['body', 'id'\]"):
        dm.prepare()


def test_empty_domain_after_filtering(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "   "} for _ in range(20)])
    with pytest.raises(ValueError, match=r"domain 'x'.*no non-empty text"):
        _dm([{"name": "x", "path": path}]).prepare()


def test_bad_files_name_domain_file_and_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="does not exist"):
        _dm([{"name": "x", "path": str(missing)}]).prepare()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"domain 'x': file .*empty.jsonl is empty"):
        _dm([{"name": "x", "path": str(empty)}]).prepare()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"domain 'x': .*bad.jsonl line 2 is not valid UTF-8"):
        _dm([{"name": "x", "path": str(bad)}]).prepare()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 2 is not valid JSON"):
        _dm([{"name": "x", "path": str(broken)}]).prepare()


def test_domain_smaller_than_one_batch_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "tiny " * 10} for _ in range(10)])
    dm = _dm([{"name": "x", "path": path}], batch_size=64, max_length=16)
    dm.prepare()
    with pytest.raises(ValueError, match=r"domain 'x' has \d+ training rows .* fewer than one global batch"):
        dm.check_batches(world_size=1)


def test_non_string_text_names_the_row(tmp_path):
    rows = [{"text": "good text " * 4} for _ in range(10)] + [{"text": 42}]
    path = _write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(ValueError, match=r"row \d+: field 'text' is int"):
        _dm([{"name": "x", "path": path, "holdout_fraction": 0.01}]).prepare()


def test_tokenized_cache_is_reused(tmp_path):
    cache = tmp_path / "cache"
    a = _dm(["arithmetic"], max_chars_per_domain=4000, cache_dir=str(cache))
    a.prepare()
    files = sorted(p.name for p in cache.iterdir())
    assert sum(f.startswith("tokens-") for f in files) == 2  # train + holdout token tables
    b = _dm(["arithmetic"], max_chars_per_domain=4000, cache_dir=str(cache))
    b.prepare()
    assert sorted(p.name for p in cache.iterdir()) == files
    assert a.train_sets["arithmetic"]["input_ids"] == b.train_sets["arithmetic"]["input_ids"]


def test_domain_spec_source_strings():
    assert "built-in" in DomainSpec(name="a", builtin="prose").source()
    assert "hub dataset 'org/ds'" in DomainSpec(name="a", hub="org/ds").source()


def test_mid_epoch_resume_counts_rows_and_refuses_a_changed_global_batch():
    from crma_lightning.data.sampling import ResumableLoader

    data = list(range(64))

    def loader(batch, progress=(0, 3)):
        return ResumableLoader(
            data, batch_size=batch, sampler=GlobalBatchSampler(data, batch), progress=lambda: progress
        )

    state = loader(8).state_dict()
    assert state == {"epoch": 0, "batches": 3, "rows": 24}
    same = loader(8)
    same.load_state_dict(state)
    assert next(iter(same.sampler)) == list(GlobalBatchSampler(data, 8))[24]  # continues at row 24
    doubled = loader(4)
    doubled.load_state_dict(state)  # 24 rows = 6 batches of 4: the same data is skipped
    assert len(list(doubled.sampler)) == 64 - 24
    with pytest.raises(ValueError, match="consumed 24 rows, not a whole number of global batches of 16"):
        loader(16).load_state_dict(state)


def test_hub_accepts_a_local_dataset_directory_and_save_to_disk_directories(tmp_path):
    from datasets import Dataset, DatasetDict

    from crma_lightning.data.domains import load_raw

    rows = {"text": [f"row {i} " * 5 for i in range(30)]}
    (tmp_path / "files").mkdir()
    _write_jsonl(tmp_path / "files" / "train.jsonl", [{"text": t} for t in rows["text"]])
    train, holdout = load_raw(DomainSpec(name="d", hub=str(tmp_path / "files")))
    assert len(train) + len(holdout) == 30  # a directory of data files, read by load_dataset
    DatasetDict(
        {"train": Dataset.from_dict(rows), "test": Dataset.from_dict({"text": ["held out " * 5] * 4})}
    ).save_to_disk(str(tmp_path / "dict"))
    train, holdout = load_raw(DomainSpec(name="d", hub=str(tmp_path / "dict"), holdout_split="test"))
    assert len(train) == 30 and holdout["text"] == ["held out " * 5] * 4
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    train, holdout = load_raw(DomainSpec(name="d", hub=str(tmp_path / "one"), holdout_fraction=0.2))
    assert (len(train), len(holdout)) == (24, 6)
    with pytest.raises(ValueError, match=r"holds one split .* holdout_split='test'"):
        load_raw(DomainSpec(name="d", hub=str(tmp_path / "one"), holdout_split="test"))
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_raw(DomainSpec(name="d", hub=str(tmp_path / "dict"), holdout_split="validation"))


def test_the_data_modules_own_tokenizer_must_be_the_models():
    from crma_lightning.data.tokenizer import byte_tokenizer

    model_tokenizer = byte_tokenizer()
    _dm(["arithmetic"], max_chars_per_domain=4000).prepare(model_tokenizer)  # "byte" twice: the same tokenizer
    other = byte_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    dm = SequentialDomainDataModule(domains=["arithmetic"], tokenizer=other, max_chars_per_domain=4000)
    with pytest.raises(ValueError, match=r"is not the model's tokenizer \(260 tokens vs the model's 259\)"):
        dm.prepare(model_tokenizer)
    assert not dm.train_sets  # refused before anything was tokenised
