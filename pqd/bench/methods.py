"""``make bench``: the four methods at W8A8 and W4A8, plus one ablation row per PQD component, side by side.

Every row reuses the same FP model, trajectories, evaluation seeds, FP samples and evaluation protocol
(``data/model``, ``data/trajectories``, ``data/samples/fp`` from ``dvc repro generate``); only the
calibration settings differ. Rows run one after another in this one process through the stages' own
``run`` functions. Outputs (``data/bench/``): ``bench.md`` (the table), ``bench.csv`` (DVC plot data),
``bench.png`` (the same as a picture), and each row's stage outputs and metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pqd.formats.metrics import PipelineMetrics
from pqd.params import Params, as_dict, load_params, params_from_dict
from pqd.params.methods import METHOD_KEYS
from pqd.stages import calibrate, evaluate, export, select

ROWS: list[tuple[str, int, dict[str, dict[str, Any]]]] = [
    *[(m, bits, {"calibrate": {"method": m}}) for bits in (8, 4) for m in ("minmax", "ptq4dm", "qdiffusion", "pqd")],
    ("pqd, uniform steps", 4, {"calibrate": {"method": "pqd"}, "select": {"timesteps": "uniform"}}),
    ("pqd, random selection", 4, {"calibrate": {"method": "pqd"}, "select": {"rule": "random"}}),
    ("pqd, G=1", 4, {"calibrate": {"method": "pqd", "time_groups": 1}}),
    ("pqd, QDrop p=0", 4, {"calibrate": {"method": "pqd", "qdrop_p": 0.0}}),
    # quantized attention matmuls (quant.attention), softmax output on 16 and on 8 bits (compare with row 3)
    ("pqd, attention matmuls, softmax 16-bit", 8, {"calibrate": {"method": "pqd"}, "quant": {"attention": True}}),
    ("pqd, attention matmuls, softmax 8-bit", 8, {"calibrate": {"method": "pqd"},
                                                  "quant": {"attention": True, "softmax_bits": 8}}),
    # integer codes of 8-bit weights (quant.reduce_range): 7-bit codes against full 8-bit codes, on this CPU
    ("pqd, 7-bit weight codes", 8, {"calibrate": {"method": "pqd"}, "quant": {"reduce_range": True}}),
    ("pqd, full 8-bit weight codes", 8, {"calibrate": {"method": "pqd"}, "quant": {"reduce_range": False}}),
    # glue between integer kernels (quant.glue): each kind alone, then together (compare with row 3); a
    # concatenation is one tensor on one grid, so its rows turn the shortcut split off, and so does their baseline
    *[(f"pqd, glue {k}", 8, {"calibrate": {"method": "pqd"}, "quant": {"glue": [k]}})
      for k in ("residual", "temb", "silu", "attention")],
    ("pqd, glue residual+temb+silu+attention", 8,
     {"calibrate": {"method": "pqd"}, "quant": {"glue": ["residual", "temb", "silu", "attention"]}}),
    ("pqd, no shortcut split", 8, {"calibrate": {"method": "pqd", "split_shortcut": False}}),
    ("pqd, no shortcut split, glue concat", 8,
     {"calibrate": {"method": "pqd", "split_shortcut": False}, "quant": {"glue": ["concat"]}}),
    ("pqd, no shortcut split, all glue", 8, {"calibrate": {"method": "pqd", "split_shortcut": False},
                                            "quant": {"glue": ["residual", "temb", "silu", "concat", "attention"]}}),
]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc every 20 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def row_params(base: Params, bits: int, override: dict[str, dict[str, Any]]) -> Params:
    """The base params with the method keys reset to the preset, then the row's overrides applied."""
    d = as_dict(base)
    for key in METHOD_KEYS:  # forget values the base params resolved from their own method
        section, name = key.split(".")
        d[section][name] = None
    d["quant"]["weight_bits"] = bits
    for section, values in override.items():
        d[section].update(values)
    return params_from_dict(d)


def run_row(name: str, p: Params, data: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    select.run(p, data / "trajectories", out / "calib")
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        cal = calibrate.run(p, data / "model", out / "calib", out / "qstate")
    cal_s = time.perf_counter() - t0
    exp = export.run(p, data / "model", out / "qstate", out / "export")
    ev = evaluate.run(p, data / "model", out / "export", data / "samples" / "fp", out / "samples", out / "grid.png")
    metrics = PipelineMetrics(calibrate=cal, export=exp, evaluate=ev)
    (out / "metrics.json").write_text(json.dumps(metrics.as_dict(), indent=2))
    return {"row": name, "bits": f"W{cal.weight_code_bits}A{p.quant.act_bits}", "fid_vs_data": ev.fid_quant_vs_ref,
            "fp_fid_vs_data": ev.fid_fp_vs_ref, "delta_fid": ev.delta_fid, "fid_vs_fp": ev.fid_quant_vs_fp,
            "noise_floor": ev.noise_floor, "psnr_db": ev.psnr_mean, "unet_output_mse": cal.unet_output_mse,
            "calib_seconds": round(cal_s, 1), "peak_rss_mb": round(mem.peak / 2**20, 1),
            "size_ratio": exp.size_ratio}


def markdown(df: pd.DataFrame) -> str:
    cols = ["row", "bits", "fid_vs_data", "delta_fid", "fid_vs_fp", "noise_floor", "psnr_db", "calib_seconds", "peak_rss_mb"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "\n".join("| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()) + "\n"


def plot(df: pd.DataFrame, path: Path) -> None:
    """Two panels per row: delta FID against the data, and FID against the FP samples; noise floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [f"{r.row} {r.bits}" for r in df.itertuples()]
    colors = ["#4c72b0" if b.startswith(("W8", "W7")) else "#dd8452" for b in df["bits"]]
    for ax, col, title in ((axes[0], "delta_fid", "delta FID vs data (quantized - FP)"),
                           (axes[1], "fid_vs_fp", "FID quantized vs FP samples")):
        ax.bar(range(len(df)), df[col], color=colors)
        ax.axhline(df["noise_floor"].iloc[0], color="k", ls="--", lw=1, label="noise floor (FP vs FP)")
        ax.set_xticks(range(len(df)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default="data/bench")
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    args = ap.parse_args(argv)
    base = load_params(args.params)
    data, out = Path(args.data), Path(args.out)
    for need in ("model", "trajectories", "samples/fp"):
        if not (data / need).exists():
            print(f"pqd bench: error: {data / need} is missing: run `dvc repro generate` first")
            return 2
    chosen = [int(i) for i in args.rows.split(",") if i] or list(range(len(ROWS)))
    results = []
    for i in chosen:
        name, bits, override = ROWS[i]
        p = row_params(base, bits, override)
        print(f"\n=== bench row {i}: {name} W{bits}A{p.quant.act_bits} ===", flush=True)
        row_dir = out / f"row{i:02d}"
        shutil.rmtree(row_dir, ignore_errors=True)
        results.append(run_row(name, p, data, row_dir))
        df = pd.DataFrame(results)
        df.to_csv(out / "bench.csv", index=False)  # written after every row: nothing computed is lost
    (out / "bench.md").write_text(markdown(df))
    plot(df, out / "bench.png")
    print("\n" + markdown(df))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
