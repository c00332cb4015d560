"""export stage: qstate/ + model/ -> export/ (integer weights, qmap.json, ONNX graphs, manifest.json).

See pqd.formats.export for the format and pqd.deploy for the ONNX graphs. Before the folder is accepted, the
loader must rebuild exactly the calibrated integer weights, and the ONNX graphs (built from what the
loader rebuilt) must reproduce the torch model on probe inputs of every time group.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from pqd import deploy
from pqd.core.modules import quant_layers
from pqd.core.timegroups import TimeGroups
from pqd.core.quantize import mean_weight_bits, weight_layers
from pqd.core.rotate import rotate_attention
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.pipeline import denoiser_component
from pqd.diffusion.sampling import initial_noise
from pqd.formats import qstate as qcodec
from pqd.diffusion.quantized import load_denoiser_from_export, load_quantized_net
from pqd.formats.export import quantized_weights_file, write_export, write_manifest
from pqd.formats.files import atomic_dir, read_json
from pqd.formats.lineage import MODEL_RECORD, git_commit
from pqd.formats.metrics import ExportMetrics, OnnxGroupCheck
from pqd.params import Params, as_dict
from pqd.params.machine import saturates_full_range
from pqd.stages._cli import stage_main

# a deployed graph whose output deviates from the torch model by more than the quantization error itself
# (||onnx - torch|| > ||torch - fp|| on the probe inputs) is worth a warning; whether it is good enough is
# measured, not assumed: evaluate's deployed-vs-simulated FID and PSNR, judged by the release gate. (Both
# compute the same integer arithmetic; float ops between quantizers round differently in torch and onnxruntime
# and can move a code by one step: 0.0957 of the quantization error on the demo W8A8 UNet, 0.354 on a 16x16
# user model whose deployed FID was within 0.07 of the simulated one.)
WARN_REL_DEVIATION = 1.0


def probe_timesteps(groups: TimeGroups, num_train_timesteps: int) -> list[float]:
    """One timestep inside each time group: the middle of the group's range."""
    bounds = [float(num_train_timesteps - 1), *groups.thresholds, 0.0]
    return [(bounds[g] + bounds[g + 1]) / 2 for g in range(groups.count)]


@torch.no_grad()
def check_onnx(fp: Denoiser, q: Denoiser, ort: Denoiser, n: int = 4) -> tuple[OnnxGroupCheck, ...]:
    """Deviation of the onnxruntime artifact from the torch model per time group, against the quantization error."""
    report = []
    cond = fp.probe_conditioning(n)  # conditioned models: the classes in turn, or the empty prompt
    for g, t in enumerate(probe_timesteps(q.time_groups, int(q.scheduler_config.get("num_train_timesteps", 1000)))):
        x = initial_noise(list(range(n)), q.sample_shape)
        tt = torch.full((n,), t)
        y_fp, y_q, y_ort = fp.predict(x, tt, cond), q.predict(x, tt, cond), ort.predict(x, tt, cond)
        rel = float((y_ort - y_q).norm() / (y_q - y_fp).norm().clamp_min(1e-12))
        report.append(OnnxGroupCheck(g, t, float((y_ort - y_q).abs().max()), rel))
    return tuple(report)


def deviation_warning(checks: tuple[OnnxGroupCheck, ...], codes: dict[str, Any]) -> str | None:
    """One line when a group's deployed graph deviates from the torch model more than quantization deviates
    from FP, with a remedy only where it applies (full 8-bit codes on a CPU whose kernels can saturate)."""
    worst = max(checks, key=lambda c: c.rel_to_quant_error)
    if worst.rel_to_quant_error <= WARN_REL_DEVIATION:
        return None
    hint = ""
    if not codes.get("reduce_range", True) and saturates_full_range():
        hint = ("; this CPU has no VNNI/AMX, so its int8 kernels can saturate on full 8-bit codes: set "
                "quant.reduce_range to auto or true")
    return (f"pqd export: warning: the ONNX graph of time group {worst.group} deviates from the torch model by "
            f"{worst.rel_to_quant_error:.3g} of the quantization error at timestep {worst.timestep:g}; evaluate's "
            f"deployed-vs-simulated FID and PSNR will tell (release gate: deployment){hint}")


def run(params: Params, model: Path, qstate: Path, out: Path) -> ExportMetrics:
    state, groups, _, qmap = qcodec.read(qstate, qcodec.STATE_TENSORS)
    codes = qmap.get("integer_codes") or {}
    den = load_denoiser(model)
    rotate_attention(den.net, (qmap.get("rotation") or {}).get("kind", "none"))  # as calibrate folded it
    source = read_json(model / MODEL_RECORD)
    extra = {"source_model": {"source": source["source"], "model_sha256": source["model_sha256"]},
             "params": as_dict(params), "git": dataclasses.asdict(git_commit()), "integer_codes": codes,
             # the bits each layer got: mean over the weights (scales included), and quant.weight_bits_budget's choice
             "weights": {"bits_mean": round(mean_weight_bits(state), 4), "group_size": params.quant.weight_group_size,
                         "mixed_precision": qmap.get("mixed_precision")}}
    onnx_info: dict[str, Any] = {}
    with atomic_dir(out) as tmp:
        info = write_export(model, den.net, state, groups, tmp, float_dtype=getattr(torch, params.export.float_dtype))
        if params.export.onnx:  # traced from what the loader rebuilds: the graphs ship what was exported
            onnx_info = deploy.write_onnx(load_quantized_net(tmp, verify=False), groups, den, tmp / deploy.ONNX_DIR)
        info["files"] = write_manifest(tmp, extra)
        # the loader must rebuild exactly these integer weights before the export is accepted
        qden = load_denoiser_from_export(tmp)
        rebuilt = quant_layers(qden.net)
        for name, lp in weight_layers(state).items():
            if not torch.equal(rebuilt[name].weight_int, lp.weight_int.to(torch.int8)):
                raise RuntimeError(f"export: layer {name} does not round-trip through the export format")  # a bug
        if params.export.onnx:
            checks = check_onnx(den, qden, deploy.load_deployed_denoiser(tmp))
            onnx_info |= {"onnx_rel_dev_max": max(c.rel_to_quant_error for c in checks), "onnx_check": checks}
            if warning := deviation_warning(checks, codes):
                print(warning, file=sys.stderr)
            graph = tmp / deploy.ONNX_DIR / deploy.graph_file(0)
            audits = {r: deploy.kernel_audit(graph, r) for r in deploy.RUNTIMES}
            onnx_info["onnx_kernels"] = {r: a.as_dict() for r, a in audits.items()}
            for a in audits.values():
                print(f"pqd export: kernels: {a.line()}", file=sys.stderr)
    fp_bytes = sum(p.stat().st_size for p in (model / denoiser_component(model)).glob("*.safetensors"))
    q_bytes = quantized_weights_file(out).stat().st_size
    w4 = sum(1 for lp in weight_layers(state).values() if lp.weight_bits <= 4)
    if "onnx_shared_bytes" in onnx_info:
        onnx_info["onnx_size_ratio"] = round(fp_bytes / (onnx_info["onnx_shared_bytes"] + onnx_info["onnx_graph_bytes"]), 3)
    return ExportMetrics(**info, fp32_unet_bytes=fp_bytes, export_unet_bytes=q_bytes,
                         size_ratio=round(fp_bytes / q_bytes, 3), packed_int4_layers=w4,
                         weight_bits_mean=extra["weights"]["bits_mean"], **onnx_info)


def main(argv: list[str] | None = None) -> int:
    return stage_main("export", run, ["model", "qstate", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
