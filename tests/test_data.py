"""Domains, sources, tokenisation/packing, samplers and the DataModule's contract."""

from __future__ import annotations

import json

import pytest
import torch

from crma_lightning.builtin_domains import BUILTIN_DOMAINS, builtin_documents
from crma_lightning.data import DomainSpec, SequentialDomainDataModule
from crma_lightning.sampling import EvalShardSampler, GlobalBatchSampler
from crma_lightning.tokenizer import byte_tokenizer


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
    from crma_lightning.sampling import ResumableLoader

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
