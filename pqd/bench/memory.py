"""``make bench-memory``: peak resident memory of the calibrate stage on a full-size CIFAR-10 DDPM UNet.

The UNet has the architecture of google/ddpm-cifar10-32 (random weights: nothing is downloaded); the calibration set
(``--samples`` Gaussian inputs at the 100-step DDIM schedule's timesteps, the real calib/ format) is calibrated in
this process with the full PQD preset. ``--units`` reconstructs only the N units with the largest recordings (each
unit's are freed before the next, so the peak is the largest unit's). Peak RSS (ru_maxrss) goes to
``data/bench/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DDIMScheduler

from pqd.diffusion.configs import cifar10_ddpm_pipeline
from pqd.errors import command
from pqd.formats.calibset import CalibWriter
from pqd.params import load_params, params_from_dict, resolve_device
from pqd.stages import calibrate


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def build_model(folder: Path, seed: int = 0) -> int:
    """Save a random-weight DDPM pipeline with the CIFAR-10 UNet in ``folder``; returns its parameter count."""
    pipe = cifar10_ddpm_pipeline(seed)
    pipe.save_pretrained(folder)
    return sum(p.numel() for p in pipe.unet.parameters())


def build_calib(folder: Path, n: int, steps: int, shard_size: int, seed: int = 0) -> None:
    """n calibration inputs in the calib/ format: Gaussian x [3, 32, 32] at DDIM timesteps, decreasing t."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    schedule = [float(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(seed)
    ts = sorted((schedule[int(i)] for i in torch.randint(steps, (n,), generator=g)), reverse=True)
    folder.mkdir(parents=True)
    writer = CalibWriter(folder, shard_size)
    for t in ts:
        writer.add(torch.randn(3, 32, 32, generator=g), t)
    writer.close({"schedule_timesteps": schedule, "timesteps": "synthetic", "conditioning": None})


def bench_params(config: Path, samples: int, recon_iters: int, batch_size: int | None, device: str | None) -> dict[str, Any]:
    """The params of the benchmarked calibrate run: ``config``'s quant/calibrate sections (the shipped CIFAR-10
    config by default) with the calibration set size, the reconstruction iterations and optionally the batch
    size and device replaced."""
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    calib = {**cfg.get("calibrate", {}), "recon_iters": recon_iters}
    if batch_size is not None:
        calib["batch_size"] = batch_size
    return {"device": device or cfg.get("device", "auto"), "quant": cfg.get("quant", {}), "calibrate": calib,
            "generate": {"steps": 100, "calib_seeds": samples}, "select": {"num_samples": samples}}


def calibrate_child(root: Path, units: int, output_check: bool) -> int:
    """The measured process: the calibrate stage on root/model and root/calib with root/params.yaml, alone in a
    fresh interpreter (as ``dvc repro`` runs it); writes its metrics and its own peak RSS to root/child.json."""
    params = load_params(root / "params.yaml")
    device = resolve_device(params)
    t0 = time.perf_counter()
    metrics = calibrate.run(params, root / "model", root / "calib", root / "qstate", largest_units=units or None,
                            output_check=output_check)
    result = {"peak_rss_mb": round(peak_rss_mb(), 1), "calibrate_seconds": round(time.perf_counter() - t0, 1),
              "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
              "torch_threads": torch.get_num_threads(), "metrics": metrics.to_json()}
    if device == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (root / "child.json").write_text(json.dumps(result, indent=2))
    return 0


@command("bench-memory")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ddpm-cifar10.yaml", help="params whose quant/calibrate sections are used")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--units", type=int, default=1, help="reconstruct the N largest units (0: all units)")
    ap.add_argument("--recon-iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="calibrate.batch_size (default: the config's)")
    ap.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: the config's")
    ap.add_argument("--no-output-check", dest="output_check", action="store_false",
                    help="skip the final FP-vs-quantized output MSE (two more full passes over the set)")
    ap.add_argument("--out", default="data/bench/memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: the measured calibrate process
    args = ap.parse_args(argv)
    if args.child:
        return calibrate_child(Path(args.child), args.units, args.output_check)

    config = Path(args.config)
    if not config.is_file():
        raise SystemExit(f"bench-memory: error: --config {config} is not a file: expected a params YAML such as "
                         "configs/ddpm-cifar10.yaml")
    raw = bench_params(config, args.samples, args.recon_iters, args.batch_size, args.device)
    params = params_from_dict(raw)  # checked before any work
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        n_params = build_model(root / "model")
        build_calib(root / "calib", args.samples, 100, params.select.shard_size)
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        setup_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "pqd.bench.memory", "--child", str(root), "--units", str(args.units)]
        # OpenMP threads sleep while they wait: on shared cores spinning threads slowed this run many times over
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        subprocess.run(cmd + ([] if args.output_check else ["--no-output-check"]), check=True, env=env)
        child = json.loads((root / "child.json").read_text())
    m = child.pop("metrics")
    c = params.calibrate
    result = {"peak_rss_mb": child["peak_rss_mb"], "target_mb": 4096, "samples": args.samples,
              "measured": "peak RSS (ru_maxrss) of the calibrate process alone",
              **{k: v for k, v in child.items() if k != "peak_rss_mb"},
              "config": str(config), "unet_parameters": n_params, "batch_size": c.batch_size, "memory_mb": c.memory_mb,
              "time_groups": m["time_groups"], "reconstructed_units": m["reconstructed_units"],
              "recon_iters": args.recon_iters, "output_check": args.output_check,
              "units_recorded_on_disk": m["units_recorded_on_disk"], "setup_seconds": round(setup_s, 1),
              "fit_seconds": m["fit_seconds"], "reconstruction_seconds": m["reconstruction_seconds"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["peak_rss_mb"] <= result["target_mb"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
