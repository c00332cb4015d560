"""The quantization lifecycle on a torch module: observe -> fit (:func:`fit_qstate`) -> apply (:func:`apply_qstate`)
-> read back (:func:`qstate_of`, after reconstruction). A :class:`QState` is plain tensors by layer name, what the
export stage stores. The caller runs the calibration batches, so nothing here knows about diffusion models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from pqd.core.affine import weight_codes, weight_scales
from pqd.core.gptq import Hessian, gptq_codes, supported
from pqd.core.guards import NumericalError, check_act_qparams, check_layer_qparams, check_smoothing
from pqd.core.modules import (ActQuantizer, QuantConv2d, QuantLinear, QuantMatMul, QuantSite, matmul_modules,
                              quant_layers, quant_matmuls, quant_sites, quantizable_layers, set_module, sites)
from pqd.core.observers import ActObserver
from pqd.core.qtypes import act_qtype, weight_qtype
from pqd.core.smooth import ChannelMax, smoothing_factors


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    ``layer_weight_bits`` overrides ``weight_bits`` by layer; ``splits``: layer -> channel where its input splits
    into two separately quantized parts; ``output_layers``: layers whose outputs are quantized too (per partial
    product when split), as integer kernels require. Every MatMul is quantized too, its operands at
    ``operand_bits[name]`` = (bits of a, bits of b), default ``act_bits``; every Site at ``act_bits``. ``smooth``:
    linear layers balanced against their weight (:mod:`pqd.core.smooth`, migration strength ``smooth_alpha``).
    ``rounding``: the weight codes' rounding, ``nearest`` or ``gptq`` (:mod:`pqd.core.gptq`, damping ``gptq_damp``,
    Hessians pooled over the calibration set and its time groups). ``weight_group_size``: 0 gives each output
    channel one weight scale; N > 0 gives layers below 8 bits one per group of at most N input channels
    (:func:`pqd.core.affine.weight_scales`). ``act_symmetric``: every activation grid has its zero point at code 0
    (a range that never goes below 0) or at the middle code (the grid of a signed integer with zero point 0)
    (:func:`pqd.core.affine.symmetric_act_qparams`), not where the observed range puts it.
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_range: str = "mse"  # minmax | mse
    act_range: str = "mse"  # minmax | mse
    act_samples: int = 200_000
    time_groups: int = 1
    layer_weight_bits: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    output_layers: frozenset[str] = frozenset()
    operand_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    smooth: frozenset[str] = frozenset()
    smooth_alpha: float = 0.5
    rounding: str = "nearest"  # nearest | gptq
    gptq_damp: float = 0.01
    weight_group_size: int = 0
    act_symmetric: bool = False
    eight_bit_codes: int = 8  # the code width of 8-bit layers (7 where quant.reduce_range takes 7-bit codes)

    def bits_for(self, name: str) -> int:
        return self.layer_weight_bits.get(name, self.weight_bits)

    def gptq_for(self, layer: nn.Module) -> bool:
        """Whether ``layer``'s codes come from GPTQ (``rounding: gptq`` and a layer GPTQ covers), not nearest."""
        return self.rounding == "gptq" and supported(layer)

    def group_size_for(self, name: str) -> int:
        """The weight group size of layer ``name``: ``weight_group_size`` below 8 bits, 0 (per channel) for an 8-bit
        layer (``eight_bit_codes`` wide)."""
        return self.weight_group_size if self.bits_for(name) < self.eight_bit_codes else 0

    def operand_bits_for(self, name: str) -> tuple[int, int]:
        return self.operand_bits.get(name, (self.act_bits, self.act_bits))


@dataclass
class LayerQParams:
    """One layer's quantizer parameters.

    weight_int: int8, the weight's shape; weight_scale: float32 [out] (per output channel) or [out, groups]
    (per group of input channels); act_scale / act_zero_point: float32 [G, P]
    (P = 2 when the input is split at channel ``act_split``); out_scale / out_zero_point: the same for the output
    (partial outputs when split), or None (float output); smooth: float32 [in], a balanced linear's input
    divisors (its codes quantize weight x smooth), or None.
    """

    kind: str  # "conv2d" | "linear"
    weight_bits: int
    act_bits: int
    weight_int: torch.Tensor
    weight_scale: torch.Tensor
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor
    act_split: int | None = None
    out_scale: torch.Tensor | None = None
    out_zero_point: torch.Tensor | None = None
    smooth: torch.Tensor | None = None


@dataclass
class MatMulQParams:
    """One activation-activation product's quantizer parameters: a_scale / a_zero_point and b_scale /
    b_zero_point float32 [G, 1] for its two operands, on unsigned ``a_bits`` / ``b_bits`` grids."""

    a_bits: int
    b_bits: int
    a_scale: torch.Tensor
    a_zero_point: torch.Tensor
    b_scale: torch.Tensor
    b_zero_point: torch.Tensor
    kind: str = "matmul"
    TENSORS: ClassVar[tuple[str, ...]] = ("a_scale", "a_zero_point", "b_scale", "b_zero_point")


@dataclass
class SiteQParams:
    """One glue site's quantizer parameters: scale / zero_point float32 [G, 1] on the unsigned ``bits`` grid."""

    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    kind: str = "site"
    TENSORS: ClassVar[tuple[str, ...]] = ("scale", "zero_point")


QState = dict[str, "LayerQParams | MatMulQParams | SiteQParams"]


def weight_layers(state: QState) -> dict[str, LayerQParams]:
    """The entries of ``state`` that hold weights (Conv2d/Linear layers), without the matmuls."""
    return {n: lp for n, lp in state.items() if isinstance(lp, LayerQParams)}


def mean_weight_bits(state: QState) -> float:
    """Average bits per weight of ``state``'s layers: the codes at their width and every scale as a float32."""
    layers = weight_layers(state).values()
    bits = sum(lp.weight_int.numel() * lp.weight_bits + 32 * lp.weight_scale.numel() for lp in layers)
    return bits / max(1, sum(lp.weight_int.numel() for lp in layers))


# Runs the (float, hooked) model over every calibration batch, calling set_group(g) before a batch of group g.
ForwardAll = Callable[[nn.Module, Callable[[int], None]], None]


def channel_maxima(model: nn.Module, forward_all: ForwardAll, names: list[str], groups: int) -> dict[str, torch.Tensor]:
    """Per layer in ``names``, the absolute maximum of each input channel (last dimension) in each time
    group: float32 [G, C]."""
    obs = {(n, g): ChannelMax() for n in names for g in range(groups)}
    current = {"group": 0}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: obs[(n, current["group"])].update(a[0]))
               for n, m in model.named_modules() if n in names]
    try:
        forward_all(model, lambda g: current.__setitem__("group", g))
    finally:
        for h in handles:
            h.remove()
    missing = [k for k, o in obs.items() if o.value is None]
    if missing:
        raise RuntimeError(f"smoothing: layer {missing[0][0]} received no input in time group {missing[0][1]}")
    return {n: torch.stack([obs[(n, g)].value for g in range(groups)]) for n in names}


def quantize_weight(w: torch.Tensor, bits: int, method: str, group_size: int = 0,
                    hessian: torch.Tensor | None = None, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization -> (codes int8, scale float32 [out] or [out, groups]): nearest rounding, or GPTQ's
    error-compensating rounding under the layer's input ``hessian`` (same scales; damping ``damp``)."""
    qt = weight_qtype(bits)
    scale = weight_scales(w, qt, method, group_size=group_size)
    codes = weight_codes(w, scale, qt) if hessian is None else gptq_codes(w, scale, hessian, qt, damp)
    return codes, scale


@torch.no_grad()
def fit_qstate(model: nn.Module, forward_all: ForwardAll, config: QuantConfig,
               include: Callable[[str], bool] = lambda name: True) -> QState:
    """Observe the inputs of every Conv2d/Linear (for which ``include(name)``), the operands of every
    MatMul and what passes every Site, and fit all quantizers. Layers in ``config.smooth`` are balanced first
    (one more pass over the calibration batches for their channel maxima); their inputs are observed divided by
    the factors."""
    layers = {n: m for n, m in quantizable_layers(model).items() if include(n)}
    matmuls = {n: m for n, m in matmul_modules(model).items() if include(n)}
    glue = {n: m for n, m in sites(model).items() if include(n)}
    if not layers:
        raise ValueError("fit_qstate: the model has no Conv2d or Linear layer to quantize")
    G = config.time_groups
    smoothed = [n for n in layers if n in config.smooth]
    if bad := [n for n in smoothed if not isinstance(layers[n], nn.Linear)]:
        raise ValueError(f"fit_qstate: smoothing is for linear layers, not {bad[0]!r}")
    maxima = channel_maxima(model, forward_all, smoothed, G) if smoothed else {}
    factors = {n: smoothing_factors(maxima[n], layers[n].weight, config.smooth_alpha) for n in smoothed}
    parts = {n: 2 if n in config.splits else 1 for n in layers} | {n: 1 for n in (*matmuls, *glue)}
    unknown = sorted(set(config.output_layers) - set(layers))
    if unknown:
        raise ValueError(f"fit_qstate: output layer {unknown[0]!r} is not a quantized layer of the model")
    sides = {n: ("in", "out") if n in config.output_layers else ("in",) for n in layers} | \
        {n: ("a", "b") for n in matmuls} | {n: ("in",) for n in glue}
    obs = {(n, g, p, side): ActObserver(config.act_samples, seed=2 * i + (side in ("out", "b")))
           for i, n in enumerate(sides) for g in range(G) for p in range(parts[n]) for side in sides[n]}
    hessians = {n: Hessian(m) for n, m in layers.items() if config.gptq_for(m)}
    current = {"group": 0}

    def set_group(g: int) -> None:
        if not 0 <= g < G:
            raise ValueError(f"time group {g} is not allowed: expected 0..{G - 1}")
        current["group"] = g

    def observe(n: str, p: int, side: str, x: torch.Tensor) -> None:
        g = current["group"]
        try:
            obs[(n, g, p, side)].update(x)
        except FloatingPointError as e:  # the observer refuses non-finite values
            what = {"in": "input", "out": "output", "a": "first operand", "b": "second operand"}[side]
            raise NumericalError(f"layer {n}, time group {g}: {what} has {e} during calibration (the "
                                 "full-precision model overflows on the calibration set)") from None

    def hook(_m: nn.Module, args: tuple, n: str) -> None:
        x = args[0]
        if n in glue:
            observe(n, 0, "in", x)
        elif n in matmuls:
            observe(n, 0, "a", x)
            observe(n, 0, "b", args[1])
        else:
            x = x / factors[n].to(x.device) if n in factors else x  # a balanced layer sees x / s (never split)
            if parts[n] == 1:
                observe(n, 0, "in", x)
            else:
                k = config.splits[n]
                observe(n, 0, "in", x[:, :k])
                observe(n, 1, "in", x[:, k:])
            if n in hessians:  # after the observers, which refuse non-finite inputs with the layer's name
                hessians[n].update(x)

    def out_hook(m: nn.Module, args: tuple, y: torch.Tensor, n: str) -> None:
        if parts[n] == 1:
            observe(n, 0, "out", y)
        else:  # the two partial products (without bias) that the split layer quantizes
            x, k = args[0], config.splits[n]
            observe(n, 0, "out", m._conv_forward(x[:, :k], m.weight[:, :k], None))
            observe(n, 1, "out", m._conv_forward(x[:, k:], m.weight[:, k:], None))

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in (layers | matmuls | glue).items()]
    handles += [m.register_forward_hook(lambda m, a, y, n=n: out_hook(m, a, y, n))
                for n, m in layers.items() if n in config.output_layers]
    try:
        forward_all(model, set_group)
    finally:
        for h in handles:
            h.remove()

    def fitted(name: str, side: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        aq = act_qtype(bits)
        scales, zps = torch.empty(G, parts[name]), torch.empty(G, parts[name])
        for g in range(G):
            for p in range(parts[name]):
                o = obs.pop((name, g, p, side))  # each observer's sample is freed once fitted
                if not o.seen:
                    raise RuntimeError(f"fit_qstate: layer {name} received no input in time group {g} during calibration")
                scales[g, p], zps[g, p] = o.qparams(aq, config.act_range, config.act_symmetric)
        return scales, zps

    state: QState = {}
    for name, layer in layers.items():
        scales, zps = fitted(name, "in", config.act_bits)
        out_s, out_z = fitted(name, "out", config.act_bits) if "out" in sides[name] else (None, None)
        bits = config.bits_for(name)
        smooth = factors.get(name)
        w = layer.weight if smooth is None else layer.weight * smooth.to(layer.weight.device)
        hessian = hessians.pop(name).value() if name in hessians else None
        codes, w_scale = quantize_weight(w, bits, config.weight_range, config.group_size_for(name), hessian,
                                         config.gptq_damp)
        state[name] = LayerQParams(
            kind="conv2d" if isinstance(layer, nn.Conv2d) else "linear",
            weight_bits=bits, act_bits=config.act_bits, weight_int=codes, weight_scale=w_scale,
            act_scale=scales, act_zero_point=zps, act_split=config.splits.get(name),
            out_scale=out_s, out_zero_point=out_z, smooth=smooth)
    for name in matmuls:
        a_bits, b_bits = config.operand_bits_for(name)
        (a_s, a_z), (b_s, b_z) = fitted(name, "a", a_bits), fitted(name, "b", b_bits)
        state[name] = MatMulQParams(a_bits, b_bits, a_s, a_z, b_s, b_z)
    for name in glue:
        state[name] = SiteQParams(config.act_bits, *fitted(name, "in", config.act_bits))
    return state


def apply_qstate(model: nn.Module, state: QState) -> nn.Module:
    """Replace each float layer named in ``state`` by its quantized twin (in place); returns model."""
    layers, matmuls, glue = quantizable_layers(model), matmul_modules(model), sites(model)
    for name, lp in state.items():
        if isinstance(lp, SiteQParams):
            if name not in glue:
                raise KeyError(f"apply_qstate: the model has no Site module named {name!r}")
            check_act_qparams(name, "glue", lp.scale, lp.zero_point, lp.bits)
            device = next(model.parameters()).device
            set_module(model, name, QuantSite(lp.bits, lp.scale, lp.zero_point).to(device))
            continue
        if isinstance(lp, MatMulQParams):
            if name not in matmuls:
                raise KeyError(f"apply_qstate: the model has no MatMul module named {name!r}")
            check_act_qparams(name, "first operand", lp.a_scale, lp.a_zero_point, lp.a_bits)
            check_act_qparams(name, "second operand", lp.b_scale, lp.b_zero_point, lp.b_bits)
            set_module(model, name, QuantMatMul(ActQuantizer(lp.a_bits, lp.a_scale, lp.a_zero_point),
                                                ActQuantizer(lp.b_bits, lp.b_scale, lp.b_zero_point)))
            continue
        if name not in layers:
            raise KeyError(f"apply_qstate: the model has no Conv2d/Linear layer named {name!r}")
        float_layer = layers[name]
        check_layer_qparams(name, lp.weight_int, lp.weight_scale, lp.weight_bits, lp.act_scale, lp.act_zero_point,
                            lp.act_bits, lp.out_scale, lp.out_zero_point)
        act = ActQuantizer(lp.act_bits, lp.act_scale, lp.act_zero_point, split=lp.act_split)
        out = None if lp.out_scale is None else \
            ActQuantizer(lp.act_bits, lp.out_scale, lp.out_zero_point, split=lp.act_split)
        if lp.smooth is not None:
            check_smoothing(name, lp.smooth, float_layer.weight.shape[-1])
            q = QuantLinear(float_layer, lp.weight_int, lp.weight_scale, lp.weight_bits, act, out, smooth=lp.smooth)
        else:
            cls = QuantConv2d if isinstance(float_layer, nn.Conv2d) else QuantLinear
            q = cls(float_layer, lp.weight_int, lp.weight_scale, lp.weight_bits, act, out)
        q.to(float_layer.weight.device)
        set_module(model, name, q)
    return model


def qstate_of(model: nn.Module) -> QState:
    """The current quantizer parameters of every quantized layer of ``model`` (detached copies)."""
    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone()

    out: QState = {}
    for name, q in quant_layers(model).items():
        act, oq = q.act, q.out
        out[name] = LayerQParams(
            kind="conv2d" if isinstance(q, QuantConv2d) else "linear", weight_bits=q.wqtype.bits,
            act_bits=act.qtype.bits, weight_int=copy(q.weight_int), weight_scale=copy(q.weight_scale),
            act_scale=copy(act.scale), act_zero_point=copy(act.zero_point), act_split=act.split,
            out_scale=None if oq is None else copy(oq.scale),
            out_zero_point=None if oq is None else copy(oq.zero_point), smooth=copy(q.smooth))
    for name, m in quant_matmuls(model).items():
        out[name] = MatMulQParams(m.qa.qtype.bits, m.qb.qtype.bits, copy(m.qa.scale), copy(m.qa.zero_point),
                                  copy(m.qb.scale), copy(m.qb.zero_point))
    for name, q in quant_sites(model).items():
        out[name] = SiteQParams(q.qtype.bits, copy(q.scale), copy(q.zero_point))
    return out
