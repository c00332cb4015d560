"""Tiny random-weight pipelines of the three families, built in code (nothing is downloaded).

- pixel: the google/ddpm-cifar10-32 UNet architecture (4 levels, attention at the second) with tiny widths
  and one ResNet per level;
- latent: an LDM (LDMPipeline: VQModel + UNet2DModel), denoising 8x8 latents of 16x16 images;
- text: a Stable-Diffusion-1.x-style pipeline (AutoencoderKL + UNet2DConditionModel with cross-attention +
  CLIPTextModel + a CLIPTokenizer built from a local vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pqd.bench_memory import CIFAR10_DDPM_UNET

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "small", "bird"]
PROMPTS = ["a photo of a cat", "a red car on the street", "a small blue bird"]


def build_pixel_cifar(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    cfg = {**CIFAR10_DDPM_UNET, "sample_size": 16, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
           "norm_num_groups": 4, "attention_head_dim": 8}
    DDPMPipeline(unet=UNet2DModel(**cfg), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def build_latent_ldm(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(seed)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=4, num_vq_embeddings=32, vq_embed_dim=3, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def write_clip_vocab(folder: Path, words: list[str] = WORDS) -> tuple[Path, Path]:
    """A byte-pair vocabulary covering ``words`` (each merged left to right), in CLIP's vocab.json/merges.txt format."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("".join(words)))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: dict[str, None] = {}
    for w in words:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merges[f"{toks[0]} {toks[1]}"] = None
            toks = [toks[0] + toks[1]] + toks[2:]
            vocab.setdefault(toks[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_text_sd(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_file, merges_file = write_clip_vocab(folder.parent / "clip-vocab")
    tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=12)
    vocab = tok.get_vocab()
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=12,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                            scheduler=DDIMScheduler(num_train_timesteps=100), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder
