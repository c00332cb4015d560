"""The shared DVC remote (pqd.ops.remote) on a real project and a local-path remote: push, a fresh clone plus
pull makes `dvc repro` a no-op, a release records the remote and every output's DVC hash, and `pqd audit
--remote` pulls them back into an empty cache and checks them (an object missing from the remote fails it)."""

import yaml

import pytest

from support.projects import BIN, clone, reproduced_project, sh
from pqd.ops import cli, release, remote, tracking


@pytest.fixture()
def project(tmp_path, tmp_path_factory, tiny_pipeline, ts_features):
    return clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path / "p")


def test_remote_set_push_and_a_fresh_clone_pull_reproduces_nothing(project, tmp_path, capsys):
    store = tmp_path / "remote"
    assert remote.main(["set", str(store), "--root", str(project)]) == 0
    assert remote.default_remote(project) == remote.Remote("storage", str(store))
    sh(["git", "commit", "-qam", "the team's remote"], project)
    assert remote.main(["push", "--root", str(project)]) == 0
    assert any(store.rglob("*.dir"))  # directory manifests of the outputs are in the remote
    fresh = tmp_path / "fresh"
    sh(["git", "clone", "-q", str(project), str(fresh)], tmp_path)
    assert not (fresh / "data/export").exists()
    assert remote.main(["pull", "--root", str(fresh)]) == 0
    assert "pull from storage" in capsys.readouterr().out
    lock = yaml.safe_load((fresh / "dvc.lock").read_text())
    for path, md5 in remote.cached_outputs(fresh, lock).items():
        assert remote.output_md5(fresh / path) == md5, path
    out = sh([str(BIN / "dvc"), "repro"], fresh)
    assert "Running stage" not in out and "up to date" in out


def test_bad_remote_and_no_remote_are_one_line(project, capsys):
    assert remote.main(["push", "--root", str(project)]) == 2
    assert "has no default DVC remote: run make remote REMOTE=" in capsys.readouterr().err
    assert remote.main(["set", "ftp://x/y", "--root", str(project)]) == 2
    assert "REMOTE = 'ftp://x/y' is not allowed: expected a local path or s3://bucket/path" in capsys.readouterr().err


@pytest.mark.slow  # a release in MLflow and three audits, each pulling every output into a fresh clone
def test_release_records_the_remote_and_hashes_and_audit_pulls_them(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    store = tmp_path / "remote"
    remote.set_remote(project, str(store))
    sh(["git", "commit", "-qam", "the team's remote"], project)
    v = release.register_candidate(project)
    tags = tracking.version_info(project, v.name, version=v.version)["tags"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert tags["dvc.remote"] == str(store) and tags["dvc.remote.name"] == "storage"
    assert {k[len("dvc.out."):]: t for k, t in tags.items() if k.startswith("dvc.out.")} == \
        remote.cached_outputs(project, lock)
    assert tags["dvc.out.data/export"] == lock["stages"]["export"]["outs"][0]["md5"]

    uri = f"models:/{v.name}/{v.version}"
    rc = cli.main(["audit", uri, "--remote"])  # nothing pushed yet
    text = capsys.readouterr()
    assert rc == 1 and "verdict: FAILED (remote)" in text.err and "failed" in text.out
    sh([str(BIN / "dvc"), "push"], project)
    rc = cli.main(["audit", uri, "--remote"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"outputs pulled from {store} match the release's hashes" in text
    # an object of the export missing from the remote: the audit says so
    export_md5 = tags["dvc.out.data/export"].removesuffix(".dir")
    manifest = next(store.rglob(f"{export_md5[2:]}.dir"))
    manifest.unlink()
    rc = cli.main(["audit", uri, "--remote"])
    text = capsys.readouterr().out
    assert rc == 1 and [ln.split()[1] for ln in text.splitlines() if ln.strip().startswith("remote ")] == ["FAIL"]
