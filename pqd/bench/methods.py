"""``make bench``: the four methods at W8A8 and W4A8 and one ablation row per PQD component, over R replicates, on
two models, with intervals and paired verdicts.

A **replicate** k varies what a user does not control: the model itself where the benchmark trains it (the
demos: ``model.seed`` + k), the calibration trajectories' seeds (``generate.calib_seed_base`` + k x 10^6), the
selection seed (``select.seed`` + k) and the reconstruction seed (``calibrate.seed`` + k); replicate 0 is
params.yaml itself. The evaluation seeds stay the same, so every row of a replicate is compared image by image
with the same FP samples. Within a replicate every row shares the FP model, its trajectories and its FP samples;
only the calibration settings differ (each row starts from params.yaml with the method keys reset to the row's
preset).

**Models** (``--models``): ``model.source`` values; the demos get their bench settings (DEMO_BENCH), any other
source is params.yaml with that source.

**Cache**: ``<out>/<model>/r<k>/fp/`` holds the replicate's FP model, trajectories and FP samples,
``<out>/<model>/r<k>/<row>/`` each row's stage outputs; each folder records the params and the code fingerprint
it was computed with (``bench_key.json``) and is reused when both match, so adding a row or a replicate runs
only what is new (``--fresh`` recomputes). Outputs (pqd.bench.report): ``bench.md`` (tables with intervals and
paired verdicts), ``bench.csv`` (one line per model and row: means and intervals; a DVC plot),
``bench_replicates.csv`` (every replicate), ``bench_paired.csv``, ``bench.png`` and ``bench_paired.png``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import pqd
from pqd.bench import report
from pqd.bench.stats import compare, summarize
from pqd.errors import ParamError, PqdError, one_line
from pqd.formats.metrics import PipelineMetrics
from pqd.params import Params, as_dict, load_params, params_from_dict
from pqd.params.methods import METHOD_KEYS, METHODS
from pqd.stages import calibrate, evaluate, export, generate, model, select

SHARED = ", shared grids"  # the suffix of a row with quant.share_grids (compared with the row without it)
_ALL_GLUE_ATTENTION = {"calibrate": {"method": "pqd", "split_shortcut": False},
                       "quant": {"glue": ["residual", "temb", "silu", "concat", "attention"], "attention": True,
                                 "softmax_bits": 8}}
ROWS: list[tuple[str, int, dict[str, dict[str, Any]]]] = [
    *[(m, bits, {"calibrate": {"method": m}}) for bits in (8, 4) for m in METHODS],
    ("pqd, uniform steps", 4, {"calibrate": {"method": "pqd"}, "select": {"timesteps": "uniform"}}),
    ("pqd, random selection", 4, {"calibrate": {"method": "pqd"}, "select": {"rule": "random"}}),
    ("pqd, G=1", 4, {"calibrate": {"method": "pqd", "time_groups": 1}}),
    ("pqd, QDrop p=0", 4, {"calibrate": {"method": "pqd", "qdrop_p": 0.0}}),
    # quantized attention matmuls (quant.attention), softmax output on 16 and on 8 bits (compare with row 3)
    ("pqd, attention matmuls, softmax 16-bit", 8, {"calibrate": {"method": "pqd"}, "quant": {"attention": True}}),
    ("pqd, attention matmuls, softmax 8-bit", 8, {"calibrate": {"method": "pqd"},
                                                  "quant": {"attention": True, "softmax_bits": 8}}),
    # integer codes of 8-bit weights (quant.reduce_range): 7-bit codes against full 8-bit codes, on this CPU
    ("pqd, 7-bit weight codes", 8, {"calibrate": {"method": "pqd"}, "quant": {"reduce_range": True}}),
    ("pqd, full 8-bit weight codes", 8, {"calibrate": {"method": "pqd"}, "quant": {"reduce_range": False}}),
    # channel balancing (quant.smooth, SmoothQuant) against rows 3 and 7; time groups off at W8 (row 10 is W4)
    ("pqd, quant.smooth", 8, {"calibrate": {"method": "pqd"}, "quant": {"smooth": True}}),
    ("pqd, quant.smooth", 4, {"calibrate": {"method": "pqd"}, "quant": {"smooth": True}}),
    ("pqd, G=1", 8, {"calibrate": {"method": "pqd", "time_groups": 1}}),
    # glue between integer kernels (quant.glue): each kind alone, then together (compare with row 3); a
    # concatenation is one tensor on one grid, so its rows turn the shortcut split off, and so does their baseline
    *[(f"pqd, glue {k}", 8, {"calibrate": {"method": "pqd"}, "quant": {"glue": [k]}})
      for k in ("residual", "temb", "silu", "attention")],
    ("pqd, glue residual+temb+silu+attention", 8,
     {"calibrate": {"method": "pqd"}, "quant": {"glue": ["residual", "temb", "silu", "attention"]}}),
    ("pqd, no shortcut split", 8, {"calibrate": {"method": "pqd", "split_shortcut": False}}),
    ("pqd, no shortcut split, glue concat", 8,
     {"calibrate": {"method": "pqd", "split_shortcut": False}, "quant": {"glue": ["concat"]}}),
    ("pqd, no shortcut split, all glue", 8, {"calibrate": {"method": "pqd", "split_shortcut": False},
                                            "quant": {"glue": ["residual", "temb", "silu", "concat", "attention"]}}),
    # one grid per tensor (quant.share_grids) on the deployment benchmark's fastest graphs: the most glue with
    # attention's matmuls on 8 bits, without and with it (UNets); attention's matmuls with it (transformers, row 13)
    ("pqd, no shortcut split, all glue, attention matmuls", 8, _ALL_GLUE_ATTENTION),
    ("pqd, no shortcut split, all glue, attention matmuls, shared grids", 8,
     {**_ALL_GLUE_ATTENTION, "quant": {**_ALL_GLUE_ATTENTION["quant"], "share_grids": True}}),
    ("pqd, attention matmuls, softmax 8-bit, shared grids", 8,
     {"calibrate": {"method": "pqd"}, "quant": {"attention": True, "softmax_bits": 8, "share_grids": True}}),
]
DEFAULT_ROWS = tuple(range(12))  # the methods at W8A8 and W4A8 and the four ablations
DEFAULT_MODELS = ("demo:digits", "demo:digits16")
# bench settings of the demos, over params.yaml. demo:digits16: a two-level UNet trained in minutes here, measured
# against its own 16x16 RGB digits, sampled with 25 DDIM steps; its rows measure the simulated quantized model
# (evaluate.backend torch, no ONNX graphs), since its deployed graphs cost twice the sampling time on this CPU and
# agree with the simulation (tests/e2e/test_second_model.py)
DEMO_BENCH: dict[str, dict[str, dict[str, Any]]] = {
    "demo:digits": {},
    "demo:digits16": {"model": {"channels": [32, 64], "train_steps": 400, "batch_size": 64},
                      "generate": {"steps": 25}, "export": {"onnx": False},
                      "evaluate": {"reference": "demo:digits16", "backend": "torch"}},
    "demo:digits-dit": {},
}
REPLICATE_SEED_STRIDE = 1_000_000  # replicate k's calibration trajectories start k x this after generate.calib_seed_base
# the code whose behaviour the cached outputs depend on (params are recorded beside it)
CODE_PACKAGES = ("core", "deploy", "diffusion", "eval", "formats", "stages")
KEY_FILE = "bench_key.json"
# named row sets (``--rows transformer``): the transformer demo's table, W8A8 and W4A8 with the minmax, qdiffusion
# and pqd presets, PQD without time groups, PQD with channel balancing
# (python -m pqd.bench --models demo:digits-dit --rows transformer)
# ``--rows glue``: PQD W8A8 (row 3) against each kind of quantized glue (quant.glue), and the shortcut split
# ``--rows shared``: one grid per tensor against the same quantization without it, on a UNet (rows 27, 28) and on
# a transformer (rows 13, 29)
ROW_SETS = {"transformer": (0, 2, 3, 4, 6, 7, 18, 10, 16, 17), "glue": (3, *range(19, 27)), "shared": (3, 27, 28, 13, 29)}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc every 20 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


# ----------------------------------------------------------------------------------------------
# params of a model, a replicate, a row


def _set(d: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> None:
    for section, values in overrides.items():
        d[section].update(values)


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``-S section.key=value`` items (values read as YAML) -> {section: {key: value}}; a malformed item is a ParamError."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        m = re.fullmatch(r"(\w+)\.(\w+)=(.*)", item)
        if not m:
            raise ParamError(f"bench: -S {item!r} is not allowed: expected section.key=value (e.g. generate.eval_samples=200)")
        out.setdefault(m[1], {})[m[2]] = yaml.safe_load(m[3])
    return out


def model_params(base: Params, source: str, sets: dict[str, dict[str, Any]] | None = None) -> Params:
    """params.yaml with ``model.source`` = source, the demo's bench settings (DEMO_BENCH), then ``sets``."""
    d = as_dict(base)
    d["model"]["source"] = source
    _set(d, DEMO_BENCH.get(source, {}))
    _set(d, sets or {})
    return params_from_dict(d)


def replicate_params(p: Params, k: int) -> Params:
    """Replicate k of ``p``: model, calibration-trajectory, selection and reconstruction seeds moved by k."""
    d = as_dict(p)
    d["model"]["seed"] += k
    d["generate"]["calib_seed_base"] += k * REPLICATE_SEED_STRIDE
    d["select"]["seed"] += k
    d["calibrate"]["seed"] += k
    return params_from_dict(d)


def row_params(base: Params, bits: int, override: dict[str, dict[str, Any]]) -> Params:
    """The base params with the method keys reset to the preset, then the row's overrides applied."""
    d = as_dict(base)
    for key in METHOD_KEYS:  # forget values the base params resolved from their own method
        section, name = key.split(".")
        d[section][name] = None
    d["quant"]["weight_bits"] = bits
    _set(d, override)
    return params_from_dict(d)


def row_key(i: int) -> str:
    """Folder name of row i: w<bits>-<name>, e.g. w4-pqd-uniform-steps."""
    name, bits, _ = ROWS[i]
    return f"w{bits}-" + "-".join(filter(None, re.split(r"[^a-z0-9]+", name.lower())))


def model_key(source: str) -> str:
    """Folder name of a model: demo:digits16 -> digits16, ./models/my-pipe -> my-pipe."""
    name = source.split(":", 1)[1] if source.startswith("demo:") else Path(source.rstrip("/")).name
    return "-".join(filter(None, re.split(r"[^a-z0-9]+", name.lower()))) or "model"


# ----------------------------------------------------------------------------------------------
# cache


def _code_only(source: str) -> str:
    """The syntax tree of a module without its docstrings (comments and layout are not in it): what runs."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_fingerprint() -> str:
    """sha256 of the code the stages run (CODE_PACKAGES of this pqd package, docstrings and comments aside): cached
    outputs made by other code are recomputed."""
    root = Path(pqd.__file__).parent
    h = hashlib.sha256()
    for f in sorted(p for pkg in CODE_PACKAGES for p in (root / pkg).rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + _code_only(f.read_text()).encode() + b"\0")
    return h.hexdigest()


def cached(folder: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The result recorded in ``folder`` when it was computed with ``key``, else None."""
    f = folder / KEY_FILE
    if not f.is_file():
        return None
    rec = json.loads(f.read_text())
    return rec.get("result") if rec.get("key") == key else None


def record(folder: Path, key: dict[str, Any], result: dict[str, Any]) -> None:
    (folder / KEY_FILE).write_text(json.dumps({"key": key, "result": result}, indent=1))


# ----------------------------------------------------------------------------------------------
# running


def ensure_fp(p: Params, folder: Path, code: str, fresh: bool) -> dict[str, Any]:
    """The replicate's FP model, trajectories and FP samples in ``folder`` (made unless cached)."""
    key = {"device": p.device, "model": as_dict(p.model), "generate": as_dict(p.generate), "code": code}
    hit = None if fresh else cached(folder, key)
    if hit is not None:
        return hit
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    mm = model.run(p, folder / "model")
    gm = generate.run(p, folder / "model", folder / "trajectories", folder / "samples" / "fp")
    result = {"fp_seconds": round(time.perf_counter() - t0, 1),
              **{k: v for k, v in mm.to_json().items() if k != "seconds"}, "calib_trajectories": gm.calib_trajectories}
    record(folder, key, result)
    return result


def run_row(p: Params, fp: Path, out: Path) -> dict[str, Any]:
    """Select, calibrate, export and evaluate one row into ``out``; its metrics as one flat dict."""
    out.mkdir(parents=True, exist_ok=True)
    select.run(p, fp / "trajectories", out / "calib")
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        cal = calibrate.run(p, fp / "model", out / "calib", out / "qstate")
    cal_s = time.perf_counter() - t0
    exp = export.run(p, fp / "model", out / "qstate", out / "export")
    ev = evaluate.run(p, fp / "model", out / "export", fp / "samples" / "fp", out / "samples", out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(PipelineMetrics(calibrate=cal, export=exp, evaluate=ev).as_dict(),
                                                 indent=2))
    res = {"bits": f"W{cal.weight_code_bits}A{p.quant.act_bits}", "fid_vs_data": ev.fid_quant_vs_ref,
           "fp_fid_vs_data": ev.fid_fp_vs_ref, "delta_fid": ev.delta_fid, "fid_vs_fp": ev.fid_quant_vs_fp,
           "noise_floor": ev.noise_floor, "psnr_db": ev.psnr_mean, "psnr_other_seed": ev.psnr_other_seed_mean,
           "unet_output_mse": cal.unet_output_mse, "calib_seconds": round(cal_s, 1),
           "peak_rss_mb": round(mem.peak / 2**20, 1), "size_ratio": exp.size_ratio}
    for m, ci in (("fid_vs_data", ev.fid_quant_vs_ref_ci), ("delta_fid", ev.delta_fid_ci),
                  ("fid_vs_fp", ev.fid_quant_vs_fp_ci), ("psnr_db", ev.psnr_mean_ci)):
        if ci is not None:
            res |= {f"{m}_boot_lo": ci.lo, f"{m}_boot_hi": ci.hi}
    if ev.delta_fid_ci is not None:  # what the release gate's three quality checks compare with their thresholds
        res |= {"gate_delta_fid_fraction": ev.delta_fid_ci.hi / ev.fid_fp_vs_ref,
                "gate_fid_vs_fp_fraction": ev.fid_quant_vs_fp_ci.hi / ev.noise_floor,
                "gate_psnr_margin_db": ev.psnr_mean_ci.lo - ev.psnr_other_seed_mean}
    return res


def comparison_pairs(rows: list[int]) -> list[tuple[str, str]]:
    """(first, second) row keys compared: PQD against each preset at the same bits, every 'pqd, ...' variant
    against PQD at its bits, and a row with shared grids against the same row without."""
    keys = {row_key(i) for i in rows}
    pairs = [(f"w{b}-pqd", f"w{b}-{m}") for b in (8, 4) for m in METHODS if m != "pqd"]
    pairs += [(row_key(i), f"w{ROWS[i][1]}-pqd") for i in rows if ROWS[i][0].startswith("pqd, ")]
    named = {(name, bits): j for j, (name, bits, _) in enumerate(ROWS)}
    pairs += [(row_key(i), row_key(named[(ROWS[i][0].removesuffix(SHARED), ROWS[i][1])])) for i in rows
              if ROWS[i][0].endswith(SHARED) and (ROWS[i][0].removesuffix(SHARED), ROWS[i][1]) in named]
    return [(a, b) for a, b in pairs if a in keys and b in keys]


def write_outputs(results: list[dict[str, Any]], rows: list[int], out: Path, base: Params,
                  wall_s: float, failed: list[str], final: bool) -> str:
    """Tables and plots of the results so far; returns the markdown."""
    if not results:
        md = "No results yet." + "".join(f"\n- FAILED: {f}" for f in failed) + "\n"
        (out / "bench.md").write_text(md)
        return md
    df = pd.DataFrame(results)
    df.to_csv(out / "bench_replicates.csv", index=False)
    confidence = base.evaluate.confidence
    summary = summarize(df, confidence)
    paired = compare(df, comparison_pairs(rows), confidence)
    summary.to_csv(out / "bench.csv", index=False)
    paired.to_csv(out / "bench_paired.csv", index=False)
    fp_s = df.drop_duplicates(["model", "replicate"])["fp_seconds"].sum()
    md = report.markdown(summary, paired, confidence, {"this run's wall time": wall_s, "compute time of every "
                         "result shown (FP models and samples + rows, as first computed)": fp_s + df["row_seconds"].sum()},
                         complete=final, thresholds=as_dict(base.release)) + "".join(f"\n- FAILED: {f}" for f in failed)
    (out / "bench.md").write_text(md)
    if final:
        report.plot_summary(summary, out / "bench.png")
        report.plot_paired(paired, out / "bench_paired.png")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/bench")
    ap.add_argument("--rows", default="", help="comma-separated row numbers, or a named set: "
                    f"{', '.join(ROW_SETS)} (default: the methods and the ablations, {DEFAULT_ROWS[0]}..{DEFAULT_ROWS[-1]})")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model.source values")
    ap.add_argument("--replicates", type=int, default=3, help="R: replicates 0..R-1 (default 3)")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[],
                    help="section.key=value over params.yaml for every model and row (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="recompute cached outputs")
    args = ap.parse_args(argv)
    try:
        if args.replicates < 1:
            raise ParamError(f"bench: --replicates {args.replicates} is not allowed: expected an integer >= 1")
        rows = list(ROW_SETS.get(args.rows, ())) or [int(i) for i in args.rows.split(",") if i] or list(DEFAULT_ROWS)
        bad = [i for i in rows if not 0 <= i < len(ROWS)]
        if bad:
            raise ParamError(f"bench: --rows {bad[0]} is not allowed: expected row numbers 0..{len(ROWS) - 1}")
        base = load_params(args.params)
        sets = parse_sets(args.sets)
        models = {s: model_params(base, s, sets) for s in args.models.split(",") if s}
        # every cell's params are built (and checked) before anything runs
        # replicate by replicate: an interrupted run leaves whole replicates of every model
        cells = {(s, k, i): row_params(replicate_params(mp, k), ROWS[i][1], ROWS[i][2])
                 for k in range(args.replicates) for s, mp in models.items() for i in rows}
    except PqdError as e:
        print(f"pqd bench: error: {one_line(e)}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code, t_start, results, failed = code_fingerprint(), time.perf_counter(), [], []
    n_cells = len(cells)
    for n, ((source, k, i), p) in enumerate(cells.items(), 1):
        rep = out / model_key(source) / f"r{k}"
        fp = ensure_fp(replicate_params(models[source], k), rep / "fp", code, args.fresh)
        folder = rep / row_key(i)
        key = {"params": as_dict(p), "code": code}
        res = None if args.fresh else cached(folder, key)
        if res is None:
            print(f"\n=== bench {n}/{n_cells}: {model_key(source)} r{k} row {i} ({ROWS[i][0]} W{ROWS[i][1]}) ===",
                  flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            try:
                res = run_row(p, rep / "fp", folder)
            except PqdError as e:  # this cell's data cannot be calibrated as asked: say so, go on with the others
                print(f"pqd bench: {model_key(source)} r{k} row {i} failed: {one_line(e)}", flush=True)
                failed.append(f"{model_key(source)} r{k} row {i} ({ROWS[i][0]} W{ROWS[i][1]}): {one_line(e)}")
                continue
            res["row_seconds"] = round(time.perf_counter() - t0, 1)
            record(folder, key, res)
        results.append({"model": model_key(source), "replicate": k, "row_index": i, "key": row_key(i),
                        "row": ROWS[i][0], **res, "fp_seconds": fp["fp_seconds"]})
        # written after every cell: nothing computed is lost, and the tables show the replicates so far
        write_outputs(results, rows, out, base, time.perf_counter() - t_start, failed, final=False)
    md = write_outputs(results, rows, out, base, time.perf_counter() - t_start, failed, final=True)
    print("\n" + md)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
