"""Task scores by generation: score rows, batched left-padded generation, stop strings, sharding, the score
matrix in the run's report, TensorBoard, checkpoint and HParams tab."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG, tiny_llama

from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.data.tokenizer import byte_tokenizer
from crma_lightning.evaluation import scoring
from crma_lightning.generation.decode import generate_from_ids
from crma_lightning.metrics.task import TaskMetric
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.run.runner import ContinualRunner

TRAINER = {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False, "enable_model_summary": False}


def _domains(first_metric=None, last_metric=None):
    first = first_metric or {"name": "exact_match", "eval_rows": 6, "max_new_tokens": 3}
    last = last_metric or {"name": "accuracy", "labels": list("abcdefgh"), "label_mode": "loss", "eval_rows": 5}
    return [{"name": "first", "builtin": "first", "metric": first}, {"name": "last", "builtin": "last", "metric": last}]


def _data(domains=None):
    return SequentialDomainDataModule(
        domains=domains or _domains(), max_length=32, packing=False, batch_size=4, max_eval_rows=8
    )


def _model(task_adapters="per_task", adapter="lora"):
    return ContinualLM(
        model_config=TINY_LLAMA_CONFIG,
        adapter=adapter,
        task_adapters=task_adapters,
        optimizer=partial(torch.optim.AdamW, lr=0.01),
    )


def test_score_rows_carry_the_training_prompt_ids_and_the_reference():
    dm = _data()
    dm.prepare(byte_tokenizer())
    rows = dm.score_rows["first"]
    assert len(rows) == 6 and len(dm.score_rows["last"]) == 5
    held = dm.eval_sets["first"][0]
    prompt_len = held["scored"].index(True)
    assert rows[0]["prompt_ids"] == held["input_ids"][:prompt_len]  # exactly the ids training sees
    text = byte_tokenizer().decode(rows[0]["prompt_ids"])
    assert text.startswith("first letter of ") and text.endswith("\n= ")
    assert rows[0]["reference"] == text.split()[3][0]  # the word's first letter, without the "\n"


def test_chat_rows_are_scored_on_their_last_assistant_turn(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w.upper()}]}
        for w in ("ab", "cd", "ef", "gh", "ij", "kl")
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = {"name": "chat", "path": str(path), "holdout_path": str(path), "metric": {"name": "exact_match"}}
    dm = SequentialDomainDataModule(domains=[spec], max_length=32, batch_size=2)
    dm.prepare(byte_tokenizer())
    first = dm.score_rows["chat"][0]
    assert byte_tokenizer().decode(first["prompt_ids"]) == "<|user|>\nsay ab\n<|assistant|>\n"
    assert first["reference"] == "AB"  # the assistant content, cut at the stop string "\n"


def test_a_bad_metric_is_refused_when_the_domains_are_given():
    with pytest.raises(ValueError, match=r"domain 'q': metric name='bleu' is unknown"):
        SequentialDomainDataModule(domains=[{"name": "q", "builtin": "first", "metric": "bleu"}])


def test_a_metric_on_plain_text_rows_is_refused_in_prepare():
    dm = SequentialDomainDataModule(
        domains=[{"name": "prose", "builtin": "prose", "metric": "exact_match"}], max_chars_per_domain=3000
    )
    with pytest.raises(ValueError, match=r"domain 'prose': metric 'exact_match' needs prompt/response or chat rows"):
        dm.prepare(byte_tokenizer())


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    model, tok = tiny_llama(vocab_size=259), byte_tokenizer()
    prompts = [list(b"ab"), list(b"hello there"), list(b"xyz q")]
    batched = generate_from_ids(model, tok, prompts, torch.device("cpu"), max_new_tokens=6)
    alone = [generate_from_ids(model, tok, [p], torch.device("cpu"), max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert generate_from_ids(model, tok, prompts, torch.device("cpu"), max_new_tokens=6) == batched  # greedy


def test_greedy_decoding_through_forward_equals_generate():
    # The path taken for an FSDP1 root, whose `generate` would skip the root's unsharding.
    from crma_lightning.generation.decode import _greedy_through_forward

    model, tok = tiny_llama(vocab_size=259), byte_tokenizer()
    prompts = [list(b"ab"), list(b"hello there"), list(b"xyz q")]
    expected = generate_from_ids(model, tok, prompts, torch.device("cpu"), max_new_tokens=6)
    width = max(map(len, prompts))
    ids = torch.tensor([[256] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = _greedy_through_forward(model, ids, mask, {"max_new_tokens": 6, "pad_token_id": 256}, tok.eos_token_id)
    assert tok.batch_decode(out[:, width:], skip_special_tokens=True) == expected


def test_stop_strings_end_generation_and_cut_the_prediction():
    model, tok = tiny_llama(vocab_size=259), byte_tokenizer()
    free = generate_from_ids(model, tok, [list(b"abc")], torch.device("cpu"), max_new_tokens=12)[0]
    stop = free[2]  # a character the model generates third
    stopped = generate_from_ids(model, tok, [list(b"abc")], torch.device("cpu"), max_new_tokens=12, stop=[stop])[0]
    assert stop in stopped and len(stopped) <= free.index(stop) + 4  # stopped soon after the stop string
    rows = [{"prompt_ids": list(b"abc"), "reference": free[: free.index(stop)]}]
    metric = TaskMetric(name="exact_match", stop=[stop], max_new_tokens=12, normalize={"strip": False})
    assert scoring.domain_score_sums(model, tok, metric, rows, torch.device("cpu"), 4) == (1.0, 1)


@pytest.mark.parametrize(
    "metric", [TaskMetric(max_new_tokens=3), TaskMetric("accuracy", labels=["a", "b"], label_mode="loss")]
)
def test_shards_over_ranks_sum_to_the_single_process_score(metric):
    model, tok = tiny_llama(vocab_size=259), byte_tokenizer()
    words = ["ab", "ba", "aab", "bb", "a", "abab", "bab"]
    # references: half of what the model says, so the score is neither 0 nor 1
    preds = scoring.predictions(model, tok, metric, [{"prompt_ids": list(w.encode())} for w in words], "cpu", 8)
    rows = [
        {"prompt_ids": list(w.encode()), "reference": p if i % 2 else "zz"}
        for i, (w, p) in enumerate(zip(words, preds))
    ]
    one = scoring.domain_score_sums(model, tok, metric, rows, torch.device("cpu"), 2)
    parts = [
        scoring.domain_score_sums(model, tok, metric, rows, torch.device("cpu"), 2, world=3, rank=r) for r in range(3)
    ]
    assert one == (3.0, 7)
    assert sum(p[0] for p in parts) == one[0] and sum(p[1] for p in parts) == 7


def test_label_loss_mode_picks_the_label_with_the_lowest_summed_loss():
    model, tok = tiny_llama(vocab_size=259), byte_tokenizer()
    prompt, labels = list(b"x = "), ["ab", "c", "ba"]
    chosen = scoring.predictions(
        model, tok, TaskMetric("accuracy", labels=labels, label_mode="loss"), [{"prompt_ids": prompt}], "cpu", 4
    )
    losses = []
    for label in labels:
        with torch.no_grad():
            ids = torch.tensor([prompt + list(label.encode())])
            logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
        losses.append(-sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(label.encode())))
    assert chosen == [labels[min(range(3), key=losses.__getitem__)]]


def test_score_matrix_in_report_tensorboard_checkpoint_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = ContinualRunner(run_dir=tmp_path / "run", trainer_kwargs=dict(TRAINER), resume="never")
    report = runner.run(_model(), _data())
    section = report["score_matrix"]
    values = section["values"]
    assert len(values) == 3 and all(v is not None and 0.0 <= v <= 1.0 for v in values[0])  # base row: all domains
    assert values[1][1] is None and None not in values[2]
    assert section["metric"] == {"first": "exact_match", "last": "accuracy"}
    assert section["ap"] == pytest.approx((values[2][0] + values[2][1]) / 2)
    assert section["bwt_score"] == pytest.approx(values[2][0] - values[1][0])
    assert set(section["eval_seconds"]) == {"0", "1", "2"}
    assert report["timings"]["stages"]["last"]["score_s"] > 0
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["score_matrix"]["values"] == values
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "## Task score `S[s][j]`" in markdown
    assert "| stage | train s | eval s (of which generation) | eval share |" in markdown
    ckpt = torch.load(runner.checkpoints.stage(1, "last"), weights_only=True, map_location="cpu")
    state = next(v for k, v in ckpt["callbacks"].items() if "DomainEvaluation" in k)
    assert state["scores"] == values and state["score_metrics"]["last"] == "accuracy"
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"val/first/exact_match", "val/last/accuracy", "cl/ap", "cl/bwt_score"} <= set(tags["scalars"])
    assert "cl/score_matrix" in tags["images"]
    assert [e.value for e in events.Scalars("cl/ap")][-1] == pytest.approx(section["ap"])
    assert [e.value for e in events.Scalars("hp/ap")] == [pytest.approx(section["ap"])]  # the HParams tab
    from crma_lightning.model.hparams import final_metrics

    assert final_metrics(report)["hp/ap"] == pytest.approx(section["ap"])


def test_scores_are_generated_with_the_adapter_the_evaluation_names(monkeypatch):
    # `evaluate --merge` / `--data ... task:` set ContinualLM.evaluation_tasks: the losses use it, and so must
    # the scores (they were generated with each domain's own adapter under a MERGED title before).
    from types import SimpleNamespace

    from crma_lightning.callbacks.domain_evaluation import DomainEvaluation

    dm, model = _data(), _model()
    dm.prepare(model.tokenizer)
    model.prepare_tasks(dm.domain_names)
    model.evaluation_tasks = {"first": "last", "last": None}
    used = []
    activate = model.activate_task
    monkeypatch.setattr(model, "activate_task", lambda task: (used.append(task), activate(task)))
    evaluation = DomainEvaluation(log_heatmap=False)
    evaluation.start_run(dm.domain_names)
    trainer = SimpleNamespace(
        datamodule=dm, world_size=1, global_rank=0, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t)
    )
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    evaluation._score(trainer, model, 0, dm.domain_names)
    assert used == ["last", None]
    assert evaluation.scores[0][0] is not None and evaluation.scores[0][1] is not None


def test_score_prompts_are_cut_from_the_left_to_leave_room_for_the_answer(tmp_path):
    rows = [{"q": "x" * 200 + f" question {i}", "a": "yes"} for i in range(4)]  # longer than max_length
    rows.append({"q": "short", "a": "yes"})  # the loss evaluation drops the long rows; this one stays
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": "no"}) + "\n" for i in range(4)))
    spec = {"name": "long", "path": str(tmp_path / "t.jsonl"), "holdout_path": str(tmp_path / "h.jsonl"),
            "template": "{q}\nAnswer:", "response_field": "a"}  # fmt: skip
    tok = byte_tokenizer()

    def prompts(metric, max_length=96):
        dm = SequentialDomainDataModule(domains=[{**spec, "metric": metric}], max_length=max_length, packing=False)
        dm.prepare(tok)
        return [r["prompt_ids"] for r in dm.score_rows["long"]]

    full = tok(rows[0]["q"] + "\nAnswer:", add_special_tokens=False)["input_ids"]
    generated = prompts({"name": "exact_match", "max_new_tokens": 8})
    assert generated[0] == full[-(96 - 8) :]  # the question's end and "Answer:" stay; 8 tokens left to generate
    ranked = prompts({"name": "accuracy", "labels": ["yes", "no"], "label_mode": "loss"})
    assert ranked[0] == full[-(96 - 3) :]  # room for the longest label ("yes": 3 bytes)
    assert prompts({"name": "exact_match", "max_new_tokens": 200})[0] == full[-95:]  # no room: the prompt fits alone
