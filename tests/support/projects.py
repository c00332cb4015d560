"""A small PQD project for the operations tests: a git + DVC repo with the real dvc.yaml, the tiny random
pipeline as model.source and a TorchScript feature network, reproduced once per test session."""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml
from filelock import FileLock

from pqd.params import integer_codes, params_from_dict


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
# width of the codes of 8-bit weights on this machine with the default quant.reduce_range (auto): 7 on x86 CPUs
# without VNNI/AMX, 8 elsewhere (pqd.params.machine)
CODE_BITS_8 = 7 if integer_codes(params_from_dict({})).reduce_range else 8
# the registered name of a W8A8 release of a pipeline folder named 'pipe' on this machine (W7A8 where the CPU takes
# 7-bit codes)
RELEASE_NAME = f"pqd-pipe-w{CODE_BITS_8}a8"


def small_params(**sections) -> dict:
    """Params for fast tests: a few trajectories and samples."""
    p = {
        "generate": {"steps": 6, "calib_seeds": 6, "eval_samples": 12, "batch_size": 8, "shard_size": 4},
        "select": {"num_samples": 16, "mu": 0.5, "sigma": 0.3},
        "calibrate": {"batch_size": 8, "act_samples": 5000, "time_groups": 2, "recon_iters": 8, "recon_batch_size": 8},
        "evaluate": {"batch_size": 8, "grid_size": 9, "bootstrap": 200},
    }
    for k, v in sections.items():
        p.setdefault(k, {}).update(v) if isinstance(v, dict) else p.__setitem__(k, v)
    return p


def write_params(folder: Path, data: dict) -> Path:
    f = folder / "params.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def ops_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, a git identity, no telemetry."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **GIT_ID, **extra}


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env or ops_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def init_project(dest: Path, overrides: dict) -> Path:
    """A committed git + DVC project in ``dest`` (not reproduced yet): this checkout's pqd/ and dvc.yaml,
    and its params.yaml with ``overrides`` ({section: {key: value}}) applied."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pqd", dest / "pqd", ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in spec["stages"].values():  # code deps the foundation has not written yet in this checkout
        stage["deps"] = [d for d in stage.get("deps", []) if not d.startswith("pqd/") or (ROOT / d).exists()]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n__pycache__/\n/.pqd/\n")
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh([str(BIN / "dvc"), "init", "-q"], dest)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "init"], dest)
    return dest


# release thresholds that any result meets: the operations project's random-weight model has no quality to judge
# (the gate's quality checks are tested on their own and on the trained demo, tests/e2e/test_demo_project.py)
OPEN_GATE = {"delta_fid_fraction": 1e9, "fid_vs_fp_fraction": 1e9, "psnr_margin_db": -1e9}


def make_project(dest: Path, tiny_pipeline: Path, features: Path) -> Path:
    """The operations project: the tiny random pipeline, minmax, TorchScript features, an open release gate
    (OPEN_GATE; not reproduced yet)."""
    return init_project(dest, small_params(model={"source": str(tiny_pipeline)}, calibrate={"method": "minmax"},
                                           generate={"eval_samples": 8},
                                           evaluate={"features": f"torchscript:{features}",
                                                     "reference": "data/samples/fp/b"}, release=OPEN_GATE))


def make_demo_project(dest: Path) -> Path:
    """The reduced embedded demo (demo:digits, a few training steps, the full PQD method with block
    reconstruction and QDrop), not reproduced yet."""
    # the torch backend: on this 30-step model the ONNX agreement check of the export stage is marginal
    # (0.057 of the quantization error against its 0.05 bound), which is the ONNX tests' business, not these
    return init_project(dest, small_params(model={"train_steps": 30, "feature_epochs": 1, "batch_size": 32},
                                           generate={"eval_samples": 24}, export={"onnx": False},
                                           evaluate={"backend": "torch"}))


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_stages_in_process(project: Path, stages: tuple[str, ...] | None = None) -> None:
    """Each stage's real command line (from dvc.yaml) through its main(), in this process, then
    ``dvc commit``: the same outputs, dvc.lock and run cache as ``dvc repro`` without an interpreter
    start-up per stage."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    with _cwd(project):
        for name, stage in spec["stages"].items():
            if stages is not None and name not in stages:
                continue
            argv = shlex.split(stage["cmd"])
            assert argv[:2] == ["python", "-m"], stage["cmd"]
            assert importlib.import_module(argv[2]).main(argv[3:]) == 0, f"stage {name} failed"
    sh([str(BIN / "dvc"), "commit", "-f", "-q"], project)


def run_stage_mains(params: Path, data: Path) -> Path:
    """The six stages through their command-line ``main`` (as dvc.yaml calls them) with ``params`` and outputs
    under ``data`` (no DVC); returns ``data``."""
    stages = {s: importlib.import_module(f"pqd.stages.{s}") for s in
              ("model", "generate", "select", "calibrate", "export", "evaluate")}

    def call(name: str, **paths: Path) -> None:
        args = ["--params", str(params), "--metrics", str(data / f"metrics/{name}.json")]
        for k, v in paths.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        assert stages[name].main(args) == 0, name

    call("model", out=data / "model")
    call("generate", model=data / "model", trajectories=data / "trajectories", samples=data / "samples/fp")
    call("select", trajectories=data / "trajectories", out=data / "calib")
    call("calibrate", model=data / "model", calib=data / "calib", out=data / "qstate")
    call("export", model=data / "model", qstate=data / "qstate", out=data / "export")
    call("evaluate", model=data / "model", export=data / "export", fp_samples=data / "samples/fp",
         out=data / "samples/quant", grid=data / "metrics/grid.png")
    return data


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` once per test run, shared by every pytest-xdist worker (make test runs several): in the
    run's common temporary folder, under a file lock, so that a second worker waits for the first's build and then
    reads it. Read what it holds; clone it to change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def reproduced_project(tmp_path_factory, tiny_pipeline: Path, features: Path) -> Path:
    """The committed project with a complete result, built once per test run (clone it to change it)."""
    def build(folder: Path) -> None:
        d = make_project(folder / "project", tiny_pipeline, features)
        run_stages_in_process(d)
        # the W4A8 variant, computed once into DVC's run cache: `dvc exp run -S quant.weight_bits=4` in the
        # tests restores it instead of recomputing (the flows' mechanics are under test, not the stages)
        baseline = (d / "params.yaml").read_text()
        (d / "params.yaml").write_text(baseline.replace("weight_bits: 8", "weight_bits: 4", 1))
        run_stages_in_process(d, ("calibrate", "export", "evaluate"))
        (d / "params.yaml").write_text(baseline)
        sh([str(BIN / "dvc"), "repro", "-q"], d)  # back to W8A8, from the run cache
        sh(["git", "add", "-A"], d)
        sh(["git", "commit", "-qm", "reproduced"], d)
        # its MLflow store created (empty; git ignores it): MLflow's two seconds of schema migrations are paid here
        # once, not by every test that tracks or releases in a clone
        from pqd.ops import tracking

        tracking.client(d).search_experiments()

    return built_once(tmp_path_factory, "ops", build) / "project"


def clone(src: Path, dest: Path) -> Path:
    """A full copy (work tree, .git, DVC cache) that a test may change."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def db_rows(project: Path, sql: str, *args) -> list[tuple]:
    """Rows from the project's MLflow sqlite store, read with sqlite3 (independent of MLflow's client)."""
    db = project / "mlflow.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(sql, args).fetchall()


def active_runs(project: Path) -> list[tuple[str, str, str]]:
    """(run id, name, status) of every active run."""
    return db_rows(project, "SELECT run_uuid, name, status FROM runs WHERE lifecycle_stage = 'active'")


def run_tags(project: Path, run_id: str) -> dict[str, str]:
    return dict(db_rows(project, "SELECT key, value FROM tags WHERE run_uuid = ?", run_id))


def demo_reference(tmp_path_factory) -> Path:
    """The reduced demo reproduced once per test run by one uninterrupted `dvc repro` from a clean data/."""
    def build(folder: Path) -> None:
        sh([str(BIN / "dvc"), "repro"], make_demo_project(folder / "p"), timeout=1200)

    return built_once(tmp_path_factory, "demo-ref", build) / "p"


def stage_outputs(project: Path) -> dict[str, str]:
    """{output path: md5} of every stage output recorded in dvc.lock, except the metrics JSON files (they hold
    wall-clock timings, which differ from run to run by nature)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
            if not (o["path"].startswith("data/metrics/") and o["path"].endswith(".json"))}


def wiped_clone(src: Path, dest: Path) -> Path:
    """A copy of project ``src`` at the same git commit with no outputs, no dvc.lock and an empty DVC cache
    (no run cache): the next `dvc repro` computes every stage again from a clean data/."""
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("data", "cache", "tmp", "dvc.lock"))
    return dest
