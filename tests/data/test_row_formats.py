"""Prompt/response and chat rows: the loss scores the response / assistant tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crma_lightning.data.datamodule import Collator, SequentialDomainDataModule
from crma_lightning.data.tokenizer import byte_tokenizer
from crma_lightning.model.continual_lm import ContinualLM

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS = "<|eos|>"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _qa_rows(n, word="apple"):
    return [
        {"prompt": f"Question {i}: what is the {word} count?\nAnswer: ", "response": f"{i * 7} items."}
        for i in range(n)
    ]


def _chat_rows(n):
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"Name number {i}."},
                {"role": "assistant", "content": f"It is {i}."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You're welcome."},
            ]
        }
        for i in range(n)
    ]


def _dm(domains, tokenizer="byte", **kw):
    kw.setdefault("max_length", 96)
    kw.setdefault("batch_size", 2)
    return SequentialDomainDataModule(domains=domains, tokenizer=tokenizer, **kw)


def _qa_domain(tmp_path, rows, holdout=None, **extra):
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    hold = _write_jsonl(tmp_path / "holdout.jsonl", holdout if holdout is not None else rows[:4])
    spec = {"name": "qa", "path": train, "holdout_path": hold, "prompt_field": "prompt", "response_field": "response"}
    return {**spec, **extra}


def _scored_text(tok, row):
    return tok.decode([t for t, s in zip(row["input_ids"], row["scored"]) if s])


def _batches(loader):
    return list(iter(loader))


def _bigram_losses(batch):
    """``token_losses`` with logits that depend on the current token only (a fixed random bigram table).

    A change in a prompt token that is not the last one then cannot move any response term: only a
    scored prompt position could change the masked loss.
    """
    table = torch.randn(260, 260, generator=torch.Generator().manual_seed(0))
    logits = table[batch["input_ids"]]
    return ContinualLM.token_losses(logits, batch["labels"])


# ---------------------------------------------------------------------- prompt/response
@pytest.mark.parametrize("packing", [False, True])
def test_changing_a_prompt_token_changes_no_scored_label_or_loss_term(tmp_path, packing):
    rows = _qa_rows(24)
    # The same rows with one prompt token changed, away from the prompt's end ("apple" -> "appla").
    changed = _qa_rows(24, word="appla")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _dm([_qa_domain(tmp_path / "a", rows)], packing=packing)
    b = _dm([_qa_domain(tmp_path / "b", changed)], packing=packing)
    a.prepare()
    b.prepare()
    for loaders in ((a.val_dataloader()[0], b.val_dataloader()[0]), (a.train_dataloader(), b.train_dataloader())):
        batches_a, batches_b = _batches(loaders[0]), _batches(loaders[1])
        assert len(batches_a) == len(batches_b) > 0
        differ = unmasked_differ = False
        for ba, bb in zip(batches_a, batches_b):
            differ |= not torch.equal(ba["input_ids"], bb["input_ids"])
            assert torch.equal(ba["labels"], bb["labels"])  # same scored positions and values
            total_a, count_a = _bigram_losses(ba)
            total_b, count_b = _bigram_losses(bb)
            assert count_a == count_b > 0
            assert torch.allclose(total_a, total_b)
            # Unmasked, the same change does move the loss: the checks above are not vacuous.
            unmasked_a = {**ba, "labels": ba["input_ids"].masked_fill(ba["attention_mask"] == 0, -100)}
            unmasked_b = {**bb, "labels": bb["input_ids"].masked_fill(bb["attention_mask"] == 0, -100)}
            unmasked_differ |= not torch.allclose(_bigram_losses(unmasked_a)[0], _bigram_losses(unmasked_b)[0])
        assert differ and unmasked_differ  # the prompts do differ, and it would show in an unmasked loss


def test_prompt_positions_are_minus_100_and_response_plus_eos_is_scored(tmp_path):
    rows = _qa_rows(20)
    dm = _dm([_qa_domain(tmp_path, rows, holdout=rows[:6])], packing=False)
    dm.prepare()
    batch = next(iter(dm.val_dataloader()[0]))
    tok = byte_tokenizer()
    for i in range(batch["input_ids"].size(0)):
        row = rows[i]
        n_prompt = len(row["prompt"].encode())  # the byte tokenizer: one token per UTF-8 byte
        n_response = len(row["response"].encode()) + 1  # + EOS
        labels = batch["labels"][i]
        assert torch.all(labels[:n_prompt] == -100)
        response = labels[n_prompt : n_prompt + n_response]
        assert tok.decode(response) == row["response"] + EOS
        assert torch.all(labels[n_prompt + n_response :] == -100)  # padding


def test_packed_masked_rows_score_exactly_the_responses_in_order(tmp_path):
    rows = _qa_rows(30)
    dm = _dm([_qa_domain(tmp_path, rows)], packing=True, max_length=48)
    dm.prepare()
    tok = byte_tokenizer()
    train = dm.train_sets["qa"]
    assert {len(x) for x in train["input_ids"]} == {48}
    assert all(len(s) == len(x) for s, x in zip(train["scored"], train["input_ids"]))
    scored = "".join(_scored_text(tok, r) for r in train)
    responses = "".join(r["response"] + EOS for r in rows)
    # Packed rows keep their order; rows with no scored target are dropped, so compare as a subsequence
    # of whole responses: every scored character comes from a response, in order.
    it = iter(responses)
    assert all(ch in it for ch in scored)
    assert "Question" not in scored and "Answer" not in scored
    assert len(scored) > len(responses) // 2


def test_template_renders_the_prompt_of_prompt_response_rows(tmp_path):
    rows = [{"q": f"colour {i}?", "a": f"blue {i}"} for i in range(20)]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    hold = _write_jsonl(tmp_path / "h.jsonl", rows[:3])
    spec = {"name": "qa", "path": path, "holdout_path": hold, "template": "Q: {q}\nA: ", "response_field": "a"}
    dm = _dm([spec], packing=False)
    dm.prepare()
    tok = byte_tokenizer()
    row = dm.eval_sets["qa"][0]
    assert tok.decode(row["input_ids"]) == f"Q: colour 0?\nA: blue 0{EOS}"
    assert _scored_text(tok, row) == f"blue 0{EOS}"


def test_shuffle_holdout_mixes_class_sorted_held_out_rows_before_the_first_n_are_taken(tmp_path):
    # Held-out rows stored in class blocks (as the Hub's dbpedia_14 test split): the first 8 are all "A".
    train = _write_jsonl(tmp_path / "t.jsonl", [{"x": f"t{i}", "label": "AB"[i % 2]} for i in range(20)])
    sorted_rows = [{"x": f"h{i}", "label": "A" if i < 20 else "B"} for i in range(40)]
    hold = _write_jsonl(tmp_path / "h.jsonl", sorted_rows)
    spec = {
        "name": "tc",
        "path": train,
        "holdout_path": hold,
        "template": "{x}\nAnswer:",
        "response_field": "label",
        "metric": {"name": "accuracy", "labels": ["A", "B"], "eval_rows": 8},
    }
    tok = byte_tokenizer()

    def first_rows(**extra):
        dm = _dm([{**spec, **extra}], packing=False, max_eval_rows=8)
        dm.prepare()
        scored = [r["reference"] for r in dm.score_rows["tc"]]
        evaluated = [_scored_text(tok, row)[:1] for row in dm.eval_sets["tc"]]
        return scored, evaluated

    assert first_rows() == (["A"] * 8, ["A"] * 8)  # the default keeps the file's order (numbers do not move)
    scored, evaluated = first_rows(shuffle_holdout=True)
    assert scored == evaluated and set(scored) == {"A", "B"}
    assert first_rows(shuffle_holdout=True) == (scored, evaluated)  # seeded: the same rows every time
    with pytest.raises(ValueError, match=r"shuffle_holdout=True needs holdout_path or holdout_split"):
        _dm([{"name": "x", "path": train, "template": "{x}", "response_field": "label", "shuffle_holdout": True}])


def test_a_prompt_that_fills_the_row_is_dropped_with_a_warning(tmp_path):
    rows = [*_qa_rows(20), {"prompt": "long prompt " * 20, "response": "never seen"}]
    dm = _dm([_qa_domain(tmp_path, rows)], packing=False, max_length=64)
    with pytest.warns(UserWarning, match=r"dropped 1 rows with no scored token within max_length=64"):
        dm.prepare()
    assert dm.summary()["qa"]["dropped_rows"] == {"train_no_scored_token": 1}
    assert len(dm.train_sets["qa"]) == 20


def test_summary_says_which_tokens_are_scored(tmp_path):
    rows = _qa_rows(20)
    chat = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(20))
    dm = _dm(
        [_qa_domain(tmp_path, rows), {"name": "chat", "path": chat}, {"name": "plain", "builtin": "arithmetic"}],
        packing=False,
        max_chars_per_domain=3000,
    )
    dm.prepare()
    summary = dm.summary()
    assert summary["qa"]["rows"] == "prompt_response" and summary["qa"]["scored"] == "response"
    assert summary["chat"]["rows"] == "chat" and summary["chat"]["scored"] == "assistant"
    assert summary["chat"]["chat_template"] == "fallback"
    assert summary["plain"]["rows"] == "text" and summary["plain"]["scored"] == "all"
    assert "messages_field" not in summary["qa"] and "messages_field" in summary["chat"]
    for name in ("qa", "chat", "plain"):
        # The held-out count is exactly what the held-out loss averages over.
        count = 0
        for batch in _batches(_val_loader(dm, name)):
            count += int(ContinualLM.token_losses(torch.zeros(*batch["labels"].shape, 260), batch["labels"])[1])
        assert summary[name]["holdout_scored_tokens"] == count, name
        assert summary[name]["train_scored_tokens"] > 0
    assert summary["qa"]["holdout_scored_tokens"] < summary["qa"]["holdout_tokens"]
    assert (
        summary["plain"]["holdout_scored_tokens"]
        == summary["plain"]["holdout_tokens"] - summary["plain"]["holdout_rows"]
    )


def _val_loader(dm, name):
    with dm.evaluating_all_domains():
        return dm.val_dataloader()[dm.domain_names.index(name)]


# ---------------------------------------------------------------------- chat
def test_chat_rows_without_a_template_score_only_assistant_content(tmp_path):
    rows = _chat_rows(20)
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    hold = _write_jsonl(tmp_path / "hold.jsonl", rows[:3])
    dm = _dm([{"name": "chat", "path": path, "holdout_path": hold}], packing=False, max_length=256)
    dm.prepare()
    tok = byte_tokenizer()
    row = dm.eval_sets["chat"][0]
    assert tok.decode(row["input_ids"]) == (
        "<|system|>\nAnswer briefly.\n<|user|>\nName number 0.\n<|assistant|>\nIt is 0.\n"
        f"<|user|>\nThanks!\n<|assistant|>\nYou're welcome.\n{EOS}"
    )
    assert _scored_text(tok, row) == f"It is 0.\nYou're welcome.\n{EOS}"
    # The same masking reaches the validation batches.
    batch = next(iter(dm.val_dataloader()[0]))
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == f"It is 0.\nYou're welcome.\n{EOS}"


def test_chat_rows_use_the_tokenizers_chat_template(tmp_path):
    rows = _chat_rows(20)
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    hold = _write_jsonl(tmp_path / "hold.jsonl", rows[:3])
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    dm = _dm([{"name": "chat", "path": path, "holdout_path": hold}], tokenizer=tok, packing=False, max_length=300)
    dm.prepare()
    assert dm.summary()["chat"]["chat_template"] == "tokenizer"
    row = dm.eval_sets["chat"][0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(rows[0]["messages"], tokenize=False) + EOS
    # Assistant content and the template's end-of-turn marker are scored; the header, system and user turns not.
    assert _scored_text(tok, row) == f"It is 0.<|im_end|>\nYou're welcome.<|im_end|>\n{EOS}"
    batch = next(iter(dm.val_dataloader()[0]))
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == _scored_text(tok, row)


def test_chat_template_that_is_not_turn_by_turn_is_refused_with_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(20))
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    dm = _dm([{"name": "chat", "path": path}], tokenizer=tok)
    with pytest.raises(ValueError, match=r"domain 'chat' \(train\): .*chat.jsonl row \d+: cannot render .*message 2"):
        dm.prepare()


def test_chat_field_name_is_configurable_and_text_wins_when_present(tmp_path):
    rows = [{"conv": r["messages"]} for r in _chat_rows(20)]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    dm = _dm([{"name": "c", "path": path, "messages_field": "conv"}])
    dm.prepare()
    assert dm.summary()["c"]["rows"] == "chat"
    both = _write_jsonl(tmp_path / "both.jsonl", [{"text": "plain text here " * 4, **r} for r in _chat_rows(20)])
    dm = _dm([{"name": "b", "path": both}])
    dm.prepare()
    assert dm.summary()["b"]["scored"] == "all" and "scored" not in dm.train_sets["b"].column_names


def test_collator_masks_unscored_tokens_and_padding():
    batch = Collator(pad_id=0, domain="d")(
        [{"input_ids": [5, 6, 7, 8], "scored": [False, False, True, True]}, {"input_ids": [9, 10], "scored": [0, 1]}]
    )
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    plain = Collator(pad_id=0, domain="d")([{"input_ids": [5, 6, 7]}, {"input_ids": [9]}])
    assert plain["labels"].tolist() == [[5, 6, 7], [9, -100, -100]]


# ---------------------------------------------------------------------- bad rows and specs
GOOD_QA = [{"prompt": "p?", "response": "r."}] * 20
GOOD_CHAT = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 20
QA = {"prompt_field": "prompt", "response_field": "response"}


@pytest.mark.parametrize(
    ("bad_row", "spec", "match"),
    [
        ({"prompt": "p?"}, QA, r"field 'response' is missing or null"),
        ({"prompt": "p?", "response": 3}, QA, r"field 'response' is int, expected a string"),
        ({"prompt": "p?", "response": "   "}, QA, r"field 'response' is blank"),
        ({"prompt": ["p"], "response": "r."}, QA, r"field 'prompt' is list, expected a string"),
        ({"messages": []}, {}, r"field 'messages' is an empty list"),
        ({"messages": "hello"}, {}, r"field 'messages' is str, expected a list"),
        ({"messages": [{"role": "user"}]}, {}, r"message 0 of field 'messages' is \{'role': 'user'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, {}, r"no assistant message with content"),
    ],
)
def test_bad_rows_fail_in_prepare_with_domain_file_and_row(tmp_path, bad_row, spec, match):
    good = GOOD_QA if spec else GOOD_CHAT
    path = _write_jsonl(tmp_path / "rows.jsonl", [*good, bad_row])
    hold = _write_jsonl(tmp_path / "hold.jsonl", good[:2])
    dm = _dm([{"name": "x", "path": path, "holdout_path": hold, **spec}])
    with pytest.raises(ValueError, match=r"domain 'x' \(train\): .*rows.jsonl row 20: " + match):
        dm.prepare()


def test_a_multi_file_prompt_response_domain_locates_rows_only_for_errors(tmp_path, monkeypatch):
    """``path: [a, b]`` (e.g. joint training on several tasks' files): the row's file is looked up only when a
    message needs it. It was looked up for every row - one ``load_dataset`` per file per row, which also
    hung offline - so such a domain could not be prepared."""
    import crma_lightning.data.row_formats as rows_module

    calls = []
    real = rows_module.describe_row
    monkeypatch.setattr(rows_module, "describe_row", lambda *a: calls.append(a) or real(*a))
    files = [_write_jsonl(tmp_path / f"{n}.jsonl", _qa_rows(12, word=n)) for n in ("a", "b")]
    hold = _write_jsonl(tmp_path / "hold.jsonl", _qa_rows(3))
    dm = _dm([{"name": "ab", "path": files, "holdout_path": hold, **QA}], packing=False)
    dm.prepare()
    assert len(dm.train_sets["ab"]) == 24 and calls == []
    bad = _write_jsonl(tmp_path / "c.jsonl", [*GOOD_QA[:2], {"prompt": "p?"}])  # errors still name file and row
    with pytest.raises(ValueError, match=r"domain 'bc' \(train\): .*c.jsonl row 2: field 'response'"):
        _dm([{"name": "bc", "path": [files[1], bad], "holdout_path": hold, **QA}]).prepare()


def test_a_missing_response_column_lists_the_fields(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}] * 20)
    dm = _dm([{"name": "x", "path": path, "prompt_field": "question", "response_field": "reply"}])
    with pytest.raises(ValueError, match=r"domain 'x'.*no field 'reply' for the response.*\['question', 'answer'\]"):
        dm.prepare()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"prompt_field": "p"}, r"prompt_field='p' needs a response_field"),
        ({"response_field": "r"}, r"needs exactly one prompt source"),
        ({"response_field": "r", "prompt_field": "p", "template": "{p}"}, r"not both"),
    ],
)
def test_bad_prompt_response_specs_fail_at_construction(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _dm([{"name": "x", "path": "x.jsonl", **extra}])


# ---------------------------------------------------------------------- the example files
def test_example_overlay_prepares_on_the_demo_config(monkeypatch):
    import yaml

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the overlay's paths are relative to the repository, as in its usage line
    base = yaml.safe_load((root / "configs" / "demo.yaml").read_text())["data"]
    overlay = yaml.safe_load((root / "examples" / "instruction.yaml").read_text())
    assert overlay["trainer"]["max_steps"] <= 50
    dm = SequentialDomainDataModule(tokenizer="byte", **{**base, **overlay["data"]})
    dm.prepare()
    dm.check_batches()
    summary = dm.summary()
    assert (summary["instruct"]["scored"], summary["chat"]["scored"]) == ("response", "assistant")
    assert len((root / "examples" / "instruction.jsonl").read_text().splitlines()) >= 12
    tok = byte_tokenizer()
    row = dm.eval_sets["instruct"][0]
    assert tok.decode(row["input_ids"]).startswith("### Instruction:\n")
    assert "### Response:" not in _scored_text(tok, row)
