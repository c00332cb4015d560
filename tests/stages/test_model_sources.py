"""The model stage's non-demo sources fail fast and clearly, and leave existing outputs alone."""

import json
import os
import subprocess
import sys
import time

import pytest

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


def model_main(tmp_path, source, capsys) -> tuple[int, str]:
    """The model stage's main() in this process (a real interpreter: the hub cases above, and
    tests/stages/test_bad_inputs.py::test_real_process_exit_status); its exit status and stderr."""
    params = write_params(tmp_path, {"model": {"source": source}})
    rc = model.main(["--params", str(params), "--out", str(tmp_path / "model"), "--metrics", str(tmp_path / "m.json")])
    return rc, capsys.readouterr().err


def test_missing_folder(tmp_path, capsys):
    rc, err = model_main(tmp_path, str(tmp_path / "nowhere"), capsys)
    assert rc == 2 and "does not exist" in err and str(tmp_path / "nowhere") in err


def test_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "notpipe" / "weights.bin").write_bytes(b"x")
    rc, err = model_main(tmp_path, str(tmp_path / "notpipe"), capsys)
    assert rc == 2 and "model_index.json is missing" in err


def test_local_pipeline_is_snapshotted(tmp_path, tiny_pipeline, capsys):
    rc, err = model_main(tmp_path, str(tiny_pipeline), capsys)
    assert rc == 0, err
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "model" / "model.json").is_file()


DIGITS16 = {"model": {"source": "demo:digits16", "train_steps": 3, "batch_size": 8, "channels": [16, 32],
                       "feature_epochs": 1}}


def train_digits16(folder):
    params = write_params(folder, DIGITS16)
    assert model.main(["--params", str(params), "--out", str(folder / "model"), "--metrics", str(folder / "m.json")]) == 0
    return folder / "model"


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    return train_digits16(tmp_path_factory.mktemp("digits16"))


def test_digits16_demo_is_trained_as_a_16x16_rgb_ddim_pipeline(digits16):
    index = json.loads((digits16 / "model_index.json").read_text())
    unet = json.loads((digits16 / "unet/config.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert (unet["sample_size"], unet["in_channels"], unet["out_channels"]) == (16, 3, 3)
    assert unet["block_out_channels"] == [16, 32] and unet["down_block_types"][0] == "AttnDownBlock2D"
    assert json.loads((digits16 / "model.json").read_text())["source"] == "demo:digits16"
    assert (digits16 / "fid_features/model.safetensors").is_file()  # the digit features, for evaluate


@pytest.mark.slow  # a second training
def test_a_demo_trained_again_has_the_same_bytes(digits16, tmp_path):
    """The model stage's training is deterministic: the same weights and digit features, bit for bit (the
    interruption test restores the model instead of training it again)."""
    weights = lambda folder: {p.relative_to(folder).as_posix(): p.read_bytes()  # noqa: E731
                              for p in folder.rglob("*.safetensors")}
    assert len(weights(digits16)) == 2 and weights(train_digits16(tmp_path)) == weights(digits16)
