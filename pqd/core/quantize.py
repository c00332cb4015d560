"""The quantization lifecycle on a torch module: choose layers -> observe -> fit -> apply.

``fit_qstate`` runs the float model over calibration batches (through a caller-supplied function, so
this module knows nothing about diffusion models), fits every quantizer and returns a
:class:`QState`: plain tensors and a per-layer map, the data that the export stage stores. ``apply_qstate``
swaps the float layers of a model for quantized ones built from a QState.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from pqd.core.affine import quantize, weight_scales
from pqd.core.modules import ActQuantizer, QuantConv2d, QuantLinear, quantizable_layers, set_module
from pqd.core.observers import ActObserver
from pqd.core.qtypes import act_qtype, weight_qtype


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. ``layer_weight_bits`` overrides ``weight_bits`` for named layers."""

    weight_bits: int = 8
    act_bits: int = 8
    weight_range: str = "mse"  # minmax | mse
    act_range: str = "mse"  # minmax | mse
    act_samples: int = 200_000
    layer_weight_bits: dict[str, int] = field(default_factory=dict)

    def bits_for(self, name: str) -> int:
        return self.layer_weight_bits.get(name, self.weight_bits)


@dataclass
class LayerQParams:
    """One layer's quantizer parameters.

    weight_int: int8, the weight's shape (codes in the signed ``weight_bits`` grid);
    weight_scale: float32 [out]; act_scale / act_zero_point: float32 [G] (G time groups).
    """

    kind: str  # "conv2d" | "linear"
    weight_bits: int
    act_bits: int
    weight_int: torch.Tensor
    weight_scale: torch.Tensor
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor


QState = dict[str, LayerQParams]

# Runs the (float, hooked) model over every calibration batch.
ForwardAll = Callable[[nn.Module], None]


def quantize_weight(w: torch.Tensor, bits: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization with nearest rounding -> (codes int8, scale float32 [out])."""
    qt = weight_qtype(bits)
    scale = weight_scales(w, qt, method)
    codes = quantize(w.detach().to(torch.float32), scale, torch.zeros_like(scale), qt, axis=0)
    return codes.to(torch.int8), scale


@torch.no_grad()
def fit_qstate(model: nn.Module, forward_all: ForwardAll, config: QuantConfig,
               include: Callable[[str], bool] = lambda name: True) -> QState:
    """Observe the inputs of every Conv2d/Linear (for which ``include(name)``) and fit all quantizers."""
    layers = {n: m for n, m in quantizable_layers(model).items() if include(n)}
    if not layers:
        raise ValueError("fit_qstate: the model has no Conv2d or Linear layer to quantize")
    observers = {n: ActObserver(config.act_samples, seed=i) for i, n in enumerate(layers)}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: observers[n].update(args[0]))
               for n, m in layers.items()]
    try:
        forward_all(model)
    finally:
        for h in handles:
            h.remove()
    state: QState = {}
    for name, layer in layers.items():
        obs = observers[name]
        if not obs.seen:
            raise RuntimeError(f"fit_qstate: layer {name} received no input during calibration")
        try:
            a_scale, a_zp = obs.qparams(act_qtype(config.act_bits),
                                        config.act_range)
        except FloatingPointError as e:
            raise FloatingPointError(f"layer {name}: {e}") from None
        bits = config.bits_for(name)
        codes, w_scale = quantize_weight(layer.weight, bits, config.weight_range)
        state[name] = LayerQParams(
            kind="conv2d" if isinstance(layer, nn.Conv2d) else "linear",
            weight_bits=bits, act_bits=config.act_bits, weight_int=codes, weight_scale=w_scale,
            act_scale=a_scale.reshape(1), act_zero_point=a_zp.reshape(1))
    return state


def apply_qstate(model: nn.Module, state: QState) -> nn.Module:
    """Replace each float layer named in ``state`` by its quantized twin (in place); returns model."""
    layers = quantizable_layers(model)
    for name, lp in state.items():
        if name not in layers:
            raise KeyError(f"apply_qstate: the model has no Conv2d/Linear layer named {name!r}")
        float_layer = layers[name]
        act = ActQuantizer(lp.act_bits, lp.act_scale, lp.act_zero_point)
        cls = QuantConv2d if isinstance(float_layer, nn.Conv2d) else QuantLinear
        q = cls(float_layer, lp.weight_int, lp.weight_scale, lp.weight_bits, act)
        q.to(float_layer.weight.device)
        set_module(model, name, q)
    return model
