"""Quantize/dequantize steps that trace into ONNX QuantizeLinear/DequantizeLinear nodes.

Each function computes exactly what the simulated layers compute (so a traced graph and the torch model
agree), and declares the ONNX nodes that express it, so that onnxruntime can fuse them into integer
kernels (QLinearConv, QLinearMatMul, QGemm):

- :class:`ActQDQ`: an activation on the uint8 grid with a constant scale and zero point;
- :class:`WeightDQ`: a weight held as int8 codes (the module buffer becomes an int8 initializer),
  dequantized per output channel.

Pure torch: nothing here writes files.
"""

from __future__ import annotations

import torch

from pqd.core.affine import fake_quantize
from pqd.core.qtypes import act_qtype


class ActQDQ(torch.autograd.Function):
    """x -> (clamp(round(x / scale) + zp, 0, 255) - zp) * scale, exported as QuantizeLinear + DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:  # noqa: D102
        return fake_quantize(x, torch.tensor(scale), torch.tensor(float(zero_point)), act_qtype(8))

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int):  # noqa: D102
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        out = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)
        out.setType(x.type())  # keeps the exporter's shape knowledge (else diffusers' squeeze(1) becomes an If)
        return out


class WeightDQ(torch.autograd.Function):
    """int8 codes [out, ...] * scale [out] -> float weight, exported as one DequantizeLinear (axis 0)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shape = [-1] + [1] * (codes.ndim - 1)
        return codes.to(torch.float32) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale):  # noqa: D102
        n = codes.type().sizes()[0]
        z = g.op("Constant", value_t=torch.zeros(n, dtype=torch.int8))
        out = g.op("DequantizeLinear", codes, scale, z, axis_i=0)
        out.setType(codes.type().with_dtype(torch.float32))
        return out


def act_qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """:class:`ActQDQ` with the parameters taken as Python numbers (constants of the traced graph)."""
    return ActQDQ.apply(x, float(scale), int(zero_point))
