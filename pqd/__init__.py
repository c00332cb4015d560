"""PQD: time-aware post-training quantization of diffusers diffusion models."""

__version__ = "0.1.0"


def load_pipeline(export_dir, device: str = "cpu"):
    """A diffusers pipeline that samples with a PQD export's quantized UNet (see pqd.artifact.load_pipeline)."""
    from pqd.artifact import load_pipeline as _load

    return _load(export_dir, device)
