"""The deployable graphs: ONNX of the quantized denoiser that onnxruntime runs with integer kernels.

Every quantized layer is traced as QuantizeLinear/DequantizeLinear around a float Conv/MatMul/Gemm, with int8
weight initializers (4-bit weights stored as INT4, two a byte: :mod:`pqd.deploy.int4`) and constant scales, the pattern onnxruntime
fuses into QLinearConv / QLinearMatMul / QGemm. One graph per time group (``onnx/unet.g<g>.onnx``: graph and
scales only), all reading the initializers they share (weights, biases, norms) from ``onnx/weights.bin``. A graph
takes the denoiser's inputs by name (:meth:`pqd.diffusion.adapter.Denoiser.example_inputs`); its output is ``noise``.

The network is traced once by the torch.export-based exporter (:func:`export_graph`, the one place that calls
it); everything that depends on the time group lives in initializers named after the buffers that hold it
(``*.onnx_*``, :func:`pqd.core.modules.set_onnx_mode`), so each group's graph is the traced one with its values.
The traced wrapper states that every input has the sample's batch, so that the batch is one symbol (PixArt
reshapes its text mask with the text's batch and the sample's, which torch.export cannot relate otherwise).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper
import onnxscript.optimizer
from onnxscript import opset20 as op
from onnxscript import opset21 as op21

import pqd.core.onnx_qdq  # noqa: F401 (registers the pqd:: operators the translations below refer to)
from pqd.core.modules import onnx_values, set_onnx_mode
from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.deploy.int4 import pack_int4
from pqd.deploy.rewrite import rewrite
from pqd.diffusion.adapter import Denoiser

ONNX_DIR = "onnx"
WEIGHTS_FILE = "weights.bin"
OPSET = 20  # 20: GELU is one node (Gelu, approximate="tanh" in DiT blocks), not seven float ops
BLOCKED_OPSET = 21  # a graph with per-group weight scales (blocked DequantizeLinear)
_ALIGN = 64
_INLINE_MAX = 64  # initializers smaller than this (scalars, per-group constants) stay in the graph
# on-disk name of the export format (format_version 1, released): the graph files (onnx/unet.g<g>.onnx) and the
# module prefix of every node and initializer name in them say "unet" whatever the denoiser network is (a UNet or
# a transformer); kept as it is so that existing exports read, and new ones compare, as before
GRAPH_STEM = "unet"


def graph_file(group: int) -> str:
    return f"{GRAPH_STEM}.g{group}.onnx"


def _act_qdq(x, scale, zero_point):
    """pqd::act_qdq: x on the uint8 grid of (scale [], zero_point [])."""
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _weight_dq(codes, scale, zero_point):
    """pqd::weight_dq: int8 codes [out, ...] dequantized per output channel."""
    return op.DequantizeLinear(codes, scale, zero_point, axis=0)


def _weight_dq_blocked(codes, scale, block: int, shape):
    """pqd::weight_dq_blocked: int8 codes [out, d] dequantized per block of ``block`` columns (a blocked
    DequantizeLinear, opset 21: the graph's opset is raised to 21 where one is, see :func:`export_graph`), reshaped to
    the weight's ``shape``."""
    w = op21.DequantizeLinear(codes, scale, axis=1, block_size=block)
    return op.Reshape(w, op.Constant(value_ints=list(shape)))


def _squeeze_dim(x, dim: int):
    """aten::squeeze.dim as torch computes it: a no-op where dimension ``dim`` is not 1 (torchlib's translation
    emits Squeeze regardless, which onnxruntime refuses: PixArt's ``squeeze(1)`` of its [B, tokens, C] output)."""
    shape = x.shape
    if shape is not None and (len(shape) == 0 or (isinstance(shape[dim], int) and shape[dim] != 1)):
        return op.Identity(x)
    return op.Squeeze(x, [dim])


TRANSLATIONS = {torch.ops.pqd.act_qdq.default: _act_qdq, torch.ops.pqd.weight_dq.default: _weight_dq,
                torch.ops.pqd.weight_dq_blocked.default: _weight_dq_blocked,
                torch.ops.aten.squeeze.dim: _squeeze_dim}


def export_graph(module: nn.Module, args: Sequence[torch.Tensor], input_names: list[str],
                 output_names: list[str]) -> onnx.ModelProto:
    """``module(*args)`` as an ONNX graph (opset ``OPSET``, or ``BLOCKED_OPSET`` with per-group weight scales; dimension 0 of every input and output dynamic), traced
    by torch.export with pqd's quantization operators translated to QuantizeLinear/DequantizeLinear. Parameters
    and buffers become initializers named by their qualified names (kept: constant folding only, see below)."""
    batch = torch.export.Dim.DYNAMIC  # not Dim("batch"): diffusers branches on batch >= 64 (a no-op for ONNX)
    # per-group weight scales need the blocked DequantizeLinear of opset 21 (which changes no op the graphs use
    # otherwise: 21 only widens types)
    opset = BLOCKED_OPSET if any(getattr(m, "grouped", False) for m in module.modules()) else OPSET
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # tracer notes about diffusers' shape checks
        program = torch.onnx.export(module.eval(), tuple(args), dynamo=True, optimize=False, verbose=False,
                                    opset_version=opset, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=_batch_dims(module, len(args), batch),
                                    custom_translation_table=TRANSLATIONS)
    # fold what is constant (casts and expansions of parameters) but nothing else: onnxscript's full optimizer
    # would also merge equal initializers and nodes, and pqd needs every initializer under its own name
    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    return _tidy(program.model_proto)


def _batch_dims(module: nn.Module, n: int, batch: Any) -> tuple:
    """Dimension 0 of each of ``n`` positional inputs dynamic, in the structure of ``module.forward``'s signature:
    torch.export takes the inputs gathered by a ``*args`` parameter (the conditioning of :class:`_Forward`) as one
    tuple, whose dynamic shapes must be a tuple too."""
    params = inspect.signature(module.forward).parameters.values()
    named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    dims: list[Any] = [{0: batch} for _ in range(min(named, n))]
    if n > named and any(p.kind == p.VAR_POSITIONAL for p in params):
        dims.append(tuple({0: batch} for _ in range(n - named)))
    return tuple(dims)


def _tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name the dynamic batch dimension ``batch``; drop the exporter's per-node metadata (stack traces with local
    paths: the bulk of the file, and not reproducible), keeping each node's module in its name
    (``unet.down_blocks.0.resnets.0.conv1/node_conv2d_3``) so that profiles and kernel reports read by module."""
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the exporter's name for it
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if batch and d.dim_param == batch:
                d.dim_param = "batch"
    for n in model.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]") or "[]")[:-1]  # modules, then the op
        if scopes and scopes[-1]:
            n.name = f"{scopes[-1]}/{n.name}"
        del n.metadata_props[:]
        n.doc_string = ""
    return model


class _Forward(nn.Module):
    """The denoiser's call with the graph's positional inputs: sample, timestep, then the conditioning by name."""

    def __init__(self, net: nn.Module, den: Denoiser, cond_names: list[str]) -> None:
        super().__init__()
        self.add_module(GRAPH_STEM, net)  # the network's module path is the prefix of the graph's names
        self.call, self.cond_names = den.call, cond_names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        for x in (timestep, *cond):  # one batch: torch.export gives each input's dimension 0 its own symbol
            torch._check(x.shape[0] == sample.shape[0])
        return self.call(getattr(self, GRAPH_STEM), sample, timestep, dict(zip(self.cond_names, cond)) or None)


def _trace(net: nn.Module, den: Denoiser) -> tuple[onnx.ModelProto, nn.Module]:
    inputs = den.example_inputs(2)
    names = list(inputs)
    wrapper = _Forward(net, den, names[2:])
    return export_graph(wrapper, tuple(inputs.values()), names, ["noise"]), wrapper


def export_net(net: nn.Module, den: Denoiser) -> bytes:
    """``net`` (``den``'s network, float or quantized, as it is set) as ONNX bytes: the named inputs of
    ``den.example_inputs`` (sample, timestep, conditioning), output ``noise``, dynamic batch."""
    return _trace(net, den)[0].SerializeToString()


def trace_group(net: nn.Module, group: int, den: Denoiser) -> onnx.ModelProto:
    """The ONNX graph of the quantized ``net`` with the activation parameters of time group ``group``."""
    return _traced_groups(net, [group], den)[0]


def _traced_groups(net: nn.Module, groups: list[int], den: Denoiser) -> list[onnx.ModelProto]:
    """The graphs of time groups ``groups``: the network traced once, each graph with its group's values of the
    group-dependent initializers (``*.onnx_*``), the only ones that differ."""
    set_time_group(net, groups[0])
    set_onnx_mode(net, True)
    try:
        base, wrapper = _trace(net, den)
        values = []
        for g in groups:
            set_time_group(net, g)
            set_onnx_mode(net, True)
            values.append({n: v.detach().cpu().numpy().copy() for n, v in onnx_values(wrapper).items()})
    finally:
        set_onnx_mode(net, False)
        set_time_group(net, 0)
    inits = {t.name for t in base.graph.initializer}
    missing = sorted(n for n in values[0] if n not in inits and any((v[n] != values[0][n]).any() for v in values))
    if missing:  # a bug: a group-dependent value that the graph does not hold under its name
        raise RuntimeError(f"ONNX export: the traced graph has no initializer {missing[0]}")
    rewrite(base, values)
    models = []
    for v in values:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        for t in m.graph.initializer:
            if t.name in v:
                t.CopyFrom(numpy_helper.from_array(v[t.name], t.name))
        models.append(m)
    return models


def _externalize(t: onnx.TensorProto, offset: int, length: int) -> None:
    """Point initializer ``t`` at bytes [offset, offset + length) of the shared weights file."""
    name, dtype, dims = t.name, t.data_type, list(t.dims)
    t.Clear()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
        t.external_data.add(key=key, value=str(value))
    t.data_location = onnx.TensorProto.EXTERNAL


def write_onnx(net: nn.Module, groups: TimeGroups, den: Denoiser, folder: Path) -> dict[str, Any]:
    """Write one graph per time group into ``folder``; every initializer of at least ``_INLINE_MAX`` bytes goes
    to weights.bin, stored once by content (the groups' graphs share weights, biases and norms, whatever
    names the tracer gave the tensors it folded). ``den`` says how the network is called (its inputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = _traced_groups(net, list(range(groups.count)), den)
    packed = [pack_int4(m) for m in models][0]  # 4-bit codes stored as 4 bits (pqd.deploy.int4)
    blobs: dict[bytes, tuple[int, int]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for m in models:
            for t in m.graph.initializer:
                data = t.raw_data if t.data_type == onnx.TensorProto.INT4 else numpy_helper.to_array(t).tobytes()
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
        del m.graph.value_info[:]  # intermediate shapes: each runtime infers them (0.4 MB a graph on the CIFAR-10 UNet)
        m.producer_name = "pqd"
        m.doc_string = f"PQD quantized {type(net).__name__}, time group {g} of {groups.count}"
        onnx.save(m, folder / graph_file(g))
    codes = {n.input[0] for n in models[0].graph.node if n.op_type == "DequantizeLinear"}
    int8 = [t for t in models[0].graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name in codes]
    return {"onnx_graphs": groups.count, "onnx_int8_initializers": len(int8), "onnx_int4_initializers": packed,
            "onnx_shared_bytes": (folder / WEIGHTS_FILE).stat().st_size,
            "onnx_graph_bytes": sum((folder / graph_file(g)).stat().st_size for g in range(groups.count))}


