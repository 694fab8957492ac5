"""Per-row held-out numbers (``DomainEvaluation(row_losses=True)``, ``heldout_rows.json``): they add up to the
loss and score matrices, cover every held-out row once, shard like evaluation does, and cost nothing when off."""

from __future__ import annotations

import warnings
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
from crma_lightning.callbacks.row_losses import ROW_LOSSES_FILE, RowLosses, read_row_losses, row_documents
from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.run.runner import ContinualRunner

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


# ---------------------------------------------------------------------- the routed evaluation's rows
ROUTED_DOMAINS = [{"name": "prose", "builtin": "prose"}, {"name": "arithmetic", "builtin": "arithmetic"}]


def _routed_run(run_dir, callbacks=(), **runner_kwargs):
    model = ContinualLM(
        model_config=TINY_LLAMA_CONFIG, task_adapters="per_task", optimizer=partial(torch.optim.AdamW, lr=0.01)
    )
    dm = SequentialDomainDataModule(
        domains=ROUTED_DOMAINS, max_length=32, batch_size=4, eval_batch_size=3, max_chars_per_domain=4000,
        max_eval_rows=7,
    )  # fmt: skip
    callbacks = [DomainEvaluation(row_losses=True), RoutedEvaluation(mode="perplexity", prefix_tokens=8), *callbacks]
    trainer = {**TRAINER, "max_steps": 3}
    runner = ContinualRunner(run_dir=run_dir, trainer_kwargs=trainer, callbacks=callbacks, **runner_kwargs)
    return runner.run(model, dm), dm


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("routed") / "run"
    report, dm = _routed_run(run_dir, resume="never")
    return run_dir, report, dm


def test_routed_rows_add_up_to_the_routed_matrices_and_the_accuracy(routed_run):
    run_dir, report, dm = routed_run
    data = read_row_losses(run_dir)
    routing = report["routing"]
    assert data["routing"] == {"mode": "perplexity", "prefix_tokens": 8, "fallback_margin": None}
    assert sorted(data["routed"]) == ["0", "1", "2"]
    for s, row in data["routed"].items():
        s = int(s)
        for j, domain in enumerate(data["domains"]):
            if routing["loss_matrix_routed"][s][j] is None:
                assert domain not in row
                continue
            cell = row[domain]
            assert len(cell["loss_sum"]) == len(cell["tokens"]) == len(cell["correct"]) == len(dm.eval_sets[domain])
            # Targets at positions >= P only: fewer than the oracle rows' (all positions), for every row.
            assert all(t < u for t, u in zip(cell["tokens"], data["rows"][str(s)][domain]["tokens"]))
            tokens = sum(cell["tokens"])
            assert sum(cell["loss_sum"]) / tokens == pytest.approx(routing["loss_matrix_routed"][s][j], rel=1e-6)
            oracle = routing["loss_matrix_oracle_same_targets"][s][j]
            if oracle is None:
                assert cell["oracle_loss_sum"] is None
            else:
                assert sum(cell["oracle_loss_sum"]) / tokens == pytest.approx(oracle, rel=1e-6)
            accuracy = routing["routing_accuracy"][s][j]
            if accuracy is None:  # the base row and domains not trained yet: no right or wrong choice
                assert set(cell["correct"]) == {None}
            else:
                flags = [c for c in cell["correct"] if c is not None]
                assert set(flags) <= {True, False} and sum(flags) / len(flags) == pytest.approx(accuracy)
    # Stage 1 has one candidate (prose's adapter): every prose row is routed right, and routed = oracle.
    first = data["routed"]["1"]["prose"]
    assert all(first["correct"]) and first["loss_sum"] == first["oracle_loss_sum"]
    assert data["routed"]["0"]["prose"]["oracle_loss_sum"] == data["routed"]["0"]["prose"]["loss_sum"]  # the base


def test_routed_rows_survive_a_mid_stage_resume(tmp_path, routed_run):
    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.current_task == "arithmetic" and trainer.global_step == 2:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _routed_run(tmp_path / "run", [Crash()], checkpoint_every_n_steps=1)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in last["callbacks"].items() if "RoutedEvaluation" in k)
    assert sorted(state["row_table"]) == [0, 1]  # the base row and stage 1's: in the mid-stage checkpoint
    assert state["prefix_targets"] == "tokens"  # marks checkpoints whose perplexity routing reads the tokens
    _routed_run(tmp_path / "run", checkpoint_every_n_steps=1)
    resumed, whole = read_row_losses(tmp_path / "run"), read_row_losses(routed_run[0])
    assert resumed["routed"] == whole["routed"] and resumed["rows"] == whole["rows"]
    assert resumed["routing"] == {"mode": "perplexity", "prefix_tokens": 8, "fallback_margin": None}


def test_resuming_routed_numbers_of_the_label_reading_version_warns():
    """Checkpoints from before perplexity routing read the prefix's tokens (no ``prefix_targets``) warn."""
    old = {"mode": "perplexity", "prefix_tokens": 8, "matrix": [[1.0]], "domains": ["prose"]}
    with pytest.warns(UserWarning, match="read the prefix's training labels"):
        RoutedEvaluation(mode="perplexity", prefix_tokens=8).load_state_dict(old)
    new = RoutedEvaluation(mode="perplexity", prefix_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint of this version: no warning
        new.load_state_dict({**old, "prefix_targets": "tokens"})
    assert new.matrix == [[1.0]]
