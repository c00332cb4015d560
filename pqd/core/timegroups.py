"""Time groups: contiguous runs of denoising steps that share activation quantization parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


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


class TimeGrouped:
    """Mixin of a module that holds one set of parameters per time group: ``group`` selects the set in use."""

    group: int = 0

    @property
    def num_groups(self) -> int:
        raise NotImplementedError


def set_time_group(model: nn.Module, group: int) -> None:
    """Select the parameters of time group ``group`` in every time-grouped module of ``model``."""
    for m in model.modules():
        if isinstance(m, TimeGrouped):
            if not 0 <= group < m.num_groups:
                raise ValueError(f"time group {group} is not allowed: expected 0..{m.num_groups - 1}")
            m.group = group
