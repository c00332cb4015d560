"""select stage: choose the calibration set among the recorded trajectory inputs.

Steps: ``select.num_samples`` draws over the normalised step position u = i / (S - 1) (0 = first,
noisiest step), from a Gaussian N(mu, sigma) truncated to [0, 1] (``gaussian``) or uniform; no step gives
more samples than there are trajectories. Samples: at each drawn step, ``kcenter`` picks the candidates
that cover the step's inputs best (greedy k-center on a pooled feature of x_t), ``random`` picks at random,
``first`` takes the lowest seeds. ``index.parquet`` records every chosen input and why it was chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pqd.io import atomic_dir, load_tensors, read_json, write_json
from pqd.params import Params, SelectParams


def step_probabilities(u: np.ndarray, sp: SelectParams) -> np.ndarray:
    """Probability of each step position u in [0, 1] under the chosen timestep distribution."""
    if sp.timesteps == "uniform":
        w = np.ones_like(u)
    else:
        w = np.exp(-0.5 * ((u - sp.mu) / sp.sigma) ** 2)
    return w / w.sum()


def draw_step_counts(p: np.ndarray, n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n steps from p (multinomial), re-drawing any excess over ``cap`` among steps with room."""
    if n > cap * len(p):
        raise ValueError(f"select.num_samples = {n} is not allowed: expected at most {cap * len(p)} "
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
    """Cheap descriptor of UNet inputs x [N, C, H, W] -> [N, C * size * size] (adaptive average pooling)."""
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
    return list(range(k)), ["first seeds"] * k


def run(params: Params, trajectories: Path, out: Path) -> dict[str, Any]:
    sp = params.select
    index = pd.read_parquet(trajectories / "index.parquet")
    meta = read_json(trajectories / "meta.json")
    steps = int(meta["steps"])
    n_traj = index["seed"].nunique()
    if index["step"].nunique() != steps or len(index) != n_traj * steps:
        raise ValueError(f"{trajectories}/index.parquet: {len(index)} rows do not match {n_traj} trajectories x {steps} "
                         "steps: expected one row per trajectory and step, as the generate stage writes it")
    rng = np.random.default_rng(sp.seed)
    u = np.arange(steps) / (steps - 1)
    p = step_probabilities(u, sp)
    counts = draw_step_counts(p, sp.num_samples, n_traj, rng)
    chosen_steps = [int(i) for i in np.nonzero(counts)[0]]

    # pass 1: features of every candidate at the chosen steps, shard by shard (memory stays bounded)
    rows_by_step: dict[int, list[tuple[int, str, int, float]]] = {s: [] for s in chosen_steps}
    feats_by_step: dict[int, list[torch.Tensor]] = {s: [] for s in chosen_steps}
    for shard in sorted(index["shard"].unique()):
        tensors = load_tensors(trajectories / shard)
        if missing := sorted({"x", "t", "seeds"} - set(tensors)):
            raise ValueError(f"{trajectories}/{shard}: tensor {missing[0]!r} is missing: expected x, t and seeds")
        x, t, seeds = tensors["x"], tensors["t"], tensors["seeds"]
        listed = sorted(index.loc[index["shard"] == shard, "seed"].unique().tolist())
        if x.ndim != 5 or x.shape[1] != steps or sorted(seeds.tolist()) != listed or len(x) != len(seeds):
            raise ValueError(f"{trajectories}/{shard}: holds x {tuple(x.shape)} for seeds {seeds.tolist()[:4]}, which "
                             f"disagrees with index.parquet: expected {len(listed)} trajectories x {steps} steps for "
                             f"seeds {listed[:4]}")
        for s in chosen_steps:
            feats_by_step[s].append(pooled_feature(x[:, s]))
            rows_by_step[s] += [(int(seeds[r]), shard, r, float(t[s])) for r in range(len(seeds))]

    picks: dict[str, list[tuple[int, int]]] = {}
    records = []
    for s in chosen_steps:
        feats = torch.cat(feats_by_step[s])
        idx, why = choose(feats, int(counts[s]), sp.rule, rng)
        for order, (i, reason) in enumerate(zip(idx, why)):
            seed, shard, row, t = rows_by_step[s][i]
            picks.setdefault(shard, []).append((row, s))
            records.append({"seed": seed, "step": s, "u": float(u[s]), "t": t, "rule": sp.rule,
                            "pick_order": order, "why": reason, "shard": shard, "row": row})

    # pass 2: gather the chosen inputs
    gathered: dict[tuple[str, int, int], torch.Tensor] = {}
    for shard, rs in picks.items():
        x = load_tensors(trajectories / shard)["x"]
        for row, s in rs:
            gathered[(shard, row, s)] = x[row, s].clone()
    xs = torch.stack([gathered[(r["shard"], r["row"], r["step"])] for r in records])
    ts = torch.tensor([r["t"] for r in records], dtype=torch.float32)
    with atomic_dir(out) as tmp:
        save_file({"x": xs.contiguous(), "t": ts}, tmp / "samples.safetensors")
        pd.DataFrame(records).to_parquet(tmp / "index.parquet", index=False)
        pd.DataFrame({"step": np.arange(steps), "u": u, "probability": p, "count": counts}).to_csv(
            tmp / "steps.csv", index=False)
        schedule = index.drop_duplicates("step").sort_values("step")["t"].tolist()
        write_json(tmp / "meta.json", {"schedule_timesteps": schedule, "timesteps": sp.timesteps, "mu": sp.mu,
                                       "sigma": sp.sigma, "rule": sp.rule, "num_samples": len(records)})
    return {"calib_samples": len(records), "distinct_steps": len(chosen_steps),
            "mean_u": round(float(np.mean([r["u"] for r in records])), 4)}


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("select", run, ["trajectories", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
