"""The deployable graphs: ONNX of the quantized denoiser that onnxruntime runs with integer kernels.

Every quantized layer is traced as QuantizeLinear/DequantizeLinear around a float Conv/MatMul/Gemm
(see pqd.core.onnx_qdq): the weights are int8 initializers (4-bit weights are int8 values on the
4-bit grid) and every activation scale is a constant, which is what lets onnxruntime fuse the pattern
into QLinearConv / QLinearMatMul / QGemm. Time-aware activation parameters are kept exactly: one graph
per time group (``onnx/unet.g<g>.onnx``, small: graph and scales only), all reading the initializers
they share (weights, biases, norms) from one file, ``onnx/weights.bin``. A graph takes every input the
denoiser takes, by name: ``sample`` [B, C, H, W], ``timestep`` [B] and the conditioning inputs of conditioned
models (``encoder_hidden_states``, ``class_labels``, ``pooled_projections``, ``encoder_attention_mask``, ...;
see :meth:`pqd.diffusion.adapter.Denoiser.example_inputs`); its output is ``noise``.

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
from pqd.diffusion.adapter import Denoiser

ONNX_DIR = "onnx"
WEIGHTS_FILE = "weights.bin"
OPSET = 17
_ALIGN = 64
_INLINE_MAX = 64  # initializers smaller than this (scalars, per-group constants) stay in the graph
def graph_file(group: int) -> str:
    return f"unet.g{group}.onnx"


class _Forward(nn.Module):
    """The denoiser's call with the graph's positional inputs: sample, timestep, then the conditioning by name."""

    def __init__(self, unet: nn.Module, den: Denoiser, cond_names: list[str]) -> None:
        super().__init__()
        self.unet, self.call, self.cond_names = unet, den.call, cond_names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.call(self.unet, sample, timestep, dict(zip(self.cond_names, cond)) or None)


def export_unet(unet: nn.Module, den: Denoiser) -> bytes:
    """``unet`` (``den``'s network, float or quantized, as it is set) as ONNX bytes: the named inputs of
    ``den.example_inputs`` (sample, timestep, conditioning), output ``noise``, dynamic batch."""
    inputs = den.example_inputs(2)
    names = list(inputs)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts and our constant scales
        torch.onnx.export(_Forward(unet, den, names[2:]).eval(), tuple(inputs.values()), buf, dynamo=False,
                          opset_version=OPSET, input_names=names, output_names=["noise"],
                          dynamic_axes={n: {0: "batch"} for n in [*names, "noise"]})
    return buf.getvalue()


def trace_group(unet: nn.Module, group: int, den: Denoiser) -> onnx.ModelProto:
    """The ONNX graph of the quantized ``unet`` with the activation parameters of time group ``group``."""
    set_time_group(unet, group)
    set_onnx_mode(unet, True)
    try:
        return onnx.load_from_string(export_unet(unet, den))
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


def write_onnx(unet: nn.Module, groups: TimeGroups, den: Denoiser, folder: Path) -> dict[str, Any]:
    """Write one graph per time group into ``folder``; every initializer of at least ``_INLINE_MAX`` bytes goes
    to weights.bin, stored once by content (the groups' graphs share weights, biases and norms, whatever
    names the tracer gave the tensors it folded). ``den`` says how the network is called (its inputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = [trace_group(unet, g, den) for g in range(groups.count)]
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
        m.doc_string = f"PQD quantized {type(unet).__name__}, time group {g} of {groups.count}"
        onnx.save(m, folder / graph_file(g))
    int8 = [t for t in models[0].graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return {"onnx_graphs": groups.count, "onnx_int8_initializers": len(int8),
            "onnx_shared_bytes": (folder / WEIGHTS_FILE).stat().st_size,
            "onnx_graph_bytes": sum((folder / graph_file(g)).stat().st_size for g in range(groups.count))}


