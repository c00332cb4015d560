"""The kernel audit: which of a graph's quantized layers a runtime really runs on integer kernels.

A quantized layer is a Conv / ConvTranspose / MatMul / Gemm of the exported ONNX graph whose weight comes from a
DequantizeLinear (the export ships no float copy of a quantized weight). A runtime fuses such a layer, with the
Q/DQ pairs around it, into an integer kernel; where it does not, the layer falls back to float: the int8 weights are
dequantized and multiplied in float, and the artifact pays the quantization error without the speed. The export
records the audit per runtime (export metrics ``onnx_kernels``) and the release gate refuses a fallback.

Two cases are reported apart, not as fallbacks. A layer with per-group weight scales (``quant.weight_group_size``,
a blocked DequantizeLinear): no runtime here has an integer kernel that rescales per group inside a dot product, so
it is weight-only by design (4-bit in the artifact, float arithmetic). And a layer whose output is the graph's output
(the noise prediction), which the export keeps in float. onnxruntime has no fused integer convolution with a float output, so it runs that
layer in float; OpenVINO runs it on an integer kernel with a float dequantization after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ops a weight may pass through between its DequantizeLinear and the layer (reshapes, runtime layout changes)
_WEIGHT_PATH = ("Transpose", "Reshape", "ReorderInput", "Unsqueeze", "Squeeze", "Slice")  # Slice: a grouped split layer
# ops between a layer and the graph's output that keep its output float by design (bias, casts, reshapes)
_OUTPUT_PATH = ("Add", "Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze")


def weight_dequantize(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                      constants: set[str]) -> onnx.NodeProto | None:
    """The DequantizeLinear of a constant (``constants``: the names of the graph's initializers) that ``node``'s
    second input (its weight) comes from, through layout ops, or None. (An activation dequantized in front of a
    matmul is not a weight: attention's Q·Kᵀ and softmax·V.)"""
    if len(node.input) < 2:
        return None
    name = node.input[1]
    while name in producers:
        p = producers[name]
        if p.op_type == "DequantizeLinear":
            const = p.input[0] in constants or (p.input[0] in producers and producers[p.input[0]].op_type == "Constant")
            return p if const else None
        if p.op_type not in _WEIGHT_PATH or not p.input:
            return None
        name = p.input[0]
    return None


def weight_from_dequantize(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], constants: set[str]) -> bool:
    """Whether ``node``'s weight is a DequantizeLinear of a constant (:func:`weight_dequantize`)."""
    return weight_dequantize(node, producers, constants) is not None


def blocked(dq: onnx.NodeProto) -> bool:
    """Whether a DequantizeLinear has a scale per block along its axis (per-group weight scales, opset 21)."""
    return any(a.name == "block_size" and a.i > 0 for a in dq.attribute)


def _reaches_output(name: str, consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> bool:
    seen, todo = set(), [name]
    while todo:
        t = todo.pop()
        if t in outputs:
            return True
        for c in consumers.get(t, []):
            if c.op_type in _OUTPUT_PATH and c.name not in seen:
                seen.add(c.name)
                todo += list(c.output)
    return False


def quantized_layers(path: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The names of the graph's quantized layers, of those among them whose output is the graph's output, and of
    those whose weight has per-group scales (weight-only: no runtime here has an integer kernel for them)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    constants = {t.name for t in graph.initializer}
    dqs = {n.name: weight_dequantize(n, producers, constants) for n in graph.node if n.op_type in LAYER_OPS}
    layers = tuple(n for n, dq in dqs.items() if dq is not None)
    by_design = tuple(n.name for n in graph.node if n.name in layers
                      and any(_reaches_output(o, consumers, outputs) for o in n.output))
    return layers, by_design, tuple(n for n in layers if blocked(dqs[n]))


@dataclass(frozen=True)
class KernelAudit:
    """One runtime's kernels for one graph: counts by kernel (integer / float), the quantized layers, and those of
    them it runs in float: ``fallbacks`` (refused by the release gate), ``float_output`` (the graph-output layers
    that the export keeps float) and ``weight_only`` (layers with per-group weight scales, ``quant.weight_group_size``:
    4-bit weights in the artifact, float arithmetic in the runtime)."""

    runtime: str
    int8: dict[str, int]
    float: dict[str, int]
    quantized_layers: int
    fallbacks: tuple[str, ...] = ()
    float_output: tuple[str, ...] = ()
    integer_layers: int = field(default=0)
    weight_only: tuple[str, ...] = ()

    @classmethod
    def of(cls, runtime: str, layers: tuple[str, ...], by_design: tuple[str, ...], weight_only: tuple[str, ...],
           on_float: list[str], int8: dict[str, int], float_: dict[str, int]) -> "KernelAudit":
        """``on_float``: names of the runtime's float layer kernels fed by a quantized weight (a runtime may add a
        suffix to a source node's name); ``weight_only`` layers are float by design wherever they run."""
        def source(name: str) -> str:
            return next((s for s in layers if name == s or name.startswith((s + "/", s + "_"))), name)
        hit = {source(n) for n in on_float} | set(weight_only)
        design = tuple(n for n in by_design if n in hit and n not in weight_only)
        falls = tuple(sorted(n for n in hit if n not in design and n not in weight_only))
        return cls(runtime, int8, float_, len(layers), falls, design, len(layers) - len(hit & set(layers)),
                   tuple(weight_only))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KernelAudit":
        """The audit as :meth:`as_dict` wrote it (export metrics ``onnx_kernels[runtime]``)."""
        return cls(**{**d, **{k: tuple(d.get(k, ())) for k in ("fallbacks", "float_output", "weight_only")}})

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), **{k: list(getattr(self, k)) for k in ("fallbacks", "float_output", "weight_only")}}

    def line(self) -> str:
        """'onnxruntime: 71 of 72 quantized layers on integer kernels (QLinearConv 46, QGemm 25); float: ...'."""
        counts = ", ".join(f"{k} {v}" for k, v in self.int8.items()) or "none"
        s = f"{self.runtime}: {self.integer_layers} of {self.quantized_layers} quantized layers on integer kernels ({counts})"
        if self.float_output:
            s += f"; float by design (graph output): {', '.join(self.float_output)}"
        if self.weight_only:
            s += f"; weight-only by design (per-group weight scales): {len(self.weight_only)} layers"
        if self.fallbacks:
            s += f"; FELL BACK TO FLOAT: {', '.join(self.fallbacks)}"
        return s

