"""The sampler a release loads: the export's quantized denoiser and the evaluation's sampling protocol (below
tracking and release, which both hand one out)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pqd import deploy
from pqd.diffusion.adapter import Conditioning, Denoiser
from pqd.diffusion.sampling import sample, scheduler_from_protocol
from pqd.errors import ParamError
from pqd.formats.export import MANIFEST, evaluated_backend
from pqd.diffusion.quantized import load_denoiser_from_export


@dataclass
class Sampler:
    """A released quantized model ready to sample: the export's denoiser + the evaluation's scheduler (and prompts
    or classes, for conditioned models)."""

    denoiser: Denoiser  # the deployed ONNX graphs (onnxruntime or openvino) when the export has them, else torch
    protocol: dict[str, Any]  # scheduler class and config, steps, eta (the FP samples' meta.json)
    device: str = "cpu"

    @classmethod
    def from_folder(cls, export_dir: Path, protocol_file: Path, device: str = "cpu",
                    runtime: str | None = None) -> "Sampler":
        """Rebuild from an export folder (hashes verified) and the sampling protocol file. It samples with
        what ships: the ONNX graphs in ``runtime`` (onnxruntime | openvino) when the export has them, else (or with
        runtime torch) the torch model. ``runtime`` None: the one the release was evaluated in (the export's
        evaluate.backend)."""
        if runtime is None:
            runtime = evaluated_backend(json.loads((Path(export_dir) / MANIFEST).read_text()))
        deploy.check_runtime(runtime, torch_too=True)
        den = load_denoiser_from_export(export_dir, device)  # verifies every file, the ONNX graphs included
        if runtime != "torch" and (Path(export_dir) / deploy.ONNX_DIR / deploy.graph_file(0)).is_file():
            den = deploy.load_deployed_denoiser(export_dir, runtime, components=den)
        return cls(den, json.loads(Path(protocol_file).read_text()), device)

    def sample(self, seeds: list[int], steps: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """One image per seed, float32 [N, C, H, W] in [0, 1]; same seeds give the evaluation's images (a
        conditioned model's seed s takes the protocol's prompt, or class, s mod P, as the evaluation's did)."""
        n = int(steps or self.protocol["steps"])
        if n < 1:
            raise ParamError(f"steps = {steps!r} is not allowed: expected an integer >= 1")
        seeds = [int(s) for s in seeds]
        cond = None
        if pc := self.protocol.get("conditioning"):
            rows = self.denoiser.conditioning(pc.get("prompts"), [], float(pc["guidance_scale"]), self.device)
            cond = Conditioning(rows.inputs, [1 + s % rows.choices for s in seeds], rows.guidance_scale)
        return sample(self.denoiser, scheduler_from_protocol(self.protocol), seeds, steps=n,
                      eta=float(self.protocol.get("eta", 0.0)), batch_size=batch_size, device=self.device,
                      progress=False, cond=cond)
