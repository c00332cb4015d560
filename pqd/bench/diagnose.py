"""``python -m pqd.bench.diagnose``: why one row of ``make bench`` does better or worse than another.

For two cells of the bench (e.g. ``digits-r0-w4-pqd`` and ``digits-r0-w4-qdiffusion``) in one or more replicates,
from each cell's ``data/`` folder in a checkout of its experiment (the FP model and trajectories: the first cell's):

- **steps drawn**: mean step position u of each calibration set, and its share in each time group of the first row;
- **time groups**: per quantizer, the largest activation range over the groups divided by the smallest (1: one set
  of parameters would have done);
- **per step**: relative MSE of each quantized model's predicted noise against FP at every step of a few
  calibration seeds' FP trajectories (where the time groups should help);
- **per unit**: the block reconstruction's output error of each unit (``qstate/reconstruction.csv``);
- **where the error reaches the image**: the FP sampler on the first evaluation seeds with each row's quantized
  model predicting in one bucket of steps only; the image MSE against FP per bucket, with every step quantized,
  and how much larger that is than the buckets' sum (the error one step leaves in the next steps' inputs).

Outputs: ``<out>/diagnose-<first>-vs-<second>.md`` (printed too) and ``.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from pqd.bench.figures import panels
from pqd.diffusion.adapter import Conditioning, Denoiser, load_denoiser
from pqd.diffusion.sampling import sample, scheduler_from_protocol
from pqd.errors import command
from pqd.formats import qstate as qcodec
from pqd.diffusion.quantized import load_denoiser_from_export
from pqd.formats.calibset import META, PROMPTS
from pqd.formats.files import load_tensors, read_json

PER_STEP_SEEDS = 16  # calibration trajectories whose every step is measured (the first shards')
REACH_SEEDS, REACH_BUCKET = 32, 5  # evaluation seeds and steps per bucket of the image-error probe


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
    """Relative MSE of each row's quantized denoiser output against the FP one's (with the trajectories' conditioning
    and guidance, as the sampler predicts), at every step of the FP trajectories of the first ``seeds`` calibration
    seeds: columns step, u, t and one per row."""
    fp_den = load_denoiser(fp / "model", "cpu")
    traj = fp / "trajectories"
    shards = sorted(traj.glob("shard-*.safetensors"))
    xs, prompt, t = [], [], None
    for shard in shards:
        data = load_tensors(shard)
        xs.append(data["x"])
        prompt += data["prompt"].tolist() if "prompt" in data else []
        t = data["t"]
        if sum(len(x) for x in xs) >= seeds:
            break
    x = torch.cat(xs)[:seeds]  # [n, S, C, H, W]
    steps = x.shape[1]
    pc = read_json(traj / META).get("conditioning")
    cond = Conditioning(load_tensors(traj / PROMPTS), prompt[:len(x)], float(pc["guidance_scale"])) \
        if pc else None

    def predict(den: Denoiser, i: int) -> torch.Tensor:
        xi, ti = x[:, i], t[i].expand(len(x))
        return den.predict(xi, ti) if cond is None else \
            den.guided(xi, ti, cond.per_seed(), cond.unconditional(), cond.guidance_scale)

    ref = [predict(fp_den, i) for i in range(steps)]
    out = pd.DataFrame({"step": range(steps), "u": [i / (steps - 1) for i in range(steps)], "t": t.tolist()})
    for name, row in rows.items():
        qden = load_denoiser_from_export(row / "export", "cpu")
        out[name] = [float((predict(qden, i) - ref[i]).pow(2).mean() / ref[i].pow(2).mean()) for i in range(steps)]
    return out


@torch.no_grad()
def image_error_by_steps(fp: Path, rows: dict[str, Path], seeds: int = REACH_SEEDS,
                         bucket: int = REACH_BUCKET) -> pd.DataFrame:
    """Image MSE against the FP sampler's images on the first ``seeds`` evaluation seeds (the generate stage's
    protocol: scheduler, steps, conditioning) when a row's quantized model predicts only at the steps of one
    bucket of ``bucket`` consecutive steps, for every bucket; then at every step ("all") and the buckets' sum.
    Columns: row, steps, t (the bucket's timesteps), image_mse, share (of the sum). The FP images are sampled once
    for all ``rows``."""
    proto = read_json(fp / "samples" / "fp" / META)
    fpd = load_tensors(fp / "samples" / "fp" / "a.safetensors")
    chosen = [int(v) for v in fpd["seeds"][:seeds]]
    fden = load_denoiser(fp / "model", "cpu")
    cond = None
    if proto.get("conditioning"):
        pc = proto["conditioning"]
        cond = fden.conditioning(pc.get("prompts"), fpd["prompt"][:len(chosen)].tolist(), float(pc["guidance_scale"]))
    steps, eta = int(proto["steps"]), float(proto["eta"])
    scheduler = scheduler_from_protocol(proto)
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    buckets = [range(b, min(b + bucket, steps)) for b in range(0, steps, bucket)]

    def images(qden: Denoiser | None, at: range) -> torch.Tensor:
        return sample(fden, scheduler_from_protocol(proto), chosen, steps=steps, eta=eta, cond=cond, progress=False,
                      swap=None if qden is None else (qden, at))

    ref = images(None, range(0))
    mse = lambda im: float((im - ref).pow(2).mean())  # noqa: E731
    out = []
    for name, row in rows.items():
        qden = load_denoiser_from_export(row / "export", "cpu")
        mine = [{"row": name, "steps": f"{b[0]}-{b[-1]}", "t": f"{ts[b[0]]}-{ts[b[-1]]}",
                 "image_mse": mse(images(qden, b))}
                for b in tqdm(buckets, desc=f"image error by steps ({name})", unit="bucket")]
        total = sum(r["image_mse"] for r in mine)
        for r in mine:
            r["share"] = r["image_mse"] / total if total > 0 else float("nan")
        out += mine + [{"row": name, "steps": "all", "t": "", "image_mse": mse(images(qden, range(steps))),
                        "share": float("nan")},
                       {"row": name, "steps": "sum of buckets", "t": "", "image_mse": total, "share": 1.0}]
    return pd.DataFrame(out)


def unit_ratios(units: pd.DataFrame, first: str, second: str) -> pd.Series | None:
    """Per unit, ``first``'s reconstruction output MSE over ``second``'s, mean over replicates (``units``: rows
    replicate, unit, row, mse_after), sorted; with more than ten units the five lowest and five highest. None when
    a row has no reconstructed unit."""
    u = units.pivot_table(index=["replicate", "unit"], columns="row", values="mse_after").reset_index()
    if not {first, second} <= set(u.columns):
        return None
    worst = (u[first] / u[second]).groupby(u["unit"]).mean().sort_values()
    return worst if len(worst) <= 10 else pd.concat([worst.head(5), worst.tail(5)])  # no unit twice


def diagnose(replicates: dict[str, tuple[Path, Path]], first: str, second: str,
             reach_seeds: int = REACH_SEEDS, reach_bucket: int = REACH_BUCKET
             ) -> tuple[str, list[pd.DataFrame], pd.DataFrame | None]:
    """Markdown comparing rows ``first`` and ``second`` in each replicate (name -> the two cells' data folders), the
    per-step errors of each replicate and the image-error probe's table (for the plot; ``reach_seeds`` 0 skips the
    probe: None)."""
    lines = [f"# {first} vs {second} ({len(replicates)} replicates)", ""]
    steps, spreads, units, per_step, reach = [], [], [], [], []
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
        if reach_seeds:
            reach.append(image_error_by_steps(dirs[first], dirs, reach_seeds, reach_bucket).assign(replicate=rep))
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
    worst = unit_ratios(pd.concat(units), first, second)
    lines += [f"## Reconstruction error per unit (output MSE after reconstruction, {first} / {second}, mean over "
              "replicates): the units where the two differ most", "",
              "(a row without block reconstruction: nothing to compare)" if worst is None
              else worst.rename("ratio").to_frame().to_markdown(floatfmt=".3f"), ""]
    if reach:
        wide = pd.concat(reach).pivot_table(index=["replicate", "steps"], columns="row", values="image_mse",
                                            sort=False).reset_index()
        lines += [f"## Where the error reaches the image (image MSE against FP, {reach_seeds} evaluation seeds, each "
                  "row's quantized model predicting only in that bucket of steps, 0 = noisiest; 'all': at every "
                  "step; all / sum > 1: one step's error grows in the steps after it)", "",
                  wide.to_markdown(index=False, floatfmt=".3e"), ""]
    return "\n".join(lines), per_step, (pd.concat(reach) if reach else None)


def plot(per_step: list[pd.DataFrame], reach: pd.DataFrame | None, first: str, second: str, path: Path) -> None:
    """Per-step error of the two rows, one panel per replicate; below, with the image-error probe, each row's image
    MSE per bucket of steps."""
    with panels(path, 1 if reach is None else 2, len(per_step), (5 * len(per_step), 3.8 if reach is None else 7.2)) \
            as (_fig, axes):
        if reach is not None:
            for ax, rep in zip(axes[1], [df["replicate"].iloc[0] for df in per_step]):
                r = reach[(reach["replicate"] == rep) & ~reach["steps"].isin(["all", "sum of buckets"])]
                for k, name in enumerate((first, second)):
                    mine = r[r["row"] == name]
                    ax.bar(np.arange(len(mine)) + 0.4 * k, mine["image_mse"], width=0.4, label=name)
                ax.set_xticks(np.arange(len(mine)) + 0.2, mine["steps"], rotation=45, fontsize=7)
                ax.set(xlabel="steps where the quantized model predicts (0 = noisiest)", ylabel="image MSE vs FP")
                ax.set_title(f"{rep}: where the error reaches the image", fontsize=10)
                ax.legend(fontsize=8)
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
    ap.add_argument("--reach-seeds", type=int, default=REACH_SEEDS,
                    help="evaluation seeds of the image-error-by-steps probe (0: skip it)")
    ap.add_argument("--reach-bucket", type=int, default=REACH_BUCKET, help="steps per bucket of that probe")
    args = ap.parse_args(argv)
    if args.reach_seeds < 0 or args.reach_bucket < 1:
        ap.error(f"--reach-seeds {args.reach_seeds} / --reach-bucket {args.reach_bucket} are not allowed: expected "
                 "seeds >= 0 and a bucket >= 1")
    first, second = args.names.split(",")
    pairs = list(zip(args.first.split(","), args.second.split(",")))
    md, per_step, reach = diagnose({f"r{k}": (Path(a), Path(b)) for k, (a, b) in enumerate(pairs)}, first, second,
                                   args.reach_seeds, args.reach_bucket)
    out, stem = Path(args.out), f"diagnose-{first}-vs-{second}"  # a row name may hold a dot (4.5 bits)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    plot(per_step, reach, first, second, out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
