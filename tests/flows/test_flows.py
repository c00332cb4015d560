"""The Prefect flows: plain functions first, then real flow runs under prefect_test_harness (real dvc, real
sqlite MLflow store), and one scheduled deployment served against a real `prefect server` on loopback."""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from flows.tasks import apply_overrides, run_dvc
from support.projects import BIN, ROOT, active_runs, clone, db_rows, free_port, ops_env, reproduced_project, run_tags
from pqd.params import ParamError


def test_plan_is_the_bits_by_methods_matrix():
    from flows.sweep import plan

    cells = plan(["w8a8", "w4a8"], ["minmax", "pqd"], ["generate.steps=10"])
    assert [c.name for c in cells] == ["w8a8-minmax", "w8a8-pqd", "w4a8-minmax", "w4a8-pqd"]
    assert cells[2].overrides == ("generate.steps=10", "quant.weight_bits=4", "quant.act_bits=8",
                                  "calibrate.method=minmax")
    with pytest.raises(ParamError, match="sweep bits 'w9a8' is not allowed: expected wWaA"):
        plan(["w9a8"], ["pqd"], [])
    with pytest.raises(ParamError, match="sweep method 'brecq' is not allowed: expected one of minmax, ptq4dm"):
        plan(["w8a8"], ["brecq"], [])


def test_overrides_apply_like_dvc_set_param():
    p = {"quant": {"weight_bits": 8}, "model": {"channels": [32, 64]}}
    out = apply_overrides(p, ["quant.weight_bits=4", "model.channels=[8, 16]", "calibrate.method=pqd"])
    assert out == {"quant": {"weight_bits": 4}, "model": {"channels": [8, 16]}, "calibrate": {"method": "pqd"}}
    assert p["quant"]["weight_bits"] == 8  # the input is not changed
    with pytest.raises(ParamError, match="override 'quant.weight_bits' is not allowed: expected key.subkey=value"):
        apply_overrides(p, ["quant.weight_bits"])


def test_validate_params_task_refuses_a_bad_override_in_one_line(tmp_path_factory, tiny_pipeline, ts_features):
    from flows.tasks import validate_params

    d = reproduced_project(tmp_path_factory, tiny_pipeline, ts_features)
    with pytest.raises(ParamError, match=r"quant.weight_bits = 9 is not allowed: expected an integer in \[2, 8\]"):
        validate_params.fn(str(d), ["quant.weight_bits=9"])


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield


@pytest.fixture()
def project(tmp_path, tmp_path_factory, tiny_pipeline, ts_features):
    return clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path / "p")


@pytest.mark.slow  # real flow runs (Prefect server, dvc): make test-fast leaves them out
def test_pipeline_flow_reproduces_then_tracks_idempotently(harness, project):
    from flows.pipeline import pipeline

    first = pipeline(str(project))
    assert first.dvc.command == "dvc repro" and first.dvc.ran_stages == ()  # up to date
    assert first.run.created and [r[0] for r in active_runs(project)] == [first.run.run_id]
    again = pipeline(str(project))
    assert (again.run.run_id, again.run.created) == (first.run.run_id, False)
    assert len(active_runs(project)) == 1


@pytest.mark.slow  # real flow runs (Prefect server, dvc): make test-fast leaves them out
def test_pipeline_flow_with_unreachable_mlflow_fails_at_tracking_and_keeps_the_result(harness, project, monkeypatch):
    from flows.pipeline import pipeline

    lock = (project / "dvc.lock").read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    state = pipeline(str(project), return_state=True)
    assert state.is_failed() and "unreachable" in state.message
    assert (project / "dvc.lock").read_text() == lock and "up to date" in run_dvc(project, ["status"]).output
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert pipeline(str(project)).run.created  # tracked later, once
    assert len(active_runs(project)) == 1


@pytest.mark.slow  # real flow runs (Prefect server, dvc): make test-fast leaves them out
def test_sweep_flow_two_cells_parent_children_table_and_restored_workspace(harness, project):
    from flows.sweep import sweep

    params_before = (project / "params.yaml").read_text()
    result = sweep(str(project), bits=["w8a8", "w4a8"], methods=["minmax"])
    runs = {name: run_id for run_id, name, _ in active_runs(project)}
    assert set(runs) == {"w8a8-minmax", "w4a8-minmax", "sweep [w8a8, w4a8] x [minmax]"}
    for cell in ("w8a8-minmax", "w4a8-minmax"):
        assert run_tags(project, runs[cell])["mlflow.parentRunId"] == result.parent_run_id
    weight_bits = dict(db_rows(project, "SELECT run_uuid, value FROM params WHERE key = 'quant.weight_bits'"))
    assert (weight_bits[runs["w8a8-minmax"]], weight_bits[runs["w4a8-minmax"]]) == ("8", "4")
    rows = {r["cell"]: r for r in result.rows}
    assert rows["w4a8-minmax"]["size_ratio"] > rows["w8a8-minmax"]["size_ratio"]  # 4-bit weights are packed
    table = Path(result.table_md).read_text()
    assert "| w4a8-minmax | w4a8 | minmax |" in table and Path(result.table_csv).is_file()
    art = project / "mlartifacts/pqd" / result.parent_run_id / "artifacts"
    assert (art / Path(result.table_md).name).read_text() == table
    # the workspace is back where it was, and both cells are DVC experiments
    assert (project / "params.yaml").read_text() == params_before
    assert "up to date" in run_dvc(project, ["status"]).output
    assert set(run_dvc(project, ["exp", "list", "--name-only"]).output.split()) >= {"w8a8-minmax", "w4a8-minmax"}


@pytest.mark.slow  # real flow runs (Prefect server, dvc): make test-fast leaves them out
def test_release_flow_refuses_then_registers(harness, project):
    from flows.release import release

    f = project / "data/metrics/evaluate.json"
    good = f.read_text()
    f.write_text(json.dumps({**json.loads(good), "delta_fid": 1e9}))  # also breaks the dvc.lock lineage
    state = release(str(project), return_state=True)
    assert state.is_failed() and "release gate failed" in state.message and "lineage" in state.message
    assert db_rows(project, "SELECT name FROM model_versions") == []
    f.write_text(good)
    v = release(str(project))
    assert (v.name, v.version, v.alias, v.created) == ("pqd-pipe-w8a8", "1", "candidate", True)
    assert dict(db_rows(project, "SELECT alias, version FROM registered_model_aliases")) == {"candidate": 1}


def _api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow  # real flow runs (Prefect server, dvc): make test-fast leaves them out
def test_served_benchmark_runs_on_its_cron_schedule_on_a_real_server(project, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = ops_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api,
                  PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_RUNNER_POLL_FREQUENCY="5")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _api(api, "/health")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "prefect server did not start"
                time.sleep(1)
        # a cron schedule with a seconds field (every 10 s) keeps the test short; the default is nightly
        serve = subprocess.Popen([str(BIN / "python"), "-m", "flows.benchmark", "serve", "--root", str(project),
                                  "--cron", "* * * * * */10", "--stage", "select"], cwd=ROOT, env=env,
                                 stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 150
        completed = []
        while not completed:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no scheduled run completed:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(3)
            completed = _api(api, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
        deployment = _api(api, f"/deployments/{completed[0]['deployment_id']}")
        assert deployment["name"] == "pqd-benchmark-nightly"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["* * * * * */10"]
        assert completed[0]["parameters"]["root"] == str(project)
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
    finished = [run_id for run_id, _, status in active_runs(project)
                if status == "FINISHED" and run_tags(project, run_id).get("pqd.kind") == "benchmark"]
    assert finished, "the scheduled run left no finished MLflow run"
    exp = db_rows(project, "SELECT e.name FROM experiments e JOIN runs r ON r.experiment_id = e.experiment_id "
                           "WHERE r.run_uuid = ?", finished[0])
    assert exp == [("pqd-benchmark",)]
