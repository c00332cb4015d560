"""Shared fixtures: offline hygiene, torch threads, a tiny random pipeline and a TorchScript feature network.

Tests mirror the package (tests/core, tests/params, ... tests/ops, tests/flows); tests/e2e holds the slow
end-to-end runs of the real pipeline (marked ``slow``: ``make test-fast`` leaves them out). Builders of models
and projects live in tests/support.
"""

import os

# offline hygiene for every test (CI sets these too)
for k, v in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402

# two threads for one test process; one each when pytest-xdist runs workers side by side (make test)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from support.models import build_tiny_pipeline, build_torchscript_features  # noqa: E402
from support.projects import built_once  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny", lambda d: build_tiny_pipeline(d / "pipe")) / "pipe"


@pytest.fixture(scope="session")
def ts_features(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "feat", lambda d: build_torchscript_features(d / "feat.pt")) / "feat.pt"


@pytest.fixture()
def one_thread():
    """One torch thread for the test (a serial run compared with workers of parallel.threads_per_worker 1:
    floats depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# files without slow tests whose module fixtures take longest (a whole pipeline run, an ONNX export: `make test-fast`
# with --durations=0), queued right after the files with slow tests so that they do not finish last
HEAVY_SETUP = {"tests/stages/test_stages.py", "tests/deploy/test_onnx_graphs.py"}


def pytest_collection_modifyitems(config, items):
    """make test runs the files on several processes (pytest-xdist --dist loadfile --no-loadscope-reorder: a file is
    one unit of work, so its module fixtures are built once, queued in collection order). The files holding slow
    tests go first, then HEAVY_SETUP, so that the longest work starts first and the short files fill the gaps at the
    end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    root = config.rootpath
    # stable: a file's tests stay together and in order
    items.sort(key=lambda item: (item.path not in slow, item.path.relative_to(root).as_posix() not in HEAVY_SETUP))
