"""``make bench-parallel``: what Dask buys on this machine, four measurements side by side.

1. **generate**: the generate stage's real command line with ``parallel.scheduler: none`` (default threads, and 1)
   against ``local`` (``--workers`` x 1 thread): wall and stage seconds, and whether the outputs are byte-identical;
2. **sweep**: the same 2x2 sweep serial and on a LocalCluster, each in a fresh clone that computes every cell;
3. **overhead**: Dask's cost per range task (an empty one, and one returning a batch of images), after a warm-up;
4. **calibrate**: sharded block reconstruction (:func:`bench_calibrate`), serial against Dask workers.

Run it where dvc.lock is committed and the cache holds the model and generate outputs (the sweeps clone HEAD).
Writes ``--out`` (markdown) and a JSON beside it; after a failure its work folder is kept for the logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from pqd.errors import command
from pqd.formats.lineage import dvc_dir_md5, git_commit
from pqd.formats.repo import BIN, cache_dir, clone
from pqd.params import ParallelParams, apply_overrides
from pqd.stages.parallel import ModelRef, Worker, map_ranges, open_pool


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``cmd``; its output goes to ``cwd/bench.log``; a failure stops the benchmark."""
    t0 = time.perf_counter()
    with open(cwd / "bench.log", "a") as log:
        r = subprocess.run(cmd, cwd=cwd, env=env or _env(), stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"bench-parallel: {' '.join(cmd[:4])} ... failed (see {cwd / 'bench.log'})")
    return round(time.perf_counter() - t0, 2)


def bench_generate(root: Path, work: Path, workers: int, overrides: list[str]) -> list[dict[str, Any]]:
    """The generate stage three ways, on ``root``'s data/model; rows of the table."""
    base = apply_overrides(yaml.safe_load((root / "params.yaml").read_text()), overrides)
    runs = [("none, default threads", {"scheduler": "none"}, {}),
            ("none, 1 thread", {"scheduler": "none"}, {"OMP_NUM_THREADS": "1"}),
            (f"local, {workers} workers x 1 thread", {"scheduler": "local", "workers": workers, "threads_per_worker": 1},
             {})]
    rows, hashes = [], {}
    for i, (name, par, env) in enumerate(runs):
        d = work / f"generate-{i}"
        d.mkdir(parents=True)
        (d / "params.yaml").write_text(yaml.safe_dump({**base, "parallel": par}, sort_keys=False))
        wall = _run([str(BIN / "python"), "-m", "pqd.stages.generate", "--params", str(d / "params.yaml"),
                     "--model", str(root / "data/model"), "--trajectories", str(d / "traj"), "--samples", str(d / "fp"),
                     "--metrics", str(d / "metrics.json")], d, _env(**env))
        m = json.loads((d / "metrics.json").read_text())
        hashes[i] = (dvc_dir_md5(d / "traj"), dvc_dir_md5(d / "fp"))
        rows.append({"run": name, "wall_s": wall, "stage_s": m["seconds"], "ranges": m["parallel"]["ranges"],
                     "torch_threads": m["parallel"]["threads_per_worker"]})
    for i, row in enumerate(rows):
        row["same_bytes_as_1_thread"] = "-" if i == 1 else hashes[i] == hashes[1]
    return rows


@contextlib.contextmanager
def tcp_cluster(workers: int, work: Path) -> Iterator[str]:
    """A Dask cluster on loopback as a team would run one: ``dask scheduler`` and ``workers`` ``dask worker``
    processes of 1 thread (separate processes, started here, stopped afterwards); yields the scheduler address."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = open(work / "cluster.log", "a")
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], stdout=log, stderr=subprocess.STDOUT)]
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:  # the scheduler answers before the workers start
            procs += [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                        "--name", str(i), "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT)
                      for i in range(workers)]
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_calibrate(root: Path, work: Path, workers: int, overrides: list[str]) -> list[dict[str, Any]]:
    """The calibrate stage's real command line on ``root``'s data/model and data/calib: the sequential method and
    the two concurrent variants (FP inputs; waves of ``workers`` units), each serial and on ``workers`` Dask
    workers (a LocalCluster, and separate scheduler + worker processes on loopback); rows of the table."""
    base = apply_overrides(yaml.safe_load((root / "params.yaml").read_text()), overrides)
    local = {"scheduler": "local", "workers": workers, "threads_per_worker": 1}
    variants = [("sequential (quantized inputs, wave 1)", {}),
                ("FP inputs", {"recon_inputs": "float"}),
                (f"quantized inputs, waves of {workers}", {"recon_wave": workers})]
    rows = []
    for vi, (variant, calib) in enumerate(variants):
        runs = [("none, default threads", {"scheduler": "none"}, {}),
                ("none, 1 thread", {"scheduler": "none"}, {"OMP_NUM_THREADS": "1"})]
        if vi > 0:
            runs += [("local, 1 worker x 1 thread", {**local, "workers": 1}, {}),
                     (f"local, {workers} workers x 1 thread", local, {}),
                     (f"tcp, {workers} worker processes x 1 thread", {"scheduler": "tcp"}, {})]
        hashes = {}
        for ri, (name, par, env) in enumerate(runs):
            d = work / f"calibrate-{vi}-{ri}"
            d.mkdir(parents=True)
            cmd = [str(BIN / "python"), "-m", "pqd.stages.calibrate", "--params", str(d / "params.yaml"),
                   "--model", str(root / "data/model"), "--calib", str(root / "data/calib"), "--out", str(d / "qstate"),
                   "--metrics", str(d / "metrics.json")]
            params = {**base, "calibrate": {**base["calibrate"], **calib},
                      "checkpoint": {**base.get("checkpoint", {}), "dir": str(d / "checkpoints")}}
            with contextlib.ExitStack() as stack:
                if par["scheduler"] == "tcp":
                    par = {**local, "scheduler": stack.enter_context(tcp_cluster(workers, d))}
                (d / "params.yaml").write_text(yaml.safe_dump({**params, "parallel": par}, sort_keys=False))
                wall = _run(cmd, d, _env(**env))
            m = json.loads((d / "metrics.json").read_text())
            hashes[ri] = dvc_dir_md5(d / "qstate")
            rows.append({"variant": variant, "run": name, "wall_s": wall, "stage_s": m["seconds"],
                         "reconstruction_s": m["reconstruction_seconds"], "output_mse": f"{m['output_mse']:.6g}",
                         "units": m["reconstructed_units"]})
        for ri, r in enumerate(rows[-len(runs):]):
            r["same_bytes_as_1_thread"] = "-" if ri == 1 else hashes[ri] == hashes[1]
    return rows


def _clone_for_sweep(root: Path, dest: Path) -> None:
    """A clone of ``root`` at HEAD with its own empty cache, holding model and generate outputs pulled from
    ``root``'s cache (used as a remote): every later stage of every cell is computed."""
    clone(root, dest)
    _run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "bench-base", cache_dir(root)], dest)
    _run([str(BIN / "dvc"), "pull", "-q", "generate", "--with-deps"], dest)


def bench_sweep(root: Path, work: Path, workers: int, overrides: list[str]) -> list[dict[str, Any]]:
    rows = []
    sets = [a for o in overrides for a in ("-S", o)]
    for name, flag in (("serial (--workers 0)", "0"), (f"{workers} Dask workers (--workers {workers})", str(workers))):
        d = work / f"sweep-{flag}"
        _clone_for_sweep(root, d)
        env = _env()
        env.pop("MLFLOW_TRACKING_URI", None)  # each clone's own sqlite store
        wall = _run([str(BIN / "python"), "-m", "flows.sweep", "--bits", "w8a8,w4a8", "--methods", "minmax,pqd",
                     "--workers", flag, "--experiment", "pqd-bench-parallel", *sets], d, env)
        table = sorted((d / "data/sweeps").glob("sweep-*.md"))[-1].read_text()
        rows.append({"run": name, "wall_s": wall, "table": table})
    same = _table_numbers(rows[0]["table"]) == _table_numbers(rows[1]["table"])
    return [{"run": r["run"], "wall_s": r["wall_s"], "same_table": same} for r in rows]


def _table_numbers(md: str) -> list[list[str]]:
    """The rows of a sweep table without the columns that differ by nature (calibration time, run ids)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    keep = [i for i, c in enumerate(head) if c not in ("calibrate_s", "mlflow_run")]
    return [[[c.strip() for c in ln.strip("|").split("|")][i] for i in keep] for ln in lines[1:]]


def no_model(device: str) -> None:
    return None


@dataclass(frozen=True)
class Empty:
    seeds: list[int]
    images: int  # 0: return nothing; n: return a [n, 1, 8, 8] batch (the demo's images) through the scratch folder


def empty_range(w: Worker, job: Empty) -> Any:
    return {"images": torch.zeros(job.images, 1, 8, 8)} if job.images else len(job.seeds)


def bench_overhead(work: Path, workers: int, tasks: int) -> list[dict[str, Any]]:
    ref = ModelRef(no_model, (), "cpu", "")
    rows = []
    with open_pool(ParallelParams("local", workers, 1), "bench") as pool:
        map_ranges(pool, empty_range, ref, [Empty([0], 0)] * (4 * workers), scratch=work / "scratch", desc="warm-up")
        for name, images in (("no-op task", 0), ("task returning 250 8x8 images", 250)):
            t0 = time.perf_counter()
            map_ranges(pool, empty_range, ref, [Empty([0], images)] * tasks, scratch=work / "scratch", desc=name)
            seconds = time.perf_counter() - t0
            rows.append({"task": name, "tasks": tasks, "seconds": round(seconds, 3),
                         "ms_per_task": round(1000 * seconds / tasks, 2)})
    return rows


def _md(rows: list[dict[str, Any]]) -> str:
    head = list(rows[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows])


@command("bench-parallel")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.parallel", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/bench/parallel.md")
    ap.add_argument("--parts", default="generate,sweep,overhead,calibrate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=200, help="overhead: tasks per measurement")
    ap.add_argument("--generate-set", action="append", default=[], metavar="KEY=VALUE", help="generate: an override")
    ap.add_argument("--sweep-set", action="append", default=[], metavar="KEY=VALUE", help="sweep: an override per cell")
    ap.add_argument("--calibrate-set", action="append", default=[], metavar="KEY=VALUE", help="calibrate: an override")
    args = ap.parse_args(argv)
    root, parts = Path(".").resolve(), args.parts.split(",")
    work = Path(tempfile.mkdtemp(prefix="pqd-bench-parallel-"))
    result: dict[str, Any] = {"commit": git_commit(root).commit, "cpus": os.cpu_count(),
                              "default_torch_threads": torch.get_num_threads(), "workers": args.workers}
    if "generate" in parts:
        result["generate"] = bench_generate(root, work, args.workers, args.generate_set)
    if "sweep" in parts:
        result["sweep"] = bench_sweep(root, work, args.workers, args.sweep_set)
    if "overhead" in parts:
        result["overhead"] = bench_overhead(work, args.workers, args.tasks)
    if "calibrate" in parts:
        result["calibrate"] = bench_calibrate(root, work, args.workers, args.calibrate_set)
    shutil.rmtree(work, ignore_errors=True)  # kept after a failure: its bench.log files say why
    lines = [f"# make bench-parallel at commit {str(result['commit'])[:12]}", "",
             f"{result['cpus']} CPUs, default torch threads {result['default_torch_threads']}, "
             f"{args.workers} Dask workers x 1 thread.", ""]
    for part in ("generate", "sweep", "overhead", "calibrate"):
        if part in result:
            lines += [f"## {part}", "", _md(result[part]), ""]
    if "generate" in result:
        g = result["generate"]
        lines += [f"generate wall-time ratio none / local: {g[0]['wall_s'] / g[2]['wall_s']:.3f} "
                  f"(default threads), {g[1]['wall_s'] / g[2]['wall_s']:.3f} (1 thread)", ""]
    if "sweep" in result:
        s = result["sweep"]
        lines += [f"sweep wall-time ratio serial / Dask: {s[0]['wall_s'] / s[1]['wall_s']:.3f}", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
