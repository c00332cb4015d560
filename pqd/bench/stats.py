"""Statistics of ``make bench`` over replicates: a mean and an interval per metric, paired comparisons of rows.

Intervals over replicates are Student-t intervals of the mean (``t_{R-1}`` quantile x standard error), at the
confidence of ``evaluate.confidence``: with R = 3 replicates the half-width is 4.30 standard errors at 95%.
A comparison of two rows is paired: the difference of a metric between the two rows within each replicate
(same FP model, trajectories, calibration seeds, evaluation seeds and FP samples), then the t-interval of the
mean difference. Its verdict is "better" or "worse" when the interval excludes 0, else "no difference shown".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

# Metrics are the stages' own (``<stage>.<key>`` of pqd.formats.metrics, flattened as pqd.ops.result.flat_metrics
# does); metric -> True when lower is better
DIRECTION = {"evaluate.fid_quant_vs_fp": True, "evaluate.delta_fid": True, "evaluate.fid_quant_vs_ref": True,
             "evaluate.psnr_mean": False, "calibrate.output_mse": True}
# metrics summarised over replicates (mean and t-interval)
SUMMARY = ("evaluate.fid_quant_vs_ref", "evaluate.fid_fp_vs_ref", "evaluate.delta_fid", "evaluate.fid_quant_vs_fp",
           "evaluate.noise_floor", "evaluate.psnr_mean", "evaluate.psnr_other_seed_mean", "calibrate.output_mse",
           "calibrate.seconds", "export.size_ratio", "export.weight_bits_mean")
# the release gate's statistics of each cell (pqd.ops.release.gate_statistics): summarised by their range
GATE = ("gate.delta_fid_fraction", "gate.fid_vs_fp_fraction", "gate.psnr_margin_db")
# metrics with a per-replicate bootstrap interval over samples (the evaluation's <m>_ci.lo, <m>_ci.hi)
BOOTSTRAPPED = ("evaluate.fid_quant_vs_ref", "evaluate.delta_fid", "evaluate.fid_quant_vs_fp", "evaluate.psnr_mean")
# metrics on which rows are compared
COMPARED = ("evaluate.fid_quant_vs_fp", "evaluate.delta_fid", "evaluate.psnr_mean")
NO_DIFFERENCE = "no difference shown"


@dataclass(frozen=True)
class MeanInterval:
    """Mean of n values and its t-interval (lo = hi = nan when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int


def t_interval(values, confidence: float) -> MeanInterval:
    """Mean of ``values`` and the Student-t ``confidence`` interval of the mean (nan bounds for fewer than 2)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return MeanInterval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if len(v) < 2:
        return MeanInterval(mean, math.nan, math.nan, len(v))
    half = float(sps.t.ppf((1 + confidence) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return MeanInterval(mean, mean - half, mean + half, len(v))


def verdict(diff: MeanInterval, lower_is_better: bool) -> str:
    """'better' / 'worse' for the first row of a comparison (difference = first - second), from whether the
    interval excludes 0; otherwise 'no difference shown' (also with too few replicates for an interval)."""
    if not (math.isfinite(diff.lo) and math.isfinite(diff.hi)) or diff.lo <= 0 <= diff.hi:
        return NO_DIFFERENCE
    first_lower = diff.hi < 0
    return "better" if first_lower == lower_is_better else "worse"


def summarize(df: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """One line per (model, row) of the per-replicate results ``df`` (columns model, row, bits, replicate and the
    metrics): n, and for each metric of SUMMARY its mean, _lo and _hi (t-interval over replicates); for each metric
    of BOOTSTRAPPED the mean over replicates of its per-replicate bootstrap bounds (_ci.lo, _ci.hi); for each of
    GATE its _min and _max."""
    out = []
    for (model, row, bits), g in df.groupby(["model", "row", "bits"], sort=False):
        line: dict[str, object] = {"model": model, "row": row, "bits": bits, "cell": f"{model} | {row} {bits}",
                                   "n": len(g)}
        for m in SUMMARY:
            if m in g:
                mi = t_interval(g[m], confidence)
                line.update({m: mi.mean, f"{m}_lo": mi.lo, f"{m}_hi": mi.hi})
        for m in GATE:
            if m in g:
                line.update({f"{m}_min": float(g[m].min()), f"{m}_max": float(g[m].max())})
        for m in BOOTSTRAPPED:
            for side in ("lo", "hi"):
                col = f"{m}_ci.{side}"
                if col in g:
                    line[col] = float(g[col].mean())
        out.append(line)
    return pd.DataFrame(out)


def compare(df: pd.DataFrame, pairs: list[tuple[str, str]], confidence: float) -> pd.DataFrame:
    """Paired comparisons: for each model and each (first, second) pair of row keys (column ``key``), the
    difference first - second of every COMPARED metric within each replicate both rows have, its mean, t-interval
    and the verdict for the first row. Rows are named by ``row`` and ``bits`` in the output."""
    out = []
    for model, g in df.groupby("model", sort=False):
        for first, second in pairs:
            a = g[g["key"] == first].set_index("replicate")
            b = g[g["key"] == second].set_index("replicate")
            common = sorted(set(a.index) & set(b.index))
            if not common:
                continue
            name = {k: f"{x['row'].iloc[0]} {x['bits'].iloc[0]}" for k, x in ((first, a), (second, b))}
            for m in COMPARED:
                diff = t_interval((a.loc[common, m] - b.loc[common, m]).tolist(), confidence)
                out.append({"model": model, "first": name[first], "second": name[second], "metric": m, "n": diff.n,
                            "diff": diff.mean, "diff_lo": diff.lo, "diff_hi": diff.hi,
                            "verdict": verdict(diff, DIRECTION[m])})
    return pd.DataFrame(out)
