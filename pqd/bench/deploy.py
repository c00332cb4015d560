"""``make bench-deploy``: denoiser forward latency and file size, float vs the deployed int8 artifact.

The denoisers come from :mod:`pqd.bench.deploy_models`; every backend (docs/benchmarks.md) is timed in one process,
interleaved round by round so that load from other processes hits every backend alike, at batch 1 and 32: the
median of ``--rounds`` timed calls after two warm-up calls. Backends: torch fp32 and bf16 autocast; the float graph
in onnxruntime and OpenVINO (fp32, and bf16 where the CPU has it); each PQD int8 graph in both runtimes; the
yardsticks onnxruntime ``quantize_static`` and NNCF ``nncf.quantize``. The CPU's ceilings (:mod:`pqd.bench.ceiling`)
are measured in the same run, and each backend's rate is reported as a fraction of its ceiling. Per model: the PQD
graph with default settings against the fastest float backend and the faster yardstick, the kernels each runtime
runs for each int8 graph, file sizes. Writes ``data/bench/deploy.md`` and ``deploy.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from pqd import deploy
from pqd.bench.ceiling import ceiling_of, measure_ceilings, model_macs
from pqd.bench.profile import openvino_profile, ort_profile, shares
from pqd.bench.deploy_models import (GLUE, VARIANT_CHOICES, BenchModel, bench_params, calibrate, cifar_model,
                                     default_variant,
                                     demo_dit_params, demo_model, describe, dit_model, export, float_onnx, nncf_reference,
                                     ort_static_reference, sizes, trajectory_inputs, variants, weights_label)
from pqd.deploy import openvino
from pqd.errors import command
from pqd.params import IntegerCodes, integer_codes, params_from_dict
from pqd.params.machine import VNNI_FLAGS, cpu_vnni_flags

INT8 = "onnxruntime int8"
REFERENCE = "onnxruntime quantize_static int8 (yardstick, not PQD)"
NNCF = "openvino nncf.quantize int8 (yardstick, not PQD)"
OV_INT8_BF16 = "openvino int8, float ops in bf16"
BENCH_FLAGS = (*VNNI_FLAGS, "avx512_bf16")
FLOAT = ("torch fp32 eager", "torch bf16 autocast", "onnxruntime fp32", "openvino fp32", "openvino bf16")
CPUINFO_GREP = "grep -o 'avx512_vnni\\|avx_vnni\\|amx_int8\\|avx512_bf16' /proc/cpuinfo"


def time_backends(fns: dict[str, Callable[[], Any]], rounds: int, desc: str,
                  max_call_s: float) -> dict[str, tuple[float, str]]:
    """Median seconds per call of each function and how it was measured: one warm-up call each, a second
    one, then ``rounds`` interleaved rounds. A function whose warm-up call took over ``max_call_s`` and over
    20x the fastest one's is not repeated: its single call is reported as such."""
    first: dict[str, float] = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        first[k] = time.perf_counter() - t0
    cap = max(max_call_s, 20 * min(first.values()))
    live = {k: f for k, f in fns.items() if first[k] <= cap}
    for f in live.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in tqdm(range(rounds), desc=desc):
        for k, f in live.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {k: (statistics.median(v), f"median of {rounds}") for k, v in times.items()}
    out.update({k: (first[k], f"one call (over {cap:.3g} s, not repeated)") for k in fns if k not in live})
    return out


def build_graphs(m: BenchModel, a: argparse.Namespace, codes: IntegerCodes, work: Path
                 ) -> tuple[dict[str, Path], dict[str, Path], dict[str, str], Path, Path]:
    """Calibrate and export ``m``: the int8 ONNX graphs to time (time group 0) by their onnxruntime backend name, the
    W8 / W4 export folders by label, each glue backend's description, the float graph and NNCF's int8 IR."""
    calib = trajectory_inputs(m.den, a.calib_seeds)
    exports: dict[str, Path] = {}
    glue: dict[str, str] = {}
    for bits in (8, 4):
        net, state, n = calibrate(m.den, bench_params(bits), calib, codes)
        exports[weights_label(bits, state)] = export(m, net, state, calib.groups, work / f"w{bits}")
        if bits == 8:
            glue[INT8] = "default settings: " + describe(default_variant(), n)
    graphs = {INT8: work / "w8" / deploy.ONNX_DIR / deploy.graph_file(0)}
    for i, (backend, v) in enumerate(variants(m.den, a.variants).items()):
        net, state, n = calibrate(m.den, bench_params(8, v), calib, codes)
        graphs[backend] = export(m, net, state, calib.groups, work / f"v{i}") / deploy.ONNX_DIR / deploy.graph_file(0)
        glue[backend] = describe(v, n)
    fp_path = float_onnx(m.den, work / "fp32.onnx")
    graphs[REFERENCE] = ort_static_reference(fp_path, calib, work / "ort-static.onnx", codes.reduce_range)
    return graphs, exports, glue, fp_path, nncf_reference(fp_path, calib, work / "nncf.xml")


def in_openvino(backend: str) -> str:
    """The name of a PQD onnxruntime backend's graph run by OpenVINO."""
    return backend.replace("onnxruntime", "openvino", 1)


def open_backends(graphs: dict[str, Path], fp_path: Path, nncf_path: Path, threads: int) -> dict[str, Any]:
    """Every graph backend, ready to run: the float graph in both runtimes (OpenVINO in bf16 too where the CPU has
    it), each PQD int8 graph in both, quantize_static in onnxruntime, NNCF's in OpenVINO."""
    # no spinning: interleaved in one process, a session's spinning pool would take the cores from the next backend
    def ort(p: Path) -> Any:
        return deploy.open_graph(p, "onnxruntime", threads, spinning=False)

    out = {"onnxruntime fp32": ort(fp_path), "openvino fp32": openvino.OvGraph(fp_path, threads, "f32")}
    if openvino.cpu_supports_bf16():
        out["openvino bf16"] = openvino.OvGraph(fp_path, threads, "bf16")
    for k, p in graphs.items():
        out[k] = ort(p)
        if k != REFERENCE:
            out[in_openvino(k)] = openvino.OvGraph(p, threads, "f32")
    if openvino.cpu_supports_bf16():
        out[OV_INT8_BF16] = openvino.OvGraph(graphs[INT8], threads, "bf16")
    out[NNCF] = openvino.OvGraph(nncf_path, threads, "f32")
    return out


def kernels_of(graphs: dict[str, Path], nncf_path: Path, threads: int) -> dict[str, dict[str, Any]]:
    """Each int8 graph's kernel audit per runtime that runs it in the benchmark."""
    out = {k: {r: deploy.kernel_report(p, r) for r in (deploy.RUNTIMES if k != REFERENCE else ("onnxruntime",))}
           for k, p in graphs.items()}
    out[NNCF] = {"openvino": openvino.kernel_audit(nncf_path, (), (), threads=threads).as_dict()}
    return out


def bench_model(m: BenchModel, a: argparse.Namespace, batches: list[int], codes: IntegerCodes, tmp: Path,
                ceilings: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    den, work = m.den, tmp / m.name
    graphs, exports, glue, fp_path, nncf_path = build_graphs(m, a, codes, work)
    backends = open_backends(graphs, fp_path, nncf_path, a.threads)
    rows: list[dict[str, Any]] = []
    too_slow: dict[str, str] = {}  # backends not run at larger batches
    for b in sorted(batches):
        x = torch.randn(b, *den.sample_shape, generator=torch.Generator().manual_seed(b))
        t = torch.full((b,), 500.0)
        cond = den.probe_conditioning(b)  # class models: the classes in turn
        feeds = deploy.graph_feeds(x, t, cond)
        macs = model_macs(den, x, t, cond)

        def eager() -> Any:
            with torch.no_grad():
                return den.call(den.net, x, t, cond)

        def bf16() -> Any:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return den.call(den.net, x, t, cond)

        fns = {"torch fp32 eager": eager, "torch bf16 autocast": bf16,
               **{k: (lambda g=g: g.run(feeds)) for k, g in backends.items()}}
        fns = {k: f for k, f in fns.items() if k not in too_slow}
        med = time_backends(fns, a.rounds, f"{m.name} batch {b}", a.max_call_s)
        for backend in too_slow:
            rows.append({"model": m.name, "batch": b, "backend": backend, "ms_per_call": float("nan"),
                         "ms_per_image": float("nan"), "vs_pqd_int8": float("nan"), "gmac_s": float("nan"),
                         "ceiling": "", "of_ceiling": float("nan"), "measured": f"skipped: {too_slow[backend]}"})
        best = min(med[k][0] for k in (INT8, in_openvino(INT8)))
        for backend, (sec, how) in med.items():
            ceiling = ceiling_of(backend, ceilings)
            rate = macs / sec / 1e9
            rows.append({"model": m.name, "batch": b, "backend": backend, "ms_per_call": sec * 1e3,
                         "ms_per_image": sec * 1e3 / b, "vs_pqd_int8": sec / best, "gmac_s": rate,
                         "ceiling": ceiling or "", "macs": macs, "measured": how,
                         "of_ceiling": rate / ceilings[ceiling]["gmac_s"] if ceiling else float("nan")})
            if how.startswith("one call"):
                too_slow[backend] = f"{sec:.1f} s per call at batch {b}"
    # where the default graph's time goes at the largest batch, from each runtime's profiler
    profile = {"onnxruntime": shares(ort_profile(graphs[INT8], feeds, a.threads)),
               "openvino": shares(openvino_profile(graphs[INT8], feeds, a.threads))}
    return rows, {"model": m.name, "weights": m.weights, "params": sum(p.numel() for p in den.net.parameters()),
                  "glue": glue, "kernels": kernels_of(graphs, nncf_path, a.threads), "profile": profile, "glue_sites": GLUE in variants(den),
                  "profile_batch": max(batches), "sizes": sizes(den, exports, work)}


def verdict_lines(rows: list[dict[str, Any]], model: str) -> list[str]:
    """Per batch: the PQD int8 graph with default settings on its best runtime against the fastest float backend and
    the faster int8 yardstick, its fraction of the int8 GEMM ceiling, and the fastest PQD graph of any settings."""
    lines = []
    for b in sorted({r["batch"] for r in rows if r["model"] == model}):
        by = {r["backend"]: r for r in rows if r["model"] == model and r["batch"] == b and r["ms_per_call"] == r["ms_per_call"]}
        if not {INT8, in_openvino(INT8)} & set(by):
            continue

        def fastest(names) -> dict[str, Any]:
            return min((by[k] for k in names if k in by), key=lambda r: r["ms_per_call"])

        d = fastest((INT8, in_openvino(INT8)))
        f, y = fastest(FLOAT), fastest((REFERENCE, NNCF))
        any_pqd = fastest([k for k in by if "int8" in k and "yardstick" not in k])
        lines.append(f"- batch {b}: PQD int8, default settings, best runtime ({d['backend']}, {d['ms_per_call']:.2f} ms): "
                     f"**{f['ms_per_call'] / d['ms_per_call']:.3f}x** the fastest float backend ({f['backend']}, "
                     f"{f['ms_per_call']:.2f} ms), **{y['ms_per_call'] / d['ms_per_call']:.3f}x** the faster int8 "
                     f"yardstick ({y['backend'].split(' (')[0]}, {y['ms_per_call']:.2f} ms); {d['gmac_s']:.1f} GMAC/s = "
                     f"**{d['of_ceiling']:.1%}** of the {d['ceiling']} GEMM ceiling. Fastest PQD graph of any settings: "
                     f"{any_pqd['backend']}, {any_pqd['ms_per_call']:.2f} ms ({f['ms_per_call'] / any_pqd['ms_per_call']:.3f}x "
                     f"the fastest float)")
    return lines


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x == x else ""


def table(rows: list[dict[str, Any]], extra: list[dict[str, Any]], threads: int, codes: IntegerCodes,
          ceilings: dict[str, dict[str, Any]]) -> str:
    flags = ", ".join(cpu_vnni_flags(wanted=BENCH_FLAGS)) or "none"
    lines = ["# Deployment benchmark (`make bench-deploy`)", "",
             f"CPU: {codes.machine}; flags (`{CPUINFO_GREP}`): {flags}. PQD weight codes: "
             f"{'7-bit (reduce_range)' if codes.reduce_range else 'full 8-bit'} ({codes.reason}); onnxruntime "
             f"quantize_static yardstick: reduce_range={codes.reduce_range} (the same rule); NNCF: nncf.quantize "
             "defaults. PQD graphs in OpenVINO run their float ops in f32 (the deployed numerics), except the row "
             f"'{OV_INT8_BF16}'.", "",
             f"One process, {threads} threads (torch, onnxruntime, OpenVINO; onnxruntime's threads sleep between calls "
             "rather than spin, so that no session takes the cores from the next), median of interleaved rounds "
             "after warm-up. `vs PQD int8` = backend time / the PQD int8 graph's (default settings) on its faster "
             "runtime (> 1: PQD is faster). GMAC/s: the float network's multiply-accumulates (torch's FLOP counter) "
             "per second; `of ceiling`: that rate over the ceiling of the backend's arithmetic, measured below in the "
             "same run.", "", "## Ceilings", "", "| ceiling | what | ms | GMAC/s | measured |",
             "|---|---|---:|---:|---|"]
    for k, c in ceilings.items():
        how = f"fastest of {c['calls']}" if c["calls"] > 1 else "one call (over the per-call limit, not repeated)"
        lines.append(f"| {k} | {c['what']} | {c['seconds'] * 1e3:.2f} | {c['gmac_s']:.1f} | {how} |")
    lines += ["", "## Latency", "", "| model | batch | backend | ms / call | ms / image | vs PQD int8 | GMAC/s | of ceiling "
              "| measured |", "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['ms_per_call']:.2f} | {r['ms_per_image']:.3f} "
                     f"| {r['vs_pqd_int8']:.2f}x | {r['gmac_s']:.1f} | {_pct(r['of_ceiling'])} {r['ceiling']} "
                     f"| {r['measured']} |")
    for e in extra:
        lines += ["", f"## {e['model']} ({e['params'] / 1e6:.2f}M parameters, {e['weights']})", "",
                  *verdict_lines(rows, e["model"]), "",
                  "| int8 graph | what | onnxruntime: integer kernels | float kernels | OpenVINO: integer kernels "
                  "| float kernels |", "|---|---|---|---|---|---|"]
        for backend, k in e["kernels"].items():
            what = e["glue"].get(backend, "not PQD: the runtime's own quantization")
            ort_k, ov_k = k.get("onnxruntime"), k.get("openvino")
            cells = [f"{_counts(a['int8'])} | {_counts(a['float'])}" if a else "- | -" for a in (ort_k, ov_k)]
            lines.append(f"| {backend.removeprefix('onnxruntime ')} | {what} | {cells[0]} | {cells[1]} |")
        lines += ["", f"Where the PQD int8 graph's time goes (default settings, batch {e['profile_batch']}, share of the "
                      "profiled op time):", ""]
        lines += [f"- {r}: {v}" for r, v in e["profile"].items()]
        if not e["glue_sites"]:
            lines += ["", "No glue backend: quant.glue puts no site in this network (its kinds are points of UNet "
                          "ResNet and attention blocks)."]
        lines += ["", "| file | bytes | fp32 / file |", "|---|---:|---:|"]
        fp = e["sizes"]["fp32 safetensors"]
        for k, v in e["sizes"].items():
            lines.append(f"| {k} | {v} | {fp / v:.3f}x |")
    return "\n".join(lines) + "\n"


@command("bench-deploy")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model", help="the demo pipeline folder (the model stage's output)")
    ap.add_argument("--dit-model", default=None,
                    help="a demo:digits-dit pipeline folder (the model stage's output for model.source: demo:digits-dit); "
                         "default: a DiT with the demo's settings made here (see --dit-train-steps)")
    ap.add_argument("--dit-train-steps", type=int, default=None,
                    help="without --dit-model: training steps of the DiT made here (default: model.train_steps of the "
                         "demo; 0: random weights, which time the same)")
    ap.add_argument("--out", default="data/bench")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--calib-seeds", type=int, default=8)
    ap.add_argument("--only", choices=["demo", "cifar10", "dit"], default=None)
    ap.add_argument("--variants", choices=list(VARIANT_CHOICES), default="all",
                    help="which PQD graphs beyond the default one to time: the previous defaults' plain graph "
                         "(previous), glue (with the skips split: split, all glue with the split off: nosplit, both: "
                         "glue), attention matmuls (alone and with glue: attention), one grid per tensor on the fastest "
                         "of those and the plain graph (shared), those and the plain graph with activation grids "
                         "without an offset (symmetric), all, none; one that builds the default graph is left out")
    ap.add_argument("--max-call-s", type=float, default=5.0,
                    help="a backend slower than this and 20x the fastest per call is timed once and not run at larger batches")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    steps = demo_dit_params().model.train_steps if a.dit_train_steps is None else a.dit_train_steps
    if a.rounds < 1 or a.threads < 1 or not batches or min(batches) < 1 or steps < 0:
        raise SystemExit(f"bench-deploy: --rounds {a.rounds}, --threads {a.threads}, --batches {a.batches}, "
                         f"--dit-train-steps {steps}: expected positive integers (steps >= 0)")
    folders = {"demo": Path(a.model), "dit": Path(a.dit_model) if a.dit_model else None}
    for name, folder in folders.items():
        if folder is not None and a.only in (None, name) and not (folder / "model_index.json").is_file():
            raise SystemExit(f"bench-deploy: {folder} is not a pipeline folder: run `dvc repro model` first"
                             + (" with model.source: demo:digits-dit" if name == "dit" else ""))
    torch.set_num_threads(a.threads)
    codes = integer_codes(params_from_dict({}))  # quant.reduce_range: auto, for this machine's CPU
    rows, extra = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ceilings = measure_ceilings(Path(tmp), a.threads, max_call_s=a.max_call_s)
        builders = {"demo": lambda: demo_model(folders["demo"]), "cifar10": lambda: cifar_model(Path(tmp)),
                    "dit": lambda: dit_model(folders["dit"], steps, Path(tmp))}
        for name, build in builders.items():
            if a.only in (None, name):
                r, e = bench_model(build(), a, batches, codes, Path(tmp), ceilings)
                rows += r
                extra.append(e)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "deploy.csv", index=False)
    text = table(rows, extra, a.threads, codes, ceilings)
    (out / "deploy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
