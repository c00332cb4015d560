"""make gpu-check refuses in one line where torch sees no CUDA GPU, before any work (this machine has none)."""

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: make gpu-check runs instead of refusing")
def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "-m", "pqd.bench.gpu", "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch.cuda.is_available() is False" in lines[0] and "nothing was run" in lines[0]
    assert not out.exists()
