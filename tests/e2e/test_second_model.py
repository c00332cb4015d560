"""A user's model, not ours: the six stages with the default method, bits, export and evaluation (PQD preset,
W8A8, ONNX graphs, onnxruntime evaluation, quant.reduce_range auto) on a pipeline that differs from the demo in
every way a user's model might (tests/support/models.py: build_second_model), with a TorchScript feature network
and a reference folder written here. Only the sample counts are smaller than the defaults, to fit the test budget.
The deployed artifact must match the simulation it was calibrated as, judged by the model's own numbers."""

import json

import pytest

from pqd.formats.metrics import EvaluateMetrics, ExportMetrics
from pqd.ops import release
from support.models import build_second_model, build_torchscript_features, write_reference_images
from support.projects import BIN, init_project, run_stages_in_process, sh

pytestmark = pytest.mark.slow  # every stage of a real project: make test-fast leaves it out

COUNTS = {"generate": {"steps": 20, "calib_seeds": 16, "eval_samples": 96, "batch_size": 96, "shard_size": 8},
          "select": {"num_samples": 128}, "calibrate": {"recon_iters": 60}, "evaluate": {"batch_size": 96}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("second")
    model = build_second_model(base / "pipe")
    features = build_torchscript_features(base / "features.pt")
    refs = write_reference_images(base / "refs")
    d = init_project(base / "project", {**COUNTS, "model": {"source": str(model)},
                                        "evaluate": {**COUNTS["evaluate"], "features": f"torchscript:{features}",
                                                     "reference": str(refs)}})
    sh([str(BIN / "python"), "-m", "pqd.params", "params.yaml"], d)  # every path it names is checked first
    run_stages_in_process(d)
    sh(["git", "add", "-A"], d)
    sh(["git", "commit", "-qm", "reproduced"], d)
    return d


def test_all_six_stages_deploy_what_was_calibrated(project):
    ex = ExportMetrics.read(project / "data/metrics/export.json")
    ev = EvaluateMetrics.read(project / "data/metrics/evaluate.json")
    assert ex.onnx_graphs == 4 and ex.onnx_kernels["int8"].get("QLinearConv", 0) > 0  # PQD preset: 4 time groups
    assert len(ex.onnx_check) == 4 and all(c.rel_to_quant_error >= 0 for c in ex.onnx_check)
    assert ev.protocol.backend.startswith("onnxruntime") and ev.protocol.features.startswith("torchscript:")
    # the deployed graphs are indistinguishable from the simulation at this sample size ...
    assert ev.fid_deployed_vs_simulated <= ev.noise_floor
    # ... and deviate from it less than quantization deviates from FP, image by image
    assert ev.psnr_deployed_vs_simulated_median > ev.psnr_median
    assert ev.psnr_median > 20  # the quantized images are the FP images of the same seeds, not noise
    codes = json.loads((project / "data/export/manifest.json").read_text())["integer_codes"]
    assert codes["setting"] == "auto" and isinstance(codes["reduce_range"], bool)


def test_the_release_gate_passes_it(project):
    _, report = release.check(project)
    assert report.passed, report.summary()
    assert "deployment" in [c.name for c in report.checks]
