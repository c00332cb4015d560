"""The bench's held-out model (pqd.bench.user_model): a diffusers folder the adapter loads like any user's model,
whose architecture differs from the demos', never written over an existing folder."""

import pytest
import torch

from pqd.bench import user_model
from pqd.diffusion.adapter import load_denoiser


def test_the_held_out_model_is_a_loadable_folder_unlike_the_demos(tmp_path, capsys):
    out = tmp_path / "user-model"
    assert user_model.main(["--out", str(out), "--steps", "2"]) == 0
    den = load_denoiser(out)
    cfg = den.net.config
    assert (cfg.resnet_time_scale_shift, cfg.act_fn, cfg.downsample_type, cfg.norm_num_groups) == (
        "scale_shift", "mish", "resnet", 16)
    x = torch.randn(2, *den.sample_shape)
    assert den.call(den.net, x, torch.tensor([900, 20]), None).shape == x.shape
    # a second write refuses in one line and leaves the first folder as it was
    before = sorted(p.name for p in out.rglob("*"))
    assert user_model.main(["--out", str(out), "--steps", "2"]) == 2
    assert "--out" in capsys.readouterr().err and sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.slow  # trains the digit network (30 epochs)
def test_features_file_measures_16x16_digits_with_the_digit_network(tmp_path, capsys):
    """--features writes the digit network as TorchScript that evaluate reads (torchscript:<file>): 128 features of
    a 16x16 RGB image, those of its 8x8 gray digit, and an existing file is refused."""
    from pqd.diffusion.digits import digits16_tensor
    from pqd.eval import fid

    feats = tmp_path / "features.pt"
    assert user_model.main(["--out", str(tmp_path / "m"), "--steps", "1", "--features", str(feats)]) == 0
    ex = fid.build_extractor(f"torchscript:{feats}", tmp_path)
    images, labels = digits16_tensor()
    x = ((images[:20] + 1) * 127.5).round()  # [20, 3, 16, 16] in [0, 255], as clean-fid hands images over
    f = ex.fn(x)
    assert f.shape == (20, 128) and torch.isfinite(f).all() and (f >= 0).all()
    script = torch.jit.load(str(feats))
    gray8 = torch.nn.functional.interpolate(x.mean(dim=1, keepdim=True) / 255.0, size=(8, 8), mode="bilinear",
                                            antialias=True)
    assert torch.allclose(f, script.net.features(gray8 * 2 - 1))
    assert user_model.main(["--out", str(tmp_path / "m2"), "--features", str(feats)]) == 2
    assert "--features" in capsys.readouterr().err
