"""pqd.tracking against a real sqlite MLflow store in a temporary project; the store is read back with
sqlite3 and compared with the pipeline's own files, git and dvc.lock."""

import json
import subprocess
import time

import pytest
import yaml

from support.projects import BIN, active_runs, clone, db_rows, free_port, ops_env, reproduced_project, run_tags, sh
from pqd.ops import tracking
from pqd.formats.lineage import hash_tree


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_pipeline, ts_features):
    """A clone of the reproduced project, tracked once."""
    d = clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path_factory.mktemp("trk") / "p")
    return d, tracking.track(d)


def test_tracking_uri_defaults_to_sqlite_in_the_project_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_one_run_with_params_metrics_and_lineage_tags(tracked):
    d, run = tracked
    assert run.created and [r[0] for r in active_runs(d)] == [run.run_id]
    assert run.uri == f"sqlite:///{d}/mlflow.db"
    (status,) = db_rows(d, "SELECT status FROM runs WHERE run_uuid = ?", run.run_id)[0]
    assert status == "FINISHED"
    params = dict(db_rows(d, "SELECT key, value FROM params WHERE run_uuid = ?", run.run_id))
    written = yaml.safe_load((d / "params.yaml").read_text())
    assert params["quant.weight_bits"] == str(written["quant"]["weight_bits"])
    assert params["generate.steps"] == str(written["generate"]["steps"])
    assert params["calibrate.method"] == "minmax" and params["calibrate.act_range"] == "minmax"  # preset resolved
    metrics = dict(db_rows(d, "SELECT key, value FROM latest_metrics WHERE run_uuid = ?", run.run_id))
    for stage in ("model", "generate", "select", "calibrate", "export", "evaluate"):
        on_disk = json.loads((d / f"data/metrics/{stage}.json").read_text())
        assert metrics[f"{stage}.seconds"] == pytest.approx(on_disk["seconds"])
    ev = json.loads((d / "data/metrics/evaluate.json").read_text())
    assert metrics["evaluate.delta_fid"] == pytest.approx(ev["delta_fid"])
    assert metrics["evaluate.noise_floor"] == pytest.approx(ev["noise_floor"])

    tags = run_tags(d, run.run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"] == head == tags["mlflow.source.git.commit"]
    assert tags["git.dirty"] == "false"
    lock_stages = yaml.safe_load((d / "dvc.lock").read_text())["stages"]
    stage_hashes = {s: tags[f"dvc.lock.{s}"] for s in lock_stages}
    assert len(set(stage_hashes.values())) == len(lock_stages) and all(len(h) == 64 for h in stage_hashes.values())
    assert tags["pqd.model_sha256"] == json.loads((d / "data/model/model.json").read_text())["model_sha256"]
    assert json.loads(tags["pqd.protocol"]) == ev["protocol"]
    assert tags["pqd.result_hash"] == run.result_hash


def test_artifacts_hold_export_metrics_grid_and_lineage(tracked):
    d, run = tracked
    art = d / "mlartifacts" / "pqd" / run.run_id / "artifacts"  # next to the sqlite database
    assert hash_tree(art / "export") == hash_tree(d / "data/export")
    assert (art / "metrics/evaluate_grid.png").read_bytes() == (d / "data/metrics/evaluate_grid.png").read_bytes()
    assert (art / "metrics/evaluate.json").is_file() and (art / "plots/steps.csv").is_file()
    assert (art / "lineage/dvc.lock").read_text() == (d / "dvc.lock").read_text()
    assert (art / "lineage/model.json").is_file()


def test_retracking_is_idempotent_until_the_result_changes(tracked):
    d, run = tracked
    again = tracking.track(d)
    assert (again.run_id, again.created) == (run.run_id, False)
    sh(["git", "commit", "--allow-empty", "-qm", "a new commit, same result"], d)
    assert tracking.track(d).run_id == run.run_id  # git state is not part of a result's identity
    # a new result: another selection seed, the select stage re-run (its calibration set and dvc.lock change; a
    # forced re-run of the same settings changes only select.json's seconds, which may round to the same value)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["select"]["seed"] += 1
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh([str(BIN / "dvc"), "repro", "-s", "select"], d)
    new = tracking.track(d)
    assert new.created and new.run_id != run.run_id
    assert len(active_runs(d)) == 2
    assert tracking.track(d).run_id == new.run_id and len(active_runs(d)) == 2


def test_interrupted_tracking_is_replaced_not_duplicated(tmp_path_factory, tiny_pipeline, ts_features):
    d = clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path_factory.mktemp("intr") / "p")
    fp = tracking.result_hash(tracking.read_result(d))
    c = tracking.client(d)
    left, _, created = tracking._open_run(c, "pqd", fp, "interrupted", {}, None)  # created, never finished
    assert created and db_rows(d, "SELECT status FROM runs WHERE run_uuid = ?", left)[0][0] == "RUNNING"
    run = tracking.track(d)
    assert run.created and run.run_id != left
    assert [r[0] for r in active_runs(d)] == [run.run_id]


def test_a_run_tagged_before_the_hash_tag_was_renamed_is_reused(tmp_path_factory, tiny_pipeline, ts_features):
    """Stores written before the result's hash tag was renamed carry it as pqd.fingerprint: tracking finds that run."""
    d = clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path_factory.mktemp("old") / "p")
    c = tracking.client(d)
    old = c.create_run(tracking.experiment_id(c, "pqd"),
                       tags={tracking.LEGACY_HASH_TAG: tracking.result_hash(tracking.read_result(d))}).info.run_id
    c.set_terminated(old)
    run = tracking.track(d)
    assert (run.run_id, run.created) == (old, False)
    assert [r[0] for r in active_runs(d)] == [old]


def test_unreachable_server_fails_fast_with_one_line_and_keeps_the_result(tracked, capsys, monkeypatch):
    d, _ = tracked
    before = hash_tree(d / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    t0 = time.perf_counter()
    assert tracking.main(["track", "--root", str(d)]) == 2
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreachable" in err and "make track" in err
    assert hash_tree(d / "data") == before


@pytest.mark.parametrize("uri, words", [("ftp://somewhere", "not allowed"), ("sqlite:////no/such/dir/m.db", "does not exist")])
def test_bad_tracking_uri_is_refused_in_one_line(tracked, capsys, monkeypatch, uri, words):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.main(["track", "--root", str(tracked[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and uri in err


def test_no_result_is_a_one_line_error(tmp_path, capsys):
    assert tracking.main(["track", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dvc.yaml not found" in err


def test_track_command_line_reports_the_reused_run(tracked):
    d, _ = tracked
    r = subprocess.run([str(BIN / "python"), "-m", "pqd.ops.tracking", "track"], cwd=d, env=ops_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "already tracked" in r.stdout and len(active_runs(d)) >= 1


def test_a_bench_table_is_logged_and_makes_a_new_run(tracked):
    d, _ = tracked
    bench = d / tracking.BENCH_DIR
    (bench / "row-1").mkdir(parents=True)
    (bench / "bench.md").write_text("| method | delta FID |\n|---|---|\n| pqd | 0.1 |\n")
    (bench / "row-1/big.bin").write_bytes(b"x" * 10)  # a row's own outputs stay out of the run
    run = tracking.track(d)
    assert run.created
    art = d / "mlartifacts" / "pqd" / run.run_id / "artifacts" / "bench"
    assert sorted(p.name for p in art.iterdir()) == ["bench.md"]
    assert tracking.track(d).run_id == run.run_id
