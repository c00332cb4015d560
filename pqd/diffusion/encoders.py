"""The conditioning inputs of conditioned denoisers, computed once per prompt or class (float, never quantized).

An encoder turns prompts (or, for class-conditional models, every class in turn) into *rows*: the denoiser's named
conditioning inputs, each [P + 1, ...], row 0 the unconditional input (empty prompt, null class) that
classifier-free guidance needs. Text rows come from the pipeline's own ``encode_prompt``, so they are what
diffusers feeds.
"""

from __future__ import annotations

from typing import Any

import torch


class ClassLabels:
    """Class-conditional models: every class, and the null class DiT was trained with for guidance."""

    kind = "class"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    def rows(self, prompts: list[str] | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
        """{"class_labels": int64 [K + 1]}: row 0 the null class (label K), row 1 + c class c."""
        if prompts is not None:
            raise ValueError("prompts were given for a class-conditional model: expected no prompts")
        return {"class_labels": torch.tensor([self.num_classes, *range(self.num_classes)], dtype=torch.int64)}


def _sd_rows(pipe: Any, texts: list[str], device: str) -> dict[str, torch.Tensor]:
    emb, _ = pipe.encode_prompt(texts, device, 1, False)
    return {"encoder_hidden_states": emb}


def _pixart_rows(pipe: Any, texts: list[str], device: str) -> dict[str, torch.Tensor]:
    emb, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device, clean_caption=False)
    rows = {"encoder_hidden_states": emb, "encoder_attention_mask": mask.to(torch.int64)}
    if getattr(pipe.transformer, "use_additional_conditions", False):  # PixArt-alpha 1024: image size conditions
        h = w = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
        rows |= {"resolution": torch.tensor([[float(h), float(w)]]).repeat(len(texts), 1),
                 "aspect_ratio": torch.tensor([[h / w]]).repeat(len(texts), 1)}
    return rows


def _sd3_rows(pipe: Any, texts: list[str], device: str) -> dict[str, torch.Tensor]:
    emb, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=device, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": emb, "pooled_projections": pooled}


_TEXT_ROWS = {"UNet2DConditionModel": _sd_rows, "PixArtTransformer2DModel": _pixart_rows,
              "SD3Transformer2DModel": _sd3_rows}


class PromptEncoder:
    """Text-conditioned models: the pipeline's text encoders, through its own ``encode_prompt`` (never changed)."""

    kind = "text"

    def __init__(self, pipe: Any, denoiser_class: str) -> None:
        self.pipe, self._rows = pipe, _TEXT_ROWS[denoiser_class]

    @torch.no_grad()
    def rows(self, prompts: list[str] | None, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The empty prompt and ``prompts`` encoded at once: each input [P + 1, ...] (float32 or int64), row 0 = ""."""
        if prompts is None:
            raise ValueError("a text-conditioned model needs prompts")
        out = self._rows(self.pipe, [""] + list(prompts), device)
        return {k: (v.to(torch.float32) if v.is_floating_point() else v).cpu() for k, v in out.items()}


Encoder = ClassLabels | PromptEncoder


def encoder_for(pipe: Any, denoiser: torch.nn.Module) -> Encoder | None:
    """The conditioning encoder of a pipeline's denoiser, or None for an unconditional one."""
    name = type(denoiser).__name__
    if name in _TEXT_ROWS:
        for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, component, None) is not None:
                getattr(pipe, component).eval().requires_grad_(False)
        return PromptEncoder(pipe, name)
    if name == "DiTTransformer2DModel":
        return ClassLabels(int(denoiser.config.num_embeds_ada_norm))
    return None
