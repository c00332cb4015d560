"""AdaRound: learned up/down rounding of weights (Nagel et al., 2020) on their symmetric grid (per output channel
or per group of input channels)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pqd.core.affine import weight_scale_like
from pqd.core.qtypes import QType

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so h reaches exactly 0 and 1
# h's start distance from a start code (0.05, 0.1 and 0.25 gave the same unit errors on the DiT demo's blocks and
# the UNet demo's largest units, docs/benchmarks.md); inside (0, 0.5) so the sigmoid is not saturated
START_MARGIN = 0.1


class AdaRound(nn.Module):
    """Soft weights ``s * clamp(floor(W/s) + h(V), qmin, qmax)`` with a learnable V per weight.

    ``h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``; V starts where h equals the fractional
    part of W/s, i.e. at the float weight. ``regularizer(beta)`` pushes every h to 0 or 1; ``codes()``
    gives the hard rounding (h >= 0.5) as int8.

    ``start``: codes to start from instead (GPTQ's): each weight may then end on its start code or on the
    neighbour on the float weight's side of it, and h starts ``START_MARGIN`` from the start code, so the soft
    weights begin next to the start codes' weights. (Starting h at the float weight's fraction instead, as from
    nearest rounding, put the soft weights back near the float weights: the regulariser then had to pull every h
    back to 0 or 1 within the iterations, and on the DiT and UNet demos the hardened codes came out worse than
    GPTQ's in nearly every unit.)
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, qtype: QType,
                 start: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qtype = qtype
        s = weight_scale_like(scale.to(torch.float32), weight.shape)
        x = weight.detach().to(torch.float32) / s
        if start is None:
            floor = torch.floor(x)
            rest = (x - floor).clamp(1e-4, 1 - 1e-4)
        else:
            c = start.to(x.device, torch.float32)
            above = x >= c  # the float weight lies above its start code: the code is the lower of the two choices
            floor = torch.where(above, c, c - 1)
            rest = torch.where(above, START_MARGIN, 1 - START_MARGIN)
        self.register_buffer("scale", s)
        self.register_buffer("floor", floor)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def soft_weight(self) -> torch.Tensor:
        return self.scale * (self.floor + self.h()).clamp(self.qtype.qmin, self.qtype.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def codes(self) -> torch.Tensor:
        return (self.floor + (self.V >= 0).to(self.floor.dtype)).clamp(self.qtype.qmin, self.qtype.qmax).to(torch.int8)

    def hard_fraction(self) -> float:
        """Share of weights whose h is already exactly 0 or 1."""
        h = self.h()
        return float(((h == 0) | (h == 1)).float().mean())


def beta_schedule(step: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """Annealed exponent of the rounding regulariser; None during warm-up (regulariser off)."""
    w = int(warmup * total)
    if step < w:
        return None
    frac = (step - w) / max(1, total - w)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * frac))
