"""Quantized drop-in replacements for nn.Conv2d and nn.Linear (simulated integer arithmetic).

A quantized layer holds int8 weight codes (4-bit codes are int8 values in [-8, 7]), a float32 scale per output
channel (or per group of input channels of an output channel: scale [out, groups]), a float bias, an input quantizer with (scale, zero point) per time group (and per channel part when
split) and optionally an output quantizer: integer kernels (onnxruntime's QLinearConv/QLinearMatMul) take uint8
in and give uint8 out, so with one the layer computes what the deployed kernel computes. A split input gives two
partial products, each with its own output quantizer, plus the bias (two integer kernels and a float add when
deployed). A balanced (smoothed) linear divides its input channels by ``smooth``; its codes quantize weight x
smooth (pqd.core.smooth). :class:`MatMul` / :class:`QuantMatMul`: the float and quantized product of two
activations (attention's Q·Kᵀ and softmax·V), each operand on its own per-tensor grid per time group.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.adaround import AdaRound
from pqd.core.affine import fake_quantize, fake_quantize_ste, group_width, weight_values
from pqd.core.onnx_qdq import act_qdq, weight_dq, weight_dq_blocked
from pqd.core.qtypes import QType, act_qtype, weight_qtype
from pqd.core.timegroups import TimeGrouped, set_time_group  # noqa: F401 (re-exported)


class ActQuantizer(TimeGrouped, nn.Module):
    """Per-tensor asymmetric fake quantization of a layer input, per time group, optionally split.

    ``scale`` / ``zero_point`` [G, P]: G time groups (``group`` picks the row); P = 2 when ``split`` = k gives
    channels [:k] and [k:] their own parameters (UNet skip concatenations), else 1. ``scale`` is a parameter so
    reconstruction can learn it (LSQ). ``drop_prob`` > 0 (reconstruction only) keeps each element in float with
    that probability (QDrop), drawn from ``drop_generator``: seeded, on the input's device, never the global RNG,
    so reruns are bit-identical. ``onnx`` (see :func:`set_onnx_mode`) computes the same values from the current
    group's parameters in buffers ``onnx_scale<p>`` / ``onnx_zero_point<p>``, through the operator that exports as
    QuantizeLinear/DequantizeLinear (8-bit grids) or as the float arithmetic (wider grids).
    """

    def __init__(self, bits: int, scale: torch.Tensor, zero_point: torch.Tensor, split: int | None = None) -> None:
        super().__init__()
        self.qtype: QType = act_qtype(bits)
        parts = 1 if split is None else 2
        scale = scale.to(torch.float32).reshape(-1, parts)
        zero_point = zero_point.to(torch.float32).reshape(-1, parts)
        if scale.shape != zero_point.shape:
            raise ValueError("ActQuantizer: scale and zero_point must have the same shape [G, P]")
        self.scale = nn.Parameter(scale.clone(), requires_grad=False)
        self.register_buffer("zero_point", zero_point.clone())
        self.split = split
        self.group = 0
        self.drop_prob = 0.0
        self.onnx = False
        self.drop_generator: torch.Generator | None = None

    @property
    def num_groups(self) -> int:
        return int(self.scale.shape[0])

    def freeze_for_onnx(self, on: bool) -> None:
        """Hold the current group's parameters in buffers, the constants of a traced graph (``on``), or drop them."""
        self.onnx = on
        for p in range(self.scale.shape[1]):
            for name in (f"onnx_scale{p}", f"onnx_zero_point{p}"):
                self._buffers.pop(name, None)
            if on:
                z = self.zero_point[self.group, p].detach()
                self.register_buffer(f"onnx_scale{p}", self.scale[self.group, p].detach().clone(), persistent=False)
                self.register_buffer(f"onnx_zero_point{p}", z.to(torch.uint8 if self.qtype.bits == 8 else torch.float32),
                                     persistent=False)

    def _fq(self, x: torch.Tensor, part: int) -> torch.Tensor:
        if self.onnx:
            if self.qtype.bits < 8:
                raise ValueError(f"ONNX export needs 8-bit activations, not {self.qtype.bits}-bit: set quant.act_bits = 8")
            s, z = getattr(self, f"onnx_scale{part}"), getattr(self, f"onnx_zero_point{part}")
            # wider grids (softmax outputs) have no integer kernel: they trace as the float arithmetic
            return act_qdq(x, s, z) if self.qtype.bits == 8 else fake_quantize(x, s, z, self.qtype)
        s, z = self.scale[self.group, part], self.zero_point[self.group, part]
        if self.scale.requires_grad:
            n = max(1, x[0].numel())
            g = 1.0 / math.sqrt(n * self.qtype.qmax)  # LSQ gradient scale
            s = (s - s * g).detach() + s * g
            return fake_quantize_ste(x, s, z, self.qtype)
        return fake_quantize(x, s, z, self.qtype)

    def _drop(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.drop_prob <= 0:
            return y
        if self.drop_generator is None:
            raise RuntimeError("ActQuantizer: QDrop needs a seeded drop_generator (see pqd.core.reconstruct.qdrop)")
        keep = torch.rand(x.shape, generator=self.drop_generator, device=x.device, dtype=x.dtype) < self.drop_prob
        return torch.where(keep, x, y)

    def part(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Fake-quantize ``x`` with the parameters of channel part ``part`` (0 or 1) of the current group."""
        return self._drop(x, self._fq(x, part))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self.part(x, 0)
        k = self.split
        return self._drop(x, torch.cat([self._fq(x[:, :k], 0), self._fq(x[:, k:], 1)], dim=1))


class _QuantWeight:
    """Mixin: integer weight codes + scales (per output channel [out], or per group of input channels [out, groups]:
    ``grouped``), dequantized once and cached."""

    weight_int: torch.Tensor
    weight_scale: torch.Tensor

    rounding: AdaRound | None
    smooth: torch.Tensor | None

    def _init_qweight(self, weight_int: torch.Tensor, weight_scale: torch.Tensor, bits: int) -> None:
        self.wqtype = weight_qtype(bits)
        codes = weight_int.to(torch.int8)
        if codes.numel() and (int(codes.min()) < self.wqtype.qmin or int(codes.max()) > self.wqtype.qmax):
            raise ValueError(f"weight codes outside the {self.wqtype.name} range")
        self.register_buffer("weight_int", codes.clone())
        scale = weight_scale.to(torch.float32)
        if scale.ndim == 2 and scale.shape[1] == 1:
            scale = scale.reshape(-1)  # one group is per output channel
        if scale.ndim not in (1, 2) or scale.shape[0] != codes.shape[0] or (
                scale.ndim == 2 and group_width(codes.shape[1], scale.shape[1]) * (scale.shape[1] - 1) >= codes.shape[1]):
            raise ValueError(f"weight scales of shape {tuple(weight_scale.shape)} for codes of shape {tuple(codes.shape)}: "
                             "expected [out] or [out, groups] with groups <= input channels")
        self.register_buffer("weight_scale", scale.clone())
        self._w_cache: torch.Tensor | None = None
        self.rounding = None
        self.register_buffer("smooth", None)  # set by a balanced QuantLinear
        self.onnx = False

    def folded(self, weight: torch.Tensor) -> torch.Tensor:
        """The float weight that the codes quantize: ``weight``, or weight x smooth when the layer is balanced."""
        return weight if self.smooth is None else weight * self.smooth.to(weight.device)

    @property
    def grouped(self) -> bool:
        """Whether the weight has a scale per group of input channels (no integer kernel takes it: weight-only)."""
        return self.weight_scale.ndim == 2

    def _split(self) -> int | None:
        return None if self.act is None or self.out is None else self.act.split

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias as the layer adds it (current time group)."""
        if self.onnx:
            return getattr(self, "onnx_bias", None)
        if self.bias is None:
            return None
        b, act = self.bias.to(dtype), self.act
        if act is not None and self.out is not None and act.split is None and not self.grouped:
            # an integer kernel adds the bias as int32 on the accumulator's grid
            step = act.scale[act.group, 0].detach() * self.weight_scale
            b = torch.round(b / step) * step
        return b

    def freeze_for_onnx(self, on: bool) -> None:
        """Hold what a traced graph needs of the current group in buffers (``on``) or drop them: ``onnx_bias``,
        the weight's zero points ``onnx_weight_zero_point`` (int8 zeros [out]) and, for a split input, the two
        parts' codes ``onnx_codes0`` / ``onnx_codes1`` (so each part is an int8 initializer of its own); a grouped
        weight's codes as one [out, in x kernel] initializer ``onnx_codes2d`` (what a blocked DequantizeLinear takes)."""
        for name in ("onnx_bias", "onnx_weight_zero_point", "onnx_codes0", "onnx_codes1", "onnx_zero_bias",
                     "onnx_codes2d"):
            self._buffers.pop(name, None)
        self.onnx = False
        if not on:
            return
        b = self._bias(torch.float32)
        if b is not None:
            self.register_buffer("onnx_bias", b.detach().clone(), persistent=False)
        zeros = torch.zeros(self.weight_int.shape[0], dtype=torch.int8, device=self.weight_int.device)
        self.register_buffer("onnx_weight_zero_point", zeros, persistent=False)
        k = self._split()
        if self.grouped:
            self.register_buffer("onnx_codes2d", self.weight_int.reshape(self.weight_int.shape[0], -1).contiguous(),
                                 persistent=False)
        elif k is not None:
            self.register_buffer("onnx_codes0", self.weight_int[:, :k].contiguous(), persistent=False)
            self.register_buffer("onnx_codes1", self.weight_int[:, k:].contiguous(), persistent=False)
            # the partial products have no bias; a zero one keeps the exporter from building one at run time
            self.register_buffer("onnx_zero_bias", torch.zeros(zeros.shape, device=zeros.device), persistent=False)
        self.onnx = True

    def _quantized_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        """``op(x, weight, bias)`` with the input, and the output when there is an output quantizer,
        on their integer grids. A split input runs as two partial products, each quantized, plus the bias."""
        b = self._bias(x.dtype)
        act, out = self.act, self.out
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        k = self._split()
        if k is None:
            w = self.dequantized_weight().to(x.dtype)
            if act is None:
                return op(x, w, b)
            if out is None:
                return op(act(x), w, b)
            return out.part(op(act.part(x, 0), w, b), 0)
        zero = None
        if self.onnx and not self.grouped:  # each part's int8 codes keep their own DequantizeLinear
            w0, w1 = (weight_dq(c, self.weight_scale, self.onnx_weight_zero_point) for c in (self.onnx_codes0, self.onnx_codes1))
            zero = self.onnx_zero_bias
        else:
            w = self.dequantized_weight().to(x.dtype)
            w0, w1 = w[:, :k], w[:, k:]
        y = out.part(op(act.part(x[:, :k], 0), w0, zero), 0) + out.part(op(act.part(x[:, k:], 1), w1, zero), 1)
        return y if b is None else y + b.reshape(-1, 1, 1)  # splits exist only for convolutions

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer weight codes (e.g. after learned rounding)."""
        self.weight_int.copy_(codes.to(torch.int8))
        self._w_cache = None

    def dequantized_weight(self) -> torch.Tensor:
        """float32 weight = weight_int * weight_scale; soft weights while learning rounding."""
        if self.rounding is not None:
            return self.rounding.soft_weight()
        if self.onnx:  # the codes stay an int8 tensor in the traced graph
            if self.grouped:
                codes = self.weight_int
                block = group_width(codes.shape[1], self.weight_scale.shape[1]) * codes[0, 0].numel()
                return weight_dq_blocked(self.onnx_codes2d, self.weight_scale, block, list(codes.shape))
            return weight_dq(self.weight_int, self.weight_scale, self.onnx_weight_zero_point)
        if self._w_cache is None or self._w_cache.device != self.weight_int.device:
            self._w_cache = weight_values(self.weight_int, self.weight_scale)
        return self._w_cache


class QuantConv2d(_QuantWeight, nn.Module):
    def __init__(self, conv: nn.Conv2d, weight_int: torch.Tensor, weight_scale: torch.Tensor, weight_bits: int,
                 act: ActQuantizer | None, out: ActQuantizer | None = None) -> None:
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        if weight_int.shape != conv.weight.shape:
            raise ValueError(f"QuantConv2d: codes of shape {tuple(weight_int.shape)} for a weight of {tuple(conv.weight.shape)}")
        self._init_qweight(weight_int, weight_scale, weight_bits)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.act, self.out = act, out
        if act is not None and act.split is not None and conv.groups != 1:
            raise ValueError("QuantConv2d: a split input needs groups = 1")

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantized_forward(x, self._conv)


class QuantLinear(_QuantWeight, nn.Module):
    def __init__(self, linear: nn.Linear, weight_int: torch.Tensor, weight_scale: torch.Tensor, weight_bits: int,
                 act: ActQuantizer | None, out: ActQuantizer | None = None, smooth: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if weight_int.shape != linear.weight.shape:
            raise ValueError(f"QuantLinear: codes of shape {tuple(weight_int.shape)} for a weight of {tuple(linear.weight.shape)}")
        self._init_qweight(weight_int, weight_scale, weight_bits)
        if smooth is not None:  # a buffer: it moves with the layer and traces into ONNX as a constant divisor
            self.register_buffer("smooth", smooth.reshape(-1).to(torch.float32).clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.act, self.out = act, out
        if act is not None and act.split is not None:
            raise ValueError("QuantLinear: split inputs are for convolutions over skip concatenations")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx and self.act is not None:
            # shapes chosen for onnxruntime's QDQ fusions (the arithmetic is the same): a quantized output is traced
            # as a 2-D Gemm whose Q follows it directly -> QGemm with an int8 output (a [B, L, C] linear is a MatMul
            # plus a bias Add, which stays in float with its Q); a float output as a MatMul -> MatMulIntegerToFloat
            # (a Gemm with a float output stays in float with its weight dequantized at every call)
            if self.out is not None and x.ndim > 2:
                y = self._quantized_forward(x.reshape(-1, x.shape[-1]), F.linear)
                return y.reshape(*x.shape[:-1], y.shape[-1])
            if self.out is None and x.ndim == 2:
                return self._quantized_forward(x.unsqueeze(1), F.linear).squeeze(1)
        return self._quantized_forward(x, F.linear)


class MatMul(nn.Module):
    """``a @ b`` as a module: the float form of a product of two activations (attention's Q·Kᵀ and
    softmax·V), so calibration can observe its operands and quantization can replace it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class QuantMatMul(nn.Module):
    """``a @ b`` with each operand on its own per-tensor integer grid (per time group): ``qa`` and ``qb``
    quantize the operands; an 8-bit pair is what an integer matmul kernel takes."""

    def __init__(self, qa: ActQuantizer, qb: ActQuantizer) -> None:
        super().__init__()
        if qa.num_groups != qb.num_groups:
            raise ValueError("QuantMatMul: the two operand quantizers need the same number of time groups")
        self.qa, self.qb = qa, qb

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.qa(a), self.qb(b))


class Site(nn.Module):
    """A point between layers where an activation can go on an integer grid (the output of a residual add, a skip
    concatenation, a sigmoid, ...): the identity, observed by calibration and replaced by a :class:`QuantSite`.
    Where sites sit is the adapter's knowledge (pqd.diffusion.glue)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class QuantSite(ActQuantizer):
    """A :class:`Site` on its unsigned per-tensor grid, per time group (scale and zero point [G, 1])."""


QUANTIZABLE = (nn.Conv2d, nn.Linear)
QuantLayer = QuantConv2d | QuantLinear


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Conv2d and nn.Linear of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def matmul_modules(model: nn.Module) -> dict[str, MatMul]:
    """Every float :class:`MatMul` of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MatMul)}


def quant_matmuls(model: nn.Module) -> dict[str, QuantMatMul]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantMatMul)}


def sites(model: nn.Module) -> dict[str, Site]:
    """Every float :class:`Site` of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Site)}


def quant_sites(model: nn.Module) -> dict[str, QuantSite]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantSite)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_onnx_mode(model: nn.Module, on: bool) -> None:
    """Trace-for-ONNX mode: with ``on``, the current time group's parameters are held in buffers ``onnx_*`` that
    a traced graph reads as named constants; the values do not change. Call it again after switching group."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.freeze_for_onnx(on)
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.freeze_for_onnx(on)


def onnx_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that :func:`set_onnx_mode` holds, by qualified name: everything of a traced graph that
    depends on the time group."""
    return {n: b for n, b in model.named_buffers() if n.rpartition(".")[2].startswith("onnx_")}


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]
