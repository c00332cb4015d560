"""Time groups travel through the export format and switch by timestep when the export is loaded."""

import torch


def test_export_keeps_time_groups_and_switches_by_timestep(tmp_path, tiny_pipeline):
    """Fit 2 time groups, export, load: the deployed UNet picks the group from the timestep."""
    import copy

    from pqd.diffusion.quantized import load_denoiser_from_export
    from pqd.formats.export import write_export, write_manifest
    from pqd.core.quantize import apply_qstate, fit_qstate, QuantConfig
    from pqd.core.timegroups import set_time_group, TimeGroups
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

    state = fit_qstate(den.net, forward_all, QuantConfig(weight_bits=4, time_groups=2))
    out = tmp_path / "export"
    out.mkdir()
    write_export(tiny_pipeline, den.net, state, groups, out, float_dtype=torch.float32)
    write_manifest(out, {})
    qden = load_denoiser_from_export(out)
    assert qden.time_groups == groups
    ref = apply_qstate(copy.deepcopy(den.net), state)
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
