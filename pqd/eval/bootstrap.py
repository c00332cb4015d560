"""Bootstrap intervals over samples: resample images, recompute the features' statistics and the FIDs.

The quantized and FP images of a seed are resampled together (paired statistics: which seeds were drawn cancels);
the reference statistics stay fixed. Intervals are percentile intervals; the FIDs' sit above their point values
(resamples repeat images, and an FID only grows with noise), ΔFID's and the mean PSNR's do not (docs/method.md).

:func:`frechet` is the product's one Fréchet distance, for point values and resamples alike: tr sqrt(S1 S2) = sum
of sqrt(eigenvalues of R S1 R), R the symmetric square root of S2, so a fixed side (the reference) is decomposed
once. It agrees with clean-fid's ``frechet_distance`` to 1e-6 relative and is several times faster.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` draws of n indices in [0, n) with replacement: int64 [resamples, n] (numpy, seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


@dataclass(frozen=True)
class PairedIntervals:
    """Bootstrap intervals of the paired statistics of one evaluation (see the module docstring)."""

    fid_quant_vs_ref: Interval
    fid_fp_vs_ref: Interval
    delta_fid: Interval
    fid_quant_vs_fp: Interval
    psnr_mean: Interval


def paired_resamples(quant: np.ndarray, fp: np.ndarray, ref: Stats, psnr: np.ndarray, *, resamples: int, seed: int,
                     progress=None) -> np.ndarray:
    """FID(quantized, ref), FID(FP, ref), ΔFID, FID(quantized, FP) and the mean per-image PSNR of each of
    ``resamples`` draws of the N seeds: float64 [resamples, 5]. quant, fp: features [N, D], row i from seed i of
    both; ref: (mean, covariance); psnr [N]: quantized image i against FP image i. ``progress`` wraps the resample
    loop (e.g. tqdm)."""
    quant, fp, psnr = (np.asarray(x, dtype=np.float64) for x in (quant, fp, psnr))
    if not (len(quant) == len(fp) == len(psnr)):
        raise ValueError(f"paired sets differ in size: {len(quant)} quantized, {len(fp)} FP, {len(psnr)} PSNR values")
    out = np.empty((resamples, 5))
    rows = resample_indices(len(quant), resamples, seed)
    with threadpool_limits(1 if quant.shape[1] <= ONE_THREAD_MAX_DIM else None, user_api="blas"):
        ref_sqrt = sqrt_psd(ref[1])
        for b in progress(range(resamples)) if progress else range(resamples):
            idx = rows[b]
            q, f = stats(quant[idx]), stats(fp[idx])
            fid_q, fid_f = _frechet(q, ref, ref_sqrt), _frechet(f, ref, ref_sqrt)
            out[b] = (fid_q, fid_f, fid_q - fid_f, frechet(q, f), psnr[idx].mean())
    return out


def paired_intervals(quant: np.ndarray, fp: np.ndarray, ref: Stats, psnr: np.ndarray, *, resamples: int, seed: int,
                     confidence: float, progress=None) -> PairedIntervals:
    """Percentile intervals of the five paired statistics of :func:`paired_resamples`."""
    out = paired_resamples(quant, fp, ref, psnr, resamples=resamples, seed=seed, progress=progress)
    return PairedIntervals(*(percentile_interval(out[:, k], confidence) for k in range(5)))
