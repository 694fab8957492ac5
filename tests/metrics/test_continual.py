"""Continual-learning metrics against hand-computed 3-domain loss matrices (DESIGN §4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from crma_lightning.metrics import continual as metrics
from crma_lightning.metrics.continual import (
    base_relative_forgetting,
    bwt,
    drift,
    fwt,
    mean_base_relative_forgetting,
    mean_drift,
    mean_plasticity,
    overhead,
    plasticity,
    stability_gain,
    summarize,
)

# Rows: 0 = base model, i = after training domain i (1-based); columns: domains a, b, c (0-based).
FULL = [
    [4.0, 5.0, 8.0],  # base
    [2.0, 4.0, 6.0],  # after a
    [2.5, 2.0, 5.0],  # after b
    [3.0, 2.2, 1.0],  # after c
]
DOMAINS = ["a", "b", "c"]


def test_full_matrix_by_hand():
    # drift_c = 100 (M[3][c] - M[c+1][c]) / M[c+1][c]:  a: 100 (3.0 - 2.0) / 2.0 = 50;  b: 100 (2.2 - 2.0) / 2.0 = 10
    assert drift(FULL) == pytest.approx([50.0, 10.0])
    assert mean_drift(FULL) == pytest.approx(30.0)
    # base-relative: a: 100 (3.0 - 4.0) / 4.0 = -25;  b: 100 (2.2 - 5.0) / 5.0 = -56;  mean -40.5
    assert base_relative_forgetting(FULL) == pytest.approx([-25.0, -56.0])
    assert mean_base_relative_forgetting(FULL) == pytest.approx(-40.5)
    # BWT = mean(M[c+1][c] - M[3][c]) = mean(2.0 - 3.0, 2.0 - 2.2) = mean(-1.0, -0.2) = -0.6
    assert bwt(FULL) == pytest.approx(-0.6)
    # FWT = mean over c = 1, 2 of M[0][c] - M[c][c] = mean(5.0 - 4.0, 8.0 - 5.0) = mean(1, 3) = 2
    assert fwt(FULL) == pytest.approx(2.0)
    # plasticity = M[c+1][c] = 2.0, 2.0, 1.0; mean 5/3
    assert plasticity(FULL) == pytest.approx([2.0, 2.0, 1.0])
    assert mean_plasticity(FULL) == pytest.approx(5.0 / 3.0)


def test_upto_earlier_stage():
    # After stage 2 (row 2): drift a = 100 (2.5 - 2.0) / 2.0 = 25; base-rel a = 100 (2.5 - 4.0) / 4.0 = -37.5
    assert drift(FULL, upto=2) == pytest.approx([25.0])
    assert base_relative_forgetting(FULL, upto=2) == pytest.approx([-37.5])
    assert bwt(FULL, upto=2) == pytest.approx(2.0 - 2.5)  # -0.5
    assert fwt(FULL, upto=2) == pytest.approx(5.0 - 4.0)  # only c = 1
    assert plasticity(FULL, upto=2) == pytest.approx([2.0, 2.0])
    # A matrix that only has rows 0..2 gives the same numbers by default.
    assert drift(FULL[:3]) == drift(FULL, upto=2)
    assert mean_drift(FULL[:3]) == pytest.approx(25.0)


def test_one_stage_has_no_drift():
    one = FULL[:2]
    assert drift(one) == []
    assert mean_drift(one) is None
    assert base_relative_forgetting(one) == []
    assert mean_base_relative_forgetting(one) is None
    assert bwt(one) is None
    assert fwt(one) is None
    assert plasticity(one) == [2.0]
    # Only the base model evaluated: nothing is defined yet.
    assert plasticity(FULL[:1]) == []
    assert mean_plasticity(FULL[:1]) is None


def test_missing_entries_propagate_and_means_skip_them():
    seen_only = [
        [4.0, None, None],  # base evaluated on the first domain only
        [2.0, None, None],
        [2.5, 2.0, None],
        [3.0, 2.2, 1.0],
    ]
    assert drift(seen_only) == pytest.approx([50.0, 10.0])
    assert fwt(seen_only) is None  # future domains never evaluated
    # b has no base loss: its base-relative forgetting is None and the mean is a's alone (-25)
    assert base_relative_forgetting(seen_only) == [pytest.approx(-25.0), None]
    assert mean_base_relative_forgetting(seen_only) == pytest.approx(-25.0)

    never = [row[:] for row in FULL]
    never[1][0] = float("nan")  # domain a never evaluated right after its stage
    assert drift(never)[0] is None
    assert drift(never)[1] == pytest.approx(10.0)
    assert mean_drift(never) == pytest.approx(10.0)
    assert bwt(never) == pytest.approx(-0.2)  # only b: 2.0 - 2.2
    assert plasticity(never) == [None, 2.0, 1.0]
    assert mean_plasticity(never) == pytest.approx(1.5)


def test_numpy_input_with_nan():
    arr = np.array(FULL, dtype=np.float64)
    arr[3, 1] = np.nan
    assert drift(arr)[0] == pytest.approx(50.0)
    assert drift(arr)[1] is None
    assert isinstance(drift(arr)[0], float)


def test_zero_reference_is_undefined_not_an_error():
    m = [[1.0, 1.0], [0.0, 1.0], [1.0, 0.5]]
    assert drift(m) == [None]
    assert bwt(m) == pytest.approx(0.0 - 1.0)


def test_stability_gain_and_overhead():
    assert stability_gain(0.61, 1.0) == pytest.approx(0.39)  # "39% more stable"
    assert stability_gain(2.0, 1.0) == pytest.approx(-1.0)
    assert stability_gain(1.0, 0.0) is None
    assert stability_gain(None, 1.0) is None
    assert overhead(0.115, 0.1) == pytest.approx(1.15)
    # Per-step times: medians 2.5 (of 1, 2, 3, 100) and 2.0 (of 1, 2, 2) -> 1.25
    assert overhead([1.0, 2.0, 3.0, 100.0], [1.0, 2.0, 2.0]) == pytest.approx(1.25)
    assert overhead(1.0, 0.0) is None
    with pytest.raises(ValueError, match="var_x"):
        stability_gain("big", 1.0)


def test_summarize_is_json_and_keyed_by_domain():
    s = summarize(FULL, DOMAINS)
    json.dumps(s, allow_nan=False)
    assert s["stages_completed"] == 3
    assert s["drift"] == {"a": pytest.approx(50.0), "b": pytest.approx(10.0)}
    assert s["drift_mean"] == pytest.approx(30.0)
    assert s["base_relative_forgetting_mean"] == pytest.approx(-40.5)
    assert s["bwt"] == pytest.approx(-0.6)
    assert s["fwt"] == pytest.approx(2.0)
    assert s["plasticity"] == {"a": 2.0, "b": 2.0, "c": 1.0}
    assert s["loss_matrix"] == FULL

    early = summarize(FULL, DOMAINS, upto=1)
    assert early["drift"] == {} and early["drift_mean"] is None and early["bwt"] is None
    assert early["plasticity"] == {"a": 2.0}
    nan = summarize([[1.0, math.nan]], ["x", "y"])
    assert nan["loss_matrix"] == [[1.0, None]]


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ([], "empty"),
        ([[1.0, 2.0], [1.0]], "ragged"),
        ([[]], "empty"),
        ([[1.0], [1.0], [1.0]], "at most 2 rows"),
        ([[1.0, "x"]], r"\[0\]\[1\]"),
        ([[1.0, True]], "not a number"),
        ("abc", "list of rows"),
        ([1.0, 2.0], "row 0"),
    ],
)
def test_invalid_matrix(matrix, match):
    with pytest.raises(ValueError, match=match):
        drift(matrix)


def test_invalid_upto_and_domains():
    for bad in (-1, 4, 1.5, True):
        with pytest.raises(ValueError, match="upto"):
            bwt(FULL, upto=bad)
    with pytest.raises(ValueError, match="3 columns"):
        summarize(FULL, ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        summarize(FULL, ["a", "a", "b"])


def test_public_api_is_torch_free():
    assert "torch" not in vars(metrics)
