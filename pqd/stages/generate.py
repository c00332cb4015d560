"""generate stage: FP trajectories for the calibration seeds and FP samples for the evaluation seeds.

Trajectories record, at every step of the inference scheduler, the denoiser's exact inputs: the scaled
sample x_t (latents for latent models) and the timestep value it receives. They are stored in
safetensors shards of ``generate.shard_size`` seeds (x: float32 [n, S, C, H, W], t: float32 [S],
seeds: int64 [n], and for conditioned models prompt: int64 [n], the seed's conditioning row) with
``index.parquet`` (one row per seed and step) and ``meta.json``. Text models: seed i takes prompt i mod P of
``generate.prompts``; class-conditional models: seed i takes class i mod K (every class in turn). Every
prompt's (class's) conditioning inputs are stored once in ``prompts.safetensors`` (by input name, e.g.
encoder_hidden_states [P + 1, L, D] or class_labels [K + 1], row 0 the unconditional input) and referenced
by row, so disk grows with the prompts, not with seeds x steps.
FP samples: set ``a`` (the evaluation seeds, compared image by image with the quantized model) and a
disjoint set ``b`` of the same size (only for the FID noise floor), as PNGs plus float tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from pqd.diffusion.adapter import Conditioning, Denoiser, load_denoiser
from pqd.diffusion.sampling import make_scheduler, sample
from pqd.errors import ParamError
from pqd.formats.calibset import PROMPTS
from pqd.formats.files import atomic_dir, read_prompts, write_json
from pqd.formats.images import save_pngs
from pqd.formats.metrics import GenerateMetrics
from pqd.params import Params, resolve_device
from pqd.stages._cli import stage_main

# disjoint seed ranges: evaluation set a, noise-floor set b, calibration trajectories
SEED_BASE = {"a": 0, "b": 500_000_000, "calib": 1_000_000_000}


def seeds(kind: str, n: int) -> list[int]:
    return [SEED_BASE[kind] + i for i in range(n)]


def check_prompts(params: Params, den: Denoiser) -> list[str] | None:
    """The prompts of a text model (``generate.prompts``); an error for a text model without them, or
    prompts for a model that takes none (class-conditional models take every class in turn)."""
    path = params.generate.prompts
    text = den.family == "text"
    if text and path is None:
        raise ParamError("params: generate.prompts = None is not allowed for this text-guided model: "
                         "expected a file with one prompt per line")
    if not text and path is not None:
        raise ParamError(f"params: generate.prompts = {path!r} is not allowed for this {den.family} model "
                         "(it takes no text): expected null")
    return read_prompts(path) if path is not None else None


def guidance_scale(params: Params, den: Denoiser) -> float:
    """``generate.guidance_scale``, or the architecture's protocol weight when it is null."""
    g = params.generate.guidance_scale
    return float(den.arch.guidance_scale if g is None else g)


def sampling_protocol(params: Params, den: Denoiser, prompts: list[str] | None) -> dict[str, Any]:
    g = params.generate
    sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
    cond = None
    if den.conditional:
        what = {"prompts": prompts} if prompts is not None else {"classes": den.encoder.num_classes}
        cond = {**what, "guidance_scale": guidance_scale(params, den), "uncond_row": 0,
                "prompt_of_seed": "row 1 + (i mod P) for the i-th seed of a set (P prompts, or classes: row 1 + c is "
                                  "class c)"}
    return {"scheduler": type(sched).__name__, "scheduler_config": dict(sched.config), "steps": g.steps, "eta": g.eta,
            "sample_shape": list(den.sample_shape), "family": den.family, "architecture": den.arch.name,
            "conditioning": cond}


def prompt_rows(n: int, cond: Conditioning | None) -> Conditioning | None:
    """The conditioning of the first n seeds of a set: seed i takes prompt row 1 + (i mod P)."""
    if cond is None:
        return None
    return Conditioning(cond.inputs, [1 + i % cond.choices for i in range(n)], cond.guidance_scale)


def record_trajectories(den: Denoiser, params: Params, out: Path, device: str,
                        cond: Conditioning | None) -> dict[str, Any]:
    g = params.generate
    calib = seeds("calib", g.calib_seeds)
    cond = prompt_rows(len(calib), cond)
    rows = []
    for shard_i, start in enumerate(range(0, len(calib), g.shard_size)):
        shard_seeds = calib[start:start + g.shard_size]
        shard_cond = None if cond is None else cond.subset(start, start + g.shard_size)
        xs: list[torch.Tensor] = []
        ts: list[float] = []

        def rec(i: int, t: torch.Tensor, x_in: torch.Tensor) -> None:
            xs.append(x_in.detach().to(torch.float32).cpu())
            if len(ts) < g.steps:
                ts.append(float(t))

        sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
        sample(den, sched, shard_seeds, steps=g.steps, eta=g.eta, batch_size=len(shard_seeds), device=device,
               record=rec, desc=f"trajectories {shard_i + 1}/{-(-len(calib) // g.shard_size)}", cond=shard_cond)
        x = torch.stack(xs, dim=1).contiguous()  # [n, S, C, H, W]
        name = f"shard-{shard_i:05d}.safetensors"
        tensors = {"x": x, "t": torch.tensor(ts, dtype=torch.float32), "seeds": torch.tensor(shard_seeds, dtype=torch.int64)}
        if shard_cond is not None:
            tensors["prompt"] = torch.tensor(shard_cond.row_of, dtype=torch.int64)
        save_file(tensors, out / name)
        for r, s in enumerate(shard_seeds):
            prompt = {} if shard_cond is None else {"prompt": shard_cond.row_of[r]}
            for i, t in enumerate(ts):
                rows.append({"seed": s, "step": i, "u": i / (g.steps - 1), "t": t, "shard": name, "row": r, **prompt})
    pd.DataFrame(rows).to_parquet(out / "index.parquet", index=False)
    if cond is not None:
        save_file({k: v.contiguous() for k, v in cond.inputs.items()}, out / PROMPTS)
    return {"calib_trajectories": len(calib), "trajectory_inputs": len(rows)}


def run(params: Params, model: Path, trajectories: Path, samples: Path) -> GenerateMetrics:
    device = resolve_device(params)
    den = load_denoiser(model, device)
    g = params.generate
    prompts = check_prompts(params, den)  # before any sampling
    torch.manual_seed(0)
    proto = sampling_protocol(params, den, prompts)
    cond = den.conditioning(prompts, [], guidance_scale(params, den), device) if den.conditional else None
    with atomic_dir(trajectories) as tmp:
        info = record_trajectories(den, params, tmp, device, cond)
        layout = "x float32 [n, steps, C, H, W]; t float32 [steps]; seeds int64 [n]"
        if cond is not None:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in cond.inputs.items())
            layout += f"; prompt int64 [n] (the row of every input in {PROMPTS}: {shapes}; row 0 unconditional)"
        write_json(tmp / "meta.json", {**proto, "seeds": "calib", "seed_base": SEED_BASE["calib"],
                                       "count": g.calib_seeds, "layout": layout})
    with atomic_dir(samples) as tmp:
        for kind in ("a", "b"):
            sd = seeds(kind, g.eval_samples)
            sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
            set_cond = prompt_rows(len(sd), cond)
            imgs = sample(den, sched, sd, steps=g.steps, eta=g.eta, batch_size=g.batch_size, device=device,
                          desc=f"FP samples {kind}", cond=set_cond)
            save_pngs(imgs, tmp / kind, [f"{s:010d}" for s in sd])
            tensors = {"images": imgs.contiguous(), "seeds": torch.tensor(sd, dtype=torch.int64)}
            if set_cond is not None:
                tensors["prompt"] = torch.tensor(set_cond.row_of, dtype=torch.int64)
            save_file(tensors, tmp / f"{kind}.safetensors")
        write_json(tmp / "meta.json", {**proto, "sets": {k: {"seed_base": SEED_BASE[k], "count": g.eval_samples}
                                                          for k in ("a", "b")}})
    return GenerateMetrics(**info, family=den.family, prompts=cond.choices if cond is not None else 0,
                           eval_samples=g.eval_samples, architecture=den.arch.name,
                           floor_samples=g.eval_samples)


def main(argv: list[str] | None = None) -> int:
    return stage_main("generate", run, ["model", "trajectories", "samples"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
