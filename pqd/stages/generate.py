"""generate stage: FP trajectories for the calibration seeds and FP samples for the evaluation seeds.

Trajectories record, at every step of the inference scheduler, the UNet's exact inputs: the scaled
sample x_t and the timestep value the UNet receives. They are stored in safetensors shards of
``generate.shard_size`` seeds (x: float32 [n, S, C, H, W], t: float32 [S], seeds: int64 [n]) with
``index.parquet`` (one row per seed and step) and ``meta.json``.
FP samples: set ``a`` (the evaluation seeds, compared image by image with the quantized model) and a
disjoint set ``b`` of the same size (only for the FID noise floor), as PNGs plus float tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.sampling import make_scheduler, sample
from pqd.io import atomic_dir, save_pngs, write_json
from pqd.params import Params, resolve_device

# disjoint seed ranges: evaluation set a, noise-floor set b, calibration trajectories
SEED_BASE = {"a": 0, "b": 500_000_000, "calib": 1_000_000_000}


def seeds(kind: str, n: int) -> list[int]:
    return [SEED_BASE[kind] + i for i in range(n)]


def sampling_protocol(params: Params, den: Denoiser) -> dict[str, Any]:
    g = params.generate
    sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
    return {"scheduler": type(sched).__name__, "scheduler_config": dict(sched.config), "steps": g.steps, "eta": g.eta,
            "sample_shape": list(den.sample_shape)}


def record_trajectories(den: Denoiser, params: Params, out: Path, device: str) -> dict[str, Any]:
    g = params.generate
    calib = seeds("calib", g.calib_seeds)
    rows = []
    for shard_i, start in enumerate(range(0, len(calib), g.shard_size)):
        shard_seeds = calib[start:start + g.shard_size]
        xs: list[torch.Tensor] = []
        ts: list[float] = []

        def rec(i: int, t: torch.Tensor, x_in: torch.Tensor) -> None:
            xs.append(x_in.detach().to(torch.float32).cpu())
            if len(ts) < g.steps:
                ts.append(float(t))

        sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
        sample(den, sched, shard_seeds, steps=g.steps, eta=g.eta, batch_size=len(shard_seeds), device=device,
               record=rec, desc=f"trajectories {shard_i + 1}/{-(-len(calib) // g.shard_size)}")
        x = torch.stack(xs, dim=1).contiguous()  # [n, S, C, H, W]
        name = f"shard-{shard_i:05d}.safetensors"
        save_file({"x": x, "t": torch.tensor(ts, dtype=torch.float32),
                   "seeds": torch.tensor(shard_seeds, dtype=torch.int64)}, out / name)
        for r, s in enumerate(shard_seeds):
            for i, t in enumerate(ts):
                rows.append({"seed": s, "step": i, "u": i / (g.steps - 1), "t": t, "shard": name, "row": r})
    pd.DataFrame(rows).to_parquet(out / "index.parquet", index=False)
    return {"calib_trajectories": len(calib), "trajectory_inputs": len(rows)}


def run(params: Params, model: Path, trajectories: Path, samples: Path) -> dict[str, Any]:
    device = resolve_device(params)
    den = load_denoiser(model, device)
    g = params.generate
    torch.manual_seed(0)
    proto = sampling_protocol(params, den)
    with atomic_dir(trajectories) as tmp:
        info = record_trajectories(den, params, tmp, device)
        write_json(tmp / "meta.json", {**proto, "seeds": "calib", "seed_base": SEED_BASE["calib"],
                                       "count": g.calib_seeds, "conditioning": None,
                                       "layout": "x float32 [n, steps, C, H, W]; t float32 [steps]; seeds int64 [n]"})
    with atomic_dir(samples) as tmp:
        for kind in ("a", "b"):
            sd = seeds(kind, g.eval_samples)
            sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
            imgs = sample(den, sched, sd, steps=g.steps, eta=g.eta, batch_size=g.batch_size, device=device,
                          desc=f"FP samples {kind}")
            save_pngs(imgs, tmp / kind, [f"{s:010d}" for s in sd])
            save_file({"images": imgs.contiguous(), "seeds": torch.tensor(sd, dtype=torch.int64)},
                      tmp / f"{kind}.safetensors")
        write_json(tmp / "meta.json", {**proto, "sets": {k: {"seed_base": SEED_BASE[k], "count": g.eval_samples}
                                                          for k in ("a", "b")}})
    return {**info, "eval_samples": g.eval_samples, "floor_samples": g.eval_samples}


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("generate", run, ["model", "trajectories", "samples"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
