"""Intervals over replicates and paired verdicts of make bench (pqd.bench.stats), against scipy and by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pqd.bench import report, stats


def test_t_interval_is_scipys():
    values = [0.12, 0.17, 0.15]
    mi = stats.t_interval(values, 0.95)
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert (mi.mean, mi.lo, mi.hi, mi.n) == (pytest.approx(np.mean(values)), pytest.approx(lo), pytest.approx(hi), 3)
    # three replicates at 95%: 4.30 standard errors each side
    assert (mi.hi - mi.mean) / sps.sem(values) == pytest.approx(4.3027, abs=1e-4)


def test_t_interval_with_one_value_or_none():
    one = stats.t_interval([0.5], 0.95)
    assert one.mean == 0.5 and math.isnan(one.lo) and math.isnan(one.hi) and one.n == 1
    assert stats.t_interval([], 0.95).n == 0 and stats.t_interval([math.nan, 1.0, 3.0], 0.95).n == 2


@pytest.mark.parametrize("lo, hi, lower_is_better, expected", [
    (-0.3, -0.1, True, "better"), (0.1, 0.3, True, "worse"), (-0.1, 0.2, True, stats.NO_DIFFERENCE),
    (0.5, 1.5, False, "better"), (-1.5, -0.5, False, "worse"), (0.0, 1.0, False, stats.NO_DIFFERENCE),
    (math.nan, math.nan, True, stats.NO_DIFFERENCE),
])
def test_verdict_follows_from_whether_the_interval_excludes_zero(lo, hi, lower_is_better, expected):
    assert stats.verdict(stats.MeanInterval((lo + hi) / 2, lo, hi, 3), lower_is_better) == expected


def results() -> pd.DataFrame:
    """Three replicates of two rows on one model: 'b' is worse than 'a' by 0.10 +- 0.01 FID vs FP in every replicate
    while both vary by far more between replicates; PSNR differs by noise only."""
    rows = []
    for k, (base, noise) in enumerate([(0.5, 0.01), (0.9, -0.01), (0.2, 0.0)]):
        rows.append({"model": "m", "replicate": k, "key": "w4-a", "row": "a", "bits": "W4A8", "evaluate.fid_quant_vs_fp": base,
                     "evaluate.delta_fid": base, "evaluate.psnr_mean": 30.0 + k, "evaluate.fid_quant_vs_fp_ci.lo": base - 0.05,
                     "evaluate.fid_quant_vs_fp_ci.hi": base + 0.05})
        rows.append({"model": "m", "replicate": k, "key": "w4-b", "row": "b", "bits": "W4A8",
                     "evaluate.fid_quant_vs_fp": base + 0.10 + noise, "evaluate.delta_fid": base + 0.10 + noise,
                     "evaluate.psnr_mean": 30.0 + k + (0.3, -0.3, 0.1)[k], "evaluate.fid_quant_vs_fp_ci.lo": base, "evaluate.fid_quant_vs_fp_ci.hi": base + 0.2})
    return pd.DataFrame(rows)


def test_paired_comparison_sees_a_difference_the_unpaired_intervals_hide():
    df = results()
    summary = stats.summarize(df, 0.95).set_index("row")
    # unpaired: the two rows' intervals overlap widely
    assert summary.loc["a", "evaluate.fid_quant_vs_fp_hi"] > summary.loc["b", "evaluate.fid_quant_vs_fp_lo"]
    assert summary.loc["b", "evaluate.fid_quant_vs_fp_ci.lo"] == pytest.approx(np.mean([0.5, 0.9, 0.2]))
    paired = stats.compare(df, [("w4-a", "w4-b")], 0.95).set_index("metric")
    assert paired.loc["evaluate.fid_quant_vs_fp", "diff"] == pytest.approx(-0.10)
    assert paired.loc["evaluate.fid_quant_vs_fp", "verdict"] == "better"  # for the first row, a
    assert paired.loc["evaluate.psnr_mean", "verdict"] == stats.NO_DIFFERENCE
    assert (paired["first"] == "a W4A8").all() and (paired["second"] == "b W4A8").all() and (paired["n"] == 3).all()


def test_comparisons_use_only_the_replicates_both_rows_have():
    df = results()
    df = df[~((df["key"] == "w4-b") & (df["replicate"] == 2))]
    paired = stats.compare(df, [("w4-a", "w4-b"), ("w4-a", "w4-missing")], 0.95)
    assert set(paired["n"]) == {2} and set(paired["second"]) == {"b W4A8"}


def test_the_frontier_keeps_the_points_nothing_beats_on_both_size_and_error():
    # (bits, FID vs FP): 4.18 per channel, 4.5 mixed (better), 4.33 groups (worse than per channel: off the
    # frontier), 8.1 (best); a tie in error at more bits is off the frontier too
    points = [(4.18, 0.31), (4.5, 0.12), (4.33, 0.35), (8.1, 0.02), (8.3, 0.02)]
    assert report.frontier(points) == [0, 1, 3]
