"""select stage: choose the calibration set among the recorded trajectory inputs (format: pqd.formats.calibset).

``select.num_samples`` draws over the step position u = i / (S - 1) (0 = first, noisiest step), from a Gaussian
truncated to [0, 1] or uniform, no step giving more samples than there are trajectories; at each drawn step,
``select.rule`` picks the inputs. With classifier-free guidance every chosen input enters twice, with its prompt
or class (branch ``cond``) and with the unconditional one (``uncond``), as the denoiser sees it at inference.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from pqd.errors import InputError, ParamError
from pqd.formats.calibset import META, PROMPTS, CalibWriter
from pqd.formats.files import atomic_dir, load_tensors, read_json
from pqd.formats.metrics import SelectMetrics
from pqd.params import Params, SelectParams
from pqd.stages._cli import stage_main


def step_probabilities(u: np.ndarray, sp: SelectParams) -> np.ndarray:
    """Probability of each step position u in [0, 1] under the chosen timestep distribution."""
    if sp.timesteps == "uniform":
        w = np.ones_like(u)
    elif sp.timesteps == "gaussian":
        w = np.exp(-0.5 * ((u - sp.mu) / sp.sigma) ** 2)
    else:
        raise ParamError(f"select.timesteps = {sp.timesteps!r} is not allowed: expected 'gaussian' or 'uniform'")
    return w / w.sum()


def draw_step_counts(p: np.ndarray, n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n steps from p (multinomial), re-drawing any excess over ``cap`` among steps with room."""
    if n > cap * len(p):
        raise ParamError(f"select.num_samples = {n} is not allowed: expected at most {cap * len(p)} "
                         f"({cap} trajectories x {len(p)} steps)")
    counts = rng.multinomial(n, p)
    while (excess := int(np.clip(counts - cap, 0, None).sum())) > 0:
        counts = np.minimum(counts, cap)
        room = (counts < cap).astype(float) * p
        if room.sum() == 0:  # p is zero where room remains: spread evenly there
            room = (counts < cap).astype(float)
        counts += rng.multinomial(excess, room / room.sum())
    return counts


def pooled_feature(x: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Cheap descriptor of the network's inputs x [N, C, H, W] -> [N, C * size * size] (adaptive average pooling)."""
    return F.adaptive_avg_pool2d(x.float(), (min(size, x.shape[-2]), min(size, x.shape[-1]))).flatten(1)


def kcenter_greedy(feats: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Greedy k-center: start at the point nearest the mean, then repeatedly add the point farthest from
    the chosen set. Returns chosen indices and, for each, its distance to the set when it was chosen."""
    d_mean = (feats - feats.mean(0, keepdim=True)).norm(dim=1)
    first = int(d_mean.argmin())
    chosen, dists = [first], [float(d_mean[first])]
    dmin = (feats - feats[first]).norm(dim=1)
    while len(chosen) < k:
        nxt = int(dmin.argmax())
        chosen.append(nxt)
        dists.append(float(dmin[nxt]))
        dmin = torch.minimum(dmin, (feats - feats[nxt]).norm(dim=1))
    return chosen, dists


def choose(feats: torch.Tensor, k: int, rule: str, rng: np.random.Generator) -> tuple[list[int], list[str]]:
    if rule == "kcenter":
        idx, dists = kcenter_greedy(feats, k)
        why = ["k-center: nearest to the step's mean input"] + [f"k-center: farthest from those chosen (distance {d:.4f})"
                                                                for d in dists[1:]]
        return idx, why
    if rule == "random":
        return sorted(rng.choice(len(feats), size=k, replace=False).tolist()), ["random"] * k
    if rule == "first":
        return list(range(k)), ["first seeds"] * k
    raise ParamError(f"select.rule = {rule!r} is not allowed: expected 'kcenter', 'random' or 'first'")


def run(params: Params, trajectories: Path, out: Path) -> SelectMetrics:
    sp = params.select
    index = pd.read_parquet(trajectories / "index.parquet")
    meta = read_json(trajectories / META)
    steps = int(meta["steps"])
    n_traj = index["seed"].nunique()
    if index["step"].nunique() != steps or len(index) != n_traj * steps:
        raise InputError(f"{trajectories}/index.parquet: {len(index)} rows do not match {n_traj} trajectories x {steps} "
                         "steps: expected one row per trajectory and step, as the generate stage writes it")
    cond = meta.get("conditioning")
    rng = np.random.default_rng(sp.seed)
    u = np.arange(steps) / (steps - 1)
    p = step_probabilities(u, sp)
    counts = draw_step_counts(p, sp.num_samples, n_traj, rng)
    chosen_steps = [int(i) for i in np.nonzero(counts)[0]]

    # pass 1: features of every candidate at the chosen steps, shard by shard (memory stays bounded)
    rows_by_step: dict[int, list[tuple[int, str, int, float, int | None]]] = {s: [] for s in chosen_steps}
    feats_by_step: dict[int, list[torch.Tensor]] = {s: [] for s in chosen_steps}
    for shard in sorted(index["shard"].unique()):
        tensors = load_tensors(trajectories / shard)  # a damaged shard is a one-line error naming it
        need = {"x", "t", "seeds"} | ({"prompt"} if cond is not None else set())
        if missing := sorted(need - set(tensors)):
            raise InputError(f"{trajectories}/{shard}: tensor {missing[0]!r} is missing: expected {', '.join(sorted(need))}")
        x, t, seeds = tensors["x"], tensors["t"], tensors["seeds"]
        prompt = tensors["prompt"].tolist() if cond is not None else [None] * len(seeds)
        listed = sorted(index.loc[index["shard"] == shard, "seed"].unique().tolist())
        if x.ndim != 5 or x.shape[1] != steps or sorted(seeds.tolist()) != listed or len(x) != len(seeds):
            raise InputError(f"{trajectories}/{shard}: holds x {tuple(x.shape)} for seeds {seeds.tolist()[:4]}, which "
                             f"disagrees with index.parquet: expected {len(listed)} trajectories x {steps} steps for "
                             f"seeds {listed[:4]}")
        for s in chosen_steps:
            feats_by_step[s].append(pooled_feature(x[:, s]))
            rows_by_step[s] += [(int(seeds[r]), shard, r, float(t[s]), prompt[r]) for r in range(len(seeds))]
        del x, tensors

    # classifier-free guidance: the denoiser sees every input twice, with its condition and the unconditional one
    branches = [("cond", None)] + ([("uncond", 0)] if cond is not None and cond["guidance_scale"] > 1 else [])
    records = []
    for s in chosen_steps:  # increasing step = decreasing t: each time group is a contiguous run (pqd.formats.calibset)
        feats = torch.cat(feats_by_step.pop(s))
        idx, why = choose(feats, int(counts[s]), sp.rule, rng)
        for order, (i, reason) in enumerate(zip(idx, why)):
            seed, shard, row, t, prompt = rows_by_step[s][i]
            for branch, row_override in branches:
                extra = {} if cond is None else {"prompt": prompt if row_override is None else row_override, "branch": branch}
                records.append({"seed": seed, "step": s, "u": float(u[s]), "t": t, "rule": sp.rule,
                                "pick_order": order, "why": reason, "shard": shard, "row": row, **extra})

    # pass 2: copy the chosen inputs into calibration shards, reading only their rows
    with atomic_dir(out) as tmp, contextlib.ExitStack() as stack:
        handles = {sh: stack.enter_context(safe_open(trajectories / sh, framework="pt"))
                   for sh in sorted({r["shard"] for r in records})}
        writer = CalibWriter(tmp, sp.shard_size)
        for r in tqdm(records, desc="calibration set", unit="input"):
            x = handles[r["shard"]].get_slice("x")[r["row"]:r["row"] + 1, r["step"]:r["step"] + 1]
            writer.add(x.reshape(x.shape[2:]), r["t"], r.get("prompt"))
        pd.DataFrame(records).to_parquet(tmp / "index.parquet", index=False)
        pd.DataFrame({"step": np.arange(steps), "u": u, "probability": p, "count": counts}).to_csv(
            tmp / "steps.csv", index=False)
        schedule = index.drop_duplicates("step").sort_values("step")["t"].tolist()
        rows = load_tensors(trajectories / PROMPTS) if cond is not None else None
        writer.close({"schedule_timesteps": schedule, "timesteps": sp.timesteps, "mu": sp.mu, "sigma": sp.sigma,
                      "rule": sp.rule, "drawn_inputs": sp.num_samples,
                      "conditioning": None if cond is None else {"guidance_scale": cond["guidance_scale"],
                                                                 "branches": [b for b, _ in branches]}}, rows)
    return SelectMetrics(calib_samples=len(records), drawn_inputs=sp.num_samples, branches=len(branches),
                         distinct_steps=len(chosen_steps), mean_u=round(float(np.mean([r["u"] for r in records])), 4))


def main(argv: list[str] | None = None) -> int:
    return stage_main("select", run, ["trajectories", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
