"""calibrate stage: fit every quantizer of the UNet on the calibration set -> qstate/.

One code path for every method (``calibrate.method`` presets, see pqd.methods):
1. weights per output channel, symmetric (min-max or MSE-searched clipping); each Conv2d/Linear input
   per tensor, asymmetric, with its own parameters for each of G contiguous time groups (and for each
   half of a skip concatenation when ``split_shortcut``), fitted on that group's calibration inputs;
2. optionally block reconstruction (AdaRound, LSQ, QDrop) unit by unit against the FP UNet.
Writes the quantizer state, the time-group thresholds, per-layer errors and the reconstruction log.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from pqd.core import QuantConfig, TimeGroups, apply_qstate, dequantize, fit_qstate, qstate_of
from pqd.core.guards import NumericalError
from pqd.core.modules import quantizable_layers
from pqd.core.reconstruct import ReconConfig, reconstruct_model
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.sampling import checked_predict
from pqd.io import atomic_dir, load_tensors, read_json
from pqd.params import Params, resolve_device
from pqd.qstate_io import save_qstate


def code_bits(params: Params, bits: int) -> int:
    """Width of the weight codes for ``bits``-bit weights: 7 for 8 with quant.reduce_range (see params)."""
    return 7 if bits == 8 and params.quant.reduce_range else bits


def quant_config(params: Params, den: Denoiser) -> QuantConfig:
    names = list(quantizable_layers(den.unet))
    q = params.quant
    edge = {n: code_bits(params, max(q.edge_bits, q.weight_bits)) for n in den.edge_layers(names)}
    c = params.calibrate
    float_out = set(den.float_output_layers(names))
    return QuantConfig(weight_bits=code_bits(params, q.weight_bits), act_bits=q.act_bits,
                       weight_range=c.weight_range, act_range=c.act_range, act_samples=c.act_samples,
                       time_groups=c.time_groups, layer_weight_bits=edge,
                       splits=den.skip_splits() if c.split_shortcut else {},
                       output_layers=frozenset(n for n in names if n not in float_out) if q.outputs else frozenset())


def recon_config(params: Params) -> ReconConfig:
    c = params.calibrate
    return ReconConfig(iters=c.recon_iters, batch_size=c.recon_batch_size, lr_round=c.lr_round, lr_act=c.lr_act,
                       round_weight=c.round_weight, qdrop_p=c.qdrop_p, adaround=c.adaround, lsq=c.lsq)


def group_batches(x: torch.Tensor, t: torch.Tensor, groups: TimeGroups, size: int,
                  device: str) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Calibration batches (x, t, group), each within a single time group."""
    g_of = groups.group_of(t)
    out = []
    for g in range(groups.count):
        idx = (g_of == g).nonzero().squeeze(1)
        if len(idx) == 0:
            raise ValueError(f"calibrate.time_groups = {groups.count}: time group {g} has no calibration sample; "
                             "use fewer groups or draw more samples (select.num_samples, select.sigma)")
        for i in range(0, len(idx), size):
            j = idx[i:i + size]
            out.append((x[j].to(device), t[j].to(device), g))
    return out


@torch.no_grad()
def output_mse(fp: Denoiser, q: Denoiser, batches: list[tuple[torch.Tensor, torch.Tensor, int]]) -> float:
    """Mean squared difference of the FP and quantized UNet outputs over the calibration inputs."""
    se, n = 0.0, 0
    for i, (xb, tb, _) in enumerate(batches):
        se += float((fp.predict(xb, tb) - checked_predict(q, xb, tb, f"calibration batch {i}")).pow(2).sum())
        n += xb.numel()
    return se / n


def run(params: Params, model: Path, calib: Path, out: Path) -> dict[str, Any]:
    device = resolve_device(params)
    c = params.calibrate
    data = load_tensors(calib / "samples.safetensors")  # inputs first: a damaged file fails before any work
    if bad := (~torch.isfinite(data["x"]).flatten(1).all(1)).nonzero().flatten().tolist():
        raise NumericalError(f"{calib}/samples.safetensors: calibration input {bad[0]} (timestep {float(data['t'][bad[0]]):g}) "
                             f"has non-finite values ({len(bad)} inputs in all): expected finite UNet inputs; re-run generate")
    den = load_denoiser(model, device)
    groups = TimeGroups.from_schedule(read_json(calib / "meta.json")["schedule_timesteps"], c.time_groups)
    batches = group_batches(data["x"], data["t"], groups, c.batch_size, device)
    cfg = quant_config(params, den)

    def forward_all(unet: torch.nn.Module, set_group) -> None:
        for xb, tb, g in tqdm(batches, desc="observing activations"):
            set_group(g)
            try:
                unet(xb, tb)
            except NumericalError as e:
                raise NumericalError(f"{e} at timesteps {sorted(set(tb.tolist()), reverse=True)[:4]}") from None

    t0 = time.perf_counter()
    state = fit_qstate(den.unet, forward_all, cfg)
    t_fit = time.perf_counter() - t0
    qden = copy.deepcopy(den)
    qden.time_groups = groups
    apply_qstate(qden.unet, state)
    recon_log: list[dict[str, Any]] = []
    if c.reconstruct:
        t0 = time.perf_counter()
        recon_log = reconstruct_model(den.unet, qden.unet, den.units(list(state)),
                                      lambda m, i: m(batches[i][0], batches[i][1]), [b[2] for b in batches],
                                      recon_config(params), seed=c.seed)
        state = qstate_of(qden.unet)
        t_recon = time.perf_counter() - t0
    else:
        t_recon = 0.0
    mse = output_mse(den, qden, batches)
    floats = quantizable_layers(den.unet)
    rows = []
    for name, lp in state.items():
        w = floats[name].weight.detach().float().cpu()
        wq = dequantize(lp.weight_int, lp.weight_scale, torch.zeros_like(lp.weight_scale), axis=0)
        rows.append({"layer": name, "kind": lp.kind, "weight_bits": lp.weight_bits,
                     "weight_rel_mse": float((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12)),
                     "act_split": lp.act_split or 0})
    errs = pd.DataFrame(rows)
    with atomic_dir(out) as tmp:
        save_qstate(state, tmp, {"method": c.method, "time_group_thresholds": list(groups.thresholds),
                                 "config": {k: v for k, v in vars(cfg).items()
                                            if k not in ("layer_weight_bits", "splits", "output_layers")},
                                 "edge_layers": sorted(cfg.layer_weight_bits), "split_layers": cfg.splits,
                                 "float_output_layers": sorted(set(state) - cfg.output_layers)})
        errs.to_csv(tmp / "layer_errors.csv", index=False)
        pd.DataFrame(recon_log or [{"unit": "", "layers": 0, "mse_before": 0.0, "mse_after": 0.0}]).to_csv(
            tmp / "reconstruction.csv", index=False)
    improved = [r for r in recon_log if r["mse_after"] < r["mse_before"]]
    return {"method": c.method, "layers": len(state), "output_quantized_layers": len(cfg.output_layers),
            "calib_samples": len(data["x"]), "time_groups": groups.count,
            "unet_output_mse": mse, "fit_seconds": round(t_fit, 2), "reconstruction_seconds": round(t_recon, 2),
            "reconstructed_units": len(recon_log), "units_improved": len(improved),
            "weight_rel_mse_mean": float(errs["weight_rel_mse"].mean()),
            "weight_rel_mse_max": float(errs["weight_rel_mse"].max())}


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("calibrate", run, ["model", "calib", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
