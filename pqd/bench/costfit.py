"""bench-calibrate's cost model: per-unit step seconds fitted against the units' sizes (pure numpy, no I/O;
the model and its assumptions are in docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

FITS = ("io_bytes", "flops")  # the per-input cost each per-step fit uses beside the unit's parameters


def least_squares(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients of y ~ [1, X] and R²."""
    A = np.column_stack([np.ones(len(y)), X])
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    resid = y - A @ coef
    return coef, float(1 - resid @ resid / ((y - y.mean()) @ (y - y.mean())))


def eval_share(short: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    """From one model at two iteration counts: each unit's seconds = iters x step + fixed (its two error passes
    over the set); phi = sum(fixed) / (sum(step) x N / rows), the fixed part in steps per ``rows`` inputs."""
    a, b = {u["unit"]: u["seconds"] for u in short["unit_log"]}, {u["unit"]: u["seconds"] for u in long["unit_log"]}
    di = long["recon_iters"] - short["recon_iters"]
    step = {u: (b[u] - a[u]) / di for u in a}
    fixed = sum(a[u] - short["recon_iters"] * step[u] for u in a)
    s = sum(step.values())
    return {"model": short["model"], "iters": [short["recon_iters"], long["recon_iters"]],
            "unit_seconds": [short["unit_seconds"], long["unit_seconds"]], "step_seconds_all_units": s,
            "fixed_seconds_all_units": fixed,
            "phi": max(0.0, fixed / (s * short["calib_inputs"] / short["rows_per_step"]))}


def step_seconds(run: dict[str, Any], phi: float) -> list[float]:
    """Each unit's seconds per reconstruction step: seconds / (iters + phi x N / rows)."""
    k = run["recon_iters"] + phi * run["calib_inputs"] / run["rows_per_step"]
    return [u["seconds"] / k for u in run["unit_log"]]


def design(parameters: np.ndarray, rows: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """The per-step regressors: the unit's parameters (rounding and optimiser work) and the io bytes or FLOPs of the
    step's rows (rows x per-input cost)."""
    return np.column_stack([parameters, rows * cost])


def per_step_fit(units: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """step seconds ~ a + b x parameters + c x rows x ``key`` per input, over ``units``; with, per model, its
    summed step seconds predicted by the same fit on the other models' units alone (a held-out check)."""
    model = np.array([u["model"] for u in units])
    p, rows, cost, y = (np.array([u[k] for u in units], dtype=float)
                        for k in ("parameters", "rows", key, "step_seconds"))
    X = design(p, rows, cost)
    (a, b, c), r2 = least_squares(X, y)
    held = {}
    for m in dict.fromkeys(model):
        out = model == m
        coef, _ = least_squares(X[~out], y[~out])
        held[m] = {"predicted": float(coef[0] * out.sum() + (X[out] @ coef[1:]).sum()), "measured": float(y[out].sum())}
    return {"intercept_s": a, "s_per_parameter": b, "s_per_row_unit": c, "r2": r2, "held_out": held}


def fit(runs: list[dict[str, Any]], phi: float) -> dict[str, Any]:
    """The per-step fits (on io bytes and on FLOPs), the log-log slopes of step seconds against each size, the
    overhead ratios and step throughput per model, and the log-log line of the whole stage's seconds against the
    parameters."""
    units = [{"model": r["model"], "parameters": u["parameters"], "io_bytes": u["io_bytes"] / r["calib_inputs"],
              "flops": u["flops_per_input"], "rows": r["rows_per_step"], "step_seconds": s}
             for r in runs for u, s in zip(r["unit_log"], step_seconds(r, phi))]
    slopes = {}
    for key in ("parameters", *FITS):  # per step: the unit's parameters, the io bytes or FLOPs of the step's rows
        x = np.array([u[key] * (1 if key == "parameters" else u["rows"]) for u in units], dtype=float)
        y = np.array([u["step_seconds"] for u in units])
        ok = (x > 0) & (y > 0)
        (_, slope), r2 = least_squares(np.log(x[ok]), np.log(y[ok]))
        slopes[key] = {"slope": slope, "r2": r2}
    overhead = {}
    for r in runs:
        s = sum(step_seconds(r, phi))
        passes = r["calib_inputs"] / r["rows_per_step"] * s  # one pass over the set, in whole-model step seconds
        flops = sum(u["flops_per_input"] for u in r["unit_log"]) * r["rows_per_step"] * 3  # backward ~ 2x forward
        overhead[r["model"]] = {
            "step_seconds_all_units": s, "step_gflop_per_s": flops / s / 1e9,
            "kappa": (r["reconstruction_seconds"] - r["unit_seconds"]) / (r["units"] * passes),
            "lambda": (r["total_seconds"] - r["reconstruction_seconds"]) / passes}
    (lc, slope), r2_total = least_squares(np.log([r["parameters"] for r in runs]),
                                          np.log([r["total_seconds"] for r in runs]))
    return {"phi": phi, "units": len(units), "per_step": {k: per_step_fit(units, k) for k in FITS},
            "log_slopes": slopes, "overhead": overhead,
            "total_vs_parameters": {"log_slope": slope, "log_intercept": lc, "r2": r2_total}}
