"""`pqd audit` on a real project (git + DVC) and a real sqlite MLflow registry: a faithful release passes,
and each kind of tampering (export bytes, source model, uncommitted pipeline state, registry values) fails
the audit with exit status 1 and the failed check named."""

import sqlite3
import contextlib

import pytest

from support.projects import BIN, RELEASE_NAME, clone, reproduced_project, sh
from pqd.ops import cli, release


@pytest.fixture()
def project(tmp_path, tmp_path_factory, tiny_pipeline, ts_features):
    return clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path / "p")


def audit(capsys, *args):
    rc = cli.main(["audit", *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def status(text: str, check: str) -> str:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(check + " "))
    return line.split()[1]


def flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def test_export_folder_audit(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, text = audit(capsys, "data/export")
    assert rc == 0, text
    assert [status(text, c) for c in ("hashes", "source_model", "lineage", "metrics")] == ["pass"] * 4
    assert "verdict: passed" in text

    f = project / "data/export/unet/quantized.safetensors"
    original = f.read_bytes()
    flip(f)
    rc, text = audit(capsys, "data/export")
    assert rc == 1 and status(text, "hashes") == "FAIL" and "unet/quantized.safetensors was modified" in text
    assert status(text, "lineage") == "FAIL"  # the export no longer hashes to what dvc.lock recorded
    assert "verdict: FAILED (hashes, lineage)" in text
    f.write_bytes(original)

    w = next((project / "data/model/unet").glob("*.safetensors"))
    original = w.read_bytes()
    flip(w)
    rc, text = audit(capsys, "data/export")
    assert rc == 1 and status(text, "source_model") == "FAIL" and "(rehashed) has source model sha256" in text
    w.write_bytes(original)

    # the same result, but dvc.lock changed and not committed: the export no longer matches the commit
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("weight_bits: 8", "weight_bits: 4", 1))
    sh([str(BIN / "dvc"), "repro", "-q"], project)  # W4A8, from DVC's run cache
    rc, text = audit(capsys, "data/export")
    assert rc == 1 and status(text, "lineage") == "FAIL" and "differs from dvc.lock at commit" in text
    assert status(text, "hashes") == "pass" and status(text, "metrics") == "pass"


def test_not_an_export_is_one_line_exit_2(project, capsys):
    rc, text = audit(capsys, str(project / "nowhere"))
    assert rc == 2 and len(text.strip().splitlines()) == 1 and "expected an export folder or models:/" in text


def _sql(project, statement, *args):
    with contextlib.closing(sqlite3.connect(project / "mlflow.db")) as con:
        con.execute(statement, args)
        con.commit()


def test_registered_release_audit(project, capsys):
    assert release.main(["register", "--root", str(project)]) == 0
    uri = f"models:/{RELEASE_NAME}@candidate"
    rc, text = audit(capsys, uri, "--root", str(project))
    assert rc == 0, text
    assert f"{RELEASE_NAME} version 1" in text and "registry tag pqd.model_sha256" in text
    assert [status(text, c) for c in ("hashes", "source_model", "lineage", "metrics")] == ["pass"] * 4

    # a registry value that no longer equals the evaluation recorded with the release
    _sql(project, "UPDATE model_version_tags SET value = '123.0' WHERE key = 'pqd.delta_fid'")
    rc, text = audit(capsys, uri, "--root", str(project))
    assert rc == 1 and status(text, "metrics") == "FAIL" and "registry tag pqd.delta_fid = 123.0" in text
    assert status(text, "hashes") == "pass"

    # the registered export's bytes changed in the artifact store
    registered = next(p for p in (project / "mlartifacts").rglob("quantized.safetensors") if "release" in p.parts)
    flip(registered)
    rc, text = audit(capsys, uri, "--root", str(project))
    assert rc == 1 and status(text, "hashes") == "FAIL" and "was modified" in text

    # a release made from uncommitted pipeline state (W4A8 reproduced, dvc.lock not committed): the gate refuses
    # it as the audit would, unless explicitly allowed; the audit then reports what was allowed
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("weight_bits: 8", "weight_bits: 4", 1))
    sh([str(BIN / "dvc"), "repro", "-q"], project)
    where = ["--root", str(project)]
    assert release.main(["register", *where]) == 1
    assert release.main(["register", "--allow-uncommitted", *where]) == 0
    capsys.readouterr()
    rc, text = audit(capsys, "models:/pqd-pipe-w4a8@candidate", "--root", str(project))
    assert rc == 1 and status(text, "lineage") == "FAIL" and "uncommitted pipeline state" in text
    assert status(text, "metrics") == "pass" and status(text, "hashes") == "pass"
