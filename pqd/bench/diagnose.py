"""``python -m pqd.bench.diagnose``: why one row of ``make bench`` does better or worse than another.

For two cells of the bench (e.g. ``digits-r0-w4-pqd`` and ``digits-r0-w4-qdiffusion``) in one or more replicates,
from each cell's ``data/`` folder in a checkout of its experiment (the FP model and trajectories: the first cell's):

- **steps drawn**: mean step position u of each calibration set, and its share in each time group of the first row;
- **time groups**: per quantizer, the largest activation range over the groups divided by the smallest (1: one set
  of parameters would have done);
- **per step**: relative MSE of each quantized model's predicted noise against FP at every step of a few
  calibration seeds' FP trajectories (where the time groups should help);
- **per unit**: the block reconstruction's output error of each unit (``qstate/reconstruction.csv``).

Outputs: ``<out>/diagnose-<first>-vs-<second>.md`` (printed too) and ``.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pqd.bench.figures import panels
from pqd.diffusion.adapter import load_denoiser
from pqd.errors import command
from pqd.formats import qstate as qcodec
from pqd.diffusion.quantized import load_denoiser_from_export
from pqd.formats.files import load_tensors

PER_STEP_SEEDS = 16  # calibration trajectories whose every step is measured (the first shards')


def steps_drawn(row: Path, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Mean step position of the row's calibration set, and the share of its inputs in each time group of
    ``thresholds`` (descending timesteps: group 0 holds the noisiest steps)."""
    idx = pd.read_parquet(row / "calib" / "index.parquet")
    group = np.searchsorted(-np.asarray(thresholds), -idx["t"].to_numpy(), side="right") if thresholds else \
        np.zeros(len(idx), dtype=int)
    out = {"mean_u": float(idx["u"].mean())}
    out |= {f"share_g{g}": float((group == g).mean()) for g in range(len(thresholds) + 1)}
    return out


def group_spread(row: Path) -> pd.DataFrame:
    """Per activation quantizer (layer input ``act``, layer output ``out``): the largest fitted range over the time
    groups divided by the smallest (ranges are scale x (2^bits - 1), the same factor for every group)."""
    tensors = load_file(row / "qstate" / qcodec.STATE_TENSORS)
    rows = []
    for name, t in tensors.items():
        for kind in ("act", "out"):
            if name.endswith(f".{kind}_scale") and t.shape[0] > 1:
                s = t.float().abs().clamp_min(1e-12)
                rows.append({"layer": name.rsplit(".", 1)[0], "kind": kind,
                             "spread": float((s.max(0).values / s.min(0).values).max())})
    return pd.DataFrame(rows, columns=["layer", "kind", "spread"])


@torch.no_grad()
def per_step_error(fp: Path, rows: dict[str, Path], seeds: int = PER_STEP_SEEDS) -> pd.DataFrame:
    """Relative MSE of each row's quantized UNet output against the FP UNet's, at every step of the FP
    trajectories of the first ``seeds`` calibration seeds: columns step, u, t and one per row."""
    fp_den = load_denoiser(fp / "model", "cpu")
    shards = sorted((fp / "trajectories").glob("shard-*.safetensors"))
    xs, t = [], None
    for shard in shards:
        data = load_tensors(shard)
        xs.append(data["x"])
        t = data["t"]
        if sum(len(x) for x in xs) >= seeds:
            break
    x = torch.cat(xs)[:seeds]  # [n, S, C, H, W]
    steps = x.shape[1]
    ref = [fp_den.predict(x[:, i], t[i].expand(len(x))) for i in range(steps)]
    out = pd.DataFrame({"step": range(steps), "u": [i / (steps - 1) for i in range(steps)], "t": t.tolist()})
    for name, row in rows.items():
        qden = load_denoiser_from_export(row / "export", "cpu")
        out[name] = [float((qden.predict(x[:, i], t[i].expand(len(x))) - ref[i]).pow(2).mean() / ref[i].pow(2).mean())
                     for i in range(steps)]
    return out


def diagnose(replicates: dict[str, tuple[Path, Path]], first: str, second: str) -> tuple[str, list[pd.DataFrame]]:
    """Markdown comparing rows ``first`` and ``second`` in each replicate (name -> the two cells' data folders), and
    the per-step errors of each replicate (for the plot)."""
    lines = [f"# {first} vs {second} ({len(replicates)} replicates)", ""]
    steps, spreads, units, per_step = [], [], [], []
    for rep, pair in replicates.items():
        dirs = dict(zip((first, second), pair))
        thresholds = qcodec.time_groups(qcodec.read_qmap(dirs[first] / "qstate")).thresholds
        for name in (first, second):
            steps.append({"replicate": rep, "row": name, **steps_drawn(dirs[name], thresholds)})
            sp = group_spread(dirs[name])
            if not sp.empty:
                spreads.append({"replicate": rep, "row": name, "quantizers": len(sp),
                                "median spread": sp["spread"].median(), "max spread": sp["spread"].max(),
                                "largest at": sp.loc[sp["spread"].idxmax(), "layer"]})
            rec = pd.read_csv(dirs[name] / "qstate" / "reconstruction.csv")[["unit", "mse_after"]]
            units.append(rec.assign(replicate=rep, row=name))
        err = per_step_error(dirs[first], dirs)
        err["group"] = np.searchsorted(-np.asarray(thresholds), -err["t"].to_numpy(), side="right") if thresholds else 0
        per_step.append(err.assign(replicate=rep))
    lines += ["## Steps drawn for calibration (share of inputs per time group of " + first + ")", "",
              pd.DataFrame(steps).to_markdown(index=False, floatfmt=".3f"), ""]
    lines += ["## Activation ranges across time groups (largest / smallest range of a quantizer)", "",
              pd.DataFrame(spreads).to_markdown(index=False, floatfmt=".3f") if spreads else "(one time group)", ""]
    ps = pd.concat(per_step)
    by_group = ps.groupby(["replicate", "group"])[[first, second]].mean().reset_index()
    by_group["ratio"] = by_group[first] / by_group[second]
    lines += ["## UNet output error per denoising step (relative MSE against FP on FP trajectories, mean per time "
              f"group of {first}; ratio < 1: {first} errs less)", "",
              by_group.to_markdown(index=False, floatfmt=".3g"), ""]
    u = pd.concat(units).pivot_table(index=["replicate", "unit"], columns="row", values="mse_after").reset_index()
    u["ratio"] = u[first] / u[second]
    worst = u.groupby("unit")["ratio"].mean().sort_values()
    lines += [f"## Reconstruction error per unit (output MSE after reconstruction, {first} / {second}, mean over "
              "replicates): the units where the two differ most", "",
              pd.concat([worst.head(5), worst.tail(5)]).rename("ratio").to_frame().to_markdown(floatfmt=".3f"), ""]
    return "\n".join(lines), per_step


def plot(per_step: list[pd.DataFrame], first: str, second: str, path: Path) -> None:
    """Per-step error of the two rows, one panel per replicate."""
    with panels(path, 1, len(per_step), (5 * len(per_step), 3.8)) as (_fig, axes):
        for ax, df in zip(axes[0], per_step):
            for name in (first, second):
                ax.plot(df["u"], df[name], label=name)
            for b in np.flatnonzero(np.diff(df["group"].to_numpy())):
                ax.axvline(df["u"].iloc[b + 1], color="k", lw=0.6, ls=":")
            ax.set(yscale="log", xlabel="step position u (0 = noisiest)")
            ax.set_title(f"{df['replicate'].iloc[0]}: UNet output rel. MSE vs FP", fontsize=10)
            ax.legend(fontsize=8)


@command("pqd diagnose")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.diagnose", description=__doc__.splitlines()[0])
    ap.add_argument("--first", required=True, help="the first row's data folders, one per replicate (comma-separated)")
    ap.add_argument("--second", required=True, help="the second row's data folders, in the same order")
    ap.add_argument("--names", default="first,second", help="the two rows' names in the report")
    ap.add_argument("--out", default="data/bench", help="where the report goes")
    args = ap.parse_args(argv)
    first, second = args.names.split(",")
    pairs = list(zip(args.first.split(","), args.second.split(",")))
    md, per_step = diagnose({f"r{k}": (Path(a), Path(b)) for k, (a, b) in enumerate(pairs)}, first, second)
    stem = Path(args.out) / f"diagnose-{first}-vs-{second}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    plot(per_step, first, second, stem.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
