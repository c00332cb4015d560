"""Where a deployed graph's time goes, from each runtime's own profiler: onnxruntime's session profiling (one
event per node run) and OpenVINO's performance counters (per compiled layer, with the kernel it ran). Used by
``make bench-deploy`` to show what keeps the int8 graph from its integer kernels (float ops between them,
re-quantizations, layout changes)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pqd.deploy import openvino
from pqd.deploy.int4 import runnable_graph
from pqd.deploy.ort import session_options


def ort_profile(path: Path, feeds: dict[str, np.ndarray], threads: int, calls: int = 3) -> Counter:
    """Microseconds per call by operator kind ('QLinearConv', 'GroupNorm', ...), averaged over ``calls`` profiled
    calls after one warm-up call (whose events are skipped)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads, spinning=False)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        s = ort.InferenceSession(runnable_graph(path, unsigned_activations=True), so, providers=["CPUExecutionProvider"])
        for _ in range(calls + 1):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    start = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    out: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            out[e["args"]["op_name"]] += e["dur"] / calls
    return out


def openvino_profile(path: Path, feeds: dict[str, np.ndarray], threads: int, calls: int = 3) -> Counter:
    """Microseconds per call by compiled layer type and kernel ('Convolution jit_avx512_amx_I8', ...)."""
    compiled = openvino.compile_graph(path, threads, "f32", profile=True)
    request = compiled.create_infer_request()
    request.infer(feeds)
    out: Counter = Counter()
    for _ in range(calls):
        request.infer(feeds)
        for p in request.get_profiling_info():
            if p.status.name == "EXECUTED":
                out[f"{p.node_type} {p.exec_type}"] += p.real_time.total_seconds() * 1e6 / calls
    return out


def shares(profile: Counter, top: int = 8) -> str:
    """'QLinearConv 61.2%, GroupNorm 12.0%, ...' (the ``top`` largest, then the rest)."""
    total = sum(profile.values()) or 1.0
    parts = [f"{k} {v / total:.1%}" for k, v in profile.most_common(top)]
    rest = total - sum(v for _, v in profile.most_common(top))
    return ", ".join(parts + ([f"other {rest / total:.1%}"] if rest > 0 else []))
