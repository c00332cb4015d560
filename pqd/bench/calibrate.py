"""``make bench-calibrate``: the cost curve of the calibrate stage, fitted and extrapolated to SD-size models.

Each model (random weights) is calibrated with a synthetic calibration set in a fresh process
(:func:`pqd.bench.memory.measure_calibrate`); the cost model and its assumptions are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from diffusers import Transformer2DModel, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from pqd.bench.costfit import FITS, eval_share, fit, step_seconds
from pqd.bench.figures import panels
from pqd.bench.memory import bench_params, build_calib, build_model, measure_calibrate
from pqd.core.modules import quantizable_layers
from pqd.core.reconstruct import unit_io_bytes
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.archs import Cond, architecture_of
from pqd.diffusion.configs import PIXART_XL_2_512
from pqd.diffusion.demo import train_demo_pipeline
from pqd.errors import command
from pqd.formats.calibset import CalibSet
from pqd.formats.lineage import git_commit
from pqd.params import params_from_dict
from pqd.stages.generate import guidance_scale

CIFAR = "cifar10-ddpm"
# the measured models: their schedule length (the calibration timesteps' DDIM schedule) and the params file whose
# quant/calibrate sections they use (None: the package defaults, params.yaml's)
MODELS: dict[str, tuple[int, Path | None]] = {"demo:digits": (50, None), "demo:digits16": (50, None),
                                              "demo:digits-dit": (50, None),
                                              CIFAR: (100, Path("configs/ddpm-cifar10.yaml"))}
TARGETS = ("sd-1.5-unet", "pixart-xl-2-512")


@dataclass(frozen=True)
class UnitCost:
    """One reconstruction unit's size: weights of its quantizable layers, recorded bytes (inputs + output) and
    forward FLOPs (2 per multiply-add), both per calibration input."""

    parameters: int
    io_bytes: int
    flops: int


def unit_costs(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> dict[str, UnitCost]:
    """The reconstruction units of ``net`` (its architecture's, over every quantizable layer) with their
    :class:`UnitCost`, from one forward pass on one input x [1, C, H, W] (any device; ``meta`` costs nothing)."""
    arch = architecture_of(net)
    layers = quantizable_layers(net)
    units = arch.units(net, list(layers))
    run = lambda m, _i: arch.call(m, x, t, cond)  # noqa: E731
    io = unit_io_bytes(net, units, run)
    flops: dict[str, int] = dict.fromkeys(units, 0)
    with FlopCounterMode(display=False) as counter:
        def hooks(u: str) -> list[Any]:
            m = net.get_submodule(u)
            return [m.register_forward_pre_hook(lambda *_: flops.__setitem__(u, flops[u] - counter.get_total_flops())),
                    m.register_forward_hook(lambda *_: flops.__setitem__(u, flops[u] + counter.get_total_flops()))]
        handles = [h for u in units for h in hooks(u)]
        try:
            with torch.no_grad():
                run(net, 0)
        finally:
            for h in handles:
                h.remove()
    weight = {n: m.weight.numel() for n, m in layers.items()}
    params = {u: sum(v for n, v in weight.items() if n == u or n.startswith(u + ".")) for u in units}
    return {u: UnitCost(params[u], io[u], flops[u]) for u in units}


def meta_copy(net: nn.Module) -> nn.Module:
    """An empty copy of a diffusers network (same config) on the meta device."""
    with torch.device("meta"):
        return type(net).from_config(net.config).eval()


def target_costs(name: str) -> tuple[int, int, dict[str, UnitCost]]:
    """(parameters, guidance branches, unit costs) of an SD-size target at 64x64x4 latents, built on the meta device:
    the Stable Diffusion 1.5 UNet (UNet2DConditionModel's defaults are SD 1.x's; CLIP ViT-L text, 77 x 768) or
    PixArt-XL-2-512 (T5 encodings, 120 x 4096)."""
    with torch.device("meta"):
        if name == "sd-1.5-unet":
            net = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
            cond = {"encoder_hidden_states": torch.empty(1, 77, 768)}
        else:
            net = Transformer2DModel.from_config(PIXART_XL_2_512)
            cond = {"encoder_hidden_states": torch.empty(1, 120, 4096), "encoder_attention_mask": torch.ones(1, 120)}
        x, t = torch.empty(1, 4, 64, 64), torch.full((1,), 500.0)
    branches = 2 if architecture_of(net).guidance_scale > 1 else 1
    return sum(p.numel() for p in net.parameters()), branches, unit_costs(net.eval(), x, t, cond)


def make_model(name: str, folder: Path) -> int:
    """Save ``name``'s pipeline (random weights: the demos untrained, from the model stage's defaults) in
    ``folder``; returns the denoiser's parameter count."""
    if name == CIFAR:
        return build_model(folder)
    mp = params_from_dict({"model": {"source": name}}).model
    pipe = train_demo_pipeline(name, seed=mp.seed, steps=0, batch_size=mp.batch_size, lr=mp.lr, channels=mp.channels,
                               dit_width=mp.dit_width, dit_depth=mp.dit_depth, progress=False)
    pipe.save_pretrained(folder)
    return sum(p.numel() for p in load_denoiser(folder).net.parameters())


def calibrate_model(name: str, root: Path, samples: int, iters: list[int], device: str) -> list[dict[str, Any]]:
    """Calibrate ``name`` once per iteration count in ``iters``, each run in its own process; one result each."""
    steps, config = MODELS[name]
    root.mkdir(parents=True)
    n_params = make_model(name, root / "model")
    den = load_denoiser(root / "model")
    defaults = params_from_dict({})
    cond = den.conditioning(None, [], guidance_scale(defaults, den)) if den.conditional else None
    n = build_calib(root / "calib", samples, steps, defaults.select.shard_size, shape=den.sample_shape, cond=cond)
    meta = meta_copy(den.net)
    x, t = torch.empty(1, *den.sample_shape, device="meta"), torch.full((1,), 500.0, device="meta")
    probe = den.probe_conditioning(1)
    costs = unit_costs(meta, x, t, None if probe is None else {k: v.to("meta") for k, v in probe.items()})
    out = []
    for it in iters:
        # each run checkpoints its units as the stage does by default, into a folder of its own: never a resume
        raw = {**bench_params(config, samples, it, None, device, steps),
               "checkpoint": {"dir": str(root / f"checkpoints-{it}")}}
        child = measure_calibrate(root, raw)
        m, c = child["metrics"], params_from_dict(raw).calibrate
        data = CalibSet(root / "calib")
        plan = data.batches(TimeGroups.from_schedule(data.schedule, m["time_groups"]), c.batch_size)
        units = []
        for r in child["unit_log"]:
            if r["unit"] not in costs:
                raise RuntimeError(f"{name}: reconstruction unit {r['unit']} is not a unit of the architecture")
            units.append({**{k: r[k] for k in ("unit", "layers", "mse_before", "mse_after", "seconds", "parameters",
                                               "io_bytes")}, "flops_per_input": costs[r["unit"]].flops})
        out.append({"model": name, "parameters": n_params, "calib_inputs": n, "recon_iters": it,
                    "recon_batch_size": c.recon_batch_size, "batch_size": c.batch_size,
                    "rows_per_step": float(np.mean([min(c.recon_batch_size, e - s) for s, e, _ in plan])),
                    "time_groups": m["time_groups"], "units": len(units), "fit_seconds": m["fit_seconds"],
                    "reconstruction_seconds": m["reconstruction_seconds"],
                    "total_seconds": child["calibrate_seconds"],
                    "unit_seconds": round(sum(u["seconds"] for u in units), 3),
                    "peak_rss_mb": child["peak_rss_mb"], "torch_threads": child["torch_threads"],
                    "device": child["device"], "unit_log": units})
    return out


# ---- the cost model ---------------------------------------------------------------------------------------------


def extrapolate(f: dict[str, Any], name: str, iters: int, samples: int, rows: int, ref: str) -> dict[str, Any]:
    """Predicted seconds of the calibrate stage for target ``name`` with ``samples`` drawn inputs (each twice under
    guidance), ``iters`` steps per unit of ``rows`` inputs, from each per-step fit, with ``ref``'s overhead ratios
    and the range over every measured model's ratios."""
    n_params, branches, costs = target_costs(name)
    n = samples * branches
    passes = n / rows
    out: dict[str, Any] = {"target": name, "parameters": n_params, "units": len(costs), "calib_inputs": n,
                           "recon_iters": iters, "rows_per_step": rows,
                           "unit_parameters": sum(c.parameters for c in costs.values()),
                           "io_bytes_per_input": sum(c.io_bytes for c in costs.values()),
                           "gflops_per_input": round(sum(c.flops for c in costs.values()) / 1e9, 1)}
    for key, g in f["per_step"].items():
        s = sum(max(0.0, g["intercept_s"] + g["s_per_parameter"] * c.parameters + g["s_per_row_unit"] * rows *
                    getattr(c, key)) for c in costs.values())
        units_s = (iters + f["phi"] * passes) * s
        total = lambda o: units_s + (o["kappa"] * len(costs) + o["lambda"]) * passes * s  # noqa: E731
        every = [total(o) for o in f["overhead"].values()]
        out[key] = {"step_seconds_all_units": s, "units_seconds": units_s, "total_seconds": total(f["overhead"][ref]),
                    "total_seconds_range": [min(every), max(every)]}
    return out


# ---- outputs ----------------------------------------------------------------------------------------------------


def hours(s: float) -> str:
    return f"{s / 3600:,.1f} h"


def table(result: dict[str, Any]) -> str:
    """data/bench/calibrate.md: the runs, the fits, the overhead ratios and the extrapolation."""
    f, lin = result["fit"], result["linearity_run"]
    lines = [f"# make bench-calibrate at commit {str(result['commit'])[:12]}"
             f"{' (uncommitted changes)' if result['dirty'] else ''}", "",
             f"{result['date']}, {result['cpus']} CPUs, torch threads {result['runs'][0]['torch_threads']}, device "
             f"{result['runs'][0]['device']}; random weights, synthetic calibration sets; "
             f"{result['wall_seconds']:.0f} s in all.", "",
             "| model | parameters | calib inputs | rows per step | iters | units | fit s | reconstruction s | "
             "total s | peak RSS MB | s per step, all units | s per unit-step |", "|" + "---|" * 12]
    for r in result["runs"] + ([lin] if lin else []):
        s = sum(step_seconds(r, f["phi"]))
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['calib_inputs']} | {r['rows_per_step']:.1f} | "
                     f"{r['recon_iters']} | {r['units']} | {r['fit_seconds']:.1f} | "
                     f"{r['reconstruction_seconds']:.1f} | {r['total_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{s:.4f} | {s / r['units']:.5f} |")
    e = result["eval_share"]
    how = f"from {e['model']} at {e['iters'][0]} and {e['iters'][1]} iterations" if e else "not measured: 0"
    lines += ["", f"Step seconds: a unit's seconds / (iters + phi x N / rows), phi {f['phi']:.3f} ({how}).", "",
              "| per-step fit (all units) | intercept s | s per parameter | s per row x io byte or FLOP | R² | "
              "held out: predicted / measured s per step, by model |", "|---|---|---|---|---|---|"]
    for k, g in f["per_step"].items():
        held = ", ".join(f"{m} {h['predicted']:.3g} / {h['measured']:.3g}" for m, h in g["held_out"].items())
        lines.append(f"| {k} | {g['intercept_s']:.3e} | {g['s_per_parameter']:.3e} | {g['s_per_row_unit']:.3e} | "
                     f"{g['r2']:.3f} | {held} |")
    t = f["total_vs_parameters"]
    what = {"parameters": "the unit's parameters", "io_bytes": "the io bytes of the step's rows",
            "flops": "the FLOPs of the step's rows"}
    lines += ["", "Log-log slopes of step seconds against " + ", ".join(
        f"{what[k]} {g['slope']:.3f} (R² {g['r2']:.3f})" for k, g in f["log_slopes"].items()) + ".", "",
        f"Whole stage at these settings: log(total s) = {t['log_intercept']:.2f} + {t['log_slope']:.3f} "
        f"log(parameters), R² {t['r2']:.3f}.", "",
        "| model | step GFLOP/s (3 x forward FLOPs) | kappa (capture passes per unit) | lambda (fit, output check, "
        "loading: passes) |", "|---|---|---|---|"]
    lines += [f"| {m} | {o['step_gflop_per_s']:.1f} | {o['kappa']:.3f} | {o['lambda']:.3f} |"
              for m, o in f["overhead"].items()]
    lines += ["", f"Extrapolated calibrate time ({result['extrapolation_ref']}'s kappa and lambda; range: every "
              "model's):", "",
              "| target | parameters | units | calib inputs | iters | GFLOPs per input | io MiB per input | "
              "fit on io bytes | range | fit on FLOPs | range |", "|" + "---|" * 11]
    for x in result["extrapolation"]:
        cells = [f"{hours(x[k]['total_seconds'])} | {hours(x[k]['total_seconds_range'][0])}–"
                 f"{hours(x[k]['total_seconds_range'][1])}" for k in FITS]
        lines.append(f"| {x['target']} | {x['parameters']:,} | {x['units']} | {x['calib_inputs']} | "
                     f"{x['recon_iters']} | {x['gflops_per_input']:,} | {x['io_bytes_per_input'] / 2**20:,.0f} | "
                     f"{' | '.join(cells)} |")
    lines += ["", "Assumptions:", *[f"- {a}" for a in result["assumptions"]]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Step seconds of each unit against its parameters and its FLOPs (log-log); False without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    with panels(path, 1, 2, (11, 4.2), dpi=110) as (fig, axes):
        axes = axes[0]
        for r in result["runs"]:
            s = step_seconds(r, result["fit"]["phi"])
            for ax, key in zip(axes, ("parameters", "flops_per_input")):
                ax.scatter([max(1, u[key]) for u in r["unit_log"]], s, s=14,
                           label=f"{r['model']} ({r['rows_per_step']:.0f} rows per step)")
        for ax, label in zip(axes, ("unit parameters", "unit forward FLOPs per input")):
            ax.set(xscale="log", yscale="log", xlabel=label, ylabel="seconds per reconstruction step")
            ax.grid(True, which="major", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"calibrate: seconds per unit-step ({result['cpus']} CPUs, commit {str(result['commit'])[:7]})")
    return True


def samples_of(args: argparse.Namespace) -> dict[str, int]:
    """Calibration inputs drawn per model: --samples, or a --model-samples override."""
    out = dict.fromkeys([*args.models, args.linearity_model], args.samples)
    for item in args.model_samples if args.model_samples is not None else [f"{CIFAR}=64"]:
        name, _, n = item.partition("=")
        out[name] = int(n)
    return out


def check_args(args: argparse.Namespace) -> None:
    """One-line refusals before any work."""
    def fail(msg: str) -> None:
        raise SystemExit(f"bench-calibrate: error: {msg}")

    named = []
    for item in args.model_samples or []:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) == 0:
            fail(f"--model-samples {item!r}: expected MODEL=N with N a positive integer, e.g. {CIFAR}=64")
        named.append(name)
    for m in [*args.models, args.linearity_model, *named]:
        if m not in MODELS:
            fail(f"unknown model {m!r}: expected one of {', '.join(MODELS)}")
    for key in ("samples", "recon_iters", "target_iters", "target_samples"):
        if getattr(args, key) <= 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)}: expected a positive integer")
    if args.linearity_iters < 0 or 0 < args.linearity_iters <= args.recon_iters:
        fail(f"--linearity-iters {args.linearity_iters}: expected 0 (off) or more than --recon-iters "
             f"{args.recon_iters}")
    if args.reference not in args.models:
        fail(f"--reference {args.reference!r}: expected one of the measured models ({', '.join(args.models)})")


ASSUMPTIONS = [
    "the machine, torch threads, fp32 and calibrate code of the measured runs; random weights (the cost does not "
    "depend on the values); the PQD preset's settings (4 time groups, AdaRound, LSQ, QDrop), outputs quantized, "
    "attention matmuls and glue in float",
    "a unit's seconds = (iters + phi x N / rows) x its step seconds, phi as measured on one model at two iteration "
    "counts; a step's seconds linear in the unit's parameters and in the io bytes (or the FLOPs) of the step's rows, "
    "as fitted on every measured unit",
    "recording the units' inputs and outputs = kappa x units, and the fit, output check and loading = lambda, passes "
    "over the set in whole-model step seconds per input; kappa and lambda as measured on the reference model",
    "targets at 64x64x4 latents (512 px) built on the meta device (SD 1.5: UNet2DConditionModel's defaults with CLIP "
    "ViT-L text 77 x 768; PixArt-XL-2-512: T5 text 120 x 4096); every drawn input enters twice (classifier-free "
    "guidance); 32 rows per step (1024 inputs in 4 time groups, calibration batches of 128)",
    "the measured runs' speed (other jobs may have shared the cores: see the date and docs/benchmarks.md); "
    "recordings spilled to disk (calibrate.memory_mb) cost no extra time",
]


@command("bench-calibrate")
def main(argv: list[str] | None = None) -> int:
    defaults = params_from_dict({})
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help=f"of {', '.join(MODELS)}")
    ap.add_argument("--samples", type=int, default=128,
                    help="calibration inputs drawn per model (each twice under guidance)")
    ap.add_argument("--model-samples", action="append", metavar="MODEL=N",
                    help=f"another --samples for one model (default: {CIFAR}=64)")
    ap.add_argument("--recon-iters", type=int, default=20)
    ap.add_argument("--linearity-model", default="demo:digits16", help="calibrated again at --linearity-iters")
    ap.add_argument("--linearity-iters", type=int, default=50, help="0: off (the error passes count as steps)")
    ap.add_argument("--reference", default=CIFAR, help="the model whose overhead ratios the extrapolation uses")
    ap.add_argument("--target-iters", type=int, default=defaults.calibrate.recon_iters)
    ap.add_argument("--target-samples", type=int, default=defaults.select.num_samples)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="data/bench/calibrate.json", help="also writes .md and .png beside it")
    args = ap.parse_args(argv)
    check_args(args)
    samples = samples_of(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pqd-bench-calibrate-") as tmp:
        runs, share, linearity_run = [], None, None
        for i, name in enumerate(args.models):
            extra = [args.linearity_iters] if args.linearity_iters and name == args.linearity_model else []
            got = calibrate_model(name, Path(tmp) / f"m{i}", samples[name], [args.recon_iters, *extra], args.device)
            runs.append(got[0])
            if extra:
                share, linearity_run = eval_share(*got), got[1]
        if args.linearity_iters and share is None:
            got = calibrate_model(args.linearity_model, Path(tmp) / "linearity", samples[args.linearity_model],
                                  [args.recon_iters, args.linearity_iters], args.device)
            share, linearity_run = eval_share(*got), got[1]
    f = fit(runs, share["phi"] if share else 0.0)
    git = git_commit(Path.cwd())
    result: dict[str, Any] = {
        "commit": git.commit, "dirty": git.dirty, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "wall_seconds": round(time.perf_counter() - t0, 1), "runs": runs, "linearity_run": linearity_run,
        "eval_share": share, "fit": f, "extrapolation_ref": args.reference,
        "extrapolation": [extrapolate(f, t, args.target_iters, args.target_samples,
                                      defaults.calibrate.recon_batch_size, args.reference) for t in TARGETS],
        "assumptions": ASSUMPTIONS}
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = out.with_suffix(".png").name if plot(result, out.with_suffix(".png")) else None
    md = table(result)
    out.with_suffix(".md").write_text(md)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
