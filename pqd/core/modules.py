"""Quantized drop-in replacements for nn.Conv2d and nn.Linear (simulated integer arithmetic).

A quantized layer holds integer weight codes (int8 tensor; 4-bit codes are int8 values in [-8, 7]),
a float32 scale per output channel, the bias in float, and an activation quantizer for its input
with (scale, zero point) pairs per time group (and per channel part when split).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.adaround import AdaRound
from pqd.core.affine import dequantize, fake_quantize, fake_quantize_ste
from pqd.core.qtypes import QType, act_qtype, weight_qtype


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantization of a layer input, per time group, optionally split.

    ``scale`` and ``zero_point`` have shape [G, P]: G time groups (``group`` picks the row) and P = 1
    part, or P = 2 when ``split`` = k splits the channels (dim 1) into [:k] and [k:] with their own
    parameters (shortcut splitting for UNet skip concatenations).
    ``scale`` is a parameter so reconstruction can learn it (LSQ, straight-through rounding); it has
    no gradient otherwise. ``drop_prob`` > 0 (set only during reconstruction) keeps each element in
    float with that probability (QDrop).
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

    @property
    def num_groups(self) -> int:
        return int(self.scale.shape[0])

    def _fq(self, x: torch.Tensor, part: int) -> torch.Tensor:
        s, z = self.scale[self.group, part], self.zero_point[self.group, part]
        if self.scale.requires_grad:
            n = max(1, x[0].numel())
            g = 1.0 / math.sqrt(n * self.qtype.qmax)  # LSQ gradient scale
            s = (s - s * g).detach() + s * g
            return fake_quantize_ste(x, s, z, self.qtype)
        return fake_quantize(x, s, z, self.qtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            y = self._fq(x, 0)
        else:
            k = self.split
            y = torch.cat([self._fq(x[:, :k], 0), self._fq(x[:, k:], 1)], dim=1)
        if self.drop_prob > 0:
            y = torch.where(torch.rand_like(x) < self.drop_prob, x, y)
        return y


class _QuantWeight:
    """Mixin: integer weight codes + per-channel scales, dequantized once and cached."""

    weight_int: torch.Tensor
    weight_scale: torch.Tensor

    rounding: AdaRound | None

    def _init_qweight(self, weight_int: torch.Tensor, weight_scale: torch.Tensor, bits: int) -> None:
        self.wqtype = weight_qtype(bits)
        codes = weight_int.to(torch.int8)
        if codes.numel() and (int(codes.min()) < self.wqtype.qmin or int(codes.max()) > self.wqtype.qmax):
            raise ValueError(f"weight codes outside the {self.wqtype.name} range")
        self.register_buffer("weight_int", codes.clone())
        self.register_buffer("weight_scale", weight_scale.reshape(-1).to(torch.float32).clone())
        self._w_cache: torch.Tensor | None = None
        self.rounding = None

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer weight codes (e.g. after learned rounding)."""
        self.weight_int.copy_(codes.to(torch.int8))
        self._w_cache = None

    def dequantized_weight(self) -> torch.Tensor:
        """float32 weight = weight_int * weight_scale (per output channel); soft weights while learning rounding."""
        if self.rounding is not None:
            return self.rounding.soft_weight()
        if self._w_cache is None or self._w_cache.device != self.weight_int.device:
            self._w_cache = dequantize(self.weight_int, self.weight_scale, torch.zeros_like(self.weight_scale), axis=0)
        return self._w_cache


class QuantConv2d(_QuantWeight, nn.Module):
    def __init__(self, conv: nn.Conv2d, weight_int: torch.Tensor, weight_scale: torch.Tensor, weight_bits: int,
                 act: ActQuantizer | None) -> None:
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        if weight_int.shape != conv.weight.shape:
            raise ValueError(f"QuantConv2d: codes of shape {tuple(weight_int.shape)} for a weight of {tuple(conv.weight.shape)}")
        self._init_qweight(weight_int, weight_scale, weight_bits)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(_QuantWeight, nn.Module):
    def __init__(self, linear: nn.Linear, weight_int: torch.Tensor, weight_scale: torch.Tensor, weight_bits: int,
                 act: ActQuantizer | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if weight_int.shape != linear.weight.shape:
            raise ValueError(f"QuantLinear: codes of shape {tuple(weight_int.shape)} for a weight of {tuple(linear.weight.shape)}")
        self._init_qweight(weight_int, weight_scale, weight_bits)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), b)


QUANTIZABLE = (nn.Conv2d, nn.Linear)
QuantLayer = QuantConv2d | QuantLinear


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Conv2d and nn.Linear of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_time_group(model: nn.Module, group: int) -> None:
    """Select the activation parameters of time group ``group`` in every quantized layer."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            if not 0 <= group < m.num_groups:
                raise ValueError(f"time group {group} is not allowed: expected 0..{m.num_groups - 1}")
            m.group = group
