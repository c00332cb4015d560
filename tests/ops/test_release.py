"""The release gate, the model card, registration with aliases and loading a release by alias, against a
real sqlite MLflow store (read back with sqlite3)."""

import json
import math
import re
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from support.projects import (BIN, RELEASE_NAME, active_runs, clone, db_rows, ops_env, reproduced_project,
                              run_stages_in_process)
from pqd.ops import release, tracking
from pqd.ops.result import bits_label, model_slug
from pqd.formats.metrics import EvalProtocol, EvaluateMetrics, Interval
from pqd.params import ParamError, ReleaseParams, params_from_dict

S = ReleaseParams(delta_fid_fraction=0.1, fid_vs_fp_fraction=0.1, psnr_margin_db=20.0)


def evaluation(delta=(0.1, 0.3), fid_vs_fp=(0.02, 0.05), psnr=(40.0, 41.0), fp_fid=5.0, floor=1.0, other=10.0,
               intervals=True) -> EvaluateMetrics:
    """Evaluate metrics with the given intervals (lo, hi) and the model's own numbers the checks compare them with:
    FP FID vs reference, noise floor, PSNR between FP images of other seeds (the rest is not read by the checks)."""
    protocol = EvalProtocol(8, 8, "0..7", "DDIMScheduler", 6, 0.0, "pixel", 0, None, "f", "r", 8, "clean-fid", "torch",
                            "8-bit weight codes", "0.95 normal, jackknife bias-corrected (25 groups)" if intervals else None)
    ci = (lambda lo_hi: Interval(*lo_hi)) if intervals else (lambda lo_hi: None)
    return EvaluateMetrics(fid_quant_vs_ref=fp_fid + sum(delta) / 2, fid_fp_vs_ref=fp_fid, delta_fid=sum(delta) / 2,
                           fid_quant_vs_fp=sum(fid_vs_fp) / 2, noise_floor=floor, mse_mean=0.0,
                           psnr_mean=sum(psnr) / 2, psnr_median=40.0, psnr_min=30.0, psnr_other_seed_mean=other,
                           delta_fid_ci=ci(delta), fid_quant_vs_fp_ci=ci(fid_vs_fp), psnr_mean_ci=ci(psnr),
                           protocol=protocol)


@pytest.mark.parametrize("ev, passed", [
    (evaluation(), (True, True, True)),                                    # within all three
    (evaluation(delta=(0.2, 0.5), fid_vs_fp=(0.05, 0.1), psnr=(30.0, 31.0)), (True, True, True)),  # limits inclusive
    (evaluation(delta=(0.3, 0.51)), (False, True, True)),                   # ΔFID's upper bound above 0.1 x 5.0
    (evaluation(delta=(0.3, 0.51), fp_fid=5.2), (True, True, True)),        # ... relative to the FP model's FID
    (evaluation(delta=(-0.4, 0.1)), (True, True, True)),                    # quantized better than FP passes
    (evaluation(fid_vs_fp=(0.02, 0.11)), (True, False, True)),              # FID vs FP's upper bound above 0.1 x floor
    (evaluation(fid_vs_fp=(0.02, 0.11), floor=1.2), (True, True, True)),    # ... relative to the noise floor
    (evaluation(psnr=(29.9, 45.0)), (True, True, False)),                   # PSNR's lower bound below 10 + 20 dB
    (evaluation(psnr=(29.9, 45.0), other=9.0), (True, True, True)),         # ... relative to other seeds' PSNR
])
def test_quality_checks_judge_intervals_against_the_models_own_numbers(ev, passed):
    checks = release.quality_checks(ev, S)
    assert [c.name for c in checks] == ["delta_fid", "fid_vs_fp", "psnr"]
    assert tuple(c.passed for c in checks) == passed


def test_quality_checks_judge_the_interval_not_the_point_value():
    """The same point ΔFID passes with a tight interval and fails with a wide one."""
    tight, wide = evaluation(delta=(0.3, 0.4)), evaluation(delta=(0.0, 0.7))
    assert tight.delta_fid == wide.delta_fid
    assert release.quality_checks(tight, S)[0].passed and not release.quality_checks(wide, S)[0].passed


@pytest.mark.parametrize("ev", [None, evaluation(intervals=False), evaluation(floor=math.nan),
                                evaluation(delta=(0.1, math.inf))])
def test_quality_checks_fail_without_finite_intervals(ev):
    checks = release.quality_checks(ev, S)
    assert not any(c.passed for c in checks)
    assert all("evaluate.bootstrap" in c.detail for c in checks)


def test_gate_summary_names_every_failed_check_in_one_line():
    report = release.GateReport((release.Check("hashes", True, "ok"), release.Check("delta_fid", False, "3 > 2"),
                                 release.Check("psnr", False, "20 < 30")))
    line = report.summary()
    assert not report.passed and "\n" not in line
    assert line == "release gate failed: delta_fid: 3 > 2; psnr: 20 < 30"


def test_release_params_defaults_section_and_one_line_errors(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("quant: {weight_bits: 8}\n")
    s = release.load_settings(f)
    assert (s.thresholds, s.source) == (ReleaseParams(), "defaults")
    f.write_text("release: {delta_fid_fraction: 0.5, psnr_margin_db: 4}\n")
    s = release.load_settings(f)
    assert (s.thresholds.delta_fid_fraction, s.thresholds.psnr_margin_db, s.source) == (0.5, 4.0, "params.yaml")
    for text, words in (("release: {delta_fid_fraction: -1}\n", "release.delta_fid_fraction = -1 is not allowed"),
                        ("release: {fid_vs_fp_fraction: 0}\n", "release.fid_vs_fp_fraction = 0 is not allowed"),
                        ("release: {psnr_margin_db: .nan}\n", "release.psnr_margin_db = nan is not allowed"),
                        ("release: {delta_fid_fraction: yes}\n", "release.delta_fid_fraction = True is not allowed"),
                        ("release: {max_fid_delta: 1}\n", "unknown key release.max_fid_delta")):
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
    rc, out, err = cli(capsys, project, "register")  # the project's own thresholds (OPEN_GATE)
    assert rc == 0, err
    name = RELEASE_NAME  # model.source is a folder named 'pipe'; W8A8
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
    assert "| mixed precision | off |" in card.read_text() and "| rotation | off |" in card.read_text()

    # registering the same result again: no new version, no new run
    assert cli(capsys, project, "register")[0] == 0
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
    rc, out, err = cli(capsys, project, "check")
    assert rc == 0, err
    for name in ("hashes", "lineage", "committed", "delta_fid", "fid_vs_fp", "psnr", "deployment"):
        assert re.search(rf"^  {name} +pass ", out, re.M), out
    assert "release gate passed" in out


def test_thresholds_on_the_command_line_override_params(project, capsys):
    """--psnr-margin-db asks for more than the model gives: the psnr check fails, the card would record it."""
    ev = EvaluateMetrics.read(project / "data/metrics/evaluate.json")
    margin = ev.psnr_mean_ci.lo - ev.psnr_other_seed_mean + 0.5
    rc, out, err = cli(capsys, project, "check", "--psnr-margin-db", str(margin))
    assert rc == 1 and re.search(r"^  psnr +FAIL ", out, re.M) and re.search(r"^  delta_fid +pass ", out, re.M)
    assert err.startswith("pqd release: release gate failed: psnr: mean PSNR vs FP") and len(err.splitlines()) == 1


def test_bad_threshold_on_the_command_line_is_one_line(project, capsys):
    rc, out, err = cli(capsys, project, "check", "--fid-vs-fp-fraction", "-2")
    assert rc == 2 and len(err.splitlines()) == 1 and "release.fid_vs_fp_fraction = -2.0 is not allowed" in err


def test_uncommitted_pipeline_state_is_refused_unless_allowed_and_then_stated(project, capsys):
    """The gate applies the audit's lineage rule: the released dvc.lock must be the committed one. A result
    re-made after the commit (here: the evaluate stage re-run with another grid size) is refused in one line;
    --allow-uncommitted registers it, and the tags and the model card say so."""
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("grid_size: 9", "grid_size: 4"))
    run_stages_in_process(project, ("evaluate",))  # as `dvc repro` would: the stage, then dvc.lock
    capsys.readouterr()  # the stage's own progress output is not the command's
    rc, out, err = cli(capsys, project, "register")
    assert rc == 1 and len(err.splitlines()) == 1
    assert "committed:" in err and "commit dvc.lock" in err
    assert registry(project) == ([], [], {})
    rc, out, err = cli(capsys, project, "register", "--allow-uncommitted")
    assert rc == 0, err
    (name,), _, _ = registry(project)
    tags = dict(db_rows(project, "SELECT key, value FROM model_version_tags WHERE name = ?", name))
    assert tags["pqd.uncommitted"] == "true" and tags["pqd.gate"] == "passed"
    (desc,), = db_rows(project, "SELECT description FROM model_versions WHERE name = ?", name)
    assert "Released with --allow-uncommitted" in desc
