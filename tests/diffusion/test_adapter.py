"""The adapter's architecture knowledge: skip-concatenation splits and reconstruction units."""

import torch

from pqd.diffusion.adapter import load_denoiser


def test_skip_splits_match_the_real_concatenation(tiny_pipeline):
    """The split channel the adapter predicts equals the width of h in torch.cat([h, skip]) at run time."""

    den = load_denoiser(tiny_pipeline)
    splits = den.skip_splits()
    seen = {}

    def block_hook(name):
        def pre(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            skips = list(kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ()))
            width = h.shape[1]
            for j, r in enumerate(mod.resnets):
                skip = skips.pop()
                seen[f"{name}.resnets.{j}.conv1"] = (width, width + skip.shape[1], r.in_channels)
                width = r.out_channels
        return pre

    hs = [b.register_forward_pre_hook(block_hook(f"up_blocks.{i}"), with_kwargs=True) for i, b in enumerate(den.net.up_blocks)]
    with torch.no_grad():
        den.net(torch.randn(2, 1, 8, 8), torch.tensor(5))
    for h in hs:
        h.remove()
    assert seen
    for layer, (k, total, in_ch) in seen.items():
        assert total == in_ch
        assert splits[layer] == k


def test_units_cover_every_quantized_layer_once(tiny_pipeline):
    from pqd.core.modules import quantizable_layers

    den = load_denoiser(tiny_pipeline)
    names = list(quantizable_layers(den.net))
    units = den.units(names)
    owner = {n: [u for u in units if n == u or n.startswith(u + ".")] for n in names}
    assert all(len(o) == 1 for o in owner.values())
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(units)
    assert any(u.endswith("attentions.0") for u in units)
