"""Integrity: loading an export checks every sha256 of its manifest (a modified, missing or extra file is
refused, named), and nothing is ever unpickled: a planted malicious pickle is refused, never executed."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.projects import ROOT, reproduced_project
from pqd.errors import ArtifactError
from pqd.diffusion.quantized import load_quantized_net
from pqd.diffusion.pipeline import ModelFolderError, load_pipeline
from pqd.formats.lineage import sha256_file
from pqd.formats import qstate as qcodec


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_pipeline, ts_features) -> Path:
    return reproduced_project(tmp_path_factory, tiny_pipeline, ts_features) / "data"


def export_copy(result: Path, dest: Path) -> Path:
    return shutil.copytree(result / "export", dest / "export")


def test_every_file_of_the_manifest_is_verified(result, tmp_path):
    files = json.loads((result / "export/manifest.json").read_text())["files"]
    assert len(files) >= 5 and "unet/quantized.safetensors" in files and "qmap.json" in files
    load_quantized_net(export_copy(result, tmp_path / "ok"))  # the untouched export loads
    for i, rel in enumerate(files):
        exp = export_copy(result, tmp_path / f"m{i}")
        with open(exp / rel, "ab") as f:
            f.write(b" ")  # one byte more: same content for every parser, another sha256
        with pytest.raises(ArtifactError, match=re.escape(f"file {rel} was modified")):
            load_quantized_net(exp)
        (exp / rel).unlink()
        with pytest.raises(ArtifactError, match=re.escape(f"file {rel} listed in manifest.json is missing")):
            load_quantized_net(exp)


class Payload:
    """Unpickling this creates the file MARKER (what an attacker's code would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(Payload(marker)))
    return path


def test_the_payload_is_live(tmp_path):
    """The same bytes do run code when unpickled: the refusals below are not an accident of a dud file."""
    marker = tmp_path / "ran"
    f = malicious(tmp_path / "evil.pkl", marker)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(f)!r}, 'rb').read())"], check=True)
    assert marker.exists()


def test_planted_pickle_in_an_export_with_a_matching_manifest_is_not_executed(result, tmp_path):
    """An attacker who can rewrite the manifest too: the weights are read as safetensors only, never unpickled."""
    marker = tmp_path / "ran"
    exp = export_copy(result, tmp_path)
    malicious(exp / "unet/quantized.safetensors", marker)
    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["files"]["unet/quantized.safetensors"] = sha256_file(exp / "unet/quantized.safetensors")
    (exp / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="quantized.safetensors is truncated or corrupted"):
        load_quantized_net(exp)
    assert not marker.exists()


def test_planted_pickle_in_qstate_is_not_executed(result, tmp_path):
    marker = tmp_path / "ran"
    q = shutil.copytree(result / "qstate", tmp_path / "qstate")
    malicious(q / qcodec.STATE_TENSORS, marker)
    with pytest.raises(ValueError, match=f"{qcodec.STATE_TENSORS} is truncated or corrupted"):
        qcodec.read(q, qcodec.STATE_TENSORS)
    assert not marker.exists()


def test_planted_pickle_as_model_weights_is_refused_by_the_weights_only_loader(result, tmp_path):
    """A model folder whose UNet weights are a pickle (.bin): diffusers reads it with torch.load(weights_only=True),
    which refuses the payload's global instead of calling it."""
    marker = tmp_path / "ran"
    model = shutil.copytree(result / "model", tmp_path / "model")
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    malicious(model / "unet/diffusion_pytorch_model.bin", marker)
    with pytest.raises(ModelFolderError, match="could not be loaded as a diffusers pipeline"):
        load_pipeline(model)
    assert not marker.exists()


def test_no_pickle_loading_in_the_product():
    """Every load in pqd/ is safetensors, JSON, parquet or torch.load(weights_only=True)."""
    offenders = []
    for f in sorted((ROOT / "pqd").rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|allow_pickle=True|pd\.read_pickle\(", code) or \
                    ("torch.load(" in code and "weights_only=True" not in code):
                offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
