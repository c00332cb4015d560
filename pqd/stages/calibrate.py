"""calibrate stage: fit every quantizer of the denoiser network on the calibration set -> qstate/.

One code path for every method (pqd.params.methods): the quantizers fitted per time group
(:func:`pqd.diffusion.qconfig.calibrate_network`), then optionally block reconstruction unit by unit against the
FP network. Writes the quantizer state, the time-group thresholds, per-layer errors and the reconstruction log.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from pqd.core.affine import weight_values
from pqd.core.quantize import mean_weight_bits, qstate_of, weight_layers
from pqd.core.timegroups import TimeGroups
from pqd.core.modules import quant_layers, quantizable_layers
from pqd.core.reconstruct import UnitResult, reconstruct_model, unit_io_bytes
from pqd.core.rotate import rotate_attention
from pqd.diffusion.adapter import Cond, Denoiser, load_denoiser
from pqd.diffusion.mixed import check_budget, mixed_precision
from pqd.diffusion.qconfig import calibrate_network, quant_config, recon_config
from pqd.diffusion.sampling import checked_predict
from pqd.errors import InputError, NumericalError
from pqd.formats import qstate as qcodec
from pqd.formats.calibset import CalibSet
from pqd.formats.checkpoint import UnitCheckpoint, calibrate_key
from pqd.formats.files import atomic_dir
from pqd.formats.metrics import CalibrateMetrics
from pqd.formats.spill import store_factory
from pqd.params import Params, integer_codes, resolve_device
from pqd.stages._cli import stage_main
from pqd.stages.parallel import UnitExecutor, open_pool


# one calibration batch: x [B, C, H, W], t [B], the conditioning inputs by name (conditioned models) or None
Batch = tuple[torch.Tensor, torch.Tensor, "Cond | None"]


@torch.no_grad()
def output_mse(fp: Denoiser, q: Denoiser, fetch: Callable[[int], Batch], n_batches: int) -> float:
    """Mean squared difference of the FP and quantized networks' outputs over the calibration inputs."""
    se, n = 0.0, 0
    for i in range(n_batches):
        xb, tb, cb = fetch(i)
        se += float((fp.predict(xb, tb, cb) - checked_predict(q, xb, tb, f"calibration batch {i}",
                                                               run=lambda: q.predict(xb, tb, cb))).pow(2).sum())
        n += xb.numel()
    return se / n


def sensitivity_batches(plan: list, samples: int) -> list[int]:
    """Indices of whole calibration batches holding at least ``samples`` samples (or all), spread evenly over the
    plan (and so over its time groups)."""
    size = max(1, plan[0][1] - plan[0][0])
    n = min(len(plan), -(-samples // size))
    return sorted({round(i * (len(plan) - 1) / max(1, n - 1)) for i in range(n)})


def resume(ckpt: UnitCheckpoint, taken: list[str]) -> Callable[[str], UnitResult | None]:
    """``reconstruct_model``'s ``saved``: units from the checkpoint (appended to ``taken``), announcing the first
    unit recomputed."""
    done = ckpt.units()
    if done:
        print(f"pqd calibrate: checkpoint {ckpt.folder} holds {len(done)} finished units", flush=True)
    announced = False

    def saved(unit: str) -> UnitResult | None:
        nonlocal announced
        result = ckpt.load(unit)
        if result is not None:
            taken.append(unit)
        elif done and not announced:
            print(f"pqd calibrate: resuming: units before {unit} come from the checkpoint; recomputing from unit "
                  f"{unit}", flush=True)
            announced = True
        return result

    return saved


def run(params: Params, model: Path, calib: Path, out: Path, largest_units: int | None = None,
        output_check: bool = True, unit_log: list[dict[str, Any]] | None = None) -> CalibrateMetrics:
    """Benchmarks only: ``largest_units`` reconstructs just the N units with the largest recordings;
    ``output_check=False`` skips the final FP-vs-quantized output comparison (two more passes over the set);
    ``unit_log`` receives each reconstructed unit's log entry with its ``seconds``, ``parameters`` (of its
    quantized layers' weights) and ``io_bytes`` (its recorded inputs + FP outputs over the whole set)."""
    threads = torch.get_num_threads()
    if params.calibrate.reconstruct and params.parallel.scheduler != "none":
        # units' inputs are recorded here and learnt from on the workers: one thread count for both, so the result
        # is that of a serial run with parallel.threads_per_worker threads (floats depend on the count)
        torch.set_num_threads(params.parallel.threads_per_worker)
    try:
        return _run(params, model, calib, out, largest_units, output_check, unit_log)
    finally:
        torch.set_num_threads(threads)


def _run(params: Params, model: Path, calib: Path, out: Path, largest_units: int | None, output_check: bool,
         unit_log: list[dict[str, Any]] | None) -> CalibrateMetrics:
    device = resolve_device(params)
    c = params.calibrate
    data = CalibSet(calib)  # checks the calibration set before the model is loaded
    groups = TimeGroups.from_schedule(data.schedule, c.time_groups)
    plan = data.batches(groups, c.batch_size)
    den = load_denoiser(model, device)
    # quant.rotate: exact rotations folded into the float weights first; export folds the same into the float model
    rotation = rotate_attention(den.net, params.quant.rotate)
    if den.conditional != (data.cond is not None):
        raise InputError(f"{calib}: calibration set {'without' if den.conditional else 'with'} conditioning inputs "
                         f"for a {den.family} model: re-run generate and select for this model")
    codes = integer_codes(params)  # quant.reduce_range resolved for this machine's CPU
    check_budget(params, den, quant_config(params, den, None, codes))
    ckpt = None
    if c.reconstruct and params.checkpoint.dir is not None:  # without reconstruction there is little to resume
        key, what = calibrate_key(model, calib, {
            "device": device, "quant": dataclasses.asdict(params.quant), "calibrate": dataclasses.asdict(c),
            "integer_codes": codes.as_dict(), "largest_units": largest_units})
        ckpt = UnitCheckpoint(Path(params.checkpoint.dir), key, what)

    def fetch(i: int) -> Batch:
        """Calibration batch i, read from the shards on disk (never the whole set in memory)."""
        return data.load(plan[i][0], plan[i][1], device)

    def forward_all(net: torch.nn.Module, set_group) -> None:
        for i in tqdm(range(len(plan)), desc="observing activations"):
            set_group(plan[i][2])
            xb, tb, cb = fetch(i)
            try:
                den.call(net, xb, tb, cb)
            except NumericalError as e:
                raise NumericalError(f"{e} at timesteps {sorted(set(tb.tolist()), reverse=True)[:4]}") from None

    t0 = time.perf_counter()
    mixed = None
    if params.quant.weight_bits_budget is not None:
        batches = sensitivity_batches(plan, c.sensitivity_samples)
        mixed = mixed_precision(params, den, quant_config(params, den, None, codes),
                                lambda net: [den.call(net, *fetch(i)) for i in batches])
    fit = calibrate_network(params, den, codes, forward_all, lambda m: den.call(m, *fetch(0)),
                            **({"fitted": ckpt.fitted(groups)} if ckpt else {}),
                            promoted={n: mixed.high_bits for n in mixed.high} if mixed else None)
    t_fit = time.perf_counter() - t0
    # the float reference from here on: the network as calibration observed it (attention matmuls, glue sites)
    den = dataclasses.replace(den, net=fit.net)
    qden = dataclasses.replace(den, net=fit.quantized(), time_groups=groups)
    state, cfg, attention, glue, shared = fit.state, fit.config, fit.attention, fit.glue, fit.shared
    recon_log: list[dict[str, Any]] = []
    from_checkpoint: list[str] = []  # units whose result an interrupted run left in the checkpoint
    if c.reconstruct:
        t0 = time.perf_counter()
        runner = lambda m, i: den.call(m, *fetch(i))  # noqa: E731
        units = den.units(list(state))
        # a unit's recordings over the whole set: its inputs + output on batch 0, scaled to every sample
        size = {u: b * len(data) // (plan[0][1] - plan[0][0]) for u, b in unit_io_bytes(den.net, units, runner).items()}
        if largest_units:
            units = sorted(units, key=lambda u: -size[u])[:largest_units]
        with tempfile.TemporaryDirectory(prefix=".pqd-recordings-", dir=out.parent) as spill, \
                open_pool(params.parallel, "calibrate") as pool:
            executor = None if pool.client is None else UnitExecutor(pool, device)
            if executor is not None and c.recon_inputs == "quantized" and c.recon_wave == 1:
                print("pqd calibrate: calibrate.recon_wave is 1, so one unit at a time runs on the cluster (set "
                      "calibrate.recon_wave > 1 or calibrate.recon_inputs: float to reconstruct units concurrently)")
            recon_log = reconstruct_model(den.net, qden.net, units, runner, [b[2] for b in plan],
                                          recon_config(params), seed=c.seed,
                                          store=store_factory(Path(spill), size, c.memory_mb * 2**20),
                                          inputs=c.recon_inputs, wave=c.recon_wave,
                                          saved=resume(ckpt, from_checkpoint) if ckpt else lambda _u: None,
                                          finished=ckpt.save if ckpt else lambda _u, _r: None,
                                          executor=executor, concurrency=pool.info.workers)
        on_disk = sum(1 for u in units if size[u] > c.memory_mb * 2**20)
        if unit_log is not None:
            unit_log.extend({**r, "parameters": sum(q.weight_int.numel() for q in quant_layers(
                qden.net.get_submodule(r["unit"])).values()), "io_bytes": size[r["unit"]]} for r in recon_log)
        recon_log = [{k: v for k, v in r.items() if k != "seconds"} for r in recon_log]  # outputs stay byte-stable
        state = qstate_of(qden.net)
        t_recon = time.perf_counter() - t0
    else:
        t_recon, on_disk = 0.0, 0
    mse = output_mse(den, qden, fetch, len(plan)) if output_check else float("nan")
    if output_check and not torch.isfinite(torch.tensor(mse)):
        raise NumericalError("calibrate: the quantized UNet gives non-finite outputs on the calibration set")
    floats = quantizable_layers(den.net)
    weighted = weight_layers(state)
    rows = []
    for name, lp in weighted.items():
        w = floats[name].weight.detach().float().cpu()
        w = w if lp.smooth is None else w * lp.smooth  # a balanced layer's codes stand for weight x smooth
        wq = weight_values(lp.weight_int, lp.weight_scale)
        rows.append({"layer": name, "kind": lp.kind, "weight_bits": lp.weight_bits,
                     "weight_rel_mse": float((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12)),
                     "act_split": lp.act_split or 0})
    errs = pd.DataFrame(rows)
    with atomic_dir(out) as tmp:
        qcodec.write(tmp, qcodec.STATE_TENSORS, state, groups, trailer={
            "method": c.method, "integer_codes": codes.as_dict(),
            "config": {k: v for k, v in vars(cfg).items()
                       if k not in ("layer_weight_bits", "splits", "output_layers", "operand_bits", "smooth")},
            "edge_layers": sorted(set(cfg.layer_weight_bits) - set(mixed.high if mixed else ())),
            "split_layers": cfg.splits, "mixed_precision": mixed.as_dict() if mixed else None,
            "rotation": {"kind": params.quant.rotate, **rotation.as_dict()},
            "float_output_layers": sorted(set(weighted) - cfg.output_layers),
            "attention_matmuls": {n: list(cfg.operand_bits_for(n)) for n in attention},
            "smoothed_layers": sorted(cfg.smooth),
            "glue": {"kinds": list(params.quant.glue), "sites": len(glue)},
            "shared_grids": [list(g) for g in shared]})
        errs.to_csv(tmp / "layer_errors.csv", index=False)
        pd.DataFrame(recon_log or [{"unit": "", "layers": 0, "mse_before": 0.0, "mse_after": 0.0}]).to_csv(
            tmp / "reconstruction.csv", index=False)
    if ckpt is not None:
        ckpt.close(params.checkpoint.keep_mb)
    improved = [r for r in recon_log if r["mse_after"] < r["mse_before"]]
    return CalibrateMetrics(method=c.method, layers=len(weighted), output_quantized_layers=len(cfg.output_layers),
                            attention_matmuls=len(attention), smoothed_layers=len(cfg.smooth) or None,
                            glue_sites=len(glue), calib_samples=len(data), time_groups=groups.count,
                            output_mse=mse, fit_seconds=round(t_fit, 2), reconstruction_seconds=round(t_recon, 2),
                            reconstructed_units=len(recon_log), units_improved=len(improved),
                            units_recorded_on_disk=on_disk, weight_rel_mse_mean=float(errs["weight_rel_mse"].mean()),
                            weight_rel_mse_max=float(errs["weight_rel_mse"].max()),
                            weight_code_bits=cfg.weight_bits, reduce_range=codes.reduce_range,
                            weight_bits_mean=round(mean_weight_bits(state), 4),
                            mixed_high_layers=len(mixed.high) if mixed else None,
                            units_from_checkpoint=len(from_checkpoint) if ckpt else None,
                            rotated_attention=len(rotation.rotated) if params.quant.rotate != "none" else None,
                            integer_codes=codes.reason)


def main(argv: list[str] | None = None) -> int:
    return stage_main("calibrate", run, ["model", "calib", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
