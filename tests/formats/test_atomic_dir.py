"""Atomic output folders (pqd.formats.files.atomic_dir), which every stage writes its outputs through: a block that
fails, or a process killed outright, leaves the output as it was, and the next build removes what a killed one left.
(tests/e2e/test_demo_project.py kills two real stages part-way under `dvc repro`.)"""

import signal
import subprocess
import sys

import pytest

from pqd.formats.files import atomic_dir
from support.projects import ROOT


def test_a_failing_block_leaves_the_earlier_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="half-way"), atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("half-way")
    assert (out / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_writer_leaves_nothing_under_the_real_name_and_the_next_build_cleans_up(tmp_path):
    out = tmp_path / "out"
    code = (f"import os, signal\nfrom pathlib import Path\nfrom pqd.formats.files import atomic_dir\n"
            f"with atomic_dir(Path({str(out)!r})) as tmp:\n    (tmp / 'a').write_text('half')\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(left) == 1 and left[0].startswith(".out.tmp-")
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "a").read_text() == "whole"
