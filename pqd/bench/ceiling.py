"""What the CPU can do, measured in the benchmark's own process: the ceilings of ``make bench-deploy``.

- The integer ceiling of each runtime: one large square int8 GEMM (u8 activations x s8 weights, a QDQ MatMul
  that onnxruntime fuses into QLinearMatMul and OpenVINO compiles to a u8 FullyConnected), the kernel every
  quantized layer of the artifact runs on.
- The float ceilings: torch.mm in fp32 and in bf16.

A model's achieved rate is its multiply-accumulates per second (counted by torch's FLOP counter on the float network:
convolutions, linears and attention matmuls), divided by the ceiling of its arithmetic.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode

from pqd import deploy
from pqd.diffusion.adapter import Denoiser

GEMM_SIZE = 2048  # M = K = N: large enough that the kernel, not the call, is timed (8.6 GMAC a call)


def model_macs(den: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None) -> int:
    """Multiply-accumulates of one forward of ``den``'s float network on this batch (torch's FLOP counter / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        den.call(den.net, x, t, cond)
    return counter.get_total_flops() // 2


def int8_gemm_graph(path: Path, n: int = GEMM_SIZE, seed: int = 0) -> Path:
    """A QDQ ONNX graph y = DQ(Q(DQ(Q(x)) @ DQ(W))) with x float [n, n], W int8 [n, n] per-output-channel scales, uint8
    activations: one integer GEMM with requantized output, as in the artifact's layers."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(n, n), dtype=np.int8)
    init = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_s"),
            numpy_helper.from_array(np.zeros(n, np.int8), "w_z"),
            numpy_helper.from_array(np.array(0.02, np.float32), "x_s"), numpy_helper.from_array(np.array(128, np.uint8), "x_z"),
            numpy_helper.from_array(np.array(0.5, np.float32), "y_s"), numpy_helper.from_array(np.array(128, np.uint8), "y_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="gemm"),
             helper.make_node("QuantizeLinear", ["y", "y_s", "y_z"], ["yq"], name="y_q"),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["out"], name="y_dq")]
    graph = helper.make_graph(nodes, "int8_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [n, n])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10  # what onnxruntime and OpenVINO both read
    onnx.save(model, str(path))
    return path


def _best_seconds(f: Callable[[], Any], rounds: int, max_call_s: float) -> tuple[float, int]:
    """The fastest of ``rounds`` calls after two warm-up calls (a ceiling is what the CPU can do, not a typical call),
    and how many calls that was: one, when the first call takes over ``max_call_s`` (bf16 matmul on a CPU without bf16
    takes a minute a call; warm-up is nothing next to it)."""
    t0 = time.perf_counter()
    f()
    first = time.perf_counter() - t0
    if first > max_call_s:
        return first, 1
    f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best, rounds


def _timed(f: Callable[[], Any], rounds: int, max_call_s: float) -> dict[str, Any]:
    seconds, calls = _best_seconds(f, rounds, max_call_s)
    return {"seconds": seconds, "calls": calls}


def measure_ceilings(work: Path, threads: int, rounds: int = 5, n: int = GEMM_SIZE,
                     max_call_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """GMAC/s of each ceiling (fastest of ``rounds`` calls, or one call over ``max_call_s``), with the kernels that ran
    it and the calls timed. Keys: 'onnxruntime int8', 'openvino int8', 'torch fp32', 'torch bf16'."""
    path = int8_gemm_graph(work / f"int8-gemm-{n}.onnx", n)
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a = torch.from_numpy(x)
    b = torch.randn(n, n, generator=torch.Generator().manual_seed(2))
    macs = n ** 3
    out: dict[str, dict[str, Any]] = {}
    for runtime in deploy.RUNTIMES:
        g = deploy.open_graph(path, runtime, threads, spinning=False)
        audit = deploy.kernel_audit(path, runtime, threads)
        kernels = ", ".join(f"{k} {v}" for k, v in audit.int8.items()) or "none"
        out[f"{runtime} int8"] = {"what": f"{n}x{n}x{n} u8 x s8 GEMM, QDQ MatMul ({kernels})",
                                  **_timed(lambda g=g: g.run({"x": x}), rounds, max_call_s)}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        aa, bb = a.to(dtype), b.to(dtype)
        out[f"torch {name}"] = {"what": f"{n}x{n}x{n} torch.mm {name}",
                                **_timed(lambda aa=aa, bb=bb: torch.mm(aa, bb), rounds, max_call_s)}
    for v in out.values():
        v["gmac_s"] = macs / v["seconds"] / 1e9
    return out


def ceiling_of(backend: str, ceilings: dict[str, dict[str, Any]]) -> str | None:
    """The ceiling a backend's arithmetic is judged against: its runtime's int8 GEMM for an integer graph, else
    torch's bf16 or fp32 matmul."""
    if "int8" in backend:
        return next((k for k in ceilings if k.endswith("int8") and backend.startswith(k.split()[0])), None)
    return "torch bf16" if "bf16" in backend else "torch fp32"
