"""The kernel audit: which of a graph's quantized layers a runtime really runs on integer kernels.

A quantized layer is a Conv / ConvTranspose / MatMul / Gemm of the exported ONNX graph whose weight comes from a
DequantizeLinear (the export ships no float copy of a quantized weight). A runtime fuses such a layer, with the
Q/DQ pairs around it, into an integer kernel; where it does not, the layer falls back to float: the int8 weights are
dequantized and multiplied in float, and the artifact pays the quantization error without the speed. The export
records the audit per runtime (export metrics ``onnx_kernels``) and the release gate refuses a fallback.

One case is reported apart, not as a fallback: a layer whose output is the graph's output (the noise prediction),
which the export keeps in float. onnxruntime has no fused integer convolution with a float output, so it runs that
layer in float; OpenVINO runs it on an integer kernel with a float dequantization after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ops a weight may pass through between its DequantizeLinear and the layer (reshapes, runtime layout changes)
_WEIGHT_PATH = ("Transpose", "Reshape", "ReorderInput", "Unsqueeze", "Squeeze")
# ops between a layer and the graph's output that keep its output float by design (bias, casts, reshapes)
_OUTPUT_PATH = ("Add", "Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze")


def weight_from_dequantize(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], constants: set[str]) -> bool:
    """Whether ``node``'s second input (its weight) is a DequantizeLinear of a constant (``constants``: the names of
    the graph's initializers), through layout ops. (An activation dequantized in front of a matmul is not a
    weight: attention's Q·Kᵀ and softmax·V.)"""
    if len(node.input) < 2:
        return False
    name = node.input[1]
    while name in producers:
        p = producers[name]
        if p.op_type == "DequantizeLinear":
            return p.input[0] in constants or (p.input[0] in producers and producers[p.input[0]].op_type == "Constant")
        if p.op_type not in _WEIGHT_PATH or not p.input:
            return False
        name = p.input[0]
    return False


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


def quantized_layers(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of the graph's quantized layers, and of those among them whose output is the graph's output."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    constants = {t.name for t in graph.initializer}
    layers = tuple(n.name for n in graph.node
                   if n.op_type in LAYER_OPS and weight_from_dequantize(n, producers, constants))
    by_design = tuple(n.name for n in graph.node if n.name in layers
                      and any(_reaches_output(o, consumers, outputs) for o in n.output))
    return layers, by_design


@dataclass(frozen=True)
class KernelAudit:
    """One runtime's kernels for one graph: counts by kernel (integer / float), the quantized layers, and those of
    them it runs in float: ``fallbacks`` (refused by the release gate) and ``float_output`` (the graph-output layers
    that the export keeps float)."""

    runtime: str
    int8: dict[str, int]
    float: dict[str, int]
    quantized_layers: int
    fallbacks: tuple[str, ...] = ()
    float_output: tuple[str, ...] = ()
    integer_layers: int = field(default=0)

    @classmethod
    def of(cls, runtime: str, layers: tuple[str, ...], by_design: tuple[str, ...], on_float: list[str],
           int8: dict[str, int], float_: dict[str, int]) -> "KernelAudit":
        """``on_float``: names of the runtime's float layer kernels fed by a quantized weight (a runtime may add a
        suffix to a source node's name)."""
        def source(name: str) -> str:
            return next((s for s in layers if name == s or name.startswith((s + "/", s + "_"))), name)
        hit = {source(n) for n in on_float}
        design = tuple(n for n in by_design if n in hit)
        falls = tuple(sorted(n for n in hit if n not in design))
        return cls(runtime, int8, float_, len(layers), falls, design, len(layers) - len(hit & set(layers)))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fallbacks": list(self.fallbacks), "float_output": list(self.float_output)}

    def line(self) -> str:
        """'onnxruntime: 71 of 72 quantized layers on integer kernels (QLinearConv 46, QGemm 25); float: ...'."""
        counts = ", ".join(f"{k} {v}" for k, v in self.int8.items()) or "none"
        s = f"{self.runtime}: {self.integer_layers} of {self.quantized_layers} quantized layers on integer kernels ({counts})"
        if self.float_output:
            s += f"; float by design (graph output): {', '.join(self.float_output)}"
        if self.fallbacks:
            s += f"; FELL BACK TO FLOAT: {', '.join(self.fallbacks)}"
        return s

