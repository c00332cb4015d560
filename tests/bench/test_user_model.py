"""The bench's held-out model (pqd.bench.user_model): a diffusers folder the adapter loads like any user's model,
whose architecture differs from the demos', never written over an existing folder."""

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
