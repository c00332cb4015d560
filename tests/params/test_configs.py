"""The configs for real checkpoints are valid params files and describe the family they name."""

from pathlib import Path

import pytest

from pqd.params import load_params

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


TEXT = {"sd-v1-4-coco", "pixart-xl-2-512", "sd3-medium"}


def test_there_is_one_config_per_family():
    assert {c.stem for c in CONFIGS} == {"ddpm-cifar10", "ldm-celebahq-256", "dit-xl-2-256"} | TEXT


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_is_valid(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # dvc runs from the project root; the prompt file path is relative to it
    p = load_params(config)
    assert p.evaluate.features == "inception" and p.device == "auto"
    assert (p.generate.prompts is not None) == (config.stem in TEXT)
    assert (p.generate.scheduler == "keep") == (config.stem in ("pixart-xl-2-512", "sd3-medium"))  # DPM-Solver, flow
    if p.generate.prompts:
        lines = [x for x in (ROOT / p.generate.prompts).read_text().splitlines() if x.strip()]
        assert len(lines) >= 20
