"""``make bench-memory``: peak resident memory of the calibrate stage on a full-size CIFAR-10 DDPM UNet.

The UNet has the architecture of google/ddpm-cifar10-32 (random weights: nothing is downloaded); the calibration set
(``--samples`` Gaussian inputs at the 100-step DDIM schedule's timesteps, the real calib/ format) is calibrated in
this process with the full PQD preset. ``--units`` reconstructs only the N units with the largest recordings (each
unit's are freed before the next, so the peak is the largest unit's). Peak RSS (ru_maxrss) goes to
``data/bench/memory.json``. The child runner (:func:`measure_calibrate`) also serves ``make bench-calibrate``.
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

from pqd.diffusion.adapter import Conditioning
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


def build_calib(folder: Path, n: int, steps: int, shard_size: int, seed: int = 0,
                shape: tuple[int, int, int] = (3, 32, 32), cond: Conditioning | None = None) -> int:
    """n calibration inputs in the calib/ format: Gaussian x of ``shape`` [C, H, W] at DDIM timesteps, decreasing t.
    With ``cond`` (a conditioned model's rows and guidance) each input takes class or prompt row 1 + i mod P and,
    under guidance, enters again with the unconditional row 0, as select writes them. Returns the inputs written."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    schedule = [float(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(seed)
    ts = sorted((schedule[int(i)] for i in torch.randint(steps, (n,), generator=g)), reverse=True)
    guided = cond is not None and cond.guidance_scale > 1
    folder.mkdir(parents=True)
    writer = CalibWriter(folder, shard_size)
    for i, t in enumerate(ts):
        x = torch.randn(*shape, generator=g)
        writer.add(x, t, None if cond is None else 1 + i % cond.choices)
        if guided:
            writer.add(x, t, 0)
    meta = None if cond is None else {"guidance_scale": cond.guidance_scale,
                                      "branches": ["cond", "uncond"] if guided else ["cond"]}
    writer.close({"schedule_timesteps": schedule, "timesteps": "synthetic", "conditioning": meta},
                 None if cond is None else cond.inputs)
    return n * (2 if guided else 1)


def bench_params(config: Path | None, samples: int, recon_iters: int, batch_size: int | None, device: str | None,
                 steps: int = 100) -> dict[str, Any]:
    """The params of the benchmarked calibrate run: ``config``'s quant/calibrate sections (None: the package
    defaults, those of params.yaml) with the calibration set size, the reconstruction iterations and optionally the
    batch size and device replaced."""
    cfg = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}) if config is not None else {}
    calib = {**cfg.get("calibrate", {}), "recon_iters": recon_iters}
    if batch_size is not None:
        calib["batch_size"] = batch_size
    return {"device": device or cfg.get("device", "auto"), "quant": cfg.get("quant", {}), "calibrate": calib,
            "generate": {"steps": steps, "calib_seeds": samples}, "select": {"num_samples": samples}}


def calibrate_child(root: Path, units: int, output_check: bool) -> int:
    """The measured process: the calibrate stage on root/model and root/calib with root/params.yaml, alone in a
    fresh interpreter (as ``dvc repro`` runs it); writes its metrics, each reconstructed unit's log entry
    (``calibrate.run``'s ``unit_log``) and its own peak RSS to root/child.json."""
    params = load_params(root / "params.yaml")
    device = resolve_device(params)
    unit_log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    metrics = calibrate.run(params, root / "model", root / "calib", root / "qstate", largest_units=units or None,
                            output_check=output_check, unit_log=unit_log)
    result = {"peak_rss_mb": round(peak_rss_mb(), 1), "calibrate_seconds": round(time.perf_counter() - t0, 1),
              "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
              "torch_threads": torch.get_num_threads(), "metrics": metrics.to_json(), "unit_log": unit_log}
    if device == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (root / "child.json").write_text(json.dumps(result, indent=2))
    return 0


def measure_calibrate(root: Path, raw: dict[str, Any], units: int = 0, output_check: bool = True) -> dict[str, Any]:
    """Run the calibrate stage with params ``raw`` on root/model and root/calib in a fresh child process
    (:func:`calibrate_child`) and return what it measured: peak RSS, seconds, metrics, ``unit_log``."""
    # checkpoints in the run's own folder: an interrupted benchmark's rerun measures the whole stage, not a resume
    raw = {**raw, "checkpoint": raw.get("checkpoint", {"dir": str(root / "checkpoints")})}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "pqd.bench.memory", "--child", str(root), "--units", str(units)]
    # OpenMP threads sleep while they wait: on shared cores spinning threads slowed this run many times over
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    subprocess.run(cmd + ([] if output_check else ["--no-output-check"]), check=True, env=env)
    return json.loads((root / "child.json").read_text())


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
        setup_s = time.perf_counter() - t0
        child = measure_calibrate(root, raw, args.units, args.output_check)
    m = child.pop("metrics")
    child.pop("unit_log")
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
