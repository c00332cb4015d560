"""Quantize/dequantize steps as torch operators that an ONNX exporter turns into QuantizeLinear/DequantizeLinear.

Two custom operators (``torch.library``) that compute exactly what the simulated layers compute; ``torch.export``
keeps each as one node, and :mod:`pqd.deploy.onnx` translates ``pqd::act_qdq`` into QuantizeLinear +
DequantizeLinear and ``pqd::weight_dq`` into one DequantizeLinear (axis 0), which onnxruntime fuses into integer
kernels, and ``pqd::weight_dq_blocked`` (per-group weight scales) into a blocked DequantizeLinear (axis 1, opset 21)
and a Reshape: a weight-only layer, which no runtime here runs on an integer kernel. Their parameters are tensors, not numbers, so that they are graph initializers named after the buffers
that hold them (:func:`pqd.core.modules.set_onnx_mode`).
"""

from __future__ import annotations

import torch

from pqd.core.affine import fake_quantize
from pqd.core.qtypes import act_qtype

_U8 = act_qtype(8)


@torch.library.custom_op("pqd::act_qdq", mutates_args=())
def act_qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x -> (clamp(round(x / scale) + zp, 0, 255) - zp) * scale; scale float32 [], zero_point uint8 []."""
    return fake_quantize(x, scale, zero_point.to(torch.float32), _U8)


@act_qdq.register_fake
def _act_qdq_shape(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("pqd::weight_dq", mutates_args=())
def weight_dq(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, ...] -> float32 (codes - zero_point) * scale, per output channel (scale, zero_point [out])."""
    shape = [-1] + [1] * (codes.ndim - 1)
    return (codes.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)


@weight_dq.register_fake
def _weight_dq_shape(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("pqd::weight_dq_blocked", mutates_args=())
def weight_dq_blocked(codes: torch.Tensor, scale: torch.Tensor, block: int, shape: list[int]) -> torch.Tensor:
    """int8 codes [out, d] (a weight [out, in, ...] flattened per output channel) -> float32 weight of ``shape``:
    column j of row o times scale[o, j // block] (scale [out, ceil(d / block)])."""
    s = scale.repeat_interleave(block, dim=1)[:, :codes.shape[1]]
    return (codes.to(torch.float32) * s).reshape(shape)


@weight_dq_blocked.register_fake
def _weight_dq_blocked_shape(codes: torch.Tensor, scale: torch.Tensor, block: int, shape: list[int]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=codes.device)
