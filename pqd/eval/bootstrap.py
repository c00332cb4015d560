"""Bootstrap intervals over samples: resample images, recompute the features' statistics and the FIDs.

The quantized and FP images of a seed are resampled together (paired statistics: which seeds were drawn cancels);
the reference statistics stay fixed. A conditioned model's seeds come in strata (seed i takes class or prompt
i mod P, so each condition has a fixed share): resamples draw within each stratum and the jackknife's groups hold
every stratum in proportion, or the class mix itself would vary and read as distance.

The intervals are bias-corrected normal intervals (:func:`corrected_interval`): an FID from N samples is biased
upwards (estimation noise only adds distance), and resamples, which repeat images, sit higher still, so the
percentile interval of the resamples misses the truth. The corrected interval is centred on the point value less its
jackknife estimate of bias (:func:`_jackknife`), with the resamples' spread; its coverage where the truth is known:
``make bench-coverage`` (docs/method.md).

:func:`frechet` is the product's one Fréchet distance, for point values and resamples alike: tr sqrt(S1 S2) = sum
of sqrt(eigenvalues of R S1 R), R the symmetric square root of S2, so a fixed side (the reference) is decomposed
once. It agrees with clean-fid's ``frechet_distance`` to 1e-6 relative and is several times faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from threadpoolctl import threadpool_limits

from pqd.formats.metrics import Interval

# below this feature dimension the resample loop runs on one BLAS thread: OpenBLAS's threads cost more than they
# save on [D, D] problems this small (4x slower on 2 busy cores at D = 128)
ONE_THREAD_MAX_DIM = 512

Stats = tuple[np.ndarray, np.ndarray]  # (mean [D], covariance [D, D]), float64


def stats(feats: np.ndarray) -> Stats:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix [D, D] (negative rounding noise in its
    eigenvalues is clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet(a: Stats, b: Stats, b_sqrt: np.ndarray) -> float:
    """Fréchet distance between Gaussians a and b, given the symmetric square root of b's covariance."""
    m = b_sqrt @ a[1] @ b_sqrt
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a[0] - b[0]
    return float(diff @ diff + np.trace(a[1]) + np.trace(b[1]) - 2 * tr_covmean)


def frechet(a: Stats, b: Stats) -> float:
    """Fréchet distance between two (mean, covariance) pairs: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    return _frechet(a, b, sqrt_psd(b[1]))


def percentile_interval(values: np.ndarray, confidence: float) -> Interval:
    """The central ``confidence`` interval of resampled values [B] (percentiles (1 -/+ confidence) / 2)."""
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return Interval(float(lo), float(hi))


def corrected_interval(values: np.ndarray, point: float, bias: float, confidence: float,
                       floor: float | None = None) -> Interval:
    """The bias-corrected normal interval (point - bias) -/+ z x sd of a statistic with point value ``point``, an
    estimate ``bias`` of the point value's bias (:func:`_jackknife`) and resampled values [B] (sd: their standard
    deviation; z: the normal quantile of ``confidence``). ``floor``: the smallest value the statistic can take (0 for
    a distance); neither bound is put below it."""
    values = np.asarray(values, dtype=np.float64)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = point - bias
    half = z * float(values.std(ddof=1)) if len(values) > 1 else 0.0
    lo, hi = centre - half, centre + half
    return Interval(lo, hi) if floor is None else Interval(max(lo, floor), max(hi, floor))


def _strata(n: int, strata: np.ndarray | None) -> np.ndarray:
    """Stratum labels int64 [n] (None: one stratum), checked against n."""
    if strata is None:
        return np.zeros(n, dtype=np.int64)
    strata = np.asarray(strata, dtype=np.int64)
    if strata.shape != (n,):
        raise ValueError(f"strata has shape {strata.shape}; expected one label per seed, ({n},)")
    return strata


def resample_indices(n: int, resamples: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """``resamples`` draws of n indices in [0, n) with replacement: int64 [resamples, n] (numpy, seeded). With
    ``strata`` (a label per index), each stratum's positions are drawn from its own members, so every draw keeps each
    stratum's count; one stratum draws as without."""
    labels = _strata(n, strata)
    rng = np.random.default_rng(seed)
    kinds = np.unique(labels)
    if len(kinds) == 1:
        return rng.integers(0, n, size=(resamples, n))
    out = np.empty((resamples, n), dtype=np.int64)
    for k in kinds:
        members = np.flatnonzero(labels == k)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


def jackknife_groups(n: int, groups: int, strata: np.ndarray | None = None) -> np.ndarray:
    """The delete-a-group jackknife's group of each of n seeds, int64 [n]: the seeds listed stratum by stratum (in
    seed order within one) and dealt to the groups in turn, so each group holds every stratum in proportion. One
    stratum: seed i is in group i mod ``groups``."""
    labels = _strata(n, strata)
    order = np.lexsort((np.arange(n), labels))  # stratum-major, seed order within a stratum
    member = np.empty(n, dtype=np.int64)
    member[order] = np.arange(n) % groups
    return member


@dataclass(frozen=True)
class PairedIntervals:
    """Bootstrap intervals of the paired statistics of one evaluation (see the module docstring)."""

    fid_quant_vs_ref: Interval
    fid_fp_vs_ref: Interval
    delta_fid: Interval
    fid_quant_vs_fp: Interval
    psnr_mean: Interval


class _Paired:
    """The five paired statistics of row subsets of one evaluation's features (the reference decomposed once)."""

    def __init__(self, quant: np.ndarray, fp: np.ndarray, ref: Stats, psnr: np.ndarray) -> None:
        self.quant, self.fp, self.psnr = (np.asarray(x, dtype=np.float64) for x in (quant, fp, psnr))
        if not (len(self.quant) == len(self.fp) == len(self.psnr)):
            raise ValueError(f"paired sets differ in size: {len(self.quant)} quantized, {len(self.fp)} FP, "
                             f"{len(self.psnr)} PSNR values")
        self.ref, self.ref_sqrt = ref, sqrt_psd(ref[1])
        self.blas_threads = 1 if self.quant.shape[1] <= ONE_THREAD_MAX_DIM else None

    def __call__(self, idx: np.ndarray | slice) -> tuple[float, float, float, float, float]:
        q, f = stats(self.quant[idx]), stats(self.fp[idx])
        fid_q, fid_f = _frechet(q, self.ref, self.ref_sqrt), _frechet(f, self.ref, self.ref_sqrt)
        return fid_q, fid_f, fid_q - fid_f, frechet(q, f), float(self.psnr[idx].mean())

    def point(self) -> np.ndarray:
        """The five statistics of all N seeds: float64 [5]."""
        with threadpool_limits(self.blas_threads, user_api="blas"):
            return np.array(self(slice(None)))


def paired_resamples(quant: np.ndarray, fp: np.ndarray, ref: Stats, psnr: np.ndarray, *, resamples: int, seed: int,
                     strata: np.ndarray | None = None, progress=None) -> np.ndarray:
    """FID(quantized, ref), FID(FP, ref), ΔFID, FID(quantized, FP) and the mean per-image PSNR of each of
    ``resamples`` draws of the N seeds: float64 [resamples, 5]. quant, fp: features [N, D], row i from seed i of
    both; ref: (mean, covariance); psnr [N]: quantized image i against FP image i; strata [N]: each seed's condition
    (class or prompt index; None: unconditioned), drawn within (:func:`resample_indices`). ``progress`` wraps the
    resample loop (e.g. tqdm)."""
    return _resampled(_Paired(quant, fp, ref, psnr), resamples, seed, strata, progress)


def _resampled(paired: _Paired, resamples: int, seed: int, strata: np.ndarray | None, progress=None) -> np.ndarray:
    out = np.empty((resamples, 5))
    rows = resample_indices(len(paired.quant), resamples, seed, strata)
    with threadpool_limits(paired.blas_threads, user_api="blas"):
        for b in progress(range(resamples)) if progress else range(resamples):
            out[b] = paired(rows[b])
    return out


# delete-a-group jackknife: the seeds dealt to JACKKNIFE_GROUPS groups (jackknife_groups)
JACKKNIFE_GROUPS = 25


def _jackknife(paired: _Paired, point: np.ndarray, strata: np.ndarray | None,
               groups: int = JACKKNIFE_GROUPS) -> np.ndarray:
    """The delete-a-group jackknife's estimate of the bias of each of the five point values: float64 [5],
    (G - 1) x (mean of the G values with one group of seeds left out - the point value). It removes a bias of order
    1/N, as an FID's is; the bootstrap's own estimate (mean of the resamples - point value) fell short of the FIDs'
    bias at the demo's sizes (docs/benchmarks.md, make bench-coverage). Groups hold the strata in proportion
    (:func:`jackknife_groups`): a group of seeds i = j mod 25 under classes i mod 10 holds 2 of the 10 classes, and
    leaving it out moved the class-conditional DiT demo's FID so far that its bias read 21.6 for a point value of 24.4
    (1.6 with balanced groups)."""
    n = len(paired.quant)
    g = min(groups, n)
    if g < 2:
        return np.zeros(5)
    member = jackknife_groups(n, g, strata)
    with threadpool_limits(paired.blas_threads, user_api="blas"):
        left_out = np.array([paired(member != j) for j in range(g)])
    return (g - 1) * (left_out.mean(axis=0) - point)


def paired_estimates(quant: np.ndarray, fp: np.ndarray, ref: Stats, psnr: np.ndarray, *, resamples: int, seed: int,
                     strata: np.ndarray | None = None, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything an interval of the five paired statistics is built from, with the reference decomposed once:
    the ``resamples`` bootstrap draws [resamples, 5] (:func:`paired_resamples`), the point values of all N seeds
    [5] and their jackknife bias [5] (:func:`_jackknife`), both respecting ``strata``."""
    paired = _Paired(quant, fp, ref, psnr)
    point = paired.point()
    return _resampled(paired, resamples, seed, strata, progress), point, _jackknife(paired, point, strata)


# the lowest value each of the five statistics can take: the FIDs are distances, ΔFID and the mean PSNR are not bounded
FLOORS = (0.0, 0.0, None, 0.0, None)


def paired_intervals(quant: np.ndarray, fp: np.ndarray, ref: Stats, psnr: np.ndarray, *, resamples: int, seed: int,
                     confidence: float, strata: np.ndarray | None = None, progress=None) -> PairedIntervals:
    """Bias-corrected intervals (:func:`corrected_interval`) of the five paired statistics: centred on the point
    value less its jackknife bias, with the spread of the bootstrap draws (:func:`paired_estimates`)."""
    out, point, bias = paired_estimates(quant, fp, ref, psnr, resamples=resamples, seed=seed, strata=strata,
                                        progress=progress)
    return PairedIntervals(*(corrected_interval(out[:, k], point[k], bias[k], confidence, FLOORS[k]) for k in range(5)))
