"""calibrate stage: fit every quantizer of the UNet on the calibration set -> qstate/.

Weights: per output channel, symmetric, ``calibrate.weight_range`` (min-max or MSE-searched clipping);
activations (each Conv2d/Linear input): per tensor, asymmetric, ``calibrate.act_range``. The first and
last convolutions and the time embedding keep ``quant.edge_bits``-bit weights.
Also writes the per-layer weight error (plot data) and the quantized UNet's output error against FP on
the calibration set.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from pqd.core import QuantConfig, apply_qstate, dequantize, fit_qstate
from pqd.core.modules import quantizable_layers
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.io import atomic_dir
from pqd.params import Params, resolve_device
from pqd.qstate_io import save_qstate


def quant_config(params: Params, den: Denoiser) -> QuantConfig:
    names = list(quantizable_layers(den.unet))
    edge = {n: max(params.quant.edge_bits, params.quant.weight_bits) for n in den.edge_layers(names)}
    c = params.calibrate
    return QuantConfig(weight_bits=params.quant.weight_bits, act_bits=params.quant.act_bits,
                       weight_range=c.weight_range, act_range=c.act_range, act_samples=c.act_samples,
                       layer_weight_bits=edge)


def batches(x: torch.Tensor, t: torch.Tensor, size: int, device: str):
    for i in range(0, len(x), size):
        yield x[i:i + size].to(device), t[i:i + size].to(device)


@torch.no_grad()
def output_mse(fp: Denoiser, q: Denoiser, x: torch.Tensor, t: torch.Tensor, size: int, device: str) -> float:
    """Mean squared difference of the FP and quantized UNet outputs over the calibration inputs."""
    se, n = 0.0, 0
    for xb, tb in batches(x, t, size, device):
        se += float((fp.predict(xb, tb) - q.predict(xb, tb)).pow(2).sum())
        n += xb.numel()
    return se / n


def run(params: Params, model: Path, calib: Path, out: Path) -> dict[str, Any]:
    device = resolve_device(params)
    den = load_denoiser(model, device)
    data = load_file(calib / "samples.safetensors")
    x, t = data["x"], data["t"]
    cfg = quant_config(params, den)
    size = params.calibrate.batch_size

    def forward_all(unet: torch.nn.Module) -> None:
        for xb, tb in tqdm(list(batches(x, t, size, device)), desc="observing activations"):
            den.predict(xb, tb)

    state = fit_qstate(den.unet, forward_all, cfg)
    rows = []
    floats = quantizable_layers(den.unet)
    for name, lp in state.items():
        w = floats[name].weight.detach().float().cpu()
        wq = dequantize(lp.weight_int, lp.weight_scale, torch.zeros_like(lp.weight_scale), axis=0)
        rows.append({"layer": name, "kind": lp.kind, "weight_bits": lp.weight_bits,
                     "weight_rel_mse": float((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12)),
                     "act_scale": float(lp.act_scale[0]), "act_zero_point": float(lp.act_zero_point[0])})
    qden = copy.deepcopy(den)
    apply_qstate(qden.unet, state)
    mse = output_mse(den, qden, x, t, size, device)
    if not torch.isfinite(torch.tensor(mse)):
        raise FloatingPointError("calibrate: the quantized UNet gives non-finite outputs on the calibration set")
    errs = pd.DataFrame(rows)
    with atomic_dir(out) as tmp:
        save_qstate(state, tmp, {"config": {k: v for k, v in vars(cfg).items() if k != "layer_weight_bits"},
                                 "edge_layers": sorted(cfg.layer_weight_bits)})
        errs.to_csv(tmp / "layer_errors.csv", index=False)
    return {"layers": len(state), "calib_samples": len(x), "unet_output_mse": mse,
            "weight_rel_mse_mean": float(errs["weight_rel_mse"].mean()),
            "weight_rel_mse_max": float(errs["weight_rel_mse"].max())}


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("calibrate", run, ["model", "calib", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
