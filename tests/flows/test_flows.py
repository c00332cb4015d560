"""The Prefect flows: plain functions first, then real flow runs under prefect_test_harness (real dvc, real
sqlite MLflow store, a real Dask LocalCluster for the concurrent sweep). The scheduled deployment served against a
real `prefect server` on loopback is in tests/ops/test_team.py."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.tasks import apply_overrides, concurrent_env, run_dvc
from support.projects import RELEASE_NAME, ROOT, active_runs, clone, db_rows, free_port, reproduced_project, run_tags
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


def test_cells_side_by_side_get_openmp_threads_that_sleep_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = concurrent_env()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert concurrent_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_validate_params_task_refuses_a_bad_override_in_one_line(tmp_path):
    from flows.tasks import validate_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # the task reads the project's params.yaml only
    validate_params.fn(str(tmp_path), ["quant.weight_bits=4"])
    with pytest.raises(ParamError, match=r"quant.weight_bits = 9 is not allowed: expected an integer in \[2, 8\]"):
        validate_params.fn(str(tmp_path), ["quant.weight_bits=9"])
    # a bench or sweep cell of a user's model with the demo's digit features would calibrate, then fail in evaluate
    with pytest.raises(ParamError, match=r"evaluate.features = 'demo:digits' is not allowed with model.source = "):
        validate_params.fn(str(tmp_path), ["model.source=/models/mine"])
    validate_params.fn(str(tmp_path), ["model.source=/models/mine", "evaluate.features=inception"])


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


def _exp_cells(project) -> dict[str, dict]:
    """`dvc exp show --json` of the project: per experiment, its params.yaml and its evaluate/export metrics
    (wall-clock fields left out)."""
    out = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and node["data"].get("params"):
                data = node["data"]
                metrics = {f: {k: v for k, v in (m.get("data") or {}).items() if "seconds" not in k}
                           for f, m in (data.get("metrics") or {}).items() if f.endswith(("evaluate.json", "export.json"))}
                out[node["name"]] = {"params": data["params"]["params.yaml"]["data"], "metrics": metrics}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(run_dvc(project, ["exp", "show", "--json"]).output))
    return {k: v for k, v in out.items() if "-" in k and k[0] == "w"}


def _sweep_view(project, result) -> dict:
    """What a sweep leaves, minus wall-clock times and run ids: table rows, MLflow runs and their parents."""
    rows = {r["cell"]: {k: v for k, v in r.items() if k not in ("calibrate_s", "mlflow_run")} for r in result.rows}
    runs = {name: run_id for run_id, name, _ in active_runs(project)}
    parents = {n: run_tags(project, i).get("mlflow.parentRunId") == result.parent_run_id for n, i in runs.items()}
    return {"rows": rows, "runs": sorted(runs), "children": sorted(n for n, p in parents.items() if p)}


@pytest.mark.slow  # real flow runs (Prefect server, dvc, a Dask LocalCluster): make test-fast leaves them out
def test_sweep_serial_and_on_a_two_worker_local_cluster_give_the_same_table(harness, project, tmp_path):
    from flows.sweep import on_dask, sweep

    # two cells the project's run cache holds (W8A8 and W4A8 minmax): the runner's mechanics are under test
    concurrent = clone(project, tmp_path / "concurrent")
    params_before = (project / "params.yaml").read_text()
    lock_before = (concurrent / "dvc.lock").read_text()
    serial = sweep(str(project), bits=["w8a8", "w4a8"], methods=["minmax"])
    dask = on_dask(workers=2)(str(concurrent), bits=["w8a8", "w4a8"], methods=["minmax"], isolated=True)
    # the serial sweep: parent + children, table on the parent, the workspace put back
    view = _sweep_view(project, serial)
    assert view["children"] == ["w4a8-minmax", "w8a8-minmax"]
    assert view["runs"] == sorted(view["children"] + ["sweep [w8a8, w4a8] x [minmax]"])
    weight_bits = dict(db_rows(project, "SELECT run_uuid, value FROM params WHERE key = 'quant.weight_bits'"))
    runs = {name: run_id for run_id, name, _ in active_runs(project)}
    assert (weight_bits[runs["w8a8-minmax"]], weight_bits[runs["w4a8-minmax"]]) == ("8", "4")
    assert serial.rows[1]["size_ratio"] > serial.rows[0]["size_ratio"]  # 4-bit weights are packed
    table = Path(serial.table_md).read_text()
    assert "| w4a8-minmax | w4a8 | minmax |" in table
    art = project / "mlartifacts/pqd" / serial.parent_run_id / "artifacts"
    assert (art / Path(serial.table_md).name).read_text() == table
    assert (project / "params.yaml").read_text() == params_before
    assert "up to date" in run_dvc(project, ["status"]).output
    # on two Dask workers: the same rows, runs and experiments; its workspace never touched
    assert _sweep_view(concurrent, dask) == view
    assert _exp_cells(concurrent) == _exp_cells(project) and len(_exp_cells(project)) == 2
    assert (concurrent / "dvc.lock").read_text() == lock_before and "up to date" in run_dvc(concurrent, ["status"]).output
    assert not any((concurrent / ".dvc/tmp/pqd-sweep").glob("*/w*"))  # cell workspaces removed


@pytest.mark.slow  # dvc exp run in a clone: make test-fast leaves it out
def test_an_earlier_setting_is_restored_from_the_run_cache_in_a_fresh_clone(project, tmp_path):
    """The cell workspaces' case: a clone sharing the project's DVC cache, its outputs (and the uncached metrics
    files, cache: false in dvc.yaml) gone; going back to W4A8 and then W8A8 runs no stage."""
    from flows.workspace import clone as workspace_clone

    ws = workspace_clone(project, tmp_path / "ws")
    for out in ("data/model", "data/trajectories", "data/samples", "data/calib", "data/qstate", "data/export",
                "data/metrics"):
        shutil.rmtree(ws / out)
    for bits, model in ((4, "is cached - skipping run, checking out outputs"), (8, "didn't change, skipping")):
        out = run_dvc(ws, ["exp", "run", "-S", f"quant.weight_bits={bits}"])
        assert out.ran_stages == (), out.output
        assert f"Stage 'model' {model}" in out.output  # its outputs were gone the first time, not the second
        assert "Stage 'calibrate' is cached - skipping run, checking out outputs" in out.output


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
    assert (v.name, v.version, v.alias, v.created) == (RELEASE_NAME, "1", "candidate", True)
    assert dict(db_rows(project, "SELECT alias, version FROM registered_model_aliases")) == {"candidate": 1}


# The scheduled deployment served against a real Prefect server: tests/ops/test_team.py (the team's server on
# PostgreSQL, support.servers.served_benchmark_run), one server set for both concerns.


@pytest.mark.slow  # real flow runs (Prefect, dvc exp run): make test-fast leaves them out
def test_serial_cells_each_start_from_the_sweeps_params(harness, project):
    """A key one cell sets is not carried into the next cell (dvc exp run -S writes into the workspace's
    params.yaml): each experiment's params are the sweep's params.yaml plus its own overrides. The keys here are
    release thresholds, which no stage reads, so both cells restore every stage."""
    from flows.sweep import Cell, open_parent_run, run_cells

    base = (project / "params.yaml").read_text()
    cells = [Cell("w8-first", ("release.psnr_margin_db=19",), labels=(("row", "first"),)),
             Cell("w8-second", ("release.delta_fid_fraction=0.3",), labels=(("row", "second"),))]
    parent = open_parent_run(str(project), "pqd", "two cells", cells, {})
    run_cells(str(project), cells, "pqd", parent)
    exps = _exp_cells(project)
    first, second = exps["w8-first"]["params"]["release"], exps["w8-second"]["params"]["release"]
    default = yaml.safe_load(base)["release"]
    assert (first["psnr_margin_db"], first["delta_fid_fraction"]) == (19, default["delta_fid_fraction"])
    assert (second["psnr_margin_db"], second["delta_fid_fraction"]) == (default["psnr_margin_db"], 0.3)
    assert (project / "params.yaml").read_text() == base
