"""Deployment: the export's ONNX graphs (integer kernels in onnxruntime or OpenVINO), their kernel audit, and the
denoiser that runs them."""

from pqd.deploy.int4 import pack_int4
from pqd.deploy.kernels import KernelAudit, quantized_layers
from pqd.deploy.onnx import (ONNX_DIR, OPSET, WEIGHTS_FILE, export_graph, export_net, graph_file, trace_group,
                             write_onnx)
from pqd.deploy.ort import FLOAT_KERNELS, INT8_KERNELS, open_session, session_options
from pqd.deploy.runtime import (RUNTIMES, DeployedDenoiser, check_runtime, graph_feeds, kernel_audit, kernel_report,
                                load_deployed_denoiser, open_graph)

__all__ = ["FLOAT_KERNELS", "INT8_KERNELS", "ONNX_DIR", "OPSET", "RUNTIMES", "WEIGHTS_FILE", "DeployedDenoiser",
           "KernelAudit", "check_runtime", "export_graph", "export_net", "graph_feeds", "graph_file", "kernel_audit",
           "kernel_report", "load_deployed_denoiser", "open_graph", "open_session", "pack_int4", "quantized_layers",
           "session_options", "trace_group", "write_onnx"]
