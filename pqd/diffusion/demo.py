"""The embedded offline demos, trained on the spot from scikit-learn's bundled 8x8 digits (no GPU, no network),
and the training of the DigitNet classifier whose features their FID uses. Deterministic given a seed.

``demo:digits``: a DDPM UNet at 8x8, one channel; ``demo:digits16``: another UNet on the digits as 16x16 RGB
(:func:`pqd.diffusion.digits.digits16_tensor`), DDIM; ``demo:digits-dit``: a class-conditional DiT on the 8x8
pixels, no autoencoder. All are evaluated with the DigitNet features of the 8x8 digits: the extractor reads an
image's channel mean at 8x8 (pqd.eval.fid), and a digits16 image's channel mean is exactly its gray digit.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pqd.diffusion.digits import DigitNet, demo_images, load_digits_tensor

DEFAULT_CHANNELS = (32, 64, 64)
DIT_HEAD_DIM = 32  # the demo DiT's attention head width: model.dit_width / 32 heads
NUM_CLASSES = 10
LABEL_DROP = 0.1  # share of training labels replaced by the null class (DiT's classifier-free guidance training)
NUM_TRAIN_TIMESTEPS = 1000


def build_demo_unet(channels: tuple[int, ...] = DEFAULT_CHANNELS, layers_per_block: int = 1):
    """A diffusers ``UNet2DModel`` for [B, 1, 8, 8] inputs, every level but the last halving the resolution, with
    attention only at the lowest (last down and first up block: the mid block's is off, for the 2-core budget)."""
    from diffusers import UNet2DModel

    n = len(channels)
    # the channel counts are multiples of 8 (checked by pqd.params), so 8 groups always divide them
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block, norm_num_groups=8, attention_head_dim=8, add_attention=False,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
    )


def build_demo_dit(width: int = 128, depth: int = 6):
    """A diffusers ``DiTTransformer2DModel`` for [B, 1, 8, 8] inputs and the 10 digit classes: patch size 2 (16 tokens),
    ``depth`` blocks of ``width`` channels (heads of 32), adaLN-zero conditioning on the timestep and the class."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=width // DIT_HEAD_DIM, attention_head_dim=DIT_HEAD_DIM,
                                 in_channels=1, out_channels=1, num_layers=depth, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=NUM_CLASSES)


def build_demo_scheduler(beta_schedule: str = "squaredcos_cap_v2"):
    """The training (and default sampling) scheduler: DDPM, 1000 steps, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def build_digits16_unet(channels: tuple[int, ...]):
    """The ``demo:digits16`` UNet for [B, 3, 16, 16]: len(channels) levels of two ResNets each, self-attention
    (head dim 16) at the full 16x16 resolution (first down block, last up block) and in the mid block."""
    from diffusers import UNet2DModel

    n = len(channels)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=tuple(channels), layers_per_block=2,
        norm_num_groups=8, attention_head_dim=16,
        down_block_types=("AttnDownBlock2D",) + ("DownBlock2D",) * (n - 1),
        up_block_types=("UpBlock2D",) * (n - 1) + ("AttnUpBlock2D",),
    )


def build_digits16_scheduler():
    """The ``demo:digits16`` training and default sampling scheduler: DDIM, linear betas over 1000 steps."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, clip_sample=True, set_alpha_to_one=False)


def train_demo_pipeline(source: str, *, seed: int, steps: int, batch_size: int, lr: float,
                        channels: tuple[int, ...], dit_width: int = 128, dit_depth: int = 6, progress: bool = True):
    """Train the denoiser of demo ``source`` (see :func:`train_denoiser`) and return its diffusers pipeline
    (DDPMPipeline for 'demo:digits', DDIMPipeline for 'demo:digits16', DiTPipeline without an autoencoder for
    'demo:digits-dit', 10% of its labels dropped to the null class)."""
    from diffusers import DDIMPipeline, DDPMPipeline, DiTPipeline

    torch.manual_seed(seed)
    train = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, progress=progress)
    if source == "demo:digits16":
        sched = build_digits16_scheduler()
        unet = train_denoiser(build_digits16_unet(channels), demo_images(source), sched, desc="demo:digits16 UNet",
                              **train)
        return DDIMPipeline(unet=unet, scheduler=sched)
    if source == "demo:digits-dit":  # pixel space: no autoencoder
        images, labels = load_digits_tensor()
        dit = train_denoiser(build_demo_dit(dit_width, dit_depth), images, build_demo_scheduler(), labels=labels,
                             desc="demo DiT", **train)
        return DiTPipeline(transformer=dit, vae=None, scheduler=build_demo_scheduler())
    unet = train_denoiser(build_demo_unet(channels), demo_images(source), build_demo_scheduler(), **train)
    return DDPMPipeline(unet=unet, scheduler=build_demo_scheduler())


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then a cosine decay to 5% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _label_tables(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]


def train_denoiser(net: nn.Module, images: torch.Tensor, scheduler, *, seed: int, steps: int, batch_size: int,
                   lr: float, ema_decay: float = 0.995, labels: torch.Tensor | None = None, progress: bool = True,
                   desc: str = "demo UNet") -> nn.Module:
    """Train ``net`` (a diffusers UNet2DModel, or a DiTTransformer2DModel with ``labels``) to predict the noise
    (epsilon) of ``images`` [N, C, H, W] in [-1, 1] noised by ``scheduler``'s training schedule.

    AdamW, warmup + cosine learning rate; returns the EMA of the weights (eval mode, float32, CPU) when
    ``ema_decay`` > 0. All randomness derives from ``seed``: with the model initialised under the same seed, two
    runs on one machine give bit-identical weights. With ``labels`` (int64 [N]), a share LABEL_DROP of each batch's
    labels becomes the null class in every block alike (diffusers' DiT gives each block its own label table, whose
    own dropout is switched off while training).
    """
    tables = _label_tables(net)
    drops = [table.dropout_prob for table in tables]
    for table in tables:
        table.dropout_prob = 0.0
    null = getattr(net.config, "num_embeds_ada_norm", None)
    net = net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_decay > 0 else None
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))
    n = images.shape[0]
    order, pos = torch.randperm(n, generator=gen), 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        # epochs of a seeded permutation: every digit is seen once per pass
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if labels is None:
            pred = net(xt, t).sample
        else:
            y = torch.where(torch.rand(len(idx), generator=gen) < LABEL_DROP, null, labels[idx])
            pred = net(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step, steps, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if ema is not None:
            # ramped decay: early on the EMA follows the fast-changing weights instead of the random init
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - d)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    out = (ema if ema is not None else net).eval()
    for table, p in zip(_label_tables(out), drops):
        table.dropout_prob = p
    return out


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction, filling with background (-1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2, x.shape[0]), generator=gen)
    rows = (torch.arange(8).view(1, 8) + dy.view(-1, 1))  # [B, 8]
    cols = (torch.arange(8).view(1, 8) + dx.view(-1, 1))
    b = torch.arange(x.shape[0]).view(-1, 1, 1)
    return padded[b, 0, rows.view(-1, 8, 1), cols.view(-1, 1, 8)].unsqueeze(1)


def train_digit_net(images: torch.Tensor, labels: torch.Tensor, *, seed: int, epochs: int,
                    batch_size: int = 64, lr: float = 2e-3, progress: bool = True) -> tuple[DigitNet, float]:
    """Train a DigitNet on a stratified 80% of (images [N, 1, 8, 8] in [-1, 1], labels int64 [N]), all randomness
    from ``seed``; returns the net (eval mode) and its accuracy on the held-out 20%."""
    from sklearn.model_selection import train_test_split  # here: a second to import, and only read here

    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2,
                                           stratify=labels.numpy(), random_state=seed)
    x_tr, y_tr = images[idx_train], labels[idx_train]
    torch.manual_seed(seed)
    net = DigitNet()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_tr) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in tqdm(range(epochs), desc="digit features", disable=not progress, unit="epoch"):
        net.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(y_tr), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(net(_random_shift(x_tr[b], gen)), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        accuracy = float((net.eval()(images[idx_test]).argmax(1) == labels[idx_test]).float().mean())
    return net, accuracy
