"""The reduced demo as a DVC project, end to end: the session's reference run (support.projects.demo_reference, one
uninterrupted `dvc repro` of the real dvc.yaml in a temporary git repo, built once for this file), then

- a no-op repro and an experiment;
- interruption part-way, and bit-for-bit reruns: in a copy with no outputs, no dvc.lock and an empty DVC cache but
  the model stage's output (restored from the reference run and committed: the model is not trained again),
  `dvc repro` is killed with SIGKILL while two representative stages are part-way, then run again: generate (the
  first stage that samples, caught writing its temporary output folder or in its sampling loop) and calibrate
  (caught in block reconstruction with QDrop, before it writes). Every stage after the model is so computed once
  more from scratch on the same commit, params, seeds and machine: nothing half-written is ever taken as complete,
  and the final outputs equal those of the uninterrupted reference run, bit for bit. The atomic output folder both
  stages write through is the one every stage writes through (pqd.formats.files.atomic_dir);
- the release gate can fail: it passes the W8A8 PQD result and refuses a W3A8 min-max one, judging paired
  statistics of each against its own FP model on the same seeds, with the default thresholds."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from pqd.formats.export import verify_manifest
from pqd.formats.lineage import hash_tree
from pqd.formats.metrics import EvaluateMetrics
from pqd.ops import release
from support.projects import (BIN, clone, demo_reference, ops_env, run_stages_in_process, sh, stage_outputs,
                              wiped_clone)

pytestmark = pytest.mark.slow  # a full `dvc repro` of the reduced demo: make test-fast leaves it out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the reduced demo after its one uninterrupted `dvc repro` from a clean data/."""
    d = clone(demo_reference(tmp_path_factory), tmp_path_factory.mktemp("e2e") / "p")
    return d, ops_env(), [str(BIN / "dvc")]


def test_repro_then_noop_then_experiment(repo):
    d, env, dvc = repo
    ev = json.loads((d / "data/metrics/evaluate.json").read_text())
    assert ev["protocol"]["num_samples"] == 24 and ev["noise_floor"] > 0  # two disjoint FP sets differ
    model_info = json.loads((d / "data/model/model.json").read_text())
    assert model_info["digitnet_heldout_accuracy"] > 0.2  # trained (one epoch here): over twice the 0.1 of guessing
    for stage in ("model", "generate", "select", "calibrate", "export", "evaluate"):
        assert (d / f"data/metrics/{stage}.json").is_file()
    out = sh(dvc + ["repro"], d, env)  # nothing changed: nothing runs
    assert "Running stage" not in out
    sh(["git", "add", "-A"], d, env)
    sh(["git", "commit", "-qm", "w8a8 baseline"], d, env)
    sh(dvc + ["exp", "run", "-S", "quant.weight_bits=4"], d, env)
    diff = json.loads(sh(dvc + ["metrics", "diff", "--json"], d, env))
    export_diff = diff["data/metrics/export.json"]
    assert export_diff["packed_int4_layers"]["new"] > 0 and export_diff["packed_int4_layers"]["old"] == 0
    assert export_diff["size_ratio"]["new"] > export_diff["size_ratio"]["old"]


# --- interruption ---

# per stage killed: (folder, output name) of the output whose temporary sibling shows it is writing, and a progress
# line that shows it is part-way through its main loop before it writes (calibrate writes last)
WATCH = {
    "generate": ("data", "trajectories", "trajectories 1/"),
    "calibrate": ("data", "qstate", "block reconstruction"),
}


class Repro:
    """`dvc repro` in its own process group, its combined output collected by a thread."""

    def __init__(self, project: Path, args: tuple[str, ...] | list[str] = ()) -> None:
        self.proc = subprocess.Popen([str(BIN / "dvc"), "repro", *args], cwd=project, env=ops_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while block := self.proc.stdout.read1(65536):
            self.chunks.append(block)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # dvc, the shell and the stage's python process alike
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)


def kill_part_way(project: Path, stage: str, timeout: float = 900) -> str:
    """Run `dvc repro` until ``stage`` is part-way, SIGKILL it; returns what showed it was part-way."""
    folder, name, marker = WATCH[stage]
    running = f"Running stage '{stage}'"
    r = Repro(project)
    deadline = time.monotonic() + timeout
    while True:
        text = r.text()
        if running in text:
            parent = project / folder
            if parent.is_dir() and any(e.name.startswith(f".{name}.tmp-") for e in os.scandir(parent)):
                r.kill()
                return f"writing {folder}/.{name}.tmp-*"
            if marker is not None and marker in text.split(running, 1)[1]:
                r.kill()
                return f"progress line {marker!r}"
        if r.proc.poll() is not None or time.monotonic() > deadline:
            if r.proc.poll() is None:
                r.kill()
            raise AssertionError(f"stage {stage} could not be caught part-way:\n{r.text()[-3000:]}")
        time.sleep(0.001)


def restore_model(ref: Path, d: Path) -> None:
    """The model stage's outputs copied from ``ref`` and committed: dvc.lock records the stage as done."""
    shutil.copytree(ref / "data/model", d / "data/model")
    (d / "data/metrics").mkdir()
    shutil.copy2(ref / "data/metrics/model.json", d / "data/metrics/model.json")
    sh([str(BIN / "dvc"), "commit", "-f", "-q", "model"], d)


def test_sigkill_part_way_then_repro_equals_an_uninterrupted_run_bit_for_bit(tmp_path, tmp_path_factory):
    ref = demo_reference(tmp_path_factory)
    d = wiped_clone(ref, tmp_path / "p")
    assert not (d / "data").exists() and not (d / ".dvc/cache").exists()  # nothing to restore: all recomputed
    restore_model(ref, d)
    status = sh([str(BIN / "dvc"), "status"], d)
    assert "generate:" in status and "model:" not in status  # the model is done, the rest is not
    outs = {name: [o for o in st["outs"]] for name, st in yaml.safe_load((d / "dvc.yaml").read_text())["stages"].items()}
    caught = {}
    for stage in WATCH:
        caught[stage] = kill_part_way(d, stage)
        # nothing of the killed stage is taken as complete: no output under its real name, no dvc.lock entry
        assert not any((d / o).exists() for o in outs[stage]), stage
        lock = yaml.safe_load((d / "dvc.lock").read_text()) if (d / "dvc.lock").exists() else {}
        assert stage not in (lock or {}).get("stages", {}), stage
    print("killed part-way:", caught)
    assert "evaluate" in sh([str(BIN / "dvc"), "status"], d)  # dvc knows the last one is not done

    out = sh([str(BIN / "dvc"), "repro"], d, timeout=1200)
    assert "Running stage 'evaluate'" in out
    assert stage_outputs(d) == stage_outputs(ref)
    export = hash_tree(d / "data/export")
    assert export == hash_tree(ref / "data/export")  # every file, manifest.json included
    assert set(verify_manifest(d / "data/export")["files"]) == set(export) - {"manifest.json"}
    assert hash_tree(d / "data/qstate") == hash_tree(ref / "data/qstate")
    leftovers = [p for p in (d / "data").rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []  # each re-run removed its killed predecessor's temporary folder


# --- resuming a killed calibration from its checkpoint ---

def seed_one_calibration(ref: Path, dest: Path) -> Path:
    """A copy of the reproduced demo whose calibrate stage has a result no run has made (calibrate.seed 1): no run
    cache to restore it from, so `dvc repro -s calibrate` computes it. 60 reconstruction steps per unit instead of
    the reduced demo's 8, so that reconstruction is the larger part of the stage, as it is where a resume matters
    (at 8 steps loading, recording and the output check took most of the stage's 8.5 s), and a kill lands in it."""
    d = clone(ref, dest)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["calibrate"].update(seed=1, recon_iters=60)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return d


def test_calibrate_killed_after_half_its_units_resumes_to_the_same_bytes(tmp_path, tmp_path_factory):
    """`kill -9` of `dvc repro` once calibrate's checkpoint holds at least half of its reconstruction units; the
    next `dvc repro` names the first unit it recomputes, takes the finished units from the checkpoint instead of
    recomputing them, and writes the bytes of an uninterrupted run."""
    ref = demo_reference(tmp_path_factory)
    full = seed_one_calibration(ref, tmp_path / "full")
    sh([str(BIN / "dvc"), "repro", "-s", "calibrate"], full)
    full_m = json.loads((full / "data/metrics/calibrate.json").read_text())
    order = [r.split(",")[0] for r in (full / "data/qstate/reconstruction.csv").read_text().splitlines()[1:]]
    assert not list((full / ".pqd/checkpoints").iterdir())  # a completed stage removes its checkpoint
    assert full_m["units_from_checkpoint"] == 0 and full_m["reconstructed_units"] == len(order)

    d = seed_one_calibration(ref, tmp_path / "killed")
    r = Repro(d, ["-s", "calibrate"])
    deadline = time.monotonic() + 900
    while not (done := list((d / ".pqd/checkpoints").glob("calibrate-*/*.safetensors"))) \
            or len(done) < (len(order) + 1) // 2:
        assert r.proc.poll() is None and time.monotonic() < deadline, r.text()[-3000:]
        time.sleep(0.005)
    r.kill()
    kept = {p.name[: -len(".safetensors")] for p in (d / ".pqd/checkpoints").glob("calibrate-*/*.safetensors")}
    assert len(kept) >= len(order) / 2 and not (d / "data/qstate").exists()
    first = next(u for u in order if u not in kept)

    out = sh([str(BIN / "dvc"), "repro", "-s", "calibrate"], d)
    assert f"recomputing from unit {first}" in out, out[-3000:]
    assert hash_tree(d / "data/qstate") == hash_tree(full / "data/qstate")
    resumed_m = json.loads((d / "data/metrics/calibrate.json").read_text())
    # the work saved is counted, not timed: wall time on a shared 2-core CI machine depends on what runs beside it
    # (the resumed stage measured 0.71 of the full run once and 0.84 another time; its reconstruction 0.98)
    assert resumed_m["units_from_checkpoint"] == len(kept) and resumed_m["reconstructed_units"] == len(order)
    print(f"calibrate: {len(order)} units, killed with {len(kept)} finished; full {full_m['seconds']} s, resumed "
          f"{resumed_m['seconds']} s; reconstruction {full_m['reconstruction_seconds']} s, resumed "
          f"{resumed_m['reconstruction_seconds']} s")


# --- the release gate ---

@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """The reduced demo (PQD, W8A8), committed."""
    d = clone(demo_reference(tmp_path_factory), tmp_path_factory.mktemp("gate") / "w8a8")
    sh(["git", "add", "-A"], d)
    sh(["git", "commit", "-qm", "w8a8 pqd"], d)
    return d


@pytest.fixture(scope="module")
def w3a8_minmax(w8a8, tmp_path_factory):
    """The same FP model, trajectories and FP samples, calibrated W3A8 with min-max ranges and no reconstruction."""
    d = clone(w8a8, tmp_path_factory.mktemp("gate") / "w3a8")
    params = d / "params.yaml"
    text = params.read_text().replace("weight_bits: 8", "weight_bits: 3", 1).replace("method: pqd", "method: minmax", 1)
    params.write_text(text.replace("time_groups: 2", "time_groups: null", 1))
    run_stages_in_process(d, ("select", "calibrate", "export", "evaluate"))
    sh(["git", "add", "-A"], d)
    sh(["git", "commit", "-qm", "w3a8 minmax"], d)
    return d


def checks(project):
    _, report = release.check(project)
    return report, {c.name: c for c in report.checks}


def test_the_gate_passes_the_w8a8_pqd_demo(w8a8):
    report, by_name = checks(w8a8)
    assert report.passed, report.summary()
    assert {"delta_fid", "fid_vs_fp", "psnr"} <= set(by_name)
    assert "[" in by_name["fid_vs_fp"].detail  # judged on the interval


def test_the_gate_refuses_the_w3a8_minmax_demo(w3a8_minmax, w8a8):
    report, by_name = checks(w3a8_minmax)
    assert not report.passed
    # the artifact itself is sound: what fails is its quality against its own FP model
    assert all(by_name[n].passed for n in ("hashes", "lineage", "committed", "deployment")), report.summary()
    failed = {n for n in ("delta_fid", "fid_vs_fp", "psnr") if not by_name[n].passed}
    assert failed, report.summary()
    ev3 = EvaluateMetrics.read(w3a8_minmax / "data/metrics/evaluate.json")
    ev8 = EvaluateMetrics.read(w8a8 / "data/metrics/evaluate.json")
    assert ev3.protocol.weight_codes.startswith("3-bit") and ev3.noise_floor == ev8.noise_floor  # same FP samples
    assert ev3.psnr_mean_ci.hi < ev8.psnr_mean_ci.lo  # the paired per-image error separates the two
    print(json.dumps({n: by_name[n].detail for n in ("delta_fid", "fid_vs_fp", "psnr")}, indent=1))
