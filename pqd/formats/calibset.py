"""The calibration set on disk (``calib/``): written by select in shards, streamed by calibrate.

Layout: ``shard-NNNNN.safetensors`` with x float32 [n, C, H, W] (the denoiser's input), t float32 [n] (the
timestep it received) and, for conditioned models, prompt int64 [n] (a row of every conditioning input in
``prompts.safetensors``: encoder_hidden_states [P + 1, L, D], class_labels [P + 1], ...; row 0 is the
unconditional input: the empty prompt or the null class). Samples are ordered by decreasing t, so a time group
is one contiguous run of samples and a batch never needs more than the shards it spans. ``meta.json``
lists the shards; only the rows of the batch in use are ever read (memory stays bounded for any set size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pqd.core.timegroups import TimeGroups
from pqd.errors import InputError, MissingInputError, NumericalError, ParamError
from pqd.formats.files import load_tensors, read_json, write_json

PROMPTS = "prompts.safetensors"
META = "meta.json"  # a calibration set's, and the generate stage's trajectories' and sample sets'


class CalibWriter:
    """Appends calibration inputs in order and writes a shard every ``shard_size`` of them."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = Path(folder), shard_size
        self._buf: list[tuple[torch.Tensor, float, int | None]] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, x: torch.Tensor, t: float, prompt: int | None = None) -> None:
        self._buf.append((x, t, prompt))
        if len(self._buf) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {"x": torch.stack([b[0] for b in self._buf]).to(torch.float32).contiguous(),
                   "t": torch.tensor([b[1] for b in self._buf], dtype=torch.float32)}
        if self._buf[0][2] is not None:
            tensors["prompt"] = torch.tensor([b[2] for b in self._buf], dtype=torch.int64)
        save_file(tensors, self.folder / name)
        self.shards.append({"file": name, "count": len(self._buf)})
        self._buf = []

    def close(self, meta: dict[str, Any], cond: dict[str, torch.Tensor] | None = None) -> None:
        """Write the last shard, the conditioning rows (conditioned models) and meta.json."""
        self._flush()
        if cond is not None:
            save_file({k: v.contiguous() for k, v in cond.items()}, self.folder / PROMPTS)
        write_json(self.folder / META, {**meta, "shards": self.shards,
                                               "num_samples": sum(s["count"] for s in self.shards)})


class CalibSet:
    """Read side: per-sample timesteps and conditioning rows in memory (small); inputs read batch by batch."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.meta = read_json(self.folder / META)
        if "shards" not in self.meta:
            raise InputError(f"{self.folder}/meta.json lists no shards: re-run the select stage")
        self.shards: list[tuple[Path, int]] = []
        ts, prompts = [], []
        for s in self.meta["shards"]:
            path = self.folder / s["file"]
            if not path.is_file():
                raise MissingInputError(f"{path}: calibration shard listed in meta.json is missing")
            tensors = load_tensors(path)  # a damaged shard is a one-line error naming it; one shard in memory at a time
            ts.append(tensors["t"])
            if "prompt" in tensors:
                prompts.append(tensors["prompt"])
            if bad := (~torch.isfinite(tensors["x"]).flatten(1).all(1)).nonzero().flatten().tolist():
                raise NumericalError(f"{path}: calibration input {bad[0]} (timestep {float(ts[-1][bad[0]]):g}) has "
                                     f"non-finite values ({len(bad)} inputs in this shard): expected finite UNet inputs; "
                                     "re-run generate")
            del tensors
            if len(ts[-1]) != s["count"]:
                raise InputError(f"{path}: {len(ts[-1])} samples, meta.json says {s['count']}")
            self.shards.append((path, int(s["count"])))
        self.t = torch.cat(ts)
        self.prompt = torch.cat(prompts) if prompts else None
        # conditioning inputs by name, each [P + 1, ...] (conditioned models only)
        self.cond = load_tensors(self.folder / PROMPTS) if self.prompt is not None else None
        self._starts = torch.tensor([0] + [n for _, n in self.shards]).cumsum(0).tolist()

    def __len__(self) -> int:
        return len(self.t)

    @property
    def schedule(self) -> list[float]:
        return list(self.meta["schedule_timesteps"])

    def load(self, start: int, end: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor,
                                                                        dict[str, torch.Tensor] | None]:
        """Samples start..end-1: (x [B, C, H, W], t [B], conditioning inputs by name [B, ...] or None), on device."""
        parts = []
        for (path, _), s0, s1 in zip(self.shards, self._starts[:-1], self._starts[1:]):
            lo, hi = max(start, s0), min(end, s1)
            if lo < hi:
                with safe_open(path, framework="pt") as f:
                    parts.append(f.get_slice("x")[lo - s0:hi - s0])
        x = torch.cat(parts).to(device)
        rows = None if self.prompt is None else self.prompt[start:end]
        cond = None if rows is None else {k: v[rows].to(device) for k, v in self.cond.items()}
        return x, self.t[start:end].to(device), cond

    def batches(self, groups: TimeGroups, size: int) -> list[tuple[int, int, int]]:
        """(start, end, group) of batches of at most ``size`` samples, each within one time group."""
        g_of = groups.group_of(self.t)
        if len(g_of) > 1 and bool((g_of[1:] < g_of[:-1]).any()):
            raise InputError(f"{self.folder}: samples are not ordered by decreasing timestep: re-run the select stage")
        out = []
        for g in range(groups.count):
            idx = (g_of == g).nonzero().squeeze(1)
            if len(idx) == 0:
                raise ParamError(f"calibrate.time_groups = {groups.count}: time group {g} has no calibration sample; "
                                 "use fewer groups or draw more samples (select.num_samples, select.sigma)")
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            out += [(s, min(s + size, hi), g) for s in range(lo, hi, size)]
        return out
