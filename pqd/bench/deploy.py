"""``make bench-deploy``: UNet forward latency and file size, float vs the deployed int8 artifact.

Two UNets: the demo's (``data/model``, trained) and one with the google/ddpm-cifar10-32 config (35.7M
parameters, random weights: speed does not depend on the values). Each is calibrated the product's way
on inputs from its own DDIM trajectories (4 time groups, split skip concatenations, quantized outputs,
MSE ranges), exported with the product's exporter, and timed in one process, interleaved round by round
so that load from other processes hits every backend alike:

    torch fp32 eager | torch bf16 autocast | onnxruntime fp32 | onnxruntime int8 (the artifact)

and, as a yardstick for what integer kernels give on the CPU at hand, onnxruntime's own static
quantization of the float graph (everything it can put in int8, random calibration: not a PQD model)

at batch 1 and 32: the median of ``--rounds`` timed calls after two warm-up calls. File sizes: the fp32
safetensors UNet against the W8 and W4 exports. Writes ``data/bench/deploy.md`` and ``deploy.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pqd import deploy
from pqd.core.quantize import fit_qstate
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import Denoiser, denoiser_from_pipeline, load_denoiser
from pqd.diffusion.configs import cifar10_ddpm_pipeline
from pqd.diffusion.qconfig import quant_config
from pqd.diffusion.sampling import make_scheduler, sample
from pqd.formats.export import QWEIGHTS, load_quantized_unet, write_export
from pqd.params import params_from_dict

GROUPS = 4
REFERENCE = "onnxruntime quantize_static int8 (yardstick, not PQD)"
STEPS = 20


def cifar_denoiser(seed: int = 0) -> Denoiser:
    return denoiser_from_pipeline(cifar10_ddpm_pipeline(seed))


def trajectory_inputs(den: Denoiser, seeds: int) -> tuple[list[tuple[torch.Tensor, float]], TimeGroups]:
    """The UNet inputs of ``seeds`` DDIM trajectories of ``STEPS`` steps, and ``GROUPS`` time groups over them."""
    inputs: list[tuple[torch.Tensor, float]] = []
    sched = make_scheduler("ddim", den.scheduler_config, den.scheduler_class)
    sample(den, sched, list(range(seeds)), steps=STEPS, batch_size=seeds,
           record=lambda i, t, x: inputs.append((x.clone(), float(t))), desc="calibration trajectories")
    return inputs, TimeGroups.from_schedule([t for _, t in inputs], GROUPS)


def calibrate(den: Denoiser, weight_bits: int, inputs: list[tuple[torch.Tensor, float]], groups: TimeGroups):
    """Quantizer state fitted on ``inputs`` the product's way (pqd.diffusion.qconfig with the PQD preset: MSE
    ranges, split skips, quantized outputs, 8-bit edge layers; 8-bit weights as 7-bit codes), without
    reconstruction (speed does not depend on it)."""
    params = params_from_dict({"quant": {"weight_bits": weight_bits, "reduce_range": True},
                               "calibrate": {"method": "pqd", "act_samples": 20_000, "time_groups": groups.count}})
    cfg = quant_config(params, den)

    def forward_all(unet: nn.Module, set_group: Callable[[int], None]) -> None:
        for x, t in tqdm(inputs, desc=f"observing (W{weight_bits})"):
            set_group(int(groups.group_of(t)))
            unet(x, torch.tensor(t))

    return fit_qstate(den.unet, forward_all, cfg), groups


def float_onnx(den: Denoiser, path: Path) -> None:
    path.write_bytes(deploy.export_unet(den.unet, den))


def ort_static_reference(fp_path: Path, sample_shape: tuple[int, ...], out: Path) -> Path:
    """onnxruntime's own static QDQ quantization of the float graph (u8 activations, s8 per-channel 7-bit
    weights, every op it supports in int8, random calibration inputs): not a PQD artifact, a yardstick for
    what integer kernels can give on this CPU."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rng, self.left = np.random.default_rng(0), 4

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.left -= 1
            return None if self.left < 0 else {"sample": self.rng.standard_normal((2, *sample_shape), dtype=np.float32),
                                               "timestep": np.full(2, 500.0, np.float32)}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    return out


def export_dirs(model_dir: Path, den: Denoiser, states: dict[int, tuple[Any, TimeGroups]], tmp: Path) -> dict[int, Path]:
    """Each calibration written the product's way: export folder, then ONNX traced from what the loader rebuilds."""
    out = {}
    for bits, (state, groups) in states.items():
        d = tmp / f"w{bits}"
        d.mkdir(parents=True)
        write_export(model_dir, den.unet, state, groups, d, float_dtype=torch.float32)
        deploy.write_onnx(load_quantized_unet(d, verify=False), groups, den, d / deploy.ONNX_DIR)
        out[bits] = d
    return out


def sizes(den: Denoiser, exports: dict[int, Path], tmp: Path) -> dict[str, int]:
    """Bytes of the fp32 UNet (safetensors) and of each export's quantized safetensors and ONNX files."""
    fp = tmp / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in den.unet.state_dict().items()}, fp)
    out = {"fp32 safetensors": fp.stat().st_size}
    for bits, d in exports.items():
        label = "W8 (7-bit codes)" if bits == 8 else f"W{bits}"
        out[f"{label} export safetensors"] = (d / QWEIGHTS).stat().st_size
        onnx_files = list((d / deploy.ONNX_DIR).iterdir())
        out[f"{label} ONNX (weights.bin + {len(onnx_files) - 1} graphs)"] = sum(p.stat().st_size for p in onnx_files)
    return out


def pipeline_folder(den: Denoiser, folder: Path) -> Path:
    """A diffusers pipeline folder around ``den`` (the exporter copies the non-UNet components from one)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=den.unet, scheduler=DDPMScheduler.from_config(den.scheduler_config)).save_pretrained(folder)
    return folder


def time_backends(fns: dict[str, Callable[[], Any]], rounds: int, desc: str,
                  max_call_s: float) -> dict[str, tuple[float, str]]:
    """Median seconds per call of each function and how it was measured: one warm-up call each, a second
    one, then ``rounds`` interleaved rounds. A function whose warm-up call took over ``max_call_s`` and over
    20x the fastest one's is not repeated: its single call is reported as such."""
    first: dict[str, float] = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        first[k] = time.perf_counter() - t0
    cap = max(max_call_s, 20 * min(first.values()))
    live = {k: f for k, f in fns.items() if first[k] <= cap}
    for f in live.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in tqdm(range(rounds), desc=desc):
        for k, f in live.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {k: (statistics.median(v), f"median of {rounds}") for k, v in times.items()}
    out.update({k: (first[k], f"one call (over {cap:.3g} s, not repeated)") for k in fns if k not in live})
    return out


def bench_unet(name: str, den: Denoiser, model_dir: Path | None, batches: list[int], rounds: int, threads: int,
               calib_seeds: int, max_call_s: float, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    inputs, groups = trajectory_inputs(den, calib_seeds)
    states = {bits: calibrate(den, bits, inputs, groups) for bits in (8, 4)}
    exports = export_dirs(model_dir or pipeline_folder(den, tmp / f"{name}-pipe"), den, states, tmp / name)
    int8_graph = exports[8] / deploy.ONNX_DIR / deploy.graph_file(0)
    fp_path = tmp / f"{name}-fp32.onnx"
    float_onnx(den, fp_path)
    s_fp = deploy.open_session(fp_path, threads)
    s_q = deploy.open_session(int8_graph, threads)
    s_ref = deploy.open_session(ort_static_reference(fp_path, den.sample_shape, tmp / f"{name}-ort-static.onnx"), threads)
    kernels = deploy.kernel_report(int8_graph)
    rows: list[dict[str, Any]] = []
    too_slow: dict[str, str] = {}  # backends not run at larger batches
    for b in sorted(batches):
        x = torch.randn(b, *den.sample_shape, generator=torch.Generator().manual_seed(b))
        t = torch.full((b,), 500.0)
        feeds = {"sample": x.numpy(), "timestep": t.numpy()}

        def eager() -> Any:
            with torch.no_grad():
                return den.unet(x, t).sample

        def bf16() -> Any:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return den.unet(x, t).sample

        fns = {"torch fp32 eager": eager, "torch bf16 autocast": bf16,
               "onnxruntime fp32": lambda: s_fp.run(None, feeds), "onnxruntime int8": lambda: s_q.run(None, feeds),
               REFERENCE: lambda: s_ref.run(None, feeds)}
        fns = {k: f for k, f in fns.items() if k not in too_slow}
        med = time_backends(fns, rounds, f"{name} batch {b}", max_call_s)
        for backend in too_slow:
            rows.append({"unet": name, "batch": b, "backend": backend, "ms_per_call": float("nan"),
                         "ms_per_image": float("nan"), "int8_speedup": float("nan"),
                         "measured": f"skipped: {too_slow[backend]}"})
        for backend, (sec, how) in med.items():
            rows.append({"unet": name, "batch": b, "backend": backend, "ms_per_call": sec * 1e3,
                         "ms_per_image": sec * 1e3 / b, "int8_speedup": sec / med["onnxruntime int8"][0], "measured": how})
            if how.startswith("one call"):
                too_slow[backend] = f"{sec:.1f} s per call at batch {b}"
    params = sum(p.numel() for p in den.unet.parameters())
    return rows, {"unet": name, "params": params, "kernels": kernels, "sizes": sizes(den, exports, tmp / name)}


def table(rows: list[dict[str, Any]], extra: list[dict[str, Any]], threads: int) -> str:
    lines = ["# Deployment benchmark (`make bench-deploy`)", "",
             f"One process, {threads} threads (torch and onnxruntime), median of interleaved rounds after warm-up. "
             "`int8 speedup` = backend time / onnxruntime int8 time (> 1: the int8 artifact is faster).", "",
             "| UNet | batch | backend | ms / call | ms / image | int8 speedup | measured |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['unet']} | {r['batch']} | {r['backend']} | {r['ms_per_call']:.2f} | {r['ms_per_image']:.3f} "
                     f"| {r['int8_speedup']:.2f}x | {r['measured']} |")
    for e in extra:
        lines += ["", f"## {e['unet']} ({e['params'] / 1e6:.2f}M parameters)", "",
                  f"Kernels onnxruntime runs for the int8 graph: integer {e['kernels']['int8']}, float {e['kernels']['float']}.",
                  "", "| file | bytes | fp32 / file |", "|---|---:|---:|"]
        fp = e["sizes"]["fp32 safetensors"]
        for k, v in e["sizes"].items():
            lines.append(f"| {k} | {v} | {fp / v:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model", help="the demo pipeline folder (the model stage's output)")
    ap.add_argument("--out", default="data/bench")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--calib-seeds", type=int, default=8)
    ap.add_argument("--only", choices=["demo", "cifar10"], default=None)
    ap.add_argument("--max-call-s", type=float, default=5.0,
                    help="a backend slower than this and 20x the fastest per call is timed once and not run at larger batches")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    if a.rounds < 1 or a.threads < 1 or not batches or min(batches) < 1:
        raise SystemExit(f"bench-deploy: --rounds {a.rounds}, --threads {a.threads}, --batches {a.batches}: expected positive integers")
    model = Path(a.model)
    if a.only != "cifar10" and not (model / "model_index.json").is_file():
        raise SystemExit(f"bench-deploy: --model {model} is not a pipeline folder: run `dvc repro model` first")
    torch.set_num_threads(a.threads)
    rows, extra = [], []
    with tempfile.TemporaryDirectory() as tmp:
        todo = [("demo", lambda: load_denoiser(model), model), ("cifar10-ddpm", cifar_denoiser, None)]
        for name, build, mdir in todo:
            if a.only and not name.startswith(a.only):
                continue
            r, e = bench_unet(name, build(), mdir, batches, a.rounds, a.threads, a.calib_seeds, a.max_call_s, Path(tmp))
            rows += r
            extra.append(e)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "deploy.csv", index=False)
    text = table(rows, extra, a.threads)
    (out / "deploy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
