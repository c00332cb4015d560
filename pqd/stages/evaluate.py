"""evaluate stage: sample with the exported quantized denoiser and compare it with FP, honestly (docs/design.md).

``evaluate.backend = onnxruntime | openvino`` measures what ships: the images come from the deployed ONNX graphs in
that runtime; the
simulated torch model samples the same seeds beside it. Same seeds, scheduler, steps and eta as the FP samples;
FIDs against the reference and FP, the noise floor (FP a vs FP b), per-image PSNR against FP, and paired bootstrap
intervals (pqd.eval.bootstrap) that the release gate judges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pqd import deploy
from pqd.diffusion.adapter import Denoiser
from pqd.diffusion.sampling import scheduler_from_protocol
from pqd.errors import NumericalError
from pqd.eval import fid
from pqd.eval.bootstrap import JACKKNIFE_GROUPS, frechet, paired_intervals, stats
from pqd.eval.metrics import per_image_mse, psnr
from pqd.diffusion.quantized import load_denoiser_from_export
from pqd.formats.calibset import META
from pqd.formats.export import MANIFEST
from pqd.formats.files import atomic_dir, load_tensors, read_json
from pqd.formats.images import side_by_side
from pqd.formats.metrics import EvalProtocol, EvaluateMetrics
from pqd.params import Params, resolve_device
from pqd.params.machine import code_bits
from pqd.stages._cli import stage_main
from pqd.stages.parallel import SCRATCH, ModelRef, folder_stamp, open_pool, sample_sets


def weight_codes(manifest: dict[str, Any]) -> str:
    """The width of the export's weight codes and why, from its manifest (quant.reduce_range as resolved)."""
    bits = int(manifest["params"]["quant"]["weight_bits"])
    codes = manifest.get("integer_codes") or {}
    stored = code_bits(bits, bool(codes.get("reduce_range")))
    return f"{stored}-bit weight codes" + (f" ({codes['reason']})" if bits == 8 and codes.get("reason") else "")


def quantized_models(export: str, backend: str, device: str) -> dict[str, Denoiser]:
    """The export's simulated denoiser and, for ``evaluate.backend: onnxruntime | openvino``, its deployed ONNX
    graphs (in that runtime, with torch's thread count), as the stage and each worker load them
    (:mod:`pqd.stages.parallel`)."""
    qden = load_denoiser_from_export(export, device)
    dens: dict[str, Denoiser] = {"simulated": qden}
    if backend in deploy.RUNTIMES:
        dens["deployed"] = deploy.load_deployed_denoiser(Path(export), backend, torch.get_num_threads(), qden)
    return dens


def run(params: Params, model: Path, export: Path, fp_samples: Path, out: Path, grid: Path) -> EvaluateMetrics:
    ev = params.evaluate
    device = resolve_device(params)
    # everything that can fail fast is checked before sampling
    extractor = fid.build_extractor(ev.features, model, device)
    ref_stats, ref_desc, ref_n = fid.reference_stats(ev.reference, extractor, ev.batch_size, device,
                                                     fid.probe_size(extractor, fp_samples / "a"))
    proto = read_json(fp_samples / META)
    fp = load_tensors(fp_samples / "a.safetensors")
    seeds = [int(s) for s in fp["seeds"]]
    dens = quantized_models(str(export.resolve()), ev.backend, device)  # verifies every file of the export first
    qden = dens["simulated"]
    manifest = read_json(export / MANIFEST)
    headline = "deployed" if ev.backend in deploy.RUNTIMES else "simulated"
    cond = None
    if proto.get("conditioning"):  # the FP samples' prompts (encoded by the export's own float text encoders) or classes
        pc = proto["conditioning"]
        cond = qden.conditioning(pc.get("prompts"), fp["prompt"].tolist(), float(pc["guidance_scale"]), device)
    ref = ModelRef(quantized_models, (str(export.resolve()), ev.backend), device, folder_stamp(export))
    with open_pool(params.parallel, "evaluate") as pool, atomic_dir(out) as tmp:
        folders = {headline: tmp / "images"}
        if "deployed" in dens:
            folders["simulated"] = tmp / "images_simulated"
        imgs, n_ranges = sample_sets(pool, ref, dens, seeds, folders, ev.batch_size, scheduler_from_protocol(proto),
                                     int(proto["steps"]), float(proto["eta"]), cond, tmp / SCRATCH, "quantized samples")
        for k, v in imgs.items():
            if not torch.isfinite(v).all():
                raise NumericalError(f"evaluate: the quantized model ({k}) produced non-finite images")
        q_imgs = imgs[headline]
        mse = per_image_mse(q_imgs, fp["images"])
        save_file({"images": q_imgs.contiguous(), "seeds": fp["seeds"]}, tmp / "quant.safetensors")
        pd.DataFrame({"seed": seeds, "mse": mse, "psnr": psnr(mse)}).to_csv(tmp / "per_image.csv", index=False)
        feats = {k: fid.folder_features(folder, extractor, ev.batch_size, device) for k, folder in
                 [*folders.items(), ("fp", fp_samples / "a"), ("floor", fp_samples / "b")]}
        run_info = pool.record(n_ranges)
    st = {k: stats(v) for k, v in feats.items()}
    fid_q = frechet(st[headline], ref_stats)
    fid_fp = frechet(st["fp"], ref_stats)
    floor = frechet(st["floor"], st["fp"])
    grid.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(fp["images"], q_imgs, ev.grid_size).save(grid)
    deployed: dict[str, float | bool] = {}
    if "deployed" in imgs:
        fid_sim = frechet(st["simulated"], ref_stats)
        dmse = per_image_mse(imgs["deployed"], imgs["simulated"])
        deployed = {"fid_deployed_vs_ref": fid_q, "fid_simulated_vs_ref": fid_sim,
                    "deployed_minus_simulated": fid_q - fid_sim,
                    "fid_deployed_vs_simulated": frechet(st["deployed"], st["simulated"]),
                    "deployed_within_noise_floor": bool(abs(fid_q - fid_sim) <= floor),
                    "psnr_deployed_vs_simulated_median": float(np.median(psnr(dmse))),
                    "psnr_simulated_median": float(np.median(psnr(per_image_mse(imgs["simulated"], fp["images"]))))}
    intervals: dict[str, Any] = {}
    # a conditioned model's seeds in strata by their class or prompt, each with a fixed share (pqd.eval.bootstrap)
    strata = fp["prompt"].numpy() if cond is not None else None
    if ev.bootstrap:
        ci = paired_intervals(feats[headline], feats["fp"], ref_stats, psnr(mse), resamples=ev.bootstrap,
                              seed=ev.bootstrap_seed, confidence=ev.confidence, strata=strata,
                              progress=lambda it: tqdm(it, desc="bootstrap", unit="resample"))
        intervals = {f"{k}_ci": getattr(ci, k) for k in
                     ("fid_quant_vs_ref", "fid_fp_vs_ref", "delta_fid", "fid_quant_vs_fp", "psnr_mean")}
    floor_imgs = load_tensors(fp_samples / "b.safetensors")["images"]
    psnr_other = float(psnr(per_image_mse(floor_imgs, fp["images"])).mean())
    protocol = EvalProtocol(
        num_samples=len(seeds), floor_samples=len(feats["floor"]), seeds=f"{seeds[0]}..{seeds[-1]}",
        scheduler=proto["scheduler"], steps=int(proto["steps"]), eta=float(proto["eta"]), family=qden.family,
        prompts=cond.choices if cond is not None else 0, architecture=qden.arch.name,
        guidance_scale=cond.guidance_scale if cond is not None else None, features=extractor.name,
        reference=ref_desc, reference_images=ref_n, fid="pqd.eval.bootstrap.frechet (eigenvalue form of the Fréchet distance)",
        backend=f"{ev.backend} (deployed ONNX, integer kernels)" if headline == "deployed"
        else "torch (simulated integer arithmetic)", weight_codes=weight_codes(manifest), parallel=run_info,
        intervals=f"{ev.confidence:g} normal, jackknife bias-corrected ({JACKKNIFE_GROUPS} groups), sd of "
                  f"{ev.bootstrap} bootstrap resamples of the {len(seeds)} evaluation seeds (seed {ev.bootstrap_seed}), "
                  f"quantized and FP images of a seed drawn together"
                  f"{f', within each of the {cond.choices} conditions' if cond is not None else ''}; reference fixed"
        if ev.bootstrap else None)
    return EvaluateMetrics(fid_quant_vs_ref=fid_q, fid_fp_vs_ref=fid_fp, delta_fid=fid_q - fid_fp,
                           fid_quant_vs_fp=frechet(st[headline], st["fp"]), noise_floor=floor, **deployed,
                           mse_mean=float(mse.mean()), psnr_mean=float(psnr(mse).mean()),
                           psnr_median=float(np.median(psnr(mse))), psnr_min=float(psnr(mse).min()),
                           psnr_other_seed_mean=psnr_other, **intervals, protocol=protocol)


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, ["model", "export", "fp_samples", "out", "grid"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
