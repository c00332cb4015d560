"""Calibration checkpoints (pqd.formats.checkpoint): keyed by everything that determines the result, exact round
trip of a unit's state and log entry, and the cleaning rules of checkpoint.keep_mb."""

import os

import torch

import pqd
from pqd.formats.checkpoint import UnitCheckpoint, calibrate_key


def folders(tmp_path):
    model, calib = tmp_path / "model", tmp_path / "calib"
    for f, text in ((model / "unet.safetensors", "w"), (calib / "shard-0.safetensors", "c")):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return model, calib


def test_the_key_changes_with_every_input_param_and_the_code(tmp_path, monkeypatch):
    model, calib = folders(tmp_path)
    settings = {"calibrate": {"seed": 0}, "device": "cpu"}
    key, what = calibrate_key(model, calib, settings)
    assert calibrate_key(model, calib, settings)[0] == key and "code" in what
    assert calibrate_key(model, calib, {"calibrate": {"seed": 1}, "device": "cpu"})[0] != key  # a param
    (model / "unet.safetensors").write_text("w2")
    assert calibrate_key(model, calib, settings)[0] != key  # a model file
    (model / "unet.safetensors").write_text("w")
    code = tmp_path / "pqd"
    (code / "core").mkdir(parents=True)
    (code / "__init__.py").write_text("")
    monkeypatch.setattr(pqd, "__file__", str(code / "__init__.py"))
    k1 = calibrate_key(model, calib, settings)[0]
    (code / "core" / "reconstruct.py").write_text("# a changed line of code\n")
    assert calibrate_key(model, calib, settings)[0] != k1


def test_a_unit_round_trips_exactly_and_keep_mb_prunes_the_oldest(tmp_path):
    ck = UnitCheckpoint(tmp_path, "a" * 32, {"what": 1})
    shared = torch.randn(4)
    state = {"conv.weight_int": torch.randint(-128, 127, (8, 3), dtype=torch.int8), "q.scale": shared,
             "k.scale": shared}  # two quantizers holding one grid
    entry = {"mse_before": 0.1 + 0.2, "mse_after": 1e-7 / 3, "reverted": 0.0}
    assert ck.load("down.0") is None and ck.units() == []
    ck.save("down.0", (state, entry))
    got_state, got_entry = ck.load("down.0")
    assert got_entry == entry and got_state.keys() == state.keys()
    assert all(torch.equal(got_state[k], v) and got_state[k].dtype == v.dtype for k, v in state.items())
    assert ck.units() == ["down.0"] and not list(ck.folder.glob(".*tmp-*"))
    ck.close(keep_mb=0)
    assert not ck.folder.exists()
    old = UnitCheckpoint(tmp_path, "b" * 32, {})
    old.save("u", ({"x": torch.zeros(200_000)}, {}))  # 800 kB
    os.utime(old.folder, (1, 1))
    new = UnitCheckpoint(tmp_path, "c" * 32, {})
    new.save("u", ({"x": torch.zeros(200_000)}, {}))
    new.close(keep_mb=1)  # both do not fit in 1 MB: the least recently used goes
    assert new.folder.exists() and not old.folder.exists()
