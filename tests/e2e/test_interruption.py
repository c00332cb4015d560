"""Interruption part-way, and bit-for-bit reruns: in a copy of the reduced demo with no outputs, no dvc.lock and an
empty DVC cache but the model stage's output (restored from the reference run and committed: the model is not
trained again), `dvc repro` is killed with SIGKILL while two representative stages are part-way, then run again:
generate (the first stage that samples, caught writing its temporary output folder or in its sampling loop) and
calibrate (caught in block reconstruction with QDrop, before it writes). Every stage after the model is so computed
once more from scratch on the same commit, params, seeds and machine: nothing half-written is ever taken as
complete, and the final outputs equal those of the uninterrupted reference run, bit for bit (the calibration with
block reconstruction and QDrop included). The atomic output folder both stages write through is the one every stage
writes through (pqd.formats.files.atomic_dir)."""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from support.projects import BIN, demo_reference, ops_env, sh, stage_outputs, wiped_clone
from pqd.formats.export import verify_manifest
from pqd.formats.lineage import hash_tree

pytestmark = pytest.mark.slow  # a full `dvc repro` of the reduced demo: make test-fast leaves it out

# per stage killed: (folder, output name) of the output whose temporary sibling shows it is writing, and a progress
# line that shows it is part-way through its main loop before it writes (calibrate writes last)
WATCH = {
    "generate": ("data", "trajectories", "trajectories 1/"),
    "calibrate": ("data", "qstate", "block reconstruction"),
}


class Repro:
    """`dvc repro` in its own process group, its combined output collected by a thread."""

    def __init__(self, project: Path) -> None:
        self.proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=ops_env(), stdout=subprocess.PIPE,
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
