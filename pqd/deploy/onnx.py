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
    model = onnx.load_from_string(buf.getvalue())
    return fold_static_conditionals(model).SerializeToString() if any(n.op_type == "If" for n in model.graph.node) \
        else buf.getvalue()


def _static_condition(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], dims: dict[str, list[int | None]]
                      ) -> bool | None:
    """The value of an If node's condition when it compares one static dimension with a constant
    (Equal(Gather(Shape(t), k), c), as the tracer writes ``squeeze(dim)``), else None."""
    eq = producer.get(node.input[0])
    if eq is None or eq.op_type != "Equal":
        return None
    gather, const = producer.get(eq.input[0]), producer.get(eq.input[1])
    shape = producer.get(gather.input[0]) if gather is not None and gather.op_type == "Gather" else None
    index = producer.get(gather.input[1]) if shape is not None else None
    if shape is None or shape.op_type != "Shape" or any(p is None or p.op_type != "Constant" for p in (index, const)):
        return None
    k = int(numpy_helper.to_array(index.attribute[0].t).reshape(-1)[0])
    dim = dims.get(shape.input[0], [])
    if not -len(dim) <= k < len(dim) or dim[k] is None:
        return None
    return dim[k] == int(numpy_helper.to_array(const.attribute[0].t).reshape(-1)[0])


def fold_static_conditionals(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each If node whose condition is a static dimension by the branch it takes.

    The TorchScript tracer writes ``x.squeeze(1)`` on a dimension it could not size (after a reshape with -1 and
    a dynamic batch) as If(dim == 1, Squeeze, Identity); onnxruntime then refuses the graph, because shape
    inference, which does know the dimension, finds the untaken Squeeze invalid (diffusers' PixArt transformer)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        taken = _static_condition(node, producer, dims) if node.op_type == "If" else None
        if taken is None:
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
        rename = {o.name: out for o, out in zip(branch.output, node.output)}
        for sub in branch.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(sub)
            for i, o in enumerate(copy.output):
                copy.output[i] = rename.setdefault(o, f"{node.name}/{o}")
            for i, x in enumerate(copy.input):
                copy.input[i] = rename.get(x, x)
            nodes.append(copy)
    used = {o.name for o in model.graph.output}  # drop what only fed the folded conditions
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in used for o in node.output):
            kept.append(node)
            used |= set(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    return model


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


