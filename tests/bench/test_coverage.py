"""The bootstrap coverage simulation (make bench-coverage) on a small case: known truths, the basic interval's
reflection, and the percentile FID intervals, which sit above their biased point values, missing the truth."""

import numpy as np
import pytest

from pqd.bench import coverage
from pqd.eval.bootstrap import frechet


def test_populations_have_the_asked_distances():
    fp, quant, ref, _ = coverage.populations(16, seed=3, ref_fid=6.0, quant_fid=0.05)
    assert frechet(fp, ref) == pytest.approx(6.0, rel=1e-6)
    assert 0 < frechet(quant, fp) <= 0.05


def test_basic_interval_is_the_percentile_interval_reflected_about_the_point():
    values = np.arange(1001, dtype=np.float64)
    iv = coverage.basic_interval(values, 400.0, 0.9)
    assert (iv.lo, iv.hi) == pytest.approx((2 * 400 - 950, 2 * 400 - 50))


def test_small_simulation_reports_coverage_per_method_and_statistic():
    r = coverage.simulate(trials=12, n=200, dim=8, resamples=100, confidence=0.95, seed=0, ref_fid=6.0,
                          quant_fid=0.05)
    assert r["truth"]["delta_fid"] == pytest.approx(r["truth"]["fid_quant_vs_ref"] - r["truth"]["fid_fp_vs_ref"])
    assert set(r["coverage"]) == {"percentile", "basic"}
    # finite-sample bias: the point values of the FIDs sit above the truth on average
    assert r["mean_point_value"]["fid_quant_vs_fp"] > r["truth"]["fid_quant_vs_fp"]
    for method in r["coverage"].values():
        assert all(0 <= c["coverage"] <= 1 for c in method.values())
