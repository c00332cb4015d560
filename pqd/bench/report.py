"""The tables and pictures of ``make bench`` from the cells' typed results (pqd.ops.result.Result): one line per
cell with the stages' own metrics (``<stage>.<key>``) and the release gate's statistics (``gate.<threshold>``, from
pqd.ops.release.gate_statistics); means with intervals per model and row, paired verdicts.

Outputs in ``out``: ``bench.md`` (tables with intervals and paired verdicts), ``bench.csv`` (one line per model and
row: means and intervals; a DVC plot), ``bench_replicates.csv`` (every cell), ``bench_paired.csv``, ``bench.png``,
``bench_paired.png`` and ``bench_frontier.png`` (weight bits against FID vs FP).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pqd.bench.figures import panels
from pqd.bench.plan import ROWS, comparison_pairs
from pqd.bench.stats import NO_DIFFERENCE, compare, summarize
from pqd.ops.release import gate_statistics
from pqd.ops.result import Result, flat_metrics

FID_VS_FP, DELTA_FID, PSNR, FID_VS_DATA = ("evaluate.fid_quant_vs_fp", "evaluate.delta_fid", "evaluate.psnr_mean",
                                           "evaluate.fid_quant_vs_ref")
LABELS = {FID_VS_FP: "FID vs FP", DELTA_FID: "ΔFID", PSNR: "PSNR dB", FID_VS_DATA: "FID vs data"}
BITS = "export.weight_bits_mean"  # average bits per quantized weight, scales included
GATE_DELTA, GATE_FID, GATE_PSNR = ("gate.delta_fid_fraction", "gate.fid_vs_fp_fraction", "gate.psnr_margin_db")


def cell_line(model: str, replicate: int, row: str, r: Result) -> dict[str, Any]:
    """One line of ``bench_replicates.csv``: the cell's labels, its stages' metrics and the gate's statistics."""
    gate = gate_statistics(r.metrics.evaluate)
    return {"model": model, "replicate": replicate, "key": row, "row": ROWS[row].label, "bits": r.bits.upper(),
            **flat_metrics(r), **({f"gate.{k}": v for k, v in dataclasses.asdict(gate).items()} if gate else {})}


def write_outputs(lines: list[dict[str, Any]], rows: list[str], out: Path, confidence: float,
                  thresholds: dict[str, float], times: dict[str, float]) -> str:
    """Tables and plots of the cells' ``lines`` (:func:`cell_line`) in ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(lines)
    df.to_csv(out / "bench_replicates.csv", index=False)
    summary, paired = summarize(df, confidence), compare(df, comparison_pairs(rows), confidence)
    summary.to_csv(out / "bench.csv", index=False)
    paired.to_csv(out / "bench_paired.csv", index=False)
    md = markdown(summary, paired, confidence, times, thresholds)
    (out / "bench.md").write_text(md)
    plot_summary(summary, out / "bench.png")
    plot_paired(paired, out / "bench_paired.png")
    plot_frontier(summary, out / "bench_frontier.png")
    return md


VERDICT_COLOR = {"better": "#2a9d3a", "worse": "#c0392b", NO_DIFFERENCE: "#7f7f7f"}


def _num(v: float, digits: int = 3) -> str:
    """``digits`` decimals; values too small to show that way in three significant digits."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** (1 - digits) else f"{v:.2e}"


def _mean_ci(r: pd.Series, m: str, digits: int = 3) -> str:
    """'mean [lo, hi]' (t-interval over replicates), or the mean alone with one replicate."""
    if m not in r or not math.isfinite(r[m]):
        return "n/a"
    lo, hi = r.get(f"{m}_lo", math.nan), r.get(f"{m}_hi", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _num(r[m], digits)
    return f"{_num(r[m], digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def _boot(r: pd.Series, m: str, digits: int = 3) -> str:
    lo, hi = r.get(f"{m}_ci.lo", math.nan), r.get(f"{m}_ci.hi", math.nan)
    return f"[{_num(lo, digits)}, {_num(hi, digits)}]" if math.isfinite(lo) and math.isfinite(hi) else "n/a"


def summary_table(summary: pd.DataFrame) -> str:
    """One markdown table per model: each metric as mean [t-interval over replicates], and the bootstrap interval
    over samples (mean of the replicates' bounds) beside FID vs FP, ΔFID and FID vs data."""
    cols = ["row", "bits", "R", "FID vs FP", "(bootstrap)", "ΔFID", "(bootstrap)", "PSNR dB", "FID vs data",
            "(bootstrap)", "FP FID vs data", "noise floor", "weight bits", "calib s"]
    parts = []
    for model, g in summary.groupby("model", sort=False):
        lines = [f"**{model}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in g.iterrows():
            cells = [r["row"], r["bits"], str(r["n"]), _mean_ci(r, FID_VS_FP), _boot(r, FID_VS_FP),
                     _mean_ci(r, DELTA_FID), _boot(r, DELTA_FID), _mean_ci(r, PSNR, 2), _mean_ci(r, FID_VS_DATA),
                     _boot(r, FID_VS_DATA), _mean_ci(r, "evaluate.fid_fp_vs_ref"), _mean_ci(r, "evaluate.noise_floor"),
                     _num(r.get(BITS, math.nan), 2), _num(r.get("calibrate.seconds", math.nan), 1)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def paired_table(paired: pd.DataFrame) -> str:
    """One markdown table per model: first - second for each compared metric, its interval and the verdict."""
    if paired.empty:
        return "(no paired comparisons: run rows that share replicates)"
    parts = []
    for model, g in paired.groupby("model", sort=False):
        lines = [f"**{model}**", "", "| first | second | R | " + " | ".join(
            f"{LABELS[m]} first - second | verdict" for m in g["metric"].unique()) + " |"]
        lines.append("|" + "---|" * (3 + 2 * g["metric"].nunique()))
        for (first, second), h in g.groupby(["first", "second"], sort=False):
            cells = [first, second, str(int(h["n"].iloc[0]))]
            for _, r in h.iterrows():
                ci = (f" [{_num(r['diff_lo'])}, {_num(r['diff_hi'])}]"
                      if math.isfinite(r["diff_lo"]) and math.isfinite(r["diff_hi"]) else "")
                cells += [f"{_num(r['diff'])}{ci}", f"**{r['verdict']}**" if r["verdict"] != NO_DIFFERENCE
                          else r["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def gate_table(summary: pd.DataFrame, thresholds: dict[str, float]) -> str:
    """Per model and row, the range over replicates of what the release gate's quality checks compare with their
    thresholds (``thresholds``: release.* of the bench's params), and how many replicates pass all three."""
    if f"{GATE_DELTA}_min" not in summary:
        return "(no intervals recorded: evaluate.bootstrap = 0)"
    t = thresholds
    head = ["row", "bits", "R", "ΔFID upper / FP FID", "FID vs FP upper / noise floor",
            "PSNR lower - other seeds (dB)"]
    parts = [f"Thresholds: release.delta_fid_fraction {t['delta_fid_fraction']:g}, release.fid_vs_fp_fraction "
             f"{t['fid_vs_fp_fraction']:g}, release.psnr_margin_db {t['psnr_margin_db']:g}. Each cell: min - max over "
             "the replicates."]
    for model, g in summary.groupby("model", sort=False):
        lines = [f"**{model}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in g.iterrows():
            rng = [f"{_num(r[f'{m}_min'])} - {_num(r[f'{m}_max'])}" for m in (GATE_DELTA, GATE_FID)]
            rng.append(f"{_num(r[f'{GATE_PSNR}_min'], 2)} - {_num(r[f'{GATE_PSNR}_max'], 2)}")
            lines.append("| " + " | ".join([r["row"], r["bits"], str(r["n"]), *rng]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def markdown(summary: pd.DataFrame, paired: pd.DataFrame, confidence: float, times: dict[str, float],
             thresholds: dict[str, float]) -> str:
    pct = f"{confidence:.0%}"
    return (f"## Methods over replicates (mean [{pct} t-interval over R replicates]; bootstrap: {pct} interval "
            "over samples, mean of the replicates' bounds)\n\n" + summary_table(summary)
            + f"\n\n## Paired comparisons (difference within each replicate, mean [{pct} t-interval]; the verdict is "
            "for the first row: lower FID / ΔFID and higher PSNR are better)\n\n" + paired_table(paired)
            + "\n\n## What the release gate would see (its statistics of each cell; it passes a result when ΔFID and "
            "FID vs FP are at most, and the PSNR margin at least, their thresholds)\n\n" + gate_table(summary, thresholds)
            + "\n\n" + "\n".join(f"- {k}: {v:.0f} s" for k, v in times.items()) + "\n")


def plot_summary(summary: pd.DataFrame, path) -> None:
    """One row of panels per model (FID vs FP, ΔFID, PSNR), each row of the bench a bar with its t-interval."""
    models = list(summary["model"].unique())
    metrics = (FID_VS_FP, DELTA_FID, PSNR)
    with panels(path, len(models), 3, (16, 4.6 * len(models))) as (_fig, axes):
        for ax_row, model in zip(axes, models):
            g = summary[summary["model"] == model].reset_index(drop=True)
            colors = ["#4c72b0" if str(b).startswith(("W8", "W7")) else "#dd8452" for b in g["bits"]]
            for ax, m in zip(ax_row, metrics):
                ax.bar(range(len(g)), g[m], color=colors, yerr=error_bars(g, m), capsize=3)
                if m == DELTA_FID:
                    ax.axhline(0, color="k", lw=0.8)
                ax.set_xticks(range(len(g)), [f"{r} {b}" for r, b in zip(g["row"], g["bits"])], rotation=45,
                              ha="right", fontsize=8)
                ax.set_title(f"{model}: {LABELS[m]} (mean, interval over replicates)", fontsize=10)


def error_bars(g: pd.DataFrame, m: str) -> list[pd.Series]:
    """Column ``m``'s distances to its interval's ends (``m_lo``, ``m_hi``), as matplotlib's yerr takes them."""
    return [(g[m] - g[f"{m}_lo"]).clip(lower=0).fillna(0), (g[f"{m}_hi"] - g[m]).clip(lower=0).fillna(0)]


def plot_paired(paired: pd.DataFrame, path) -> None:
    """Forest plot of the paired differences: one panel per model and metric, a point and its interval per
    comparison, coloured by the verdict for the first row."""
    if paired.empty:
        return
    models, metrics = list(paired["model"].unique()), list(paired["metric"].unique())
    n = paired.groupby("model").size().max() // len(metrics)
    with panels(path, len(models), len(metrics), (5.2 * len(metrics), 0.45 * n + 1.6 * len(models))) as (_f, axes):
        for ax_row, model in zip(axes, models):
            for ax, m in zip(ax_row, metrics):
                g = paired[(paired["model"] == model) & (paired["metric"] == m)].reset_index(drop=True)
                for y, r in g.iterrows():
                    c = VERDICT_COLOR[r["verdict"]]
                    if math.isfinite(r["diff_lo"]):
                        ax.plot([r["diff_lo"], r["diff_hi"]], [y, y], color=c, lw=2)
                    ax.plot(r["diff"], y, "o", color=c)
                ax.axvline(0, color="k", lw=0.8)
                ax.set_yticks(range(len(g)), [f"{a} - {b}" for a, b in zip(g["first"], g["second"])], fontsize=7)
                ax.invert_yaxis()
                ax.set_title(f"{model}: {LABELS[m]}", fontsize=10)


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (bits, error) points no other point beats on both (fewer or equal bits and lower error, or
    lower bits and equal error), ordered by bits: the size-quality frontier."""
    keep = [i for i, (b, e) in enumerate(points)
            if not any((b2 <= b and e2 < e) or (b2 < b and e2 <= e) for b2, e2 in points)]
    return sorted(keep, key=lambda i: points[i])


def plot_frontier(summary: pd.DataFrame, path) -> None:
    """Size against quality, one panel per model: each row at its average weight bits (scales included) and its FID
    vs FP (mean and interval over replicates), the frontier joined by a line."""
    if BITS not in summary or summary[BITS].isna().all():
        return
    models = list(summary["model"].unique())
    with panels(path, 1, len(models), (6.5 * len(models), 5)) as (_fig, axes):
        for ax, model in zip(axes[0], models):
            g = summary[(summary["model"] == model) & summary[BITS].notna()].reset_index(drop=True)
            ax.errorbar(g[BITS], g[FID_VS_FP], yerr=error_bars(g, FID_VS_FP), fmt="o", capsize=3, color="#4c72b0")
            for _, r in g.iterrows():
                ax.annotate(f"{r['row']} {r['bits']}", (r[BITS], r[FID_VS_FP]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
            best = g.iloc[frontier(list(zip(g[BITS], g[FID_VS_FP])))]
            ax.plot(best[BITS], best[FID_VS_FP], "-", color="#dd8452", lw=1.5, label="frontier")
            ax.set(xlabel="average weight bits (codes + float32 scales)", ylabel="FID vs FP")
            ax.set_title(f"{model}: size against FID vs FP", fontsize=10)
            ax.legend(fontsize=8)
