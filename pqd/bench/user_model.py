"""A held-out model for ``make bench``: a diffusers DDIM pipeline on the 16x16 RGB digits (so that
``evaluate.reference: demo:digits16`` measures it) whose architecture none of the demos has, written as a local
folder that ``--models <folder>`` then quantizes like any user's model.

Its choices, against the demos': three levels of (32, 48, 64) channels with GroupNorm of 16 groups (demos: 8);
FiLM time conditioning (``resnet_time_scale_shift: scale_shift``; demos: additive); Mish activations (demos:
SiLU); ResNet blocks for down- and upsampling (demos: strided and nearest-neighbour convolutions); attention at the
middle level only, heads of 24 channels (demos: 8, 16 or 32, at the lowest or the full resolution); sinusoidal
embeddings without the cos/sin flip; scaled-linear betas (demos: cosine, linear).

Its FID features: the demo's digit network is written with the demo models only (``evaluate.features:
demo:digits`` refuses another model), so ``--features FILE`` also writes it as TorchScript, trained as the model
stage trains it, taking 16x16 RGB images: ``-S evaluate.features=torchscript:FILE -S
evaluate.reference=demo:digits16`` then measures the held-out model with the digit network's features.

``python -m pqd.bench.user_model --out data/bench/user-model [--features FILE] [--steps 400 --seed 0]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pqd.diffusion.demo import NUM_TRAIN_TIMESTEPS, train_denoiser, train_digit_net
from pqd.diffusion.digits import demo_images, load_digits_tensor
from pqd.errors import command
from pqd.eval.fid import DigitFeatures
from pqd.params import ModelParams

CHANNELS = (32, 48, 64)


def build(seed: int, steps: int, batch_size: int = 64, lr: float = 2e-3):
    """The trained pipeline (deterministic given ``seed``)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=CHANNELS, layers_per_block=1,
        norm_num_groups=16, act_fn="mish", resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False,
        downsample_type="resnet", upsample_type="resnet", attention_head_dim=24, add_attention=False,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    sched = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="scaled_linear", beta_start=8.5e-4,
                          beta_end=0.012, clip_sample=True, set_alpha_to_one=False)
    unet = train_denoiser(unet, demo_images("demo:digits16"), sched, seed=seed, steps=steps, batch_size=batch_size,
                          lr=lr, desc="held-out UNet")
    return DDIMPipeline(unet=unet, scheduler=sched)


def write_features(path: Path) -> float:
    """Write :class:`pqd.eval.fid.DigitFeatures` (the digit network trained with the model stage's defaults, resizing
    16x16 images itself) as TorchScript to ``path``; returns the network's held-out accuracy."""
    mp = ModelParams()
    net, acc = train_digit_net(*load_digits_tensor(), seed=mp.feature_seed, epochs=mp.feature_epochs)
    torch.jit.script(DigitFeatures(net.eval(), resize=True).eval()).save(str(path))
    return acc


@command("bench-user-model", (FileExistsError,))
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", type=Path, help="also write the digit network's features as TorchScript here")
    args = ap.parse_args(argv)
    if args.out.exists():
        raise FileExistsError(f"--out {args.out} exists: expected a new folder (nothing is overwritten)")
    if args.features is not None and args.features.exists():
        raise FileExistsError(f"--features {args.features} exists: expected a new file (nothing is overwritten)")
    build(args.seed, args.steps).save_pretrained(args.out)
    print(f"pqd bench user-model: wrote {args.out}")
    if args.features is not None:
        acc = write_features(args.features)
        print(f"pqd bench user-model: wrote {args.features} (digit network, held-out accuracy {acc:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
