"""Bootstrap intervals of the benchmark (benchmarks/lib/stats.py) against hand computations on a fixed small sample.

Two domains (a, b), two held-out rows each, four explicit replicates (row draws), so every replicate's
statistic and the percentile bounds (numpy's linear interpolation: position p (B - 1) in the sorted
replicates) are computed by hand in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.lib.stats import PAIR_STATS, ROUTED_PAIR_STATS, ROUTED_STATS, RUN_STATS, SCORE_STATS, RunRows, interval

# Row draws per domain, one replicate per line (B = 4).
DRAWS = [np.array([[0, 0], [0, 1], [1, 1], [1, 0]]), np.array([[1, 1], [0, 1], [0, 0], [1, 0]])]


def _run(a_after_a, a_final, b_final, shift=0.0):
    """A run over domains a, b: rows 0 (base), 1 (after a), 2 (after b); ``(loss_sum, tokens)`` per cell."""

    def cell(loss, tok):
        return {"loss_sum": [x + shift * t for x, t in zip(loss, tok)], "tokens": tok}

    base = {"a": cell([3, 6], [1, 2]), "b": cell([6, 3], [2, 1])}
    data = {
        "domains": ["a", "b"],
        "rows": {"0": base, "1": {"a": cell(*a_after_a)}, "2": {"a": cell(*a_final), "b": cell(*b_final)}},
    }
    return RunRows.from_file_content(data)


REF = _run(([1, 4], [1, 2]), ([2, 6], [1, 2]), ([4, 4], [2, 1]))


def test_final_loss_and_drift_of_one_run():
    # L[2][a] per replicate: [0,0] (2+2)/2 = 2; [0,1] 8/3; [1,1] 12/4 = 3; [1,0] 8/3.
    # L[2][b] per replicate: [1,1] 8/2 = 4; [0,1] 8/3; [0,0] 8/4 = 2; [1,0] 8/3.
    # final mean loss: 3, 8/3, 2.5, 8/3 -> sorted [2.5, 8/3, 8/3, 3]
    # 2.5 %: position 0.075 -> 2.5 + 0.075 (1/6) = 2.5125; 97.5 %: position 2.925 -> 8/3 + 0.925 (1/3) = 2.975.
    out = interval(RUN_STATS["final_loss_mean"], [[REF]], draws=DRAWS)
    assert out["value"] == pytest.approx(8 / 3)  # all rows: a 8/3, b 8/3
    assert (out["low"], out["high"]) == (pytest.approx(2.5125), pytest.approx(2.975))
    assert out["resamples"] == 4 and out["seeds"] == 1
    # L[1][a]: 1, 5/3, 2, 5/3 -> drift_a = 100 (L[2][a] - L[1][a]) / L[1][a] = 100, 60, 50, 60 (b is last: no drift)
    # sorted [50, 60, 60, 100]: 50 + 0.075 * 10 = 50.75; 60 + 0.925 * 40 = 97.
    drift = interval(RUN_STATS["drift_mean_pct"], [[REF]], draws=DRAWS)
    assert drift["value"] == pytest.approx(60.0)  # all rows: 100 (8/3 - 5/3) / (5/3)
    assert (drift["low"], drift["high"]) == (pytest.approx(50.75), pytest.approx(97.0))
    assert drift["excludes_zero"] is True
    # L[0][a]: [0,0] 3; [0,1] 9/3 = 3; 3; 3 -> forgetting_a = 100 (L[2][a] - 3) / 3 = -33.33, -11.11, 0, -11.11
    forgetting = interval(RUN_STATS["base_relative_forgetting_mean_pct"], [[REF]], draws=DRAWS)
    assert (forgetting["low"], forgetting["high"]) == (
        pytest.approx(-100 / 3 + 0.075 * (100 / 3 - 100 / 9)),
        pytest.approx(-100 / 9 + 0.925 * (100 / 9)),
    )
    assert forgetting["high"] == pytest.approx(-5 / 6) and forgetting["excludes_zero"] is True  # -0.83 < 0


def test_paired_interval_of_two_settings_on_the_same_rows():
    x = _run(([1, 4], [1, 2]), ([1, 6], [1, 2]), ([4, 4], [2, 1]))
    # L_X[2][a]: [0,0] 1; [0,1] 7/3; [1,1] 3; [1,0] 7/3 against L_ref[2][a] 2, 8/3, 3, 8/3; b identical (0 %).
    # improvement = mean_j 100 (L_ref - L_X) / L_ref = (50 + 0) / 2, (12.5 + 0) / 2, 0, 6.25 = 25, 6.25, 0, 6.25
    # sorted [0, 6.25, 6.25, 25]: 0 + 0.075 * 6.25 = 0.46875; 6.25 + 0.925 * 18.75 = 23.59375.
    out = interval(PAIR_STATS["heldout_improvement_pct"], [[x, REF]], draws=DRAWS)
    assert out["value"] == pytest.approx(6.25)  # all rows: a 100 (8/3 - 7/3) / (8/3) = 12.5, b 0
    assert (out["low"], out["high"]) == (pytest.approx(0.46875), pytest.approx(23.59375))
    assert out["excludes_zero"] is True  # a difference: the interval excludes 0
    same = interval(PAIR_STATS["final_loss_diff"], [[REF, REF]], draws=DRAWS)
    assert (same["value"], same["low"], same["high"], same["excludes_zero"]) == (0.0, 0.0, 0.0, False)


def test_seeds_are_resampled_then_rows_within_them():
    shifted = _run(([1, 4], [1, 2]), ([2, 6], [1, 2]), ([4, 4], [2, 1]), shift=1.0)  # every loss + 1 per token
    # final mean loss per replicate: seed 0: 3, 8/3, 2.5, 8/3; seed 1: 4, 11/3, 3.5, 11/3.
    # seed draws (0,0), (0,1), (1,1), (1,0): 3, (8/3 + 11/3) / 2 = 19/6, 3.5, 19/6 -> sorted [3, 19/6, 19/6, 3.5]
    # 3 + 0.075 (1/6) = 3.0125; 19/6 + 0.925 (1/3) = 3.475.
    seed_draws = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    out = interval(RUN_STATS["final_loss_mean"], [[REF], [shifted]], draws=DRAWS, seed_draws=seed_draws)
    assert out["value"] == pytest.approx(19 / 6) and out["seeds"] == 2
    assert (out["low"], out["high"]) == (pytest.approx(3.0125), pytest.approx(3.475))


def test_random_resampling_is_seeded_and_refuses_unpaired_rows():
    first = interval(RUN_STATS["final_loss_mean"], [[REF]], resamples=500, seed=7)
    assert first == interval(RUN_STATS["final_loss_mean"], [[REF]], resamples=500, seed=7)
    assert first["resamples"] == 500 and first["low"] <= first["value"] <= first["high"]
    other = RunRows.from_file_content(
        {
            "domains": ["a", "b"],
            "rows": {"0": {"a": {"loss_sum": [1.0], "tokens": [1]}, "b": {"loss_sum": [1.0], "tokens": [1]}}},
        }
    )
    with pytest.raises(ValueError, match="different held-out rows"):
        interval(PAIR_STATS["final_loss_diff"], [[REF, other]])


def test_documents_are_the_unit_resampled():
    # Rows 0-1 start in document 0, row 2 in document 4: two units per stage, with summed losses and tokens.
    data = {
        "domains": ["a"],
        "rows": {"0": {"a": {"loss_sum": [1.0, 2.0, 4.0], "tokens": [1, 1, 2]}}},
        "documents": {"a": [0, 0, 4]},
    }
    by_doc = RunRows.from_file_content(data)
    assert by_doc.loss_sum[0][0].tolist() == [3.0, 4.0] and by_doc.tokens[0][0].tolist() == [2.0, 2.0]
    assert by_doc.rows_per_domain() == [2]
    by_row = RunRows.from_file_content(data, unit="row")
    assert by_row.loss_sum[0][0].tolist() == [1.0, 2.0, 4.0]
    # Replicates [doc 0, doc 0] -> 6/4 = 1.5 and [doc 1, doc 1] -> 8/4 = 2: the loss is token-weighted per unit.
    m = by_doc.matrix([np.array([[0, 0], [1, 1]])])
    assert m[0, 0].tolist() == [1.5, 2.0]
    assert by_doc.matrix([None])[0, 0, 0] == pytest.approx(7 / 4)  # all rows: the loss-matrix value


SCORES = {"0": {"a": [0.0, 1.0], "b": [0.0, 0.0]}, "1": {"a": [1.0, 1.0]}, "2": {"a": [0.0, 1.0], "b": [1.0, 1.0]}}


def test_task_score_statistics():
    # S[0] = [0.5, 0], S[1][a] = 1, S[2] = [0.5, 1]: AP 0.75, BWT_score 0.5 - 1 = -0.5, forgetting_a 1 - 0.5 = 0.5.
    runs = RunRows.from_scores({"domains": ["a", "b"], "scores": SCORES})
    values = {k: interval(stat, [[runs]], draws=[np.array([[0, 1]]), np.array([[0, 1]])])["value"]
              for k, stat in SCORE_STATS.items()}  # fmt: skip
    assert values == {"ap": 0.75, "bwt_score": -0.5, "forgetting_mean": 0.5}
    # Replicates: a [1,1], b [0,0] -> S[2] = [1, 1], S[1][a] = 1: AP 1, BWT 0; a [0,0], b [0,1] -> S[2] = [0, 1],
    # S[1][a] = 1: AP 0.5, BWT -1. Percentiles of [0.5, 1]: 0.5125, 0.9875; of [-1, 0]: -0.975, -0.025.
    draws = [np.array([[1, 1], [0, 0]]), np.array([[0, 0], [0, 1]])]
    ap = interval(SCORE_STATS["ap"], [[runs]], draws=draws)
    bwt = interval(SCORE_STATS["bwt_score"], [[runs]], draws=draws)
    assert (ap["low"], ap["high"]) == (pytest.approx(0.5125), pytest.approx(0.9875))
    assert (bwt["low"], bwt["high"], bwt["excludes_zero"]) == (pytest.approx(-0.975), pytest.approx(-0.025), True)
    with pytest.raises(ValueError, match=r"\['b'\] have no task score"):
        RunRows.from_scores({"domains": ["a", "b"], "scores": {"0": {"a": [1.0]}}})


def test_benchmark_intervals_pair_the_settings_of_each_seed(tmp_path):
    import json

    from benchmarks.lib.intervals import benchmark_intervals, render_intervals

    def write(name, content):
        d = tmp_path / name
        d.mkdir()
        (d / "heldout_rows.json").write_text(json.dumps({"format": "crma_lightning heldout rows v1", **content}))
        return {"status": "complete", "run_dir": str(d)}

    def content(run):
        rows = {
            str(s): {d: {"loss_sum": run.loss_sum[s][j].tolist(), "tokens": run.tokens[s][j].tolist()}
                     for j, d in enumerate(run.domains) if run.loss_sum[s][j] is not None}
            for s in range(3)
        }  # fmt: skip
        return {"domains": run.domains, "rows": rows, "scores": SCORES, "documents": {}}

    x = _run(([1, 4], [1, 2]), ([1, 6], [1, 2]), ([4, 4], [2, 1]))
    per_seed = {"0": {"runs": {"NAIVE": write("n", content(REF)), "EWC": write("e", content(x))}}}
    out = benchmark_intervals(per_seed, {"EWC": "NAIVE"}, resamples=200, seed=3)
    direct = interval(PAIR_STATS["heldout_improvement_pct"], [[x, REF]], resamples=200, seed=3)
    assert out["pairs"]["EWC_vs_NAIVE"]["heldout_improvement_pct"] == direct  # same draws: seeded the same way
    assert out["modes"]["NAIVE"]["final_loss_mean"] == interval(RUN_STATS["final_loss_mean"], [[REF]], 200, seed=3)
    assert out["scores"]["pairs"]["EWC_vs_NAIVE"]["ap_diff"]["value"] == 0.0
    assert out["units_per_domain"] == {"a": 2, "b": 2}
    text = render_intervals(out)
    assert "| EWC vs NAIVE |" in text and "Task scores" in text


def _routed_content(a_final=(2, 6), flags_a=(True, False), flags_b=(False, True)):
    """Routed rows with REF's numbers as the routed loss matrix, and the final row's routing choices."""

    def cell(loss, tok, correct=(None, None)):
        return {"loss_sum": list(loss), "oracle_loss_sum": list(loss), "tokens": list(tok), "correct": list(correct)}

    routed = {
        "0": {"a": cell([3, 6], [1, 2]), "b": cell([6, 3], [2, 1])},
        "1": {"a": cell([1, 4], [1, 2], (True, True))},
        "2": {"a": cell(a_final, [1, 2], flags_a), "b": cell([4, 4], [2, 1], flags_b)},
    }
    return {"domains": ["a", "b"], "rows": {}, "routed": routed}


def test_routed_statistics_of_one_run():
    runs = RunRows.from_routed(_routed_content())
    # The routed matrix is REF's matrix: the routed drift is REF's drift, replicate by replicate (50.75, 97).
    drift = interval(ROUTED_STATS["drift_mean_routed_pct"], [[runs]], draws=DRAWS)
    assert drift["value"] == pytest.approx(60.0)
    assert (drift["low"], drift["high"]) == (pytest.approx(50.75), pytest.approx(97.0))
    # Plasticity: L~[1][a] 1, 5/3, 2, 5/3 and L~[2][b] 4, 8/3, 2, 8/3 -> means 2.5, 13/6, 2, 13/6
    # sorted [2, 13/6, 13/6, 2.5]: 2 + 0.075 (1/6) = 2.0125; 13/6 + 0.925 (1/3) = 2.475.
    plasticity = interval(ROUTED_STATS["plasticity_mean_routed"], [[runs]], draws=DRAWS)
    assert plasticity["value"] == pytest.approx(13 / 6)
    assert (plasticity["low"], plasticity["high"]) == (pytest.approx(2.0125), pytest.approx(2.475))
    # Accuracy (final row): a's flags [right, wrong] drawn [0,0] 1, [0,1] 0.5, [1,1] 0, [1,0] 0.5; b's [wrong,
    # right] drawn [1,1] 1, [0,1] 0.5, [0,0] 0, [1,0] 0.5 -> means 1, 0.5, 0, 0.5; sorted [0, 0.5, 0.5, 1]:
    # 0 + 0.075 * 0.5 = 0.0375; 0.5 + 0.925 * 0.5 = 0.9625.
    accuracy = interval(ROUTED_STATS["routing_accuracy_mean"], [[runs]], draws=DRAWS)
    assert accuracy["value"] == pytest.approx(0.5)
    assert (accuracy["low"], accuracy["high"]) == (pytest.approx(0.0375), pytest.approx(0.9625))
    forgetting = interval(ROUTED_STATS["base_relative_forgetting_mean_routed_pct"], [[runs]], draws=DRAWS)
    assert forgetting == interval(RUN_STATS["base_relative_forgetting_mean_pct"], [[REF]], draws=DRAWS)
    with pytest.raises(ValueError, match="no routed per-row numbers"):
        RunRows.from_routed({"domains": ["a"], "rows": {}})


def test_routed_rows_missing_for_some_stages_are_refused_not_nan():
    """A run resumed from a version without routed rows has them for the later stages only: no interval."""
    from benchmarks.lib.intervals import _routed
    from benchmarks.lib.results import Null

    content = _routed_content()
    content["rows"] = {"0": {}, "1": {}, "2": {}}
    del content["routed"]["0"], content["routed"]["1"]
    with pytest.raises(ValueError, match=r"routed rows for matrix rows \[2\], oracle rows for \[0, 1, 2\]"):
        RunRows.from_routed(content)
    why = _routed(content, {"routing": {"mode": "perplexity"}})
    assert isinstance(why, Null) and why.reason.startswith("no routed intervals: routed rows for matrix rows [2]")


def test_routed_drift_of_a_pair_is_paired():
    x, ref = RunRows.from_routed(_routed_content(a_final=(1, 6))), RunRows.from_routed(_routed_content())
    # L~_X[2][a]: [0,0] 1; [0,1] 7/3; [1,1] 3; [1,0] 7/3 over L~[1][a] 1, 5/3, 2, 5/3: drift 0, 40, 50, 40;
    # the pair's 100, 60, 50, 60 -> X - pair = -100, -20, 0, -20; sorted [-100, -20, -20, 0]:
    # -100 + 0.075 * 80 = -94; -20 + 0.925 * 20 = -1.5.
    out = interval(ROUTED_PAIR_STATS["drift_mean_routed_diff_pp"], [[x, ref]], draws=DRAWS)
    assert out["value"] == pytest.approx(40.0 - 60.0)
    assert (out["low"], out["high"], out["excludes_zero"]) == (pytest.approx(-94.0), pytest.approx(-1.5), True)


def test_routed_units_are_documents_and_null_flags_count_nowhere():
    content = {
        "domains": ["a"],
        "rows": {},
        "documents": {"a": [0, 0, 3]},
        "routed": {"1": {"a": {"loss_sum": [1.0, 2.0, 4.0], "oracle_loss_sum": [1.0, 2.0, 4.0], "tokens": [1, 1, 2],
                               "correct": [True, None, False]}}},
    }  # fmt: skip
    runs = RunRows.from_routed(content)
    assert runs.loss.loss_sum[1][0].tolist() == [3.0, 4.0] and runs.loss.tokens[1][0].tolist() == [2.0, 2.0]
    # Right choices / routed rows per document: doc 0 1 of 1 (the null row counts in neither), doc 3 0 of 1.
    assert runs.accuracy.loss_sum[1][0].tolist() == [1.0, 0.0] and runs.accuracy.tokens[1][0].tolist() == [1.0, 1.0]
    assert runs.rows_per_domain() == [2] and runs.matrix([None]).shape == (2, 2, 1, 1)


def test_benchmark_intervals_of_the_routed_settings(tmp_path):
    import json

    from benchmarks.lib.intervals import benchmark_intervals, render_intervals

    def write(name, content, mode):
        d = tmp_path / name
        d.mkdir()
        rows = {str(s): {d: {"loss_sum": REF.loss_sum[s][j].tolist(), "tokens": REF.tokens[s][j].tolist()}
                         for j, d in enumerate(REF.domains) if REF.loss_sum[s][j] is not None}
                for s in range(3)}  # fmt: skip
        content = {"format": "crma_lightning heldout rows v1", **content, "rows": rows, "documents": {}}
        (d / "heldout_rows.json").write_text(json.dumps(content))
        return {"status": "complete", "run_dir": str(d), "routing": {"mode": mode}}

    x = _routed_content(a_final=(1, 6))
    runs = {
        "NAIVE": write("n", {"domains": ["a", "b"]}, "none"),
        "FROZEN": write("f", _routed_content(), "perplexity"),
        "MODULAR": write("m", x, "perplexity"),
    }
    pairs = {"MODULAR": "FROZEN", "EWC": "NAIVE"}
    out = benchmark_intervals({"0": {"runs": runs}}, pairs, resamples=200, seed=3)
    routed = out["routed"]
    assert list(routed["modes"]) == ["FROZEN", "MODULAR"] and list(routed["pairs"]) == ["MODULAR_vs_FROZEN"]
    direct = interval(
        ROUTED_PAIR_STATS["drift_mean_routed_diff_pp"],
        [[RunRows.from_routed(x), RunRows.from_routed(_routed_content())]],
        resamples=200,
        seed=3,
    )
    assert routed["pairs"]["MODULAR_vs_FROZEN"]["drift_mean_routed_diff_pp"] == direct
    # One draw for oracle and routed numbers: FROZEN's routed matrix is its oracle one here, so are the intervals.
    assert routed["modes"]["FROZEN"]["drift_mean_routed_pct"] == out["modes"]["FROZEN"]["drift_mean_pct"]
    text = render_intervals(out)
    assert "| routed mean drift % |" in text and "| MODULAR | " in text and "MODULAR vs FROZEN, routed" in text
    # No routed setting: a null with its reason.
    alone = benchmark_intervals({"0": {"runs": {"NAIVE": runs["NAIVE"]}}}, {}, resamples=20, seed=3)
    assert "no setting was evaluated routed" in alone["routed"].reason
