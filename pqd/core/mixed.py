"""Mixed-precision weights under a size budget (after MixDQ): each layer's sensitivity, and the bits per layer.

A layer's sensitivity is the relative output error of the whole network when only that layer's weight is on the low
grid (the others float, activations float): what moving it to the low grid costs on its own. The solver starts every
candidate layer at the low width and moves layers to the high width, the most sensitive per extra bit first, while
the average weight bits (codes and scales of every quantized layer) stay within the budget; the objective is the sum
of the sensitivities of the layers left low (errors taken as additive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

SCALE_BITS = 32  # each weight scale is a float32


@dataclass(frozen=True)
class LayerCost:
    """One layer's weight storage in bits at the low and the high width (codes + scales), and its weight count."""

    weights: int
    low_bits: float
    high_bits: float


def layer_cost(weight_shape: torch.Size, scales_low: int, scales_high: int, low: int, high: int) -> LayerCost:
    n = int(torch.Size(weight_shape).numel())
    return LayerCost(n, n * low + SCALE_BITS * scales_low, n * high + SCALE_BITS * scales_high)


@torch.no_grad()
def weight_sensitivity(model: nn.Module, outputs: Callable[[nn.Module], list[torch.Tensor]], names: list[str],
                       low_weight: Callable[[str], torch.Tensor], progress: Callable[[Iterable], Iterable] = iter
                       ) -> dict[str, float]:
    """Per layer in ``names``, the network's output error with only that layer's weight replaced by
    ``low_weight(name)`` (its weight on the low grid, dequantized; made one layer at a time): sum of squared
    differences from the float outputs over sum of squared float outputs. ``outputs(model)`` runs the same inputs
    each time and returns the network's outputs."""
    ref = outputs(model)
    energy = sum(float(r.double().pow(2).sum()) for r in ref)
    sens: dict[str, float] = {}
    for name in progress(list(names)):
        layer = model.get_submodule(name)
        kept = layer.weight.data
        layer.weight.data = low_weight(name).to(kept.device, kept.dtype)
        try:
            got = outputs(model)
        finally:
            layer.weight.data = kept
        sens[name] = sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(got, ref)) / max(energy, 1e-30)
    return sens


def mean_bits(costs: dict[str, LayerCost], high: set[str]) -> float:
    """Average weight bits (codes and scales) when the layers in ``high`` are at the high width, the rest low."""
    total = sum(c.high_bits if n in high else c.low_bits for n, c in costs.items())
    return total / max(1, sum(c.weights for c in costs.values()))


def choose_high(costs: dict[str, LayerCost], sensitivity: dict[str, float], budget: float) -> set[str]:
    """The layers (among those with a sensitivity) to keep at the high width: most sensitive per extra bit first,
    each only while the average weight bits stay within ``budget``. Raises ValueError when even all-low exceeds it."""
    floor = mean_bits(costs, set())
    if floor > budget + 1e-9:
        raise ValueError(f"quant.weight_bits_budget = {budget:g} is not allowed for this model: expected at least "
                         f"{floor:.3f}, the average weight bits with every candidate layer at the low width")
    total_weights = sum(c.weights for c in costs.values())
    spare = (budget - floor) * total_weights
    order = sorted(sensitivity, key=lambda n: sensitivity[n] / max(costs[n].high_bits - costs[n].low_bits, 1e-9),
                   reverse=True)
    high: set[str] = set()
    for name in order:
        extra = costs[name].high_bits - costs[name].low_bits
        if sensitivity[name] > 0 and extra <= spare + 1e-9 * total_weights:  # (rounding of the budget's product)
            high.add(name)
            spare -= extra
    return high
