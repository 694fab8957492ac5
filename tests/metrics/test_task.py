"""Task metrics against hand computations (and torchmetrics where it has the metric), the metric setting's
checks, and the task-score summary (AP, BWT_score, FWT_score, forgetting) of docs/metrics.md."""

from __future__ import annotations

import pytest

from crma_lightning.metrics import continual as metrics
from crma_lightning.metrics import task as task_metrics
from crma_lightning.metrics.task import TaskMetric, as_task_metric, normalize, row_scores


def test_normalisation_options_each_do_one_thing():
    text = "  Hello,\t World!  "
    assert normalize(text) == "hello, world!"
    assert normalize(text, {"lowercase": False}) == "Hello, World!"
    assert normalize(text, {"collapse_whitespace": False}) == "hello,\t world!"
    assert normalize(text, {"strip": False}) == " hello, world! "
    assert normalize(text, {"remove_punctuation": True}) == "hello world"


def test_exact_match_by_hand():
    m = TaskMetric(name="exact_match")
    assert row_scores(m, ["  DCBA ", "dcb", "d c  b"], ["dcba", "dcba", "D C B"]) == [1.0, 0.0, 1.0]
    strict = TaskMetric(name="exact_match", normalize={"lowercase": False})
    assert row_scores(strict, ["DCBA"], ["dcba"]) == [0.0]


def test_token_f1_by_hand_and_against_torchmetrics_squad():
    # pred "the cat sat", ref "the cat sat down": common 3, P = 3/3, R = 3/4, F1 = 2*1*0.75/1.75
    assert task_metrics.token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 0.75 / 1.75)
    # multiplicity: pred "a a b", ref "a b b": common = min(2,1) + min(1,2) = 2, P = R = 2/3
    assert task_metrics.token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert task_metrics.token_f1("", "") == 1.0 and task_metrics.token_f1("x", "") == 0.0
    from torchmetrics.text import SQuAD

    pairs = [("cat sat on mat", "cat sat mat"), ("blue green", "green blue red"), ("x y z", "q")]
    for pred, ref in pairs:  # texts without articles/punctuation: SQuAD's normalisation equals ours
        squad = SQuAD()(
            [{"prediction_text": pred, "id": "0"}], [{"answers": {"answer_start": [0], "text": [ref]}, "id": "0"}]
        )
        assert task_metrics.token_f1(pred, ref) == pytest.approx(float(squad["f1"]) / 100, abs=1e-5)


def test_rouge_l_by_hand_and_from_torchmetrics():
    # LCS("a b c d", "a c d e") = "a c d" = 3; P = 3/4, R = 3/4, F = 0.75
    assert task_metrics.rouge_l(["a b c d"], ["a c d e"]) == pytest.approx([0.75])
    from torchmetrics.text import ROUGEScore

    expected = float(ROUGEScore(rouge_keys="rougeL")("the cat sat", "the cat sat down")["rougeL_fmeasure"])
    assert row_scores(TaskMetric(name="rouge_l"), ["the cat sat"], ["the cat sat down"]) == pytest.approx([expected])
    assert expected == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_accuracy_generate_mode_takes_the_label_the_text_starts_with():
    m = TaskMetric(name="accuracy", labels=["yes", "no", "not sure"])
    preds = ["Yes, it is", "no", "not sure at all", "maybe", "nope"]
    refs = ["yes", "yes", "not sure", "no", "no"]
    # "nope" starts with "no" (a label): counted as "no"; "not sure ..." picks the longest matching label
    assert row_scores(m, preds, refs) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert task_metrics.generated_label("maybe", m.labels) is None


def test_accuracy_loss_mode_compares_the_chosen_label():
    m = TaskMetric(name="accuracy", labels=["a", "b"], label_mode="loss")
    assert row_scores(m, ["a", "b", "a"], ["a", "a", "a"]) == [1.0, 0.0, 1.0]


def test_registered_metric_is_used_and_checked():
    task_metrics.register_metric("starts_with", lambda p, r: float(p.strip().startswith(r.strip())))
    m = as_task_metric({"name": "starts_with"}, "d")
    assert row_scores(m, ["abc", "xbc"], ["ab", "ab"]) == [1.0, 0.0]
    task_metrics.register_metric("too_big", lambda p, r: 2.0)
    with pytest.raises(ValueError, match=r"returned 2\.0"):
        row_scores(as_task_metric("too_big", "d"), ["a"], ["a"])
    with pytest.raises(ValueError, match="built in"):
        task_metrics.register_metric("exact_match", lambda p, r: 1.0)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("bleu", r"name='bleu' is unknown"),
        ({"name": "accuracy"}, r"needs `labels`"),
        ({"name": "exact_match", "label_mode": "loss"}, r"applies to 'accuracy' only"),
        ({"name": "exact_match", "normalize": {"case": True}}, r"unknown keys \['case'\]"),
        ({"name": "exact_match", "eval_rows": 0}, r"eval_rows=0 is invalid"),
        ({"name": "exact_match", "stop": [""]}, r"stop=\[''\] is invalid"),
        ({"nme": "exact_match"}, r"unknown keys \['nme'\]"),
        (3, r"metric=3 is invalid"),
    ],
)
def test_bad_metric_settings_are_refused_with_the_domain(value, match):
    with pytest.raises(ValueError, match=match):
        as_task_metric(value, "qa")


def test_cut_at_stop_takes_the_earliest_stop():
    assert task_metrics.cut_at_stop("abc\ndef.", ["\n", "."]) == "abc"
    assert task_metrics.cut_at_stop("abc", ["\n"]) == "abc"


def test_score_summary_worked_example():
    # docs/metrics.md's worked example: 3 domains, rows base..after 3.
    s = [
        [0.0, 0.1, 0.0],
        [0.9, 0.2, 0.1],
        [0.5, 0.8, 0.3],
        [0.3, 0.6, 0.7],
    ]
    out = metrics.summarize_scores(s, ["a", "b", "c"])
    assert out["ap"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert out["bwt_score"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert out["forgetting"] == pytest.approx({"a": 0.9 - 0.3, "b": 0.8 - 0.6})
    assert out["forgetting_mean"] == pytest.approx(0.4)
    assert out["fwt_score"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.0)) / 2)
    assert out["score_plasticity"] == pytest.approx({"a": 0.9, "b": 0.8, "c": 0.7})
    # after stage 2 only: T = 2
    mid = metrics.summarize_scores(s, ["a", "b", "c"], upto=2)
    assert mid["ap"] == pytest.approx(0.65) and mid["forgetting"] == pytest.approx({"a": 0.4})


def test_score_summary_skips_domains_without_a_metric():
    s = [[None, 0.0], [None, 0.1], [None, 0.9]]
    out = metrics.summarize_scores(s, ["text", "qa"])
    assert out["ap"] == pytest.approx(0.9) and out["bwt_score"] is None and out["forgetting"] == {"text": None}


def test_edit_similarity_by_hand():
    # LCS("kitten", "sitting") = "ittn" (4): 2 * 4 / (6 + 7), python-Levenshtein's ratio (fuzz.ratio 62).
    assert task_metrics.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert task_metrics.edit_similarity("", "") == 1.0 and task_metrics.edit_similarity("abc", "") == 0.0
    assert task_metrics.edit_similarity("x = 1", "x = 1") == 1.0
    metric = task_metrics.as_task_metric("edit_similarity", "py")
    assert task_metrics.row_scores(metric, ["abcd", "ab"], ["abcd", "ba"]) == [1.0, 0.5]
