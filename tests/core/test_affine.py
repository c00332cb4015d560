import pytest
import torch

from pqd.core.affine import (act_qparams, asymmetric_qparams, dequantize, fake_quantize, quantize, symmetric_scale,
                             weight_scales)
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


def test_symmetric_scale_never_zero():
    assert float(symmetric_scale(torch.tensor(0.0), weight_qtype(8))) > 0
