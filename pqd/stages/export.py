"""export stage: qstate/ + model/ -> export/ (integer weights, qmap.json, ONNX graphs, manifest.json).

See pqd.artifact for the format and pqd.deploy for the ONNX graphs. Before the folder is accepted, the
loader must rebuild exactly the calibrated integer weights, and the ONNX graphs (built from what the
loader rebuilt) must reproduce the torch model on probe inputs of every time group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pqd import deploy
from pqd.artifact import QWEIGHTS, git_commit, load_denoiser_from_export, load_quantized_unet, write_export, write_manifest
from pqd.core import TimeGroups, quant_layers
from pqd.core.quantize import weight_layers
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.sampling import initial_noise
from pqd.io import atomic_dir, read_json
from pqd.params import ParamError, Params, as_dict
from pqd.qstate_io import load_qstate, load_time_groups

# the ONNX graphs must agree with the torch model to within this share of the quantization error itself:
# ||onnx - torch|| <= 0.25 ||torch - fp||, so even if uncorrelated the deployed model is at most
# sqrt(1 + 0.25^2) = 1.03x as far from FP as the simulated one. Both compute the same integer arithmetic;
# what differs are float ops between quantizers (GroupNorm, SiLU, softmax) whose last-bit rounding differs
# between torch and onnxruntime and, near a grid midpoint, moves a code by one step (measured on the demo
# W8A8 UNet: no difference through the first 44 of 60 layers, then single-step flips in 0.3%-9% of the
# up-path outputs; 0.0957 of the quantization error at the output)
ONNX_TOLERANCE = 0.25


def probe_timesteps(groups: TimeGroups, num_train_timesteps: int) -> list[float]:
    """One timestep inside each time group: the middle of the group's range."""
    bounds = [float(num_train_timesteps - 1), *groups.thresholds, 0.0]
    return [(bounds[g] + bounds[g + 1]) / 2 for g in range(groups.count)]


@torch.no_grad()
def check_onnx(fp: Denoiser, q: Denoiser, ort: Denoiser, n: int = 4) -> dict[str, Any]:
    """Deviation of the onnxruntime artifact from the torch model per time group, against the quantization error."""
    worst = 0.0
    report = []
    for g, t in enumerate(probe_timesteps(q.time_groups, int(q.scheduler_config.get("num_train_timesteps", 1000)))):
        x = initial_noise(list(range(n)), q.sample_shape)
        tt = torch.full((n,), t)
        y_fp, y_q, y_ort = fp.predict(x, tt), q.predict(x, tt), ort.predict(x, tt)
        rel = float((y_ort - y_q).norm() / (y_q - y_fp).norm().clamp_min(1e-12))
        report.append({"group": g, "timestep": t, "max_abs": float((y_ort - y_q).abs().max()), "rel_to_quant_error": rel})
        worst = max(worst, rel)
        if not rel <= ONNX_TOLERANCE:
            raise RuntimeError(f"export: the ONNX graph of time group {g} deviates from the torch model by {rel:.3g} "
                               f"of the quantization error at timestep {t} (allowed {ONNX_TOLERANCE}); on x86 CPUs "
                               "without VNNI quant.reduce_range must be true")
    return {"onnx_rel_dev_max": worst, "onnx_check": report}


def run(params: Params, model: Path, qstate: Path, out: Path) -> dict[str, Any]:
    state = load_qstate(qstate)
    groups = load_time_groups(qstate)
    den = load_denoiser(model)
    if params.export.onnx and den.conditional:
        raise ParamError("params: export.onnx = true is not allowed for a text-guided model (the ONNX graphs take no "
                         "encoder hidden states yet): expected export.onnx = false and evaluate.backend = 'torch'")
    source = read_json(model / "model.json")
    extra = {"source_model": {"source": source["source"], "model_sha256": source["model_sha256"]},
             "params": as_dict(params), "git": git_commit()}
    onnx_info: dict[str, Any] = {}
    with atomic_dir(out) as tmp:
        info = write_export(model, den.unet, state, groups, tmp, float_dtype=getattr(torch, params.export.float_dtype))
        if params.export.onnx:  # traced from what the loader rebuilds: the graphs ship what was exported
            onnx_info = deploy.write_onnx(load_quantized_unet(tmp, verify=False), groups, den.sample_shape,
                                          tmp / deploy.ONNX_DIR)
        info["files"] = write_manifest(tmp, extra)
        # the loader must rebuild exactly these integer weights before the export is accepted
        qden = load_denoiser_from_export(tmp)
        rebuilt = quant_layers(qden.unet)
        for name, lp in weight_layers(state).items():
            if not torch.equal(rebuilt[name].weight_int, lp.weight_int.to(torch.int8)):
                raise RuntimeError(f"export: layer {name} does not round-trip through the export format")
        if params.export.onnx:
            onnx_info.update(check_onnx(den, qden, deploy.load_ort_denoiser(tmp)))
            onnx_info["onnx_kernels"] = deploy.kernel_report(tmp / deploy.ONNX_DIR / deploy.graph_file(0))
    fp_bytes = sum(p.stat().st_size for p in (model / "unet").glob("*.safetensors"))
    q_bytes = (out / QWEIGHTS).stat().st_size
    w4 = sum(1 for lp in weight_layers(state).values() if lp.weight_bits <= 4)
    return {**info, "fp32_unet_bytes": fp_bytes, "export_unet_bytes": q_bytes,
            "size_ratio": round(fp_bytes / q_bytes, 3), "packed_int4_layers": w4, **onnx_info}


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("export", run, ["model", "qstate", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
