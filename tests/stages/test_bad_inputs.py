"""The bad-input suite: every bad setting or damaged input stops its stage at once with one line naming the
key or file, the bad value and what is allowed, exits non-zero, and leaves every existing output untouched.

Each case starts from a copy of a complete pipeline result (the tiny operations project), damages one thing,
runs the stage's real command line from dvc.yaml, and compares the whole folder before and after."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from support.projects import ROOT, _cwd, reproduced_project
from pqd.formats.lineage import sha256_file


def set_param(key: str, value):
    def mutate(d: Path) -> None:
        data = yaml.safe_load((d / "params.yaml").read_text())
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
        (d / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return mutate


def write(rel: str, content: bytes | str):
    def mutate(d: Path) -> None:
        f = d / rel
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return mutate


def truncate(rel: str):
    def mutate(d: Path) -> None:
        f = d / rel
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return mutate


def remove(rel: str):
    def mutate(d: Path) -> None:
        p = d / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return mutate


def empty(rel: str):
    def mutate(d: Path) -> None:
        shutil.rmtree(d / rel)
        (d / rel).mkdir()
    return mutate


def flip_byte(rel: str):
    def mutate(d: Path) -> None:
        b = bytearray((d / rel).read_bytes())
        b[len(b) // 2] ^= 0xFF
        (d / rel).write_bytes(bytes(b))
    return mutate


def edit_index(fn):
    def mutate(d: Path) -> None:
        f = d / "data/trajectories/index.parquet"
        fn(pd.read_parquet(f)).to_parquet(f, index=False)
    return mutate


def future_qmap(d: Path) -> None:
    """An export whose qmap.json says format_version 99, with a consistent manifest (a newer writer's export)."""
    exp = d / "data/export"
    qmap = json.loads((exp / "qmap.json").read_text())
    (exp / "qmap.json").write_text(json.dumps({**qmap, "format_version": 99}))
    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["files"]["qmap.json"] = sha256_file(exp / "qmap.json")
    (exp / "manifest.json").write_text(json.dumps(manifest))


def not_a_pipeline(d: Path) -> None:
    (d / "notpipe").mkdir()
    (d / "notpipe/diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    set_param("model.source", str(d / "notpipe"))(d)


def reference_folder(files: dict[str, bytes]):
    """evaluate.reference set to a new folder holding ``files`` (name -> bytes)."""
    def mutate(d: Path) -> None:
        (d / "refs").mkdir()
        for name, content in files.items():
            (d / "refs" / name).write_bytes(content)
        set_param("evaluate.reference", "refs")(d)
    return mutate


def reference_npz(**arrays):
    """evaluate.reference set to a new stats.npz holding ``arrays``."""
    def mutate(d: Path) -> None:
        import numpy as np

        np.savez(d / "stats.npz", **arrays)
        set_param("evaluate.reference", "stats.npz")(d)
    return mutate


def nan_in_calibration_set(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "data/calib/shard-00000.safetensors"
    t = load_file(f)
    t["x"][3, 0, 2, 2] = float("nan")
    save_file(t, f)


# bad evaluate.reference values: (id, damage, words of the evaluate stage's error (TorchScript features of 6 values),
# words of the pre-flight check's error with the default demo:digits features (128 values))
NO_IMAGES = "evaluate.reference = 'refs' is not allowed: the folder holds 0 images clean-fid reads"
REFERENCE_CASES = [
    ("empty-folder", reference_folder({}), [NO_IMAGES + "; expected", "a folder of at least 2 images"], [NO_IMAGES + "; expected"]),
    ("no-image-file", reference_folder({"notes.txt": b"my images"}), [NO_IMAGES + " (and 1 other file: notes.txt)"],
     [NO_IMAGES + " (and 1 other file: notes.txt)"]),
    ("file-not-an-image", reference_folder({"a.png": b"not a png", "b.png": b"nor this"}),
     ["'refs' is not allowed: a.png, one of the 2 image files found, is not an image PIL can open"],
     ["a.png, one of the 2 image files found, is not an image PIL can open"]),
    ("npz-without-mu", reference_npz(sigma=[[1.0]]), ["'stats.npz' is not allowed: it holds no mu; expected arrays 'mu' [D]"],
     ["'stats.npz' is not allowed: it holds no mu"]),
    ("npz-wrong-size", reference_npz(mu=[0.0] * 5, sigma=[[0.0] * 5] * 5),
     ["'stats.npz' is not allowed: mu has shape [5] and sigma [5, 5]", "the extractor's feature size D = 6"],
     ["'stats.npz' is not allowed: mu has shape [5] and sigma [5, 5]", "the extractor's feature size D = 128"]),
]

# (id, stage to run, damage, words the one-line error must contain)
CASES = [
    ("bits-0", "calibrate", set_param("quant.weight_bits", 0), ["quant.weight_bits = 0", "expected an integer in [2, 8]"]),
    ("bits-1", "calibrate", set_param("quant.weight_bits", 1), ["quant.weight_bits = 1", "expected an integer in [2, 8]"]),
    ("bits-9", "calibrate", set_param("quant.weight_bits", 9), ["quant.weight_bits = 9", "expected an integer in [2, 8]"]),
    ("act-bits-text", "calibrate", set_param("quant.act_bits", "8"), ["quant.act_bits = '8'", "expected an integer"]),
    ("sigma-0", "select", set_param("select.sigma", 0), ["select.sigma = 0", "expected a finite number > 0"]),
    ("sigma-negative", "select", set_param("select.sigma", -0.5), ["select.sigma = -0.5", "> 0"]),
    ("mu-above-1", "select", set_param("select.mu", 1.5), ["select.mu = 1.5", "expected a number in [0, 1]"]),
    ("mu-below-0", "select", set_param("select.mu", -0.1), ["select.mu = -0.1", "[0, 1]"]),
    ("groups-over-steps", "calibrate", set_param("calibrate.time_groups", 7),
     ["calibrate.time_groups = 7", "expected at most generate.steps = 6"]),
    ("unknown-method", "calibrate", set_param("calibrate.method", "gptq"),
     ["calibrate.method = 'gptq'", "one of 'minmax', 'ptq4dm', 'qdiffusion', 'pqd'"]),
    ("unknown-source", "model", set_param("model.source", "s3://bucket/unet"),
     ["model.source = 's3://bucket/unet'", "expected 'demo:digits', 'demo:digits16', 'demo:digits-dit', a local folder path, or a hub id"]),
    ("negative-num-samples", "select", set_param("select.num_samples", -3), ["select.num_samples = -3", "expected an integer >= 1"]),
    ("negative-eval-samples", "generate", set_param("generate.eval_samples", -1), ["generate.eval_samples = -1", ">= 2"]),
    ("zero-calib-seeds", "generate", set_param("generate.calib_seeds", 0), ["generate.calib_seeds = 0", ">= 1"]),
    ("unknown-key", "calibrate", set_param("quant.bits", 8), ["unknown key quant.bits", "allowed keys are quant.weight_bits"]),
    ("unknown-timesteps", "select", set_param("select.timesteps", "normal"),
     ["select.timesteps = 'normal'", "one of 'gaussian', 'uniform'"]),
    ("qdrop-1", "calibrate", set_param("calibrate.qdrop_p", 1.0), ["calibrate.qdrop_p = 1.0", "[0, 1)"]),
    ("float-dtype", "export", set_param("export.float_dtype", "int8"), ["export.float_dtype = 'int8'", "'float32', 'float16'"]),
    ("unknown-features", "evaluate", set_param("evaluate.features", "clip"), ["evaluate.features = 'clip'", "'inception'"]),
    ("params-not-yaml", "calibrate", write("params.yaml", "quant: [8, 8\n"), ["params.yaml is not valid YAML"]),
    ("missing-input-folder", "calibrate", remove("data/calib"),
     ["input folder data/calib is missing", "expected the complete output of the select stage"]),
    ("empty-input-folder", "export", empty("data/qstate"),
     ["input folder data/qstate is empty", "expected the complete output of the calibrate stage"]),
    ("truncated-shard", "select", truncate("data/trajectories/shard-00000.safetensors"),
     ["data/trajectories/shard-00000.safetensors is truncated or corrupted", "expected a complete safetensors file"]),
    ("corrupted-safetensors", "calibrate", write("data/calib/shard-00000.safetensors", b"\xff" * 8 + b"not a header" * 10),
     ["data/calib/shard-00000.safetensors is truncated or corrupted", "expected a complete safetensors file"]),
    ("index-seeds-disagree", "select", edit_index(lambda df: df.assign(seed=df["seed"] + 1000)),
     ["shard-00000.safetensors", "disagrees with index.parquet", "expected 4 trajectories x 6 steps"]),
    ("index-rows-missing", "select", edit_index(lambda df: df[~((df["seed"] == df["seed"].min()) & (df["step"] == 3))]),
     ["data/trajectories/index.parquet: 35 rows do not match 6 trajectories x 6 steps", "expected one row per"]),
    ("qmap-future-format", "evaluate", future_qmap,
     ["data/export/qmap.json: format_version = 99 is not supported", "expected 1"]),
    ("export-file-modified", "evaluate", flip_byte("data/export/unet/quantized.safetensors"),
     ["file unet/quantized.safetensors was modified (sha256 differs from manifest.json)"]),
    ("export-file-missing", "evaluate", remove("data/export/qmap.json"),
     ["file qmap.json listed in manifest.json is missing"]),
    ("export-file-planted", "evaluate", write("data/export/unet/diffusion_pytorch_model.bin", b"planted"),
     ["file unet/diffusion_pytorch_model.bin is not listed in manifest.json"]),
    ("source-not-a-pipeline", "model", not_a_pipeline, ["notpipe is not a diffusers pipeline: model_index.json is missing"]),
    ("model-folder-not-a-pipeline", "generate", remove("data/model/model_index.json"),
     ["model folder data/model is not a diffusers pipeline: model_index.json is missing"]),
    ("calibration-set-nan", "calibrate", nan_in_calibration_set,
     ["data/calib/shard-00000.safetensors: calibration input 3 (timestep", "has non-finite values", "expected finite"]),
    ("qstate-not-json", "export", write("data/qstate/qmap.json", "{not json"), ["data/qstate/qmap.json: not valid JSON"]),
    *[(f"reference-{case}", "evaluate", damage, words) for case, damage, words, _ in REFERENCE_CASES],
]


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_pipeline, ts_features) -> Path:
    return reproduced_project(tmp_path_factory, tiny_pipeline, ts_features)


def copy_result(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("data", "params.yaml", "dvc.yaml"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dest / name)
    return dest


def snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime) of every file under d, hidden temporary folders included."""
    return {p.relative_to(d).as_posix(): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def stage_argv(d: Path, stage: str) -> tuple[str, list[str]]:
    argv = shlex.split(yaml.safe_load((d / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return argv[2], argv[3:]


@pytest.mark.parametrize("stage, damage, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_touches_nothing(result, tmp_path, capsys, stage, damage, words):
    import importlib

    d = copy_result(result, tmp_path / "p")
    damage(d)
    before = snapshot(d)
    module, args = stage_argv(d, stage)
    with _cwd(d):
        rc = importlib.import_module(module).main(args)
    err = capsys.readouterr().err.strip()
    print(f"[{stage}] {err}")
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"pqd {stage}: error: ")
    for w in words:
        assert w in err
    assert snapshot(d) == before  # no output written, replaced or left half-done


@pytest.mark.parametrize("case", ["bits-9", "truncated-shard"])
def test_real_process_exit_status(result, tmp_path, case):
    """The same through a real interpreter: exit status 2 and one line on stderr, nothing else."""
    _, stage, damage, words = next(c for c in CASES if c[0] == case)
    d = copy_result(result, tmp_path / "p")
    damage(d)
    before = snapshot(d)
    module, args = stage_argv(d, stage)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=d, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words)
    assert snapshot(d) == before


def test_export_that_overflows_stops_evaluate_naming_layer_and_step(result, tmp_path, capsys):
    """A consistent export (manifest re-hashed) whose UNet overflows: evaluate stops at the first sampling step,
    naming the layer, instead of writing black images; the earlier quantized samples stay as they were."""
    import importlib

    from safetensors.torch import load_file, save_file

    d = copy_result(result, tmp_path / "p")
    exp = d / "data/export"
    tensors = load_file(exp / "unet/quantized.safetensors")
    tensors["mid_block.resnets.0.norm2.weight"][0] = float("inf")  # a float layer: no integer grid clamps it
    save_file(tensors, exp / "unet/quantized.safetensors")
    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["files"]["unet/quantized.safetensors"] = sha256_file(exp / "unet/quantized.safetensors")
    (exp / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(d)
    module, args = stage_argv(d, "evaluate")
    with _cwd(d):
        rc = importlib.import_module(module).main(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    print(last)
    assert rc == 2 and last.startswith("pqd evaluate: error: non-finite UNet output at sampling step 0 (timestep ")
    assert "first produced by layer mid_block.resnets.0.norm2" in last
    assert snapshot(d) == before


def fresh_project(d: Path) -> Path:
    """The committed project before its first stage: params.yaml and dvc.yaml, no data."""
    d.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, d / name)
    return d


NO_CUDA = "params: device = 'cuda' is not allowed here: torch.cuda.is_available() is False on this machine; expected 'cpu' or 'auto'"
PREFLIGHT = [(f"reference-{case}", damage, words) for case, damage, _, words in REFERENCE_CASES] + [
    ("device-cuda", set_param("device", "cuda"), [NO_CUDA])]


@pytest.mark.parametrize("damage, words", [c[1:] for c in PREFLIGHT], ids=[c[0] for c in PREFLIGHT])
def test_preflight_refuses_before_the_first_stage(tmp_path, capsys, damage, words):
    """``make run``'s first step (python -m pqd.stages.preflight) stops a bad reference set or an unusable device in one
    line, before any stage has run, and writes nothing."""
    import torch

    from pqd.stages.preflight import main as preflight

    if words == [NO_CUDA] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = fresh_project(tmp_path / "p")
    damage(d)
    before = snapshot(d)
    with _cwd(d):
        rc = preflight(["params.yaml"])
    err = capsys.readouterr().err.strip()
    print(err)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("pqd: error: ")
    for w in words:
        assert w in err
    assert snapshot(d) == before


def test_preflight_counts_the_reference_images_and_is_what_make_runs_first(tmp_path, capsys):
    from PIL import Image

    from pqd.stages.preflight import main as preflight

    d = fresh_project(tmp_path / "p")
    (d / "refs/sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(d / "refs/sub" / f"{i}.png")
    set_param("evaluate.reference", "refs")(d)
    with _cwd(d):
        assert preflight(["params.yaml"]) == 0
    assert "reference refs (3 images)" in capsys.readouterr().out
    recipe = (ROOT / "Makefile").read_text().split("\ncheck-params:", 1)[1].split("\n\n", 1)[0]
    assert "python -m pqd.stages.preflight params.yaml" in recipe
