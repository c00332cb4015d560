"""One end-to-end `dvc repro` of the real dvc.yaml on a reduced demo, in a temporary git repo (the session's
reference run, shared with the interruption and determinism tests), then a no-op repro and an experiment."""

import json

import pytest

from support.projects import BIN, clone, demo_reference, ops_env, sh

pytestmark = pytest.mark.slow  # a full `dvc repro` of the reduced demo: make test-fast leaves it out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the reduced demo after its one uninterrupted `dvc repro` from a clean data/."""
    d = clone(demo_reference(tmp_path_factory), tmp_path_factory.mktemp("e2e") / "p")
    return d, ops_env(), [str(BIN / "dvc")]


def test_repro_then_noop_then_experiment(repo):
    d, env, dvc = repo
    ev = json.loads((d / "data/metrics/evaluate.json").read_text())
    assert ev["protocol"]["num_samples"] == 24 and ev["noise_floor"] > 0  # two disjoint FP sets differ
    model_info = json.loads((d / "data/model/model.json").read_text())
    assert model_info["digitnet_heldout_accuracy"] > 0.2  # trained (one epoch here): over twice the 0.1 of guessing
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
