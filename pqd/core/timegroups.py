"""Time groups: contiguous runs of denoising steps that share activation quantization parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimeGroups:
    """G groups over timestep values. ``thresholds`` holds G-1 descending timestep values; a timestep t
    belongs to group ``#{thresholds > t}``, so group 0 holds the first (noisiest, largest-t) steps."""

    thresholds: tuple[float, ...] = ()

    @property
    def count(self) -> int:
        return len(self.thresholds) + 1

    @staticmethod
    def from_schedule(timesteps: list[float], groups: int) -> "TimeGroups":
        """Split the inference schedule (timesteps in sampling order, descending) into ``groups``
        contiguous runs of (nearly) equal length; each threshold is the midpoint between two runs."""
        n = len(timesteps)
        if not 1 <= groups <= n:
            raise ValueError(f"time groups = {groups} is not allowed: expected 1..{n} (the number of steps)")
        ts = sorted((float(t) for t in timesteps), reverse=True)
        bounds = [round(n * g / groups) for g in range(1, groups)]
        return TimeGroups(tuple((ts[b - 1] + ts[b]) / 2 for b in bounds))

    def group_of(self, t: torch.Tensor | float) -> torch.Tensor:
        """Group index (int64, t's shape) of each timestep value."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if not self.thresholds:
            return torch.zeros(t.shape, dtype=torch.int64)
        th = torch.tensor(self.thresholds, dtype=torch.float64)
        return (th > t.unsqueeze(-1)).sum(-1)
