import pytest
import torch

from pqd.core import affine
from pqd.core.affine import (act_qparams, asymmetric_qparams, dequantize, fake_quantize, quantize,
                             symmetric_act_qparams, symmetric_scale, weight_scales)
from pqd.core.qtypes import QType, act_qtype, weight_qtype


def ref_quant(x, s, z, lo, hi):
    """Plain elementwise reference: clamp(round(x/s)+z)."""
    out = torch.empty_like(x)
    for i, v in enumerate(x.reshape(-1).tolist()):
        q = round(v / s) + z  # Python round is half-to-even, like torch.round
        out.reshape(-1)[i] = min(max(q, lo), hi)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_qtype_ranges(bits):
    w, a = weight_qtype(bits), act_qtype(bits)
    assert (w.qmin, w.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (a.qmin, a.qmax) == (0, 2 ** bits - 1)


def test_qtype_rejects_bits():
    with pytest.raises(ValueError, match="QType.bits = 17"):
        QType(17, False)
    with pytest.raises(ValueError, match="weight bits = 9"):
        weight_qtype(9)


def test_quantize_matches_plain_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g) * 3
    qt = act_qtype(8)
    s, z = torch.tensor(0.05), torch.tensor(17.0)
    q = quantize(x, s, z, qt)
    assert torch.equal(q.float(), ref_quant(x, 0.05, 17, 0, 255))
    assert torch.allclose(dequantize(q, s, z), (q.float() - 17) * 0.05)
    assert torch.allclose(fake_quantize(x, s, z, qt), dequantize(q, s, z))


def test_per_channel_axis_broadcast():
    w = torch.tensor([[1.0, -2.0], [0.1, 0.3]])
    s = torch.tensor([2.0 / 127, 0.3 / 127])
    q = quantize(w, s, torch.zeros(2), weight_qtype(8), axis=0)
    assert q.tolist() == [[64, -127], [42, 127]]


def test_symmetric_minmax_scale_hits_extremes():
    w = torch.randn(16, 3, 3, 3)
    qt = weight_qtype(8)
    s = weight_scales(w, qt, "minmax")
    assert torch.allclose(s, w.reshape(16, -1).abs().amax(1) / 127)
    q = quantize(w, s, torch.zeros(16), qt, axis=0)
    assert q.abs().reshape(16, -1).amax(1).eq(127).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_scales_never_worse_than_minmax(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    qt = weight_qtype(bits)
    err = {}
    for m in ("minmax", "mse"):
        s = weight_scales(w, qt, m)
        err[m] = (fake_quantize(w, s, torch.zeros(32), qt, axis=0) - w).pow(2).sum(1)
    assert (err["mse"] <= err["minmax"] + 1e-9).all()
    assert err["mse"].sum() < err["minmax"].sum()


def test_asymmetric_qparams_cover_range_and_zero():
    qt = act_qtype(8)
    s, z = asymmetric_qparams(torch.tensor(-1.0), torch.tensor(3.0), qt)
    assert torch.isclose(s, torch.tensor(4.0 / 255))
    assert 0 <= z <= 255 and float(z) == round(float(z))
    # zero is exactly representable
    assert float(fake_quantize(torch.tensor(0.0), s, z, qt)) == 0.0
    # a positive-only range still contains 0
    s2, z2 = asymmetric_qparams(torch.tensor(0.5), torch.tensor(2.0), qt)
    assert float(z2) == 0.0 and torch.isclose(s2, torch.tensor(2.0 / 255))


def test_act_mse_search_beats_minmax_with_outliers():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(50_000, generator=g)
    v[:5] = 40.0
    qt = act_qtype(8)
    lo, hi = v.min(), v.max()
    errs = {}
    for m in ("minmax", "mse"):
        s, z = act_qparams(v, lo, hi, qt, m)
        errs[m] = float((fake_quantize(v, s, z, qt) - v).pow(2).mean())
    assert errs["mse"] < errs["minmax"]


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_symmetric_activation_grids_have_no_offset(method):
    """quant.act_symmetric: a range that never goes below 0 takes all 256 codes from zero point 0; a signed one the
    middle code, i.e. a signed int8 grid with zero point 0 (minmax: its extremes at +-127 steps), or at mse whichever
    grid without an offset has the least error, the unsigned one with the few negatives clipped included."""
    qt = act_qtype(8)
    g = torch.Generator().manual_seed(4)
    relu = torch.randn(20_000, generator=g).clamp_min(0)
    s, z = act_qparams(relu, relu.min(), relu.max(), qt, method, symmetric=True)
    assert float(z) == 0.0 and float(fake_quantize(torch.tensor(0.0), s, z, qt)) == 0.0
    silu = torch.nn.functional.silu(torch.randn(20_000, generator=g) * 3)
    s2, z2 = act_qparams(silu, silu.min(), silu.max(), qt, method, symmetric=True)
    err = lambda p: float((fake_quantize(silu, *p, qt) - silu).pow(2).sum())  # noqa: E731
    signed = symmetric_act_qparams(silu.min(), silu.max(), qt)
    if method == "minmax":
        assert float(z2) == 128.0 and torch.isclose(s2, silu.abs().max() / 127)
        assert torch.isclose(s, relu.max() / 255) and torch.isclose(fake_quantize(silu.max(), s2, z2, qt), silu.max())
    else:  # the search never does worse than either full range
        unsigned = symmetric_act_qparams(torch.tensor(0.0), silu.max(), qt)
        assert float(z2) in (0.0, 128.0) and err((s2, z2)) <= min(err(signed), err(unsigned))
    # the asymmetric grid of the same signed tensor spends its codes on the range it has: less error than the signed
    sa, za = act_qparams(silu, silu.min(), silu.max(), qt, method)
    assert err((sa, za)) < err(signed)


def test_symmetric_scale_never_zero():
    assert float(symmetric_scale(torch.tensor(0.0), weight_qtype(8))) > 0


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_group_scales_fit_each_group_of_input_channels(method):
    """40 input channels in groups of at most 16: 3 groups of 14, 14 and 12 channels, each with its own scale, never
    worse than one scale per output channel; an input channel with outliers only coarsens its own group."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, 3, 3, generator=g)
    w[:, 30] *= 20  # outliers in the last group
    qt = weight_qtype(4)
    per_channel = affine.weight_scales(w, qt, method)
    grouped = affine.weight_scales(w, qt, method, group_size=16)
    assert per_channel.shape == (6,) and grouped.shape == (6, 3)
    if method == "minmax":
        for k, (a, b) in enumerate([(0, 14), (14, 28), (28, 40)]):
            want = affine.symmetric_scale(w[:, a:b].abs().amax(dim=(1, 2, 3)), qt)
            assert torch.allclose(grouped[:, k], want)
    err = lambda s: (affine.weight_values(affine.weight_codes(w, s, qt), s) - w)[:, :28].pow(2).sum()  # noqa: E731
    assert err(grouped) < 0.25 * err(per_channel)  # the first two groups no longer pay for the outliers
    assert affine.weight_scales(w, qt, method, group_size=40).shape == (6,)  # one group is per output channel
    assert affine.weight_scale_like(grouped, w.shape).shape == (6, 40, 1, 1)
