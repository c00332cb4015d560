"""``make bench-coverage``: do the evaluation's bootstrap intervals cover at their stated level?

Simulated where the truth is known: Gaussian features. The FP population N(mu_f, S_f) has a decaying spectrum, the
reference statistics (mu_r, S_r) are fixed and exact, as the evaluate stage's are, and a quantized feature is its
FP feature plus a shift and independent noise, q_i = f_i + delta + e_i, so both populations, and so the true FID
vs reference, FID vs FP and ΔFID, are known in closed form. Each trial draws N paired samples and computes the
evaluate stage's intervals from ``--resamples`` bootstrap draws (pqd.eval.bootstrap.paired_estimates) in three ways:

- corrected: the bias-corrected normal interval, (point - jackknife bias) -/+ z x sd of the resamples (what the
  evaluate stage reports and the release gate reads: pqd.eval.bootstrap.corrected_interval, paired_estimates);
- percentile: the central interval of the resampled values (what the evaluate stage reported before);
- basic: the percentile interval reflected about the point value, [2 x point - hi, 2 x point - lo], which carries
  the bias that resampling shows (an FID's resamples sit above its point value) back onto the point value.

With ``--classes P`` the population is class-conditional, as a class- or prompt-conditioned model's evaluation is:
seed i takes class i mod P, each class shifts the features' mean, and the truth is that of the equal mixture. The
intervals then come from resamples within each class and jackknife groups that hold every class
(pqd.eval.bootstrap's strata), and a fourth method, "corrected, classes ignored", shows what the same interval does
when it treats the seeds as one population.

Coverage is the share of trials whose interval holds the truth; its binomial standard error is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from pqd.errors import MissingInputError, ParamError, command
from pqd.eval import fid
from pqd.eval.bootstrap import FLOORS, PairedIntervals, Stats, corrected_interval, frechet, paired_estimates, percentile_interval
from pqd.formats.metrics import Interval
from pqd.params import load_params

# the FIDs and ΔFID: the first four columns of the bootstrap draws, named as PairedIntervals names them
STATISTICS = tuple(f.name for f in fields(PairedIntervals))[:4]
METHODS = ("corrected", "percentile", "basic")
UNSTRATIFIED = "corrected, classes ignored"  # with classes: the corrected interval from draws that ignore them


def populations(dim: int, seed: int, ref_fid: float, quant_fid: float) -> tuple[Stats, Stats, Stats, np.ndarray]:
    """(FP population, quantized population, reference statistics, the noise's standard deviation per dimension).
    The reference is a shifted, 10% wider copy of the FP population, the shift scaled so that FID(FP, ref) is about
    ``ref_fid``; the quantized population's shift and noise give FID(quantized, FP) about ``quant_fid``."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    cov_f = (basis * (1.0 / (1.0 + np.arange(dim)))) @ basis.T
    mu_f = rng.standard_normal(dim) * 0.3
    direction = rng.standard_normal(dim)
    cov_r = cov_f * 1.1
    base = frechet((mu_f, cov_f), (mu_f, cov_r))
    mu_r = mu_f + direction / np.linalg.norm(direction) * np.sqrt(max(ref_fid - base, 0.0))
    noise_sd = np.full(dim, np.sqrt(quant_fid / 2 / dim))  # about half of FID(q, FP) from the noise ...
    away = rng.standard_normal(dim)  # a direction of its own, not towards the reference
    delta = away / np.linalg.norm(away) * np.sqrt(quant_fid / 2)  # ... half from the shift
    quant = (mu_f + delta, cov_f + np.diag(noise_sd ** 2))
    return (mu_f, cov_f), quant, (mu_r, cov_r), noise_sd


def basic_interval(values: np.ndarray, point: float, confidence: float) -> Interval:
    """The percentile interval of ``values`` reflected about ``point``: [2 x point - hi, 2 x point - lo]."""
    iv = percentile_interval(values, confidence)
    return Interval(2 * point - iv.hi, 2 * point - iv.lo)


Draw = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]  # (rng, n) -> paired (quant, fp) [n, D]


def truths(q_pop: Stats, fp_pop: Stats, ref: Stats) -> dict[str, float]:
    t = {"fid_quant_vs_ref": frechet(q_pop, ref), "fid_fp_vs_ref": frechet(fp_pop, ref),
         "fid_quant_vs_fp": frechet(q_pop, fp_pop)}
    t["delta_fid"] = t["fid_quant_vs_ref"] - t["fid_fp_vs_ref"]
    return t


def seed_classes(n: int, classes: int) -> np.ndarray | None:
    """Each of n seeds' class, i mod ``classes``, as the generate stage assigns them; None for one class."""
    return np.arange(n) % classes if classes > 1 else None


def coverage_trials(draw: Draw, truth: dict[str, float], ref: Stats, trials: int, n: int, resamples: int,
                    confidence: float, seed: int, classes: int = 1) -> dict:
    """``trials`` draws of n paired samples; per trial and statistic, whether each method's interval holds the truth.
    ``classes`` > 1: seed i is of class i mod classes (the draw's rows), and the intervals respect it."""
    rng = np.random.default_rng(seed + 1)
    strata = seed_classes(n, classes)
    methods = (*METHODS, UNSTRATIFIED) if strata is not None else METHODS
    hits = {m: {s: 0 for s in STATISTICS} for m in methods}
    points: dict[str, list[float]] = {s: [] for s in STATISTICS}
    spreads: dict[str, list[float]] = {s: [] for s in STATISTICS}  # each trial's sd of the resampled values
    for trial in tqdm(range(trials), desc="coverage trials", unit="trial"):
        quant, fp = draw(rng, n)
        draws, point, bias = paired_estimates(quant, fp, ref, np.zeros(n), resamples=resamples, seed=seed + 2 + trial,
                                              strata=strata)
        plain = (paired_estimates(quant, fp, ref, np.zeros(n), resamples=resamples, seed=seed + 2 + trial)
                 if strata is not None else None)
        for k, s in enumerate(STATISTICS):
            points[s].append(float(point[k]))
            spreads[s].append(float(draws[:, k].std(ddof=1)))
            ivs = [("corrected", corrected_interval(draws[:, k], point[k], bias[k], confidence, FLOORS[k])),
                   ("percentile", percentile_interval(draws[:, k], confidence)),
                   ("basic", basic_interval(draws[:, k], point[k], confidence))]
            if plain is not None:
                ivs.append((UNSTRATIFIED, corrected_interval(plain[0][:, k], point[k], plain[2][k], confidence,
                                                             FLOORS[k])))
            for m, iv in ivs:
                hits[m][s] += iv.lo <= truth[s] <= iv.hi
    se = lambda p: float(np.sqrt(p * (1 - p) / trials))  # noqa: E731
    return {"trials": trials, "n": n, "classes": classes, "resamples": resamples, "confidence": confidence,
            "seed": seed, "truth": truth,
            "mean_point_value": {s: float(np.mean(v)) for s, v in points.items()},
            "sd_point_value": {s: float(np.std(v, ddof=1)) for s, v in points.items()},
            # the spread the intervals use, against the point values' own sd above
            "median_resample_sd": {s: float(np.median(v)) for s, v in spreads.items()},
            "coverage": {m: {s: {"coverage": h / trials, "se": se(h / trials)} for s, h in c.items()}
                         for m, c in hits.items()}}


# the class means' spread against the spread within a class (trace of their covariances): 3.9 on the DiT demo's
# DigitNet features (500 FP samples, 10 classes); a classifier's features separate classes, so it is large
CLASS_SPREAD = 4.0


def class_shifts(dim: int, classes: int, seed: int, within_trace: float, spread: float = CLASS_SPREAD) -> np.ndarray:
    """[classes, dim] mean shifts of the classes, centred (they average to 0), the trace of their covariance
    ``spread`` x ``within_trace``; zeros for one class."""
    if classes <= 1:
        return np.zeros((1, dim))
    m = np.random.default_rng(seed + 7).standard_normal((classes, dim))
    m -= m.mean(axis=0)
    return m * np.sqrt(spread * within_trace / (np.sum(m ** 2) / classes))


def simulate(trials: int, n: int, dim: int, resamples: int, confidence: float, seed: int, ref_fid: float,
             quant_fid: float, classes: int = 1, class_spread: float = CLASS_SPREAD) -> dict:
    """Coverage on Gaussian features (:func:`populations`); ``classes`` > 1: seed i's features are shifted by class
    i mod classes (:func:`class_shifts`), and the truth is the equal mixture's (its mean and covariance)."""
    fp_pop, q_pop, ref, noise_sd = populations(dim, seed, ref_fid, quant_fid)
    delta = q_pop[0] - fp_pop[0]
    chol = np.linalg.cholesky(fp_pop[1] + 1e-12 * np.eye(dim))
    shifts = class_shifts(dim, classes, seed, float(np.trace(fp_pop[1])), class_spread)
    between = shifts.T @ shifts / len(shifts)  # the class means' covariance (they are centred)
    mix = lambda pop: (pop[0], pop[1] + between)  # noqa: E731

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        fp = fp_pop[0] + rng.standard_normal((n, dim)) @ chol.T + shifts[np.arange(n) % len(shifts)]
        return fp + delta + rng.standard_normal((n, dim)) * noise_sd, fp

    return {"population": "gaussian" if classes <= 1 else f"gaussian, {classes} classes, spread {class_spread:g}",
            "dim": dim,
            **coverage_trials(draw, truths(mix(q_pop), mix(fp_pop), ref), ref, trials, n, resamples, confidence,
                              seed, classes)}


def simulate_pool(quant: np.ndarray, fp: np.ndarray, ref: Stats, trials: int, n: int, resamples: int,
                  confidence: float, seed: int, classes: int = 1) -> dict:
    """Coverage on real features: the population is a pool of paired features (quant[i], fp[i]) itself, drawn with
    replacement, so its FIDs are known exactly (population covariances). ``classes`` > 1: pool row i is of class
    i mod classes (the evaluation's seeds 0..N-1), a trial's seed j is drawn from class j mod classes, and the
    population is the equal mixture of the classes."""
    labels = np.arange(len(quant)) % classes
    members = [np.flatnonzero(labels == c) for c in range(classes)]
    weight = np.empty(len(quant))  # each class weighs 1/classes, shared by its rows
    for m in members:
        weight[m] = 1.0 / (classes * len(m))

    def pop(x: np.ndarray) -> Stats:
        mu = weight @ x
        return mu, (x - mu).T @ ((x - mu) * weight[:, None])

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        cls = np.arange(n) % classes
        idx = np.empty(n, dtype=np.int64)
        for c, m in enumerate(members):
            at = np.flatnonzero(cls == c)
            idx[at] = m[rng.integers(0, len(m), len(at))]
        return quant[idx], fp[idx]

    return {"population": f"pool of {len(quant)} feature pairs", "dim": quant.shape[1],
            **coverage_trials(draw, truths(pop(quant), pop(fp), ref), ref, trials, n, resamples, confidence, seed,
                              classes)}


def pool_from_run(data: Path, params_file: Path) -> tuple[np.ndarray, np.ndarray, Stats]:
    """(quantized features, FP features, reference statistics) of a pipeline run's evaluation: the quantized and FP
    images of the evaluation seeds under ``data`` (data/samples/quant, data/samples/fp/a), through the extractor and
    reference of ``params_file``'s evaluate section."""
    ev = load_params(params_file).evaluate
    ex = fid.build_extractor(ev.features, data / "model")
    ref, _, _ = fid.reference_stats(ev.reference, ex, ev.batch_size, "cpu",
                                    fid.probe_size(ex, data / "samples/fp/a"))
    quant = fid.folder_features(data / "samples/quant/images", ex, ev.batch_size)
    return quant, fid.folder_features(data / "samples/fp/a", ex, ev.batch_size), ref


@command("bench-coverage")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.coverage", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--n", type=int, default=1000, help="paired samples per trial (generate.eval_samples)")
    ap.add_argument("--dim", type=int, default=128, help="feature dimension (the demo's DigitNet features: 128)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap draws per trial (evaluate.bootstrap: 1000)")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--ref-fid", type=float, default=6.0, help="true FID(FP, reference)")
    ap.add_argument("--quant-fid", type=float, default=0.05, help="true FID(quantized, FP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=1, help="seed i of class i mod CLASSES (a class- or prompt-"
                    "conditioned model's evaluation; with --pool: the run's generate.prompts or classes); 1: none")
    ap.add_argument("--class-spread", type=float, default=CLASS_SPREAD, help="Gaussian features with --classes: the "
                    "class means' spread over the spread within a class (traces)")
    ap.add_argument("--pool", metavar="DATA", help="real features instead of Gaussian ones: the quantized and FP "
                    "evaluation images of the pipeline run under DATA (e.g. data, after make run), as the population")
    ap.add_argument("--params", default="params.yaml", help="with --pool: whose evaluate.features and reference")
    ap.add_argument("--out", default="data/bench/coverage.json")
    args = ap.parse_args(argv)
    if args.classes < 1:
        raise ParamError(f"--classes {args.classes} is not allowed: expected 1 (unconditioned) or more")
    if args.pool and not (Path(args.pool) / "samples/quant/images").is_dir():
        raise MissingInputError(f"--pool {args.pool}: no evaluation images under it ({args.pool}/samples/quant/images); "
                                f"expected a pipeline's data folder after the evaluate stage (make run)")
    t0 = time.perf_counter()
    if args.pool:
        quant, fp, ref = pool_from_run(Path(args.pool), Path(args.params))
        result = simulate_pool(quant, fp, ref, args.trials, args.n, args.resamples, args.confidence, args.seed,
                               args.classes)
    else:
        result = simulate(args.trials, args.n, args.dim, args.resamples, args.confidence, args.seed, args.ref_fid,
                          args.quant_fid, args.classes, args.class_spread)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
