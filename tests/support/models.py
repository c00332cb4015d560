"""Tiny random-weight pipelines built in code (nothing is downloaded): the 8x8 test pipeline, a TorchScript
feature network, and the three families:

- pixel: the google/ddpm-cifar10-32 UNet architecture (4 levels, attention at the second) with tiny widths
  and one ResNet per level;
- latent: an LDM (LDMPipeline: VQModel + UNet2DModel), denoising 8x8 latents of 16x16 images;
- text: a Stable-Diffusion-1.x-style pipeline (AutoencoderKL + UNet2DConditionModel with cross-attention +
  CLIPTextModel + a CLIPTokenizer built from a local vocabulary);
- transformers: PixArt-alpha- and SD3-shaped pipelines (their real architectures' configs at tiny widths).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pqd import deploy
from pqd.core.modules import quantizable_layers
from pqd.core.quantize import QuantConfig, fit_qstate
from pqd.diffusion.configs import CIFAR10_DDPM_UNET
from pqd.diffusion.quantized import load_denoiser_from_export
from support.projects import CODE_BITS_8


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


def _tiny_vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16, **extra)


def build_text_pixart(folder: Path, seed: int = 0) -> Path:
    """A PixArt-alpha-shaped pipeline (PixArtAlphaPipeline): PixArtTransformer2DModel with the PixArt-XL-2 layout
    (adaLN-single, cross-attention on T5 encodings, caption projection, learned variance: 8 output channels for 4
    latent ones) at tiny widths, a tiny T5 encoder (tokenized by a local CLIP vocabulary) and a KL autoencoder."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    from pqd.diffusion.configs import PIXART_XL_2_512

    vocab_file, merges_file = write_clip_vocab(folder.parent / "clip-vocab")
    tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=12)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok.get_vocab()), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id))
    transformer = PixArtTransformer2DModel.from_config({**PIXART_XL_2_512, "num_layers": 2, "num_attention_heads": 2,
                                                        "attention_head_dim": 8, "cross_attention_dim": 16,
                                                        "caption_channels": 16, "sample_size": 8})
    PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=_tiny_vae(4), transformer=transformer,
                        scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def build_text_sd3(folder: Path, seed: int = 0) -> Path:
    """An SD3-shaped pipeline (StableDiffusion3Pipeline): SD3Transformer2DModel (MMDiT joint attention, pooled text
    projections, the last block context-pre-only) at tiny widths, two tiny CLIP text encoders with projections (no
    T5: diffusers then feeds zeros for its part, as SD3 allows), a KL autoencoder with SD3's shift and scale, and
    SD3's flow-matching Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from pqd.diffusion.configs import SD3_MEDIUM, SD3_MEDIUM_SCHEDULER

    vocab_file, merges_file = write_clip_vocab(folder.parent / "clip-vocab")
    tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=12)
    vocab = tok.get_vocab()
    torch.manual_seed(seed)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, projection_dim=width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])) for width in (8, 16)]
    transformer = SD3Transformer2DModel.from_config({
        **SD3_MEDIUM, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
        "out_channels": 4, "sample_size": 8, "pos_embed_max_size": 8, "joint_attention_dim": 24,
        "caption_projection_dim": 16, "pooled_projection_dim": 24})
    vae = _tiny_vae(4, scaling_factor=1.5305, shift_factor=0.0609)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_MEDIUM_SCHEDULER),
                             vae=vae, text_encoder=clips[0], tokenizer=tok, text_encoder_2=clips[1], tokenizer_2=tok,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)
    return folder


def blob_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random RGB images [n, 3, size, size] in [0, 1]: 4x4 random colours, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def build_second_model(folder: Path, seed: int = 0, train_steps: int = 80) -> Path:
    """A DDIM pipeline unlike the demo in every way a user's model might be: 16x16 RGB (demo: 8x8 gray), two
    levels of (16, 32) channels (demo: three of 32/64/64), two ResNets per level (demo: one), self-attention at
    the full 16x16 resolution with head dim 16 and in the mid block (demo: at the lowest resolution, head dim 8,
    no mid-block attention), linear betas over 1000 steps (demo: cosine), DDIMScheduler (demo: DDPMScheduler).
    Trained briefly on blob images (a trained denoiser contracts towards its data; a random one amplifies any
    perturbation into a different image, which no quantized model could follow)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from pqd.diffusion.demo import train_denoiser

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=2,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       norm_num_groups=8, attention_head_dim=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=True, set_alpha_to_one=False)
    unet = train_denoiser(unet, blob_images(2048, seed=seed + 1) * 2 - 1, scheduler, seed=seed, steps=train_steps,
                      batch_size=32, lr=2e-3, progress=False)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def write_reference_images(folder: Path, n: int = 256, size: int = 16, seed: int = 0) -> Path:
    """``n`` blob images (PNG) as an FID reference folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate((blob_images(n, size, seed) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    return folder


def fit_two_groups(den, weight_bits: int | None = None, splits: dict[str, int] | None = None, group_size: int = 0,
                   symmetric: bool = False):
    """A qstate of ``den``'s network fitted over 2 time groups with very different input ranges (group 0: t = 80,
    inputs x 2; group 1: t = 20, inputs x 0.5), every layer's output quantized but the float-output layers';
    ``symmetric``: quant.act_symmetric's grids. ``weight_bits`` defaults to this machine's 8-bit codes (7 where
    onnxruntime's u8s8 kernels would saturate on full ones)."""
    weight_bits = weight_bits or CODE_BITS_8
    g = torch.Generator().manual_seed(0)
    xs = {0: torch.randn(8, *den.sample_shape, generator=g) * 2, 1: torch.randn(8, *den.sample_shape, generator=g) * 0.5}
    ts = {0: torch.full((8,), 80.0), 1: torch.full((8,), 20.0)}

    def forward_all(m, set_group):
        for k in (0, 1):
            set_group(k)
            m(xs[k], ts[k])

    names = list(quantizable_layers(den.net))
    cfg = QuantConfig(weight_bits=weight_bits, time_groups=2, splits=splits or {}, weight_group_size=group_size,
                      act_symmetric=symmetric,
                      output_layers=frozenset(n for n in names if n not in den.float_output_layers(names)))
    return fit_qstate(den.net, forward_all, cfg)


def fp_simulated_deployed(den, export: Path, runtime: str = "onnxruntime"
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noise predicted by ``den`` (FP), the export's simulated model and its ONNX graphs in ``runtime``, on one
    batch whose timesteps fall in both groups of :func:`fit_two_groups`."""
    qden, ort = load_denoiser_from_export(export), deploy.load_deployed_denoiser(export, runtime)
    x = torch.randn(6, *den.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([90.0, 70.0, 55.0, 40.0, 20.0, 5.0])
    with torch.no_grad():
        return den.predict(x, t), qden.predict(x, t), ort.predict(x, t)
