"""Method presets, time groups through export/load, and the adapter's architecture knowledge."""

import pytest
import torch

from pqd.methods import METHOD_KEYS, PRESETS
from pqd.params import params_from_dict


@pytest.mark.parametrize("method", list(PRESETS))
def test_presets_produce_their_documented_settings(method):
    p = params_from_dict({"calibrate": {"method": method}})
    for key, value in PRESETS[method].items():
        section, name = key.split(".")
        assert getattr(getattr(p, section), name) == value, key


def test_documented_table_matches_presets():
    import pqd.methods as m

    doc = m.__doc__
    assert "| calibrate.time_groups | 1 | 1 | 1 | PQD_GROUPS |" in doc
    assert PRESETS["pqd"]["calibrate.time_groups"] == m.PQD_GROUPS > 1
    assert PRESETS["minmax"]["calibrate.reconstruct"] is False
    assert PRESETS["qdiffusion"]["calibrate.split_shortcut"] is True and PRESETS["qdiffusion"]["calibrate.qdrop_p"] == 0
    assert PRESETS["ptq4dm"]["select.timesteps"] == "gaussian" and PRESETS["ptq4dm"]["select.rule"] == "random"


def test_explicit_value_wins_over_preset():
    p = params_from_dict({"calibrate": {"method": "pqd", "time_groups": 1, "qdrop_p": 0.0}, "select": {"rule": "random"}})
    assert p.calibrate.time_groups == 1 and p.calibrate.qdrop_p == 0.0 and p.select.rule == "random"
    assert p.calibrate.reconstruct is True  # the rest still from the preset
    assert set(METHOD_KEYS) == set(PRESETS["minmax"])


def test_time_groups_larger_than_steps_rejected():
    from pqd.params import ParamError

    with pytest.raises(ParamError, match="calibrate.time_groups = 60 is not allowed"):
        params_from_dict({"calibrate": {"time_groups": 60}, "generate": {"steps": 50}})


def test_skip_splits_match_the_real_concatenation(tiny_pipeline):
    """The split channel the adapter predicts equals the width of h in torch.cat([h, skip]) at run time."""
    from pqd.diffusion.adapter import load_denoiser

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

    hs = [b.register_forward_pre_hook(block_hook(f"up_blocks.{i}"), with_kwargs=True) for i, b in enumerate(den.unet.up_blocks)]
    with torch.no_grad():
        den.unet(torch.randn(2, 1, 8, 8), torch.tensor(5))
    for h in hs:
        h.remove()
    assert seen
    for layer, (k, total, in_ch) in seen.items():
        assert total == in_ch
        assert splits[layer] == k


def test_units_cover_every_quantized_layer_once(tiny_pipeline):
    from pqd.core.modules import quantizable_layers
    from pqd.diffusion.adapter import load_denoiser

    den = load_denoiser(tiny_pipeline)
    names = list(quantizable_layers(den.unet))
    units = den.units(names)
    owner = {n: [u for u in units if n == u or n.startswith(u + ".")] for n in names}
    assert all(len(o) == 1 for o in owner.values())
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(units)
    assert any(u.endswith("attentions.0") for u in units)


def test_export_keeps_time_groups_and_switches_by_timestep(tmp_path, tiny_pipeline):
    """Fit 2 time groups, export, load: the deployed UNet picks the group from the timestep."""
    import copy

    from pqd.artifact import load_denoiser_from_export, write_export, write_manifest
    from pqd.core import QuantConfig, TimeGroups, apply_qstate, fit_qstate, set_time_group
    from pqd.diffusion.adapter import load_denoiser

    den = load_denoiser(tiny_pipeline)
    groups = TimeGroups.from_schedule([90.0, 70.0, 50.0, 30.0, 10.0], 2)
    g = torch.Generator().manual_seed(0)
    xs = {0: torch.randn(4, 1, 8, 8, generator=g) * 3, 1: torch.randn(4, 1, 8, 8, generator=g) * 0.3}
    ts = {0: torch.full((4,), 90.0), 1: torch.full((4,), 10.0)}

    def forward_all(m, set_group):
        for k in (0, 1):
            set_group(k)
            m(xs[k], ts[k])

    state = fit_qstate(den.unet, forward_all, QuantConfig(weight_bits=4, time_groups=2))
    out = tmp_path / "export"
    out.mkdir()
    write_export(tiny_pipeline, den.unet, state, groups, out, float_dtype=torch.float32)
    write_manifest(out, {})
    qden = load_denoiser_from_export(out)
    assert qden.time_groups == groups
    ref = apply_qstate(copy.deepcopy(den.unet), state)
    x = torch.randn(3, 1, 8, 8, generator=g)
    for t, grp in ((90.0, 0), (10.0, 1)):
        set_time_group(ref, grp)
        expected = ref(x, torch.tensor(t)).sample
        assert torch.equal(qden.predict(x, torch.tensor(t)), expected)
    set_time_group(ref, 0)
    assert not torch.equal(qden.predict(x, torch.tensor(10.0)), ref(x, torch.tensor(10.0)).sample)
    # a batch mixing both groups gives each sample its own group's result
    mixed = qden.predict(torch.cat([x, x]), torch.tensor([90.0] * 3 + [10.0] * 3))
    assert torch.equal(mixed[:3], qden.predict(x, torch.tensor(90.0)))
    assert torch.equal(mixed[3:], qden.predict(x, torch.tensor(10.0)))
