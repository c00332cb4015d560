import copy

import pytest
import torch

from pqd.core.rotate import hadamard, head_rotation, rotate_attention


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


@pytest.mark.parametrize("d, kind", [(16, "hadamard"), (24, "hadamard 8 x orthogonal 3"), (5, "orthogonal 5")])
def test_a_head_rotation_is_orthogonal_for_any_width(d, kind):
    r, what = head_rotation(d)
    assert what == kind and torch.allclose(r @ r.T, torch.eye(d, dtype=r.dtype), atol=1e-12)
    with pytest.raises(ValueError, match="size 12 is not a power of two"):
        hadamard(12)


def _same_function(net, make_inputs, kind="hadamard"):
    torch.manual_seed(0)
    net = net.eval()
    rotated = copy.deepcopy(net)
    report = rotate_attention(rotated, kind)
    inputs = make_inputs()
    with torch.no_grad():
        a, b = net(**inputs), rotated(**inputs)
    a, b = a[0] if isinstance(a, tuple) else a.sample, b[0] if isinstance(b, tuple) else b.sample
    return report, float((a - b).abs().max() / a.abs().max())


def test_a_unet_computes_the_same_function_after_rotation():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    for m in unet.modules():  # non-zero biases, so that a bias left unrotated would show
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.5)
    inputs = lambda: {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([3, 70])}  # noqa: E731
    report, dev = _same_function(unet, inputs)
    assert len(report.rotated) == 4 and set(report.rotated.values()) == {"hadamard"} and not report.skipped
    assert dev < 1e-5
    names = dict(unet.named_modules())
    assert set(report.linears) == set(report.rotated)
    for attn, (v, o) in report.linears.items():  # the full names of the linears each rotation changed
        assert v == f"{attn}.to_v" and o == f"{attn}.to_out.0" and isinstance(names[o], torch.nn.Linear)
    unchanged, dev0 = _same_function(unet, inputs, "none")
    assert not unchanged.rotated and dev0 == 0


def test_a_dit_with_24_channel_heads_computes_the_same_function_after_rotation():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(2)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    report, dev = _same_function(dit, lambda: {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor(
        [5, 900]), "class_labels": torch.tensor([1, 7])})
    assert set(report.rotated.values()) == {"hadamard 8 x orthogonal 3"} and len(report.rotated) == 2
    assert dev < 1e-5


def test_joint_attention_is_left_as_it_is_and_named():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(3)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    report, dev = _same_function(sd3, lambda: {"hidden_states": torch.randn(1, 4, 8, 8),
                                               "encoder_hidden_states": torch.randn(1, 3, 16),
                                               "pooled_projections": torch.randn(1, 8), "timestep": torch.tensor([10])})
    assert report.skipped and all("joint attention" in why for why in report.skipped.values())
    assert dev < 1e-5


def test_rotation_lowers_the_peak_of_an_output_projection_with_an_outlier_channel():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(4)
    attn = Attention(query_dim=32, heads=2, dim_head=16, bias=True)
    w = attn.to_out[0].weight
    with torch.no_grad():
        w[:, 3] *= 20  # one input channel of the output projection carries an outlier
    def crest(t):  # mean row peak over mean row rms
        t = t.detach()
        return float(t.abs().amax(1).mean() / t.pow(2).mean(1).sqrt().mean())

    before = crest(w)
    report = rotate_attention(attn, "hadamard")
    assert report.linears == {"": ("to_v", "to_out.0")}  # the network itself is the attention module
    assert crest(attn.to_out[0].weight) < 0.5 * before
    with pytest.raises(ValueError, match="rotation 'pca' is not allowed: expected one of none, hadamard"):
        rotate_attention(attn, "pca")
