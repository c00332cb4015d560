"""One end-to-end `dvc repro` of the real dvc.yaml on a reduced demo, in a temporary git repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import small_params

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    shutil.copytree(ROOT / "pqd", d / "pqd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in small_params(model={"train_steps": 30, "feature_epochs": 1, "batch_size": 32},
                                        generate={"eval_samples": 24}).items():
        params[section].update(values)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [str(Path(sys.executable).parent / "dvc")]
    sh(["git", "init", "-q", "-b", "main"], d, env)
    sh(dvc + ["init", "-q"], d, env)
    sh(dvc + ["config", "core.analytics", "false"], d, env)
    sh(["git", "add", "-A"], d, env)
    sh(["git", "commit", "-qm", "init"], d, env)
    return d, env, dvc


def test_repro_then_noop_then_experiment(repo):
    d, env, dvc = repo
    sh(dvc + ["repro"], d, env)
    ev = json.loads((d / "data/metrics/evaluate.json").read_text())
    assert ev["protocol"]["num_samples"] == 24 and ev["noise_floor"] >= 0
    model_info = json.loads((d / "data/model/model.json").read_text())
    assert 0 <= model_info["digitnet_heldout_accuracy"] <= 1
    for stage in ("model", "generate", "select", "calibrate", "export", "evaluate"):
        assert (d / f"data/metrics/{stage}.json").is_file()
    out = sh(dvc + ["repro"], d, env)  # nothing changed: nothing runs
    assert "Running stage" not in out
    sh(["git", "add", "-A"], d, env)
    sh(["git", "commit", "-qm", "w8a8 baseline"], d, env)
    sh(dvc + ["exp", "run", "-S", "quant.weight_bits=4"], d, env)
    diff = json.loads(sh(dvc + ["metrics", "diff", "--json"], d, env))
    export_diff = diff["data/metrics/export.json"]
    assert export_diff["packed_int4_layers"]["new"] > 0 and export_diff["packed_int4_layers"]["old"] == 0
    assert export_diff["size_ratio"]["new"] > export_diff["size_ratio"]["old"]
