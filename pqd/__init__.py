"""PQD: time-aware post-training quantization of diffusers diffusion models."""

__version__ = "0.1.0"
