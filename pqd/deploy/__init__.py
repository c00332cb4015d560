"""Deployment: the export's ONNX graphs (integer kernels in onnxruntime) and the denoiser that runs them."""

from pqd.deploy.onnx import (ONNX_DIR, OPSET, WEIGHTS_FILE, export_graph, export_net, graph_file, trace_group,
                             write_onnx)
from pqd.deploy.runtime import (FLOAT_KERNELS, INT8_KERNELS, OrtDenoiser, kernel_report, load_ort_denoiser,
                                open_session, ort_feeds, session_options)

__all__ = ["FLOAT_KERNELS", "INT8_KERNELS", "ONNX_DIR", "OPSET", "OrtDenoiser", "WEIGHTS_FILE", "export_graph",
           "export_net", "graph_file", "kernel_report", "load_ort_denoiser", "open_session", "ort_feeds",
           "session_options", "trace_group", "write_onnx"]
