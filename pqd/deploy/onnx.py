"""The deployable graphs: ONNX of the quantized UNet that onnxruntime runs with integer kernels.

Every quantized layer is traced as QuantizeLinear/DequantizeLinear around a float Conv/MatMul/Gemm
(see pqd.core.onnx_qdq): the weights are int8 initializers (4-bit weights are int8 values on the
4-bit grid) and every activation scale is a constant, which is what lets onnxruntime fuse the pattern
into QLinearConv / QLinearMatMul / QGemm. Time-aware activation parameters are kept exactly: one graph
per time group (``onnx/unet.g<g>.onnx``, small: graph and scales only), all reading the initializers
they share (weights, biases, norms) from one file, ``onnx/weights.bin``.

:mod:`pqd.deploy.runtime` runs them.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.core.modules import set_onnx_mode

ONNX_DIR = "onnx"
WEIGHTS_FILE = "weights.bin"
OPSET = 17
_ALIGN = 64
_INLINE_MAX = 64  # initializers smaller than this (scalars, per-group constants) stay in the graph
def graph_file(group: int) -> str:
    return f"unet.g{group}.onnx"


class _Forward(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


def export_unet(unet: nn.Module, sample_shape: tuple[int, ...]) -> bytes:
    """``unet`` (float or quantized, as it is set) as ONNX bytes: inputs ``sample`` [B, C, H, W] and ``timestep``
    [B], output ``noise``, dynamic batch."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts and our constant scales
        torch.onnx.export(_Forward(unet).eval(), (torch.zeros(2, *sample_shape), torch.full((2,), 10.0)), buf,
                          dynamo=False, opset_version=OPSET, input_names=["sample", "timestep"], output_names=["noise"],
                          dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "noise": {0: "batch"}})
    return buf.getvalue()


def trace_group(unet: nn.Module, group: int, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The ONNX graph of the quantized ``unet`` with the activation parameters of time group ``group``."""
    set_time_group(unet, group)
    set_onnx_mode(unet, True)
    try:
        return onnx.load_from_string(export_unet(unet, sample_shape))
    finally:
        set_onnx_mode(unet, False)
        set_time_group(unet, 0)


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    return numpy_helper.to_array(t).tobytes()


def _externalize(t: onnx.TensorProto, offset: int, length: int) -> None:
    """Point initializer ``t`` at bytes [offset, offset + length) of the shared weights file."""
    name, dtype, dims = t.name, t.data_type, list(t.dims)
    t.Clear()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
        t.external_data.add(key=key, value=str(value))
    t.data_location = onnx.TensorProto.EXTERNAL


def write_onnx(unet: nn.Module, groups: TimeGroups, sample_shape: tuple[int, ...], folder: Path) -> dict[str, Any]:
    """Write one graph per time group into ``folder``; every initializer of at least ``_INLINE_MAX`` bytes goes
    to weights.bin, stored once by content (the groups' graphs share weights, biases and norms, whatever
    names the tracer gave the tensors it folded)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = [trace_group(unet, g, sample_shape) for g in range(groups.count)]
    blobs: dict[bytes, tuple[int, int]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for m in models:
            for t in m.graph.initializer:
                data = _tensor_bytes(t)
                if len(data) < _INLINE_MAX:
                    continue
                key = hashlib.sha256(data).digest() + bytes([t.data_type])
                if key not in blobs:
                    pad = -f.tell() % _ALIGN
                    f.write(b"\0" * pad)
                    blobs[key] = (f.tell(), len(data))
                    f.write(data)
                _externalize(t, *blobs[key])
    for g, m in enumerate(models):
        m.producer_name = "pqd"
        m.doc_string = f"PQD quantized UNet, time group {g} of {groups.count}"
        onnx.save(m, folder / graph_file(g))
    int8 = [t for t in models[0].graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return {"onnx_graphs": groups.count, "onnx_int8_initializers": len(int8),
            "onnx_shared_bytes": (folder / WEIGHTS_FILE).stat().st_size,
            "onnx_graph_bytes": sum((folder / graph_file(g)).stat().st_size for g in range(groups.count))}


