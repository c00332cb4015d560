"""The bootstrap over samples (pqd.eval.bootstrap): its Fréchet distance is clean-fid's and the textbook one, its intervals are those of
the resampled statistic, and resampling pairs the quantized and FP images of a seed."""

import numpy as np
import pytest
from cleanfid.fid import frechet_distance
from scipy import linalg

from pqd.eval import bootstrap as bs


def features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift


@pytest.mark.parametrize("n, d", [(400, 16), (300, 128), (60, 128)])  # the last: rank-deficient covariances
def test_frechet_is_clean_fids_and_the_textbook_formula(n, d):
    a, b = bs.stats(features(n, d, 0)), bs.stats(features(n + 50, d, 1, shift=0.2))
    assert bs.frechet(a, b) == pytest.approx(frechet_distance(a[0], a[1], b[0], b[1]), rel=1e-6, abs=1e-8)
    covmean = linalg.sqrtm(a[1] @ b[1]).real
    textbook = ((a[0] - b[0]) ** 2).sum() + np.trace(a[1] + b[1] - 2 * covmean)
    assert bs.frechet(a, b) == pytest.approx(textbook, rel=1e-6, abs=1e-8)
    assert abs(bs.frechet(a, a)) < 1e-6 * np.trace(a[1])  # rounding only, also with singular covariances


def test_percentile_interval():
    values = np.arange(1001, dtype=float)  # 0..1000
    iv = bs.percentile_interval(values, 0.95)
    assert (iv.lo, iv.hi) == pytest.approx((25.0, 975.0))
    assert bs.percentile_interval(values, 0.5).lo == pytest.approx(250.0)


def test_corrected_interval_is_centred_on_the_point_less_its_bias_with_the_resamples_spread():
    values = np.array([5.0, 6.0, 7.0])  # sd 1
    iv = bs.corrected_interval(values, 5.0, 1.0, 0.95)
    assert (iv.lo, iv.hi) == pytest.approx((4 - 1.959964, 4 + 1.959964), rel=1e-6)
    assert bs.corrected_interval(values, 5.0, 1.0, 0.95, floor=3.0).lo == 3.0  # a distance is not put below 0
    assert bs.corrected_interval(values, 5.0, 1.0, 0.5).hi == pytest.approx(4 + 0.674490, rel=1e-6)


def test_jackknife_removes_a_bias_of_order_one_over_n():
    """The mean PSNR is unbiased: its jackknife bias is 0. FID(FP, ref) with the reference's own population: the
    truth is 0, the point value is pure estimation bias, and the jackknife finds most of it."""
    rng = np.random.default_rng(11)
    d, n = 8, 400
    ref = (np.zeros(d), np.eye(d))
    f = rng.standard_normal((n, d))
    _, point, bias = bs.paired_estimates(f, f, ref, rng.normal(30, 3, n), resamples=2, seed=0)
    assert abs(bias[4]) < 1e-9 and abs(bias[3]) < 1e-9  # mean PSNR; FID(q, FP) of identical sets is 0 on every subset
    assert 0.5 * point[1] < bias[1] < 1.5 * point[1]


def test_resampling_is_seeded_and_with_replacement():
    a, b = bs.resample_indices(50, 3, seed=7), bs.resample_indices(50, 3, seed=7)
    assert a.shape == (3, 50) and (a == b).all() and (a != bs.resample_indices(50, 3, seed=8)).any()
    assert a.min() >= 0 and a.max() < 50 and any(len(set(r)) < 50 for r in a)  # repeats: with replacement


def test_mean_psnr_interval_matches_the_normal_theory_interval():
    """For a mean, the bootstrap interval agrees with mean +- 1.96 standard errors (large n)."""
    rng = np.random.default_rng(3)
    psnr = rng.normal(40.0, 4.0, 2000)
    f = features(2000, 8, 4)
    ci = bs.paired_intervals(f, f, bs.stats(f), psnr, resamples=1000, seed=0, confidence=0.95).psnr_mean
    half = 1.96 * psnr.std(ddof=1) / np.sqrt(len(psnr))
    assert ci.lo == pytest.approx(psnr.mean() - half, abs=0.06 * half * 2)
    assert ci.hi == pytest.approx(psnr.mean() + half, abs=0.06 * half * 2)


def test_identical_sets_give_zero_intervals_for_the_paired_statistics():
    """Quantized images equal to the FP images of their seeds: FID(quantized, FP) and ΔFID are 0 on every
    resample (the pairing is exact), while FID vs the reference still varies."""
    f, ref = features(200, 16, 5), bs.stats(features(500, 16, 6, shift=0.5))
    ci = bs.paired_intervals(f, f.copy(), ref, np.full(200, 60.0), resamples=200, seed=1, confidence=0.9)
    assert abs(ci.fid_quant_vs_fp.lo) < 1e-8 and abs(ci.fid_quant_vs_fp.hi) < 1e-8  # rounding only
    assert abs(ci.delta_fid.lo) < 1e-8 and abs(ci.delta_fid.hi) < 1e-8
    assert ci.fid_quant_vs_ref.hi - ci.fid_quant_vs_ref.lo > 0.01
    assert ci.fid_quant_vs_ref == ci.fid_fp_vs_ref


def test_paired_intervals_are_tighter_than_unpaired_ones():
    """A small per-seed perturbation: the paired ΔFID interval is far narrower than each FID's own interval, and
    contains the point ΔFID."""
    f = features(500, 16, 7)
    q = f + 0.05 * np.random.default_rng(8).standard_normal(f.shape)
    ref = bs.stats(features(800, 16, 9, shift=0.3))
    ci = bs.paired_intervals(q, f, ref, np.full(500, 30.0), resamples=300, seed=2, confidence=0.95)
    delta = bs.frechet(bs.stats(q), ref) - bs.frechet(bs.stats(f), ref)
    assert ci.delta_fid.lo <= delta <= ci.delta_fid.hi
    assert ci.delta_fid.hi - ci.delta_fid.lo < 0.2 * (ci.fid_fp_vs_ref.hi - ci.fid_fp_vs_ref.lo)
    fid_qf = bs.frechet(bs.stats(q), bs.stats(f))
    assert ci.fid_quant_vs_fp.lo <= fid_qf * 1.5 and ci.fid_quant_vs_fp.hi >= fid_qf * 0.5


def test_mismatched_sets_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        bs.paired_intervals(features(10, 4, 0), features(9, 4, 1), bs.stats(features(20, 4, 2)), np.zeros(10),
                            resamples=100, seed=0, confidence=0.95)


def test_resamples_within_strata_keep_each_strata_count():
    """A conditioned model's seeds (class i mod 4): every draw keeps 3 seeds of each class, drawn from that class;
    one stratum draws exactly as without strata."""
    labels = np.arange(12) % 4
    rows = bs.resample_indices(12, 50, seed=3, strata=labels)
    assert rows.shape == (50, 12) and (labels[rows] == labels).all()
    assert any(len(set(r)) < 12 for r in rows)  # still with replacement
    assert (bs.resample_indices(12, 5, seed=3, strata=np.zeros(12)) == bs.resample_indices(12, 5, seed=3)).all()
    with pytest.raises(ValueError, match="one label per seed"):
        bs.resample_indices(12, 5, seed=3, strata=labels[:10])


def test_jackknife_groups_hold_every_stratum():
    """One stratum: seed i in group i mod G, as before strata. Ten classes (i mod 10) and 25 groups of 500 seeds:
    every group holds 2 seeds of each class (seed i mod 25 would hold 2 of the 10 classes)."""
    assert (bs.jackknife_groups(60, 25) == np.arange(60) % 25).all()
    labels = np.arange(500) % 10
    groups = bs.jackknife_groups(500, 25, labels)
    counts = np.array([[np.sum((groups == g) & (labels == c)) for c in range(10)] for g in range(25)])
    assert (counts == 2).all()


def test_jackknife_bias_of_class_conditioned_features():
    """Ten well-separated classes, seed i of class i mod 10, the reference the exact mixture: the truth of
    FID(FP, ref) is 0, so the point value is all bias. With the classes as strata the jackknife finds it; with the
    seeds as one population it finds ten times more (leaving out a group of two classes moves the mean)."""
    rng = np.random.default_rng(5)
    d, n, classes = 16, 500, 10
    shifts = rng.standard_normal((classes, d)) * 2.0
    shifts -= shifts.mean(axis=0)
    labels = np.arange(n) % classes
    f = rng.standard_normal((n, d)) + shifts[labels]
    ref = (np.zeros(d), np.eye(d) + shifts.T @ shifts / classes)
    _, point, bias = bs.paired_estimates(f, f, ref, np.zeros(n), resamples=2, seed=0, strata=labels)
    _, _, ignored = bs.paired_estimates(f, f, ref, np.zeros(n), resamples=2, seed=0)
    assert 0.5 * point[1] < bias[1] < 1.5 * point[1]
    assert ignored[1] > 5 * point[1]
