"""generate stage: FP trajectories for the calibration seeds and FP samples for the evaluation seeds.

Trajectories record the denoiser's exact inputs (x_t, latents for latent models, and the timestep) at every step,
in safetensors shards of ``generate.shard_size`` seeds with ``index.parquet`` (one row per seed and step) and
``meta.json`` (which states the layout). Seed i takes prompt (or class) i mod P; each prompt's conditioning inputs
are stored once in ``prompts.safetensors`` and referenced by row, so disk grows with the prompts, not with seeds x
steps. FP samples: set ``a`` (the evaluation seeds) and a disjoint set ``b`` of the same size (the noise floor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from pqd.diffusion.adapter import Conditioning, Denoiser, load_denoiser
from pqd.diffusion.sampling import make_scheduler, sample
from pqd.errors import ParamError
from pqd.formats.calibset import META, PROMPTS
from pqd.formats.files import atomic_dir, read_prompts, write_json
from pqd.formats.metrics import GenerateMetrics
from pqd.params import SAMPLE_SEED_BASE, Params, resolve_device
from pqd.stages._cli import stage_main
from pqd.stages.parallel import (SCRATCH, ModelRef, Pool, Worker, check_complete, folder_stamp, map_ranges, open_pool,
                                 ranges, sample_sets)


def seeds(kind: str, n: int, params: Params) -> list[int]:
    """The n seeds of set ``kind``: 'a' (evaluation), 'b' (noise floor) or 'calib' (trajectories, from
    generate.calib_seed_base); disjoint ranges (pqd.params checks that the calibration range stays clear)."""
    base = params.generate.calib_seed_base if kind == "calib" else SAMPLE_SEED_BASE[kind]
    return [base + i for i in range(n)]


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


def fp_model(model: str, device: str) -> dict[str, Denoiser]:
    """The FP denoiser of a model folder, as a worker loads it (:mod:`pqd.stages.parallel`)."""
    return {"fp": load_denoiser(Path(model), device)}


@dataclass(frozen=True)
class ShardRange:
    """The calibration seeds of one trajectory shard (``generate.shard_size`` seeds, one sampling batch)."""

    index: int
    seeds: list[int]
    out: str  # the trajectories folder
    scheduler: Any
    steps: int
    eta: float
    row_of: list[int] | None  # each seed's row of the conditioning inputs (w.shared)
    guidance_scale: float


def record_shard(w: Worker, job: ShardRange) -> list[dict[str, Any]]:
    """Sample the shard's seeds recording every input of the denoiser network, write ``shard-<index>.safetensors``;
    returns its index rows (one per seed and step)."""
    xs: list[torch.Tensor] = []
    ts: list[float] = []

    def rec(i: int, t: torch.Tensor, x_in: torch.Tensor) -> None:
        xs.append(x_in.detach().to(torch.float32).cpu())
        if len(ts) < job.steps:
            ts.append(float(t))

    cond = None if job.row_of is None else Conditioning(w.shared, job.row_of, job.guidance_scale)
    sample(w.model["fp"], copy.deepcopy(job.scheduler), job.seeds, steps=job.steps, eta=job.eta,
           batch_size=len(job.seeds), device=w.device, record=rec, progress=False, cond=cond)
    name = f"shard-{job.index:05d}.safetensors"
    tensors = {"x": torch.stack(xs, dim=1).contiguous(), "t": torch.tensor(ts, dtype=torch.float32),
               "seeds": torch.tensor(job.seeds, dtype=torch.int64)}  # x: [n, S, C, H, W]
    if cond is not None:
        tensors["prompt"] = torch.tensor(cond.row_of, dtype=torch.int64)
    save_file(tensors, Path(job.out) / name)
    rows = []
    for r, s in enumerate(job.seeds):
        prompt = {} if cond is None else {"prompt": cond.row_of[r]}
        rows += [{"seed": s, "step": i, "u": i / (job.steps - 1), "t": t, "shard": name, "row": r, **prompt}
                 for i, t in enumerate(ts)]
    return rows


def record_trajectories(pool: Pool, ref: ModelRef, den: Denoiser, params: Params, out: Path,
                        cond: Conditioning | None) -> tuple[dict[str, Any], int]:
    """Every calibration seed's trajectory, one range per shard; index.parquet (and the prompts) assembled here."""
    g = params.generate
    calib = seeds("calib", g.calib_seeds, params)
    cond = prompt_rows(len(calib), cond)
    sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
    jobs = [ShardRange(i, calib[a:b], str(out), sched, g.steps, g.eta, None if cond is None else cond.row_of[a:b],
                       cond.guidance_scale if cond else 1.0) for i, (a, b) in enumerate(ranges(calib, g.shard_size))]
    parts = map_ranges(pool, record_shard, ref, jobs, scratch=out / SCRATCH, desc="trajectories", local_model={"fp": den},
                       shared=None if cond is None else cond.inputs, unit="traj")
    rows = [row for part in parts for row in part]
    check_complete(out, [f"shard-{j.index:05d}.safetensors" for j in jobs])
    pd.DataFrame(rows).to_parquet(out / "index.parquet", index=False)
    if cond is not None:
        save_file({k: v.contiguous() for k, v in cond.inputs.items()}, out / PROMPTS)
    return {"calib_trajectories": len(calib), "trajectory_inputs": len(rows)}, len(jobs)


def run(params: Params, model: Path, trajectories: Path, samples: Path) -> GenerateMetrics:
    device = resolve_device(params)
    den = load_denoiser(model, device)
    g = params.generate
    prompts = check_prompts(params, den)  # before any sampling
    torch.manual_seed(0)
    proto = sampling_protocol(params, den, prompts)
    cond = den.conditioning(prompts, [], guidance_scale(params, den), device) if den.conditional else None
    ref = ModelRef(fp_model, (str(model.resolve()),), device, folder_stamp(model))
    with open_pool(params.parallel, "generate") as pool:
        with atomic_dir(trajectories) as tmp:
            info, n_ranges = record_trajectories(pool, ref, den, params, tmp, cond)
            layout = "x float32 [n, steps, C, H, W]; t float32 [steps]; seeds int64 [n]"
            if cond is not None:
                shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in cond.inputs.items())
                layout += f"; prompt int64 [n] (the row of every input in {PROMPTS}: {shapes}; row 0 unconditional)"
            write_json(tmp / META, {**proto, "seeds": "calib", "seed_base": g.calib_seed_base,
                                           "count": g.calib_seeds, "layout": layout})
        with atomic_dir(samples) as tmp:
            for kind in ("a", "b"):
                sd = seeds(kind, g.eval_samples, params)
                sched = make_scheduler(g.scheduler, den.scheduler_config, den.scheduler_class)
                set_cond = prompt_rows(len(sd), cond)
                imgs, n = sample_sets(pool, ref, {"fp": den}, sd, {"fp": tmp / kind}, g.batch_size, sched, g.steps,
                                      g.eta, set_cond, tmp / SCRATCH, f"FP samples {kind}")
                n_ranges += n
                tensors = {"images": imgs["fp"].contiguous(), "seeds": torch.tensor(sd, dtype=torch.int64)}
                if set_cond is not None:
                    tensors["prompt"] = torch.tensor(set_cond.row_of, dtype=torch.int64)
                save_file(tensors, tmp / f"{kind}.safetensors")
            write_json(tmp / META, {**proto, "sets": {k: {"seed_base": SAMPLE_SEED_BASE[k], "count": g.eval_samples}
                                                              for k in ("a", "b")}})
        run_info = pool.record(n_ranges)
    return GenerateMetrics(**info, family=den.family, prompts=cond.choices if cond is not None else 0,
                           eval_samples=g.eval_samples, architecture=den.arch.name, floor_samples=g.eval_samples,
                           parallel=run_info)


def main(argv: list[str] | None = None) -> int:
    return stage_main("generate", run, ["model", "trajectories", "samples"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
