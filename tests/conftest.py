import os

# offline hygiene for every test (CI sets these too)
for k, v in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402

torch.set_num_threads(2)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """A random-weight 8x8 grayscale DDPM pipeline with one attention level, saved in diffusers layout."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def build_torchscript_features(path: Path) -> Path:
    """A tiny fixed-weight TorchScript feature network: [B, 3, H, W] in [0, 255] -> [B, 6]."""

    class Feat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.conv(x / 255.0)).mean(dim=(2, 3))

    torch.jit.script(Feat()).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def ts_features(tmp_path_factory) -> Path:
    return build_torchscript_features(tmp_path_factory.mktemp("feat") / "feat.pt")


def small_params(**sections) -> dict:
    """Params for fast tests: a few trajectories and samples."""
    p = {
        "generate": {"steps": 6, "calib_seeds": 6, "eval_samples": 12, "batch_size": 8, "shard_size": 4},
        "select": {"num_samples": 16, "mu": 0.5, "sigma": 0.3},
        "calibrate": {"batch_size": 8, "act_samples": 5000, "time_groups": 2, "recon_iters": 8, "recon_batch_size": 8},
        "evaluate": {"batch_size": 8, "grid_size": 9},
    }
    for k, v in sections.items():
        p.setdefault(k, {}).update(v) if isinstance(v, dict) else p.__setitem__(k, v)
    return p


def write_params(folder: Path, data: dict) -> Path:
    f = folder / "params.yaml"
    f.write_text(yaml.safe_dump(data))
    return f
