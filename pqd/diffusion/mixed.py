"""Mixed precision for a denoiser (``quant.weight_bits_budget``): which of its low-bit layers move to 8 bits.

The product's side of :mod:`pqd.core.mixed`: the candidate layers and their storage under ``params`` (the bits and
group sizes :func:`pqd.diffusion.qconfig.quant_config` gives them), each one's weight on its low grid, and the
sensitivities measured on calibration batches that the caller runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pqd.core.affine import weight_groups, weight_values
from pqd.core.gptq import input_hessian
from pqd.core.mixed import LayerCost, choose_high, layer_cost, mean_bits, weight_sensitivity
from pqd.core.modules import quantizable_layers
from pqd.core.quantize import QuantConfig, quantize_weight
from pqd.diffusion.adapter import Denoiser
from pqd.params import Params


@dataclass(frozen=True)
class MixedPrecision:
    """The layers moved to ``high_bits`` under ``budget`` (average weight bits), the average they give, and every
    candidate layer's sensitivity (relative output error with only it on its low grid)."""

    budget: float
    high_bits: int
    high: tuple[str, ...]
    mean_bits: float
    sensitivity: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "high_bits": self.high_bits, "high_layers": list(self.high),
                "mean_bits": round(self.mean_bits, 4),
                "sensitivity": {n: float(f"{v:.4g}") for n, v in self.sensitivity.items()}}


def storage(cfg: QuantConfig, net: nn.Module, high_bits: int) -> tuple[dict[str, LayerCost], list[str]]:
    """Every quantizable layer's storage at its bits under ``cfg`` (low) and at ``high_bits`` (high: per-channel
    scales), and the candidates: the layers below ``high_bits``."""
    costs, candidates = {}, []
    for name, m in quantizable_layers(net).items():
        shape, bits = m.weight.shape, cfg.bits_for(name)
        scales = shape[0] * (weight_groups(shape[1], cfg.group_size_for(name)) if len(shape) > 1 else 1)
        if bits < high_bits:
            candidates.append(name)
            costs[name] = layer_cost(shape, scales, shape[0], bits, high_bits)
        else:
            costs[name] = layer_cost(shape, scales, scales, bits, bits)
    return costs, candidates


def check_budget(params: Params, den: Denoiser, cfg: QuantConfig) -> None:
    """Refuse a budget below what every candidate layer at its low width costs (before any long work)."""
    budget = params.quant.weight_bits_budget
    if budget is not None:
        costs, _ = storage(cfg, den.net, cfg.eight_bit_codes)
        choose_high(costs, {}, budget)


def mixed_precision(params: Params, den: Denoiser, cfg: QuantConfig,
                    outputs: Callable[[nn.Module], list[torch.Tensor]]) -> MixedPrecision:
    """Measure the sensitivity of each of ``den``'s layers below 8 bits under ``cfg`` (its weight on its low grid,
    rounded as ``cfg.rounding`` says; ``outputs(net)``: the network's outputs on the sensitivity batches) and choose
    the layers to move to 8 bits within quant.weight_bits_budget."""
    budget = params.quant.weight_bits_budget
    if budget is None:
        raise ValueError("mixed_precision: quant.weight_bits_budget is not set")
    high_bits = cfg.eight_bit_codes
    costs, candidates = storage(cfg, den.net, high_bits)
    layers = quantizable_layers(den.net)

    def low(name: str) -> torch.Tensor:
        layer = layers[name]
        # GPTQ rounding: the layer's codes as calibration will round them (its Hessian from the same batches, one
        # more pass per layer), so that a layer GPTQ repairs is not moved to 8 bits for nearest rounding's error
        hessian = input_hessian(den.net, layer, outputs) if cfg.gptq_for(layer) else None
        codes_, scale = quantize_weight(layer.weight, cfg.bits_for(name), cfg.weight_range, cfg.group_size_for(name),
                                        hessian, cfg.gptq_damp)
        return weight_values(codes_, scale)

    sens = weight_sensitivity(den.net, outputs, candidates, low,
                              progress=lambda xs: tqdm(xs, desc="layer sensitivity", unit="layer"))
    high = choose_high(costs, sens, budget)
    return MixedPrecision(budget, high_bits, tuple(n for n in candidates if n in high), mean_bits(costs, high), sens)
