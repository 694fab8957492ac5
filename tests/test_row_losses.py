"""Per-row held-out numbers (``DomainEvaluation(row_losses=True)``, ``heldout_rows.json``): they add up to the
loss and score matrices, cover every held-out row once, shard like evaluation does, and cost nothing when off."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA_CONFIG

from crma_lightning.callbacks.evaluation import DomainEvaluation
from crma_lightning.callbacks.row_losses import ROW_LOSSES_FILE, RowLosses, read_row_losses, row_documents
from crma_lightning.data import SequentialDomainDataModule
from crma_lightning.module import ContinualLM
from crma_lightning.runner import ContinualRunner

TRAINER = {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False, "enable_model_summary": False}
DOMAINS = [
    {"name": "prose", "builtin": "prose"},
    {"name": "first", "builtin": "first", "metric": {"name": "exact_match", "eval_rows": 5, "max_new_tokens": 3}},
]


def _run(tmp_path, name, callbacks):
    model = ContinualLM(model_config=TINY_LLAMA_CONFIG, optimizer=partial(torch.optim.AdamW, lr=0.01))
    dm = SequentialDomainDataModule(
        domains=DOMAINS, max_length=32, batch_size=4, eval_batch_size=3, max_chars_per_domain=4000, max_eval_rows=7
    )
    runner = ContinualRunner(run_dir=tmp_path / name, trainer_kwargs=dict(TRAINER), callbacks=callbacks)
    return runner.run(model, dm), dm


def test_row_numbers_add_up_to_the_matrices_and_default_runs_write_none(tmp_path):
    report, dm = _run(tmp_path, "rows", [DomainEvaluation(row_losses=True)])
    data = read_row_losses(tmp_path / "rows")
    assert data["domains"] == ["prose", "first"] and sorted(data["rows"]) == ["0", "1", "2"]
    matrix = report["loss_matrix"]["values"]
    for s, row in data["rows"].items():
        for j, domain in enumerate(data["domains"]):
            if matrix[int(s)][j] is None:
                assert domain not in row  # not evaluated after this stage (a future domain)
                continue
            sums, tokens = row[domain]["loss_sum"], row[domain]["tokens"]
            assert len(sums) == len(tokens) == len(dm.eval_sets[domain])  # every held-out row, once
            assert all(t > 0 for t in tokens)
            assert sum(sums) / sum(tokens) == pytest.approx(matrix[int(s)][j], rel=1e-6)
    for domain in data["domains"]:  # the document each row starts in: from 0, never going back
        docs = data["documents"][domain]
        assert len(docs) == len(dm.eval_sets[domain]) and docs[0] == 0
        assert docs == sorted(docs)
    scores = report["score_matrix"]["values"]
    assert sorted(data["scores"]) == ["0", "2"]  # 'first' is scored before training and once it is trained
    for s, per_domain in data["scores"].items():
        per_row = per_domain["first"]
        assert len(per_row) == 5 and set(per_row) <= {0.0, 1.0}
        assert sum(per_row) / 5 == pytest.approx(scores[int(s)][1])
    # Off (the default): the same run writes no rows file, and validation returns no per-row outputs.
    plain, _ = _run(tmp_path, "plain", None)
    assert not (tmp_path / "plain" / ROW_LOSSES_FILE).exists()
    assert plain["loss_matrix"]["values"] == matrix  # the per-row reduction does not change the matrix


def test_shards_of_ranks_give_the_single_process_rows():
    """Two ranks' contiguous shards (and a padding batch after the shorter one) reassemble to the rows."""
    n = 5
    rows = torch.arange(n, dtype=torch.float64) + 0.5
    tokens = torch.tensor([3, 4, 5, 6, 7])
    datamodule = SimpleNamespace(eval_sets={"d": list(range(n))})
    parts = []
    # shard_bounds(5, 2, r): rank 0 rows [0, 2), rank 1 rows [2, 5); batches of 2, so rank 0 gets a padding batch.
    for rank, batches in enumerate([[(0, 2), (0, 2)], [(2, 4), (4, 5)]]):
        trainer = SimpleNamespace(datamodule=datamodule, world_size=2, global_rank=rank)
        rec = RowLosses()
        for a, b in batches:
            rec.add(trainer, "d", rows[a:b], tokens[a:b])
        trainer.strategy = SimpleNamespace(reduce=lambda t, reduce_op: t)  # each rank's own vector
        parts.append(rec.gather(trainer, ["d"], torch.device("cpu"))["d"])
    total = [a + b for a, b in zip(parts[0]["loss_sum"], parts[1]["loss_sum"])]
    assert total == rows.tolist()
    assert [a + b for a, b in zip(parts[0]["tokens"], parts[1]["tokens"])] == tokens.tolist()
    assert parts[0]["loss_sum"][2:] == [0.0, 0.0, 0.0] and parts[1]["loss_sum"][:2] == [0.0, 0.0]


def test_a_file_that_is_not_a_rows_file_is_refused(tmp_path):
    (tmp_path / ROW_LOSSES_FILE).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a held-out rows file"):
        read_row_losses(tmp_path)


def test_row_documents_count_the_eos_tokens_before_each_row():
    eos = 9
    # Packed rows: doc 0 ends in row 0, doc 1 fills rows 1-2 and ends at row 2's start, doc 2 ends in row 2.
    rows = [[1, 2, eos, 3], [4, 5, 6, 7], [eos, 8, eos, 1], [2]]
    assert row_documents(rows, eos) == [0, 1, 1, 3]
    assert row_documents([[1, eos], [2, eos]], eos) == [0, 1]  # unpacked rows: one text each
    assert row_documents(rows, None) == [0, 1, 2, 3]  # no EOS: every row its own document


def test_rows_missing_from_the_per_row_numbers_are_refused(tmp_path, monkeypatch):
    """A row the per-row pass never saw (here: every batch's last row dropped) would be a zero-token bootstrap
    unit: refused with the domain named, instead of a silently wrong interval."""
    original = RowLosses.add

    def drop_last(self, trainer, domain, loss_sums, tokens):
        original(self, trainer, domain, loss_sums[:-1], tokens[:-1])

    monkeypatch.setattr(RowLosses, "add", drop_last)
    with pytest.raises(RuntimeError, match=r"domain 'prose' per-row tokens sum to \d+, the evaluation counted"):
        _run(tmp_path, "short", [DomainEvaluation(row_losses=True)])
