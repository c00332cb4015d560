"""evaluate stage: sample with the exported quantized UNet and compare it with FP, honestly.

Same evaluation seeds, scheduler, step count and eta as the FP samples. FID (clean-fid, extractor
``evaluate.features``, reference ``evaluate.reference``): quantized vs reference, FP vs reference,
quantized vs FP, and the noise floor = FID between the FP evaluation set and a disjoint FP set of the same
size. Per image: MSE and PSNR against the FP image of the same seed. A grid shows FP beside quantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pqd import fid
from pqd.artifact import load_denoiser_from_export
from pqd.diffusion.sampling import sample, scheduler_from_protocol
from pqd.io import atomic_dir, image_grid, read_json, save_pngs
from pqd.params import Params, resolve_device


def side_by_side(fp: torch.Tensor, q: torch.Tensor, n: int) -> Image.Image:
    """FP grid (left) beside the quantized grid (right) for the first n images of each, same seeds."""
    n = min(n, len(fp))
    cols = max(1, int(np.ceil(np.sqrt(n))))
    scale = max(1, 256 // (cols * fp.shape[-1]))
    a, b = image_grid(fp[:n], cols, scale), image_grid(q[:n], cols, scale)
    out = Image.new("RGB", (a.width + b.width + 16, a.height), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 16, 0))
    return out


def psnr(mse: np.ndarray) -> np.ndarray:
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def run(params: Params, model: Path, export: Path, fp_samples: Path, out: Path, grid: Path) -> dict[str, Any]:
    ev = params.evaluate
    device = resolve_device(params)
    # everything that can fail fast is checked before sampling
    extractor = fid.build_extractor(ev.features, model, device)
    ref_stats, ref_desc, ref_n = fid.reference_stats(ev.reference, extractor, ev.batch_size, device)
    proto = read_json(fp_samples / "meta.json")
    fp = load_file(fp_samples / "a.safetensors")
    seeds = [int(s) for s in fp["seeds"]]
    qden = load_denoiser_from_export(export, device)

    q_imgs = sample(qden, scheduler_from_protocol(proto), seeds, steps=int(proto["steps"]), eta=float(proto["eta"]),
                    batch_size=ev.batch_size, device=device, desc="quantized samples")
    if not torch.isfinite(q_imgs).all():
        raise FloatingPointError("evaluate: the quantized model produced non-finite images")
    mse = (q_imgs - fp["images"]).pow(2).flatten(1).mean(1).numpy()
    with atomic_dir(out) as tmp:
        save_pngs(q_imgs, tmp / "images", [f"{s:010d}" for s in seeds])
        save_file({"images": q_imgs.contiguous(), "seeds": fp["seeds"]}, tmp / "quant.safetensors")
        pd.DataFrame({"seed": seeds, "mse": mse, "psnr": psnr(mse)}).to_csv(tmp / "per_image.csv", index=False)
        feats = {k: fid.folder_features(folder, extractor, ev.batch_size, device)
                 for k, folder in (("quant", tmp / "images"), ("fp", fp_samples / "a"), ("floor", fp_samples / "b"))}
    st = {k: fid.stats(v) for k, v in feats.items()}
    fid_q = fid.frechet(st["quant"], ref_stats)
    fid_fp = fid.frechet(st["fp"], ref_stats)
    grid.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(fp["images"], q_imgs, ev.grid_size).save(grid)
    return {
        "fid_quant_vs_ref": fid_q,
        "fid_fp_vs_ref": fid_fp,
        "delta_fid": fid_q - fid_fp,
        "fid_quant_vs_fp": fid.frechet(st["quant"], st["fp"]),
        "noise_floor": fid.frechet(st["floor"], st["fp"]),
        "mse_mean": float(mse.mean()),
        "psnr_mean": float(psnr(mse).mean()),
        "psnr_median": float(np.median(psnr(mse))),
        "psnr_min": float(psnr(mse).min()),
        "protocol": {"num_samples": len(seeds), "floor_samples": len(feats["floor"]),
                     "seeds": f"{seeds[0]}..{seeds[-1]}", "scheduler": proto["scheduler"],
                     "steps": int(proto["steps"]), "eta": float(proto["eta"]),
                     "features": extractor.name, "reference": ref_desc, "reference_images": ref_n,
                     "fid": "clean-fid frechet_distance", "backend": "torch (simulated integer arithmetic)"},
    }


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("evaluate", run, ["model", "export", "fp_samples", "out", "grid"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
