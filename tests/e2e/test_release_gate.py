"""The release gate can fail: on the reduced demo it passes the W8A8 PQD result and refuses a W3A8 min-max one,
judging paired statistics of each against its own FP model on the same seeds, with the default thresholds."""

import json

import pytest

from pqd.formats.metrics import EvaluateMetrics
from pqd.ops import release
from support.projects import clone, demo_reference, run_stages_in_process, sh

pytestmark = pytest.mark.slow  # the reduced demo's dvc repro (shared with the other e2e tests), then one more run


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """The reduced demo (PQD, W8A8), committed."""
    d = clone(demo_reference(tmp_path_factory), tmp_path_factory.mktemp("gate") / "w8a8")
    sh(["git", "add", "-A"], d)
    sh(["git", "commit", "-qm", "w8a8 pqd"], d)
    return d


@pytest.fixture(scope="module")
def w3a8_minmax(w8a8, tmp_path_factory):
    """The same FP model, trajectories and FP samples, calibrated W3A8 with min-max ranges and no reconstruction."""
    d = clone(w8a8, tmp_path_factory.mktemp("gate") / "w3a8")
    params = d / "params.yaml"
    text = params.read_text().replace("weight_bits: 8", "weight_bits: 3", 1).replace("method: pqd", "method: minmax", 1)
    params.write_text(text.replace("time_groups: 2", "time_groups: null", 1))
    run_stages_in_process(d, ("select", "calibrate", "export", "evaluate"))
    sh(["git", "add", "-A"], d)
    sh(["git", "commit", "-qm", "w3a8 minmax"], d)
    return d


def checks(project):
    _, report = release.check(project)
    return report, {c.name: c for c in report.checks}


def test_the_gate_passes_the_w8a8_pqd_demo(w8a8):
    report, by_name = checks(w8a8)
    assert report.passed, report.summary()
    assert {"delta_fid", "fid_vs_fp", "psnr"} <= set(by_name)
    assert "[" in by_name["fid_vs_fp"].detail  # judged on the interval


def test_the_gate_refuses_the_w3a8_minmax_demo(w3a8_minmax, w8a8):
    report, by_name = checks(w3a8_minmax)
    assert not report.passed
    # the artifact itself is sound: what fails is its quality against its own FP model
    assert all(by_name[n].passed for n in ("hashes", "lineage", "committed", "deployment")), report.summary()
    failed = {n for n in ("delta_fid", "fid_vs_fp", "psnr") if not by_name[n].passed}
    assert failed, report.summary()
    ev3 = EvaluateMetrics.read(w3a8_minmax / "data/metrics/evaluate.json")
    ev8 = EvaluateMetrics.read(w8a8 / "data/metrics/evaluate.json")
    assert ev3.protocol.weight_codes.startswith("3-bit") and ev3.noise_floor == ev8.noise_floor  # same FP samples
    assert ev3.psnr_mean_ci.hi < ev8.psnr_mean_ci.lo  # the paired per-image error separates the two
    print(json.dumps({n: by_name[n].detail for n in ("delta_fid", "fid_vs_fp", "psnr")}, indent=1))
