"""``make gpu-check``: the pipeline on a CUDA GPU against the same seeds on the CPU, at reduced sizes.

The CIFAR-10 UNet config (configs/ddpm-cifar10.yaml's quant and calibrate sections; random weights, nothing is
downloaded) goes through the model, generate, select, calibrate and export stages twice, with ``device: cpu`` and
with ``device: cuda`` (DDIM-10, 4 trajectories, 32 calibration inputs, ``--recon-iters`` per unit). Then:

- each run's simulated quantized network predicts the noise of one probe batch on the CPU; the two must differ by
  less than a tenth of the quantization error (the CPU run's squared error against the FP prediction);
- the CUDA run's int8 graph runs on onnxruntime's CUDA provider, where the installed onnxruntime has one
  (onnxruntime-gpu), against its CPU provider on the same batch.

It prints the seconds of each stage on each device. Without CUDA it refuses in one line, before any work
(``--device cpu`` runs the same comparison CPU against CPU: the check's own plumbing, on any machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pqd.bench.memory import build_model
from pqd.deploy.int4 import runnable_graph
from pqd.deploy.onnx import ONNX_DIR, graph_file
from pqd.deploy.ort import session_options
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.quantized import load_denoiser_from_export
from pqd.errors import InputError, command
from pqd.params import params_from_dict
from pqd.stages import calibrate, export, generate, model, select

REDUCED = {"generate": {"steps": 10, "calib_seeds": 4, "eval_samples": 8, "batch_size": 8, "shard_size": 8},
           "select": {"num_samples": 32}}


def check_cuda(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"torch.cuda.is_available() is False on this machine (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}): expected a CUDA GPU; nothing was run")


def run_pipeline(root: Path, raw: dict, device: str) -> dict[str, float]:
    """model -> generate -> select -> calibrate -> export under ``root`` with ``device``; seconds per stage."""
    # timings of whole stages: never a resume from a checkpoint an interrupted check left
    params = params_from_dict({**raw, "device": device, "checkpoint": {"dir": None}})
    d = {k: root / k for k in ("model", "trajectories", "samples", "calib", "qstate", "export")}
    steps = [("model", lambda: model.run(params, d["model"])),
             ("generate", lambda: generate.run(params, d["model"], d["trajectories"], d["samples"])),
             ("select", lambda: select.run(params, d["trajectories"], d["calib"])),
             ("calibrate", lambda: calibrate.run(params, d["model"], d["calib"], d["qstate"])),
             ("export", lambda: export.run(params, d["model"], d["qstate"], d["export"]))]
    seconds = {}
    for name, step in steps:
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[name] = round(time.perf_counter() - t0, 2)
    return seconds


def probe(model_dir: Path, exports: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(x, FP prediction, each export's simulated prediction) on one CPU batch across the schedule."""
    den = load_denoiser(model_dir)
    x = torch.randn(8, *den.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(900.0, 10.0, 8)
    with torch.no_grad():
        return x, den.predict(x, t), [load_denoiser_from_export(e).predict(x, t) for e in exports]


def ort_providers(export_dir: Path, x: torch.Tensor) -> dict[str, object]:
    """Time group 0's graph on onnxruntime's CUDA provider against its CPU provider, where CUDA is available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return {"onnxruntime_cuda": f"not available (onnxruntime {ort.__version__} providers: {', '.join(available)})"}
    # a W4 graph's INT4 codes widened to int8, its activations on uint8 grids (onnxruntime's kernels)
    graph = runnable_graph(export_dir / ONNX_DIR / graph_file(0), unsigned_activations=True)
    t = torch.full((len(x),), 999.0)  # the noisiest step: time group 0 of every schedule
    feed = {"sample": x.numpy(), "timestep": t.numpy()}
    out = {}
    for p in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        s = ort.InferenceSession(graph, session_options(), providers=[p])
        s.run(None, feed)  # warm-up
        t0 = time.perf_counter()
        out[p] = torch.from_numpy(s.run(None, feed)[0])
        out[f"{p} seconds"] = round(time.perf_counter() - t0, 4)
    diff = float((out["CUDAExecutionProvider"] - out["CPUExecutionProvider"]).abs().max())
    return {"onnxruntime_cuda_max_abs_diff": diff, **{k: v for k, v in out.items() if k.endswith("seconds")}}


@command("gpu-check")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ddpm-cifar10.yaml", help="params whose quant/calibrate sections are used")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="the device checked against the CPU")
    ap.add_argument("--recon-iters", type=int, default=20)
    ap.add_argument("--out", default="data/bench/gpu_check.json")
    args = ap.parse_args(argv)
    check_cuda(args.device)  # before any work
    cfg = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
    raw = {**REDUCED, "quant": cfg.get("quant", {}),
           "calibrate": {**cfg.get("calibrate", {}), "recon_iters": args.recon_iters, "batch_size": 8}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_params = build_model(root / "source")
        raw["model"] = {"source": str(root / "source")}
        runs = {"reference (cpu)": "cpu", f"checked ({args.device})": args.device}  # each in its own folder
        seconds = {run: run_pipeline(root / f"run{i}", raw, dev) for i, (run, dev) in enumerate(runs.items())}
        exports = [root / "run0/export", root / "run1/export"]
        x, fp, (sim_cpu, sim_dev) = probe(root / "run0/model", exports)
        quant_err = float(((sim_cpu - fp) ** 2).mean())
        device_diff = float(((sim_dev - sim_cpu) ** 2).mean())
        result = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                  "unet_parameters": n_params, "seconds": seconds, "quantization_mse": quant_err,
                  "device_mse": device_diff, "passed": device_diff < 0.1 * quant_err,
                  **ort_providers(exports[1], x)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
