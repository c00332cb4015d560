"""A user's model, not ours: the six stages with the default method, bits, export and evaluation (PQD preset,
W8A8, ONNX graphs, onnxruntime evaluation, quant.reduce_range auto) on a pipeline that differs from the demo in
every way a user's model might (tests/support/models.py: build_second_model), with a TorchScript feature network
and a reference folder written here. Only the sample counts are smaller than the defaults, to fit the test budget.
The deployed artifact must match the simulation it was calibrated as, judged by the model's own numbers."""

import json
import math

import pytest

from pqd.formats import qstate as qcodec
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
    groups = qcodec.time_groups(qcodec.read_qmap(project / "data/export"))  # each probe lies in its own group
    assert [int(groups.group_of(c.timestep)) for c in ex.onnx_check] == [0, 1, 2, 3]
    assert ev.protocol.backend.startswith("onnxruntime") and ev.protocol.features.startswith("torchscript:")
    # the deployed graphs are indistinguishable from the simulation at this sample size ...
    assert ev.fid_deployed_vs_simulated <= ev.noise_floor
    # ... and add no more error than quantization did: deployed images at most twice as far from FP (MSE)
    assert ev.psnr_median >= ev.psnr_simulated_median - 10 * math.log10(2)
    # the quantized images are the FP images of the same seeds, closer to them than to each other
    assert ev.psnr_median > ev.psnr_deployed_vs_simulated_median - 10 * math.log10(2) > 25
    codes = json.loads((project / "data/export/manifest.json").read_text())["integer_codes"]
    assert codes["setting"] == "auto" and isinstance(codes["reduce_range"], bool)


def test_the_release_gate_accepts_its_artifact(project):
    """The gate's checks of the artifact itself pass on it: hashes, lineage, committed state and the deployed graphs
    judged by this model's own numbers (the FID-difference checks are about quality, not the artifact)."""
    _, report = release.check(project)
    checks = {c.name: c for c in report.checks}
    assert all(checks[n].passed for n in ("hashes", "lineage", "committed", "deployment")), report.summary()
