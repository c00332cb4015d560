"""onnxruntime: sessions on the export's QDQ ONNX graphs and the kernels its optimiser chose for them."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pqd.deploy.int4 import runnable_graph
from pqd.deploy.kernels import KernelAudit, weight_from_dequantize

# onnxruntime kernels that compute in integer arithmetic (layers, then glue between them: quant.glue), and the float
# ones a quantized layer may fall back to, then the float glue
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QAttention", "MatMulNBits",
                "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearSoftmax")
FLOAT_LAYER_KERNELS = ("Conv", "FusedConv", "NchwcConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")
FLOAT_KERNELS = (*FLOAT_LAYER_KERNELS, "Add", "Mul", "BatchNormalization", "Sigmoid", "QuickGelu", "Gelu", "FastGelu",
                 "Concat", "Softmax")


def session_options(threads: int | None = None, optimized_path: Path | None = None, spinning: bool = True):
    """``spinning=False``: the session's worker threads sleep between calls instead of spinning (several sessions
    timed in turn in one process, where a spinning pool would take the cores from the next one)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def open_session(path: Path, threads: int | None = None, spinning: bool = True):
    return ort.InferenceSession(runnable_graph(path, unsigned_activations=True),
                                session_options(threads, spinning=spinning), providers=["CPUExecutionProvider"])


class OrtGraph:
    """One graph in onnxruntime's CPU provider; ``run`` gives its first output."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True) -> None:
        self.session = open_session(path, threads, spinning)
        self.inputs = tuple(i.name for i in self.session.get_inputs())

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]


def kernel_audit(path: Path, layers: tuple[str, ...], by_design: tuple[str, ...],
                 weight_only: tuple[str, ...] = ()) -> KernelAudit:
    """The kernels onnxruntime runs for the graph at ``path``, read from its optimised graph. A quantized layer fell
    back to float where a float layer kernel still takes its weight from a DequantizeLinear (onnxruntime keeps the
    source node's name on a node it did not fuse)."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(runnable_graph(path, unsigned_activations=True), session_options(optimized_path=opt),
                             providers=["CPUExecutionProvider"])
        graph = onnx.load(str(opt), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    producers = {o: n for n in graph.node for o in n.output}
    constants = {t.name for t in graph.initializer}
    on_float = [n.name for n in graph.node
                if n.op_type in FLOAT_LAYER_KERNELS and weight_from_dequantize(n, producers, constants)]
    return KernelAudit.of("onnxruntime", layers, by_design, weight_only, on_float,
                          int8={k: v for k, v in sorted(ops.items()) if k in INT8_KERNELS},
                          float_={k: v for k, v in sorted(ops.items()) if k in FLOAT_KERNELS})
