"""The release gate, the model card, registration with aliases and loading a release by alias, against a
real sqlite MLflow store (read back with sqlite3)."""

import json
import math
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from support.projects import BIN, active_runs, clone, db_rows, ops_env, reproduced_project, sh
from pqd.ops import release, tracking
from pqd.ops.result import bits_label, model_slug
from pqd.formats.metrics import EvalProtocol, EvaluateMetrics
from pqd.params import ParamError, ReleaseParams, params_from_dict

S = ReleaseParams(max_fid_delta=1.0, floor_multiple=2.0)


def evaluation(delta, floor) -> EvaluateMetrics:
    """Evaluate metrics with the given delta FID and noise floor (the rest is not read by the FID checks)."""
    protocol = EvalProtocol(8, 8, "0..7", "DDIMScheduler", 6, 0.0, "pixel", 0, None, "f", "r", 8, "clean-fid", "torch",
                            "8-bit weight codes")
    return EvaluateMetrics(fid_quant_vs_ref=1.0, fid_fp_vs_ref=1.0, delta_fid=delta, fid_quant_vs_fp=0.1,
                           noise_floor=floor, mse_mean=0.0, psnr_mean=40.0, psnr_median=40.0, psnr_min=30.0,
                           protocol=protocol)


@pytest.mark.parametrize("delta, floor, passed", [
    (0.5, 0.5, (True, True)),     # within both
    (1.0, 0.5, (True, True)),     # limits are inclusive: 1.0 <= 1.0 and 1.0 <= 2 x 0.5
    (1.5, 1.0, (False, True)),    # above max_fid_delta only
    (0.9, 0.4, (True, False)),    # above 2 x noise floor only
    (-3.0, 0.0, (True, True)),    # quantized better than FP passes
])
def test_fid_checks(delta, floor, passed):
    checks = release.fid_checks(evaluation(delta, floor), S)
    assert [c.name for c in checks] == ["max_fid_delta", "noise_floor"]
    assert tuple(c.passed for c in checks) == passed


@pytest.mark.parametrize("ev", [None, evaluation(math.nan, 1.0), evaluation(1.0, math.inf)])
def test_fid_checks_fail_without_finite_numbers(ev):
    assert not any(c.passed for c in release.fid_checks(ev, S))


def test_gate_summary_names_every_failed_check_in_one_line():
    report = release.GateReport((release.Check("hashes", True, "ok"), release.Check("max_fid_delta", False, "3 > 2"),
                                 release.Check("noise_floor", False, "3 > 1")))
    line = report.summary()
    assert not report.passed and "\n" not in line
    assert line == "release gate failed: max_fid_delta: 3 > 2; noise_floor: 3 > 1"


def test_release_params_defaults_section_and_one_line_errors(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("quant: {weight_bits: 8}\n")
    s = release.load_settings(f)
    assert (s.thresholds, s.source) == (ReleaseParams(), "defaults")
    f.write_text("release: {max_fid_delta: 0.5, floor_multiple: 4}\n")
    s = release.load_settings(f)
    assert (s.thresholds.max_fid_delta, s.thresholds.floor_multiple, s.source) == (0.5, 4.0, "params.yaml")
    for text, words in (("release: {max_fid_delta: -1}\n", "release.max_fid_delta = -1 is not allowed"),
                        ("release: {floor_multiple: 0}\n", "release.floor_multiple = 0 is not allowed"),
                        ("release: {max_fid_delta: yes}\n", "release.max_fid_delta = True is not allowed"),
                        ("release: {max_delta: 1}\n", "unknown key release.max_delta")):
        f.write_text(text)
        with pytest.raises(ParamError, match=words):
            release.load_settings(f)


def test_bits_label_and_model_slug_name_a_release():
    """pqd-<model>-w<W>a<A>, where W is the width of the codes the weights are stored as (W7A8 for 8-bit weights
    kept as 7-bit codes)."""
    assert bits_label(params_from_dict({"quant": {"weight_bits": 4, "act_bits": 8}})) == "w4a8"
    assert bits_label(params_from_dict({}), weight_code_bits=7) == "w7a8"
    assert model_slug(params_from_dict({})) == "demo-digits"
    assert model_slug(params_from_dict({"model": {"source": "google/ddpm-cifar10-32"}})) == "ddpm-cifar10-32"
    assert model_slug(params_from_dict({"model": {"source": "./models/My Pipe/"}})) == "my-pipe"


@pytest.fixture()
def project(tmp_path, tmp_path_factory, tiny_pipeline, ts_features):
    return clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path / "p")


def registry(project):
    """(registered model names, (name, version) pairs, {alias: version})."""
    return ([r[0] for r in db_rows(project, "SELECT name FROM registered_models")],
            db_rows(project, "SELECT name, version FROM model_versions"),
            dict(db_rows(project, "SELECT alias, version FROM registered_model_aliases")))


def cli(capsys, project, *args):
    """``python -m pqd.release`` in this process (its main(), as the module runs it)."""
    rc = release.main([*args, "--root", str(project)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


@pytest.mark.parametrize("tamper, check", [("export", "hashes"), ("metrics", "lineage")])
def test_failing_gate_registers_nothing_and_names_the_check(project, tamper, check):
    """Through the real command line, in a subprocess."""
    if tamper == "export":
        f = project / "data/export/unet/quantized.safetensors"
        f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    else:
        f = project / "data/metrics/evaluate.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "delta_fid": -1.0}))
    r = subprocess.run([str(BIN / "python"), "-m", "pqd.ops.release", "register"], cwd=project, env=ops_env(),
                       capture_output=True, text=True, timeout=300)
    rc, err = r.returncode, r.stderr.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("pqd release: release gate failed: ") and f"{check}:" in err
    assert registry(project) == ([], [], {}) and active_runs(project) == []  # nothing written to MLflow


def test_register_promote_and_load_the_production_sampler(project, capsys):
    rc, out, err = cli(capsys, project, "register", "--max-fid-delta", "1e9", "--floor-multiple", "1e9")
    assert rc == 0, err
    name = "pqd-pipe-w8a8"  # model.source is a folder named 'pipe'; W8A8
    assert registry(project) == ([name], [(name, 1)], {"candidate": 1})
    tags = dict(db_rows(project, "SELECT key, value FROM model_version_tags WHERE name = ? AND version = 1", name))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    ev = json.loads((project / "data/metrics/evaluate.json").read_text())
    assert tags["pqd.gate"] == "passed" and tags["git.commit"] == head
    assert float(tags["pqd.delta_fid"]) == pytest.approx(ev["delta_fid"])
    assert float(tags["pqd.noise_floor"]) == pytest.approx(ev["noise_floor"])
    assert {f"dvc.lock.{s}" for s in yaml.safe_load((project / "dvc.lock").read_text())["stages"]} <= set(tags)
    (desc, run_id), = db_rows(project, "SELECT description, run_id FROM model_versions WHERE name = ?", name)
    for section in ("## Method", "## Metrics", "## Quality gate", "## Evaluation protocol", "## Lineage"):
        assert section in desc
    assert run_id in desc and head in desc
    card = project / "mlartifacts/pqd" / run_id / "artifacts/release/model_card.md"
    assert card.read_text().startswith(f"# {name}") and "## Parameters" in card.read_text()

    # registering the same result again: no new version, no new run
    assert cli(capsys, project, "register", "--max-fid-delta", "1e9", "--floor-multiple", "1e9")[0] == 0
    assert registry(project)[1] == [(name, 1)] and len(active_runs(project)) == 1

    rc, out, err = cli(capsys, project, "promote")  # the name comes from params.yaml, the version from 'candidate'
    assert rc == 0, err
    assert registry(project)[2] == {"candidate": 1, "production": 1}

    sampler = tracking.load_sampler(f"models:/{name}@production", root=project)
    images = sampler.sample([0, 1, 2])
    evaluated = load_file(project / "data/samples/quant/quant.safetensors")  # what evaluate sampled, same seeds
    # the same seeds give evaluate's images (up to float rounding when the batch size differs)
    assert images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(images, evaluated["images"][:3], rtol=0, atol=1e-5)
    by_number = tracking.load_sampler(f"models:/{name}/1", root=project).sample([5])
    torch.testing.assert_close(by_number, evaluated["images"][5:6], rtol=0, atol=1e-5)


def test_promote_without_a_candidate_is_one_line(project, capsys):
    rc, out, err = cli(capsys, project, "promote", "pqd-nothing-w8a8")
    assert rc == 2 and len(err.splitlines()) == 1 and "pqd-nothing-w8a8" in err and "'candidate'" in err


def test_gate_check_command_prints_every_check(project, capsys):
    rc, out, err = cli(capsys, project, "check", "--max-fid-delta", "1e9", "--floor-multiple", "1e9")
    assert rc == 0, err
    for name in ("hashes", "lineage", "max_fid_delta", "noise_floor"):
        assert f"  {name}" in out and "pass" in out
    assert "release gate passed" in out


def test_bad_threshold_on_the_command_line_is_one_line(project, capsys):
    rc, out, err = cli(capsys, project, "check", "--floor-multiple", "-2")
    assert rc == 2 and len(err.splitlines()) == 1 and "release.floor_multiple = -2.0 is not allowed" in err


def test_uncommitted_pipeline_state_is_refused_unless_allowed_and_then_stated(project, capsys):
    """The gate applies the audit's lineage rule: the released dvc.lock must be the committed one. A result
    re-made after the commit (here: the evaluate stage re-run with another grid size) is refused in one line;
    --allow-uncommitted registers it, and the tags and the model card say so."""
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("grid_size: 9", "grid_size: 4"))
    sh([str(BIN / "dvc"), "repro", "-q"], project)
    thresholds = ("--max-fid-delta", "1e9", "--floor-multiple", "1e9")
    rc, out, err = cli(capsys, project, "register", *thresholds)
    assert rc == 1 and len(err.splitlines()) == 1
    assert "committed:" in err and "commit dvc.lock" in err
    assert registry(project) == ([], [], {})
    rc, out, err = cli(capsys, project, "register", "--allow-uncommitted", *thresholds)
    assert rc == 0, err
    (name,), _, _ = registry(project)
    tags = dict(db_rows(project, "SELECT key, value FROM model_version_tags WHERE name = ?", name))
    assert tags["pqd.uncommitted"] == "true" and tags["pqd.gate"] == "passed"
    (desc,), = db_rows(project, "SELECT description FROM model_versions WHERE name = ?", name)
    assert "Released with --allow-uncommitted" in desc
