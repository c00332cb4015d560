"""The model stage's non-demo sources fail fast and clearly, and leave existing outputs alone."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pqd.stages import model
from support.projects import write_params


def run_model_stage(tmp_path, source, env_extra=None):
    params = write_params(tmp_path, {"model": {"source": source}})
    env = {**os.environ, **(env_extra or {})}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pqd.stages.model", "--params", str(params), "--out", str(tmp_path / "model"),
                        "--metrics", str(tmp_path / "m.json")], capture_output=True, text=True, env=env, timeout=120)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_id_fails_at_once_offline(tmp_path, offline):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("earlier output")
    r, seconds = run_model_stage(tmp_path, "google/ddpm-cifar10-32", {"HF_HUB_OFFLINE": offline})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "google/ddpm-cifar10-32" in lines[0]
    assert seconds < 60
    assert (tmp_path / "model" / "keep.txt").read_text() == "earlier output"
    assert not (tmp_path / "m.json").exists()


def test_missing_folder(tmp_path):
    r, _ = run_model_stage(tmp_path, str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "does not exist" in r.stderr and str(tmp_path / "nowhere") in r.stderr


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "notpipe" / "weights.bin").write_bytes(b"x")
    r, _ = run_model_stage(tmp_path, str(tmp_path / "notpipe"))
    assert r.returncode == 2 and "model_index.json is missing" in r.stderr


def test_local_pipeline_is_snapshotted(tmp_path, tiny_pipeline):
    r, _ = run_model_stage(tmp_path, str(tiny_pipeline))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "model" / "model.json").is_file()


def test_digits16_demo_is_trained_as_a_16x16_rgb_ddim_pipeline_the_same_bytes_twice(tmp_path):
    params = write_params(tmp_path, {"model": {"source": "demo:digits16", "train_steps": 3, "batch_size": 8,
                                               "channels": [16, 32], "feature_epochs": 1}})
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's torch threads
    r = subprocess.run([sys.executable, "-m", "pqd.stages.model", "--params", str(params), "--out", str(tmp_path / "model"),
                        "--metrics", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    # trained again (in this process): the same weights and digit features, bit for bit
    assert model.main(["--params", str(params), "--out", str(tmp_path / "again"), "--metrics", str(tmp_path / "a.json")]) == 0
    weights = lambda folder: {p.relative_to(folder).as_posix(): p.read_bytes()  # noqa: E731
                              for p in folder.rglob("*.safetensors")}
    assert len(weights(tmp_path / "model")) == 2 and weights(tmp_path / "again") == weights(tmp_path / "model")
    index = json.loads((tmp_path / "model/model_index.json").read_text())
    unet = json.loads((tmp_path / "model/unet/config.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert (unet["sample_size"], unet["in_channels"], unet["out_channels"]) == (16, 3, 3)
    assert unet["block_out_channels"] == [16, 32] and unet["down_block_types"][0] == "AttnDownBlock2D"
    assert json.loads((tmp_path / "model/model.json").read_text())["source"] == "demo:digits16"
    assert (tmp_path / "model/fid_features/model.safetensors").is_file()  # the digit features, for evaluate
