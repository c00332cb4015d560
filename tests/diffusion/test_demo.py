"""The embedded demos' data and architectures (pqd.diffusion.demo): demo:digits16 is the digits at 16x16 RGB whose
channel mean is the upsampled gray digit, under a UNet unlike the demo's."""

import torch
import torch.nn.functional as F

from pqd.diffusion import demo, digits


def test_digits16_channel_mean_is_the_upsampled_gray_digit():
    rgb, labels = digits.digits16_tensor()
    gray, labels8 = digits.load_digits_tensor()
    assert rgb.shape == (1797, 3, 16, 16) and torch.equal(labels, labels8)
    assert rgb.min() >= -1 and rgb.max() <= 1
    up = F.interpolate((gray + 1) / 2, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(rgb.mean(1, keepdim=True), up, rtol=0, atol=1e-6)
    # the strokes are coloured: channels differ where the digit is neither background nor full intensity
    spread = rgb.max(1).values - rgb.min(1).values
    assert spread.mean() > 0.1 and spread[up[:, 0] <= -1 + 1e-6].abs().max() < 1e-6
    # the colours belong to the data set: the same on every call
    assert torch.equal(digits.digits16_tensor()[0], rgb)


def test_reference_images_are_the_training_images_as_uint8():
    ref = digits.reference_uint8("demo:digits16")
    assert ref.shape == (1797, 16, 16, 3) and ref.dtype.name == "uint8"
    torch.testing.assert_close(torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255 * 2 - 1,
                               digits.digits16_tensor()[0], rtol=0, atol=1 / 255 + 1e-6)
    assert digits.reference_uint8("demo:digits").shape == (1797, 8, 8)


def test_digits16_unet_differs_from_the_demo_where_a_users_model_might():
    unet = demo.build_digits16_unet((16, 32))
    cfg = unet.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels, cfg.layers_per_block) == (16, 3, 3, 2)
    assert cfg.down_block_types[0] == "AttnDownBlock2D" and cfg.up_block_types[-1] == "AttnUpBlock2D"
    assert unet.mid_block.attentions[0] is not None  # mid-block attention (the demo switches it off)
    heads = {m.heads for m in unet.modules() if type(m).__name__ == "Attention"}
    assert heads == {1, 2}  # head dim 16 over 16 and 32 channels
    out = unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 900])).sample
    assert out.shape == (2, 3, 16, 16)
    sched = demo.build_digits16_scheduler()
    assert type(sched).__name__ == "DDIMScheduler" and sched.config.beta_schedule == "linear"
