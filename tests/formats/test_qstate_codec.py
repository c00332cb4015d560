"""The one QState codec (pqd.formats.qstate): what is written is read back exactly, for every kind of entry."""

import dataclasses
import json

import pytest
import torch

from pqd.core.quantize import LayerQParams, MatMulQParams, SiteQParams
from pqd.core.timegroups import TimeGroups
from pqd.errors import ArtifactError
from pqd.formats import qstate as qcodec


def layer(kind, shape, bits, split=None, out=False, groups=2, seed=0, scale_groups=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    parts = 2 if split else 1
    return LayerQParams(kind=kind, weight_bits=bits, act_bits=8, act_split=split,
                        weight_int=torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8),
                        weight_scale=torch.rand(shape[0], *([scale_groups] if scale_groups else []), generator=g) + 0.01,
                        act_scale=torch.rand(groups, parts, generator=g) + 0.01,
                        act_zero_point=torch.randint(0, 256, (groups, parts), generator=g).float(),
                        out_scale=torch.rand(groups, parts, generator=g) + 0.01 if out else None,
                        out_zero_point=torch.randint(0, 256, (groups, parts), generator=g).float() if out else None)


@pytest.fixture()
def state():
    g = torch.Generator().manual_seed(3)
    return {"conv_in": layer("conv2d", (8, 3, 3, 3), 8, out=True),
            "up.conv1": layer("conv2d", (8, 16, 3, 3), 4, split=12, out=True, seed=1),
            "odd.linear": layer("linear", (5, 7), 3, seed=2),  # 35 codes: an odd count packs with a pad nibble
            # a scale per group of input channels: 40 channels in 3 groups of 14, 14 and 12
            "grouped.conv": layer("conv2d", (6, 40, 3, 3), 4, out=True, seed=5, scale_groups=3),
            "ff.proj": dataclasses.replace(layer("linear", (4, 6), 8, seed=4), smooth=torch.rand(6, generator=g) + 0.5),
            "attn.processor.qk": MatMulQParams(8, 8, *(torch.rand(2, 1, generator=g) for _ in range(4))),
            "down.resnets.0.glue_residual": SiteQParams(8, torch.rand(2, 1, generator=g) + 0.01,
                                                        torch.randint(0, 256, (2, 1), generator=g).float())}


def test_round_trip_is_exact(state, tmp_path):
    groups = TimeGroups((600.0,))
    qcodec.write(tmp_path, qcodec.STATE_TENSORS, state, groups, trailer={"method": "pqd"},
                 extra_tensors={"float.bias": torch.ones(3)})
    back, g, rest, qmap = qcodec.read(tmp_path, qcodec.STATE_TENSORS)
    assert g == groups and qmap["method"] == "pqd" and set(rest) == {"float.bias"}
    assert list(back) == list(state)
    for name, lp in state.items():
        got = back[name]
        assert type(got) is type(lp)
        for f in ("weight_int", "weight_scale", "act_scale", "act_zero_point", "out_scale", "out_zero_point", "smooth",
                  "a_scale", "a_zero_point", "b_scale", "b_zero_point", "scale", "zero_point", "bits"):
            a, b = getattr(lp, f, None), getattr(got, f, None)
            assert (a is None and b is None) or (a == b if isinstance(a, int) else torch.equal(a, b)), (name, f)
    assert back["up.conv1"].act_split == 12 and back["odd.linear"].out_scale is None
    assert back["grouped.conv"].weight_scale.shape == (6, 3)
    entry = qmap["layers"]["grouped.conv"]
    assert (entry["weight_granularity"], entry["weight_groups"], entry["weight_group_width"]) == ("per_group", 3, 14)
    assert qmap["layers"]["conv_in"]["weight_granularity"] == "per_output_channel"
    assert back["ff.proj"].smooth is not None and back["odd.linear"].smooth is None
    assert [n for n, e in qmap["layers"].items() if e.get("act_smooth")] == ["ff.proj"]  # balanced layers only


def test_4_bit_weights_are_stored_two_per_byte(state, tmp_path):
    qcodec.write(tmp_path, qcodec.STATE_TENSORS, state, TimeGroups())
    qmap = json.loads((tmp_path / qcodec.QMAP).read_text())
    assert qmap["layers"]["up.conv1"]["weight_storage"] == "int4_packed"
    assert qmap["layers"]["conv_in"]["weight_storage"] == "int8"
    tensors, _ = qcodec.encode(state)
    assert tensors["up.conv1.qweight"].dtype == torch.uint8 and tensors["up.conv1.qweight"].numel() == 8 * 16 * 9 // 2
    assert tensors["odd.linear.qweight"].numel() == 18


def test_unknown_kind_missing_tensor_and_future_version_are_one_line_errors(state, tmp_path):
    qcodec.write(tmp_path, qcodec.STATE_TENSORS, state, TimeGroups())
    qmap = json.loads((tmp_path / qcodec.QMAP).read_text())
    tensors, _ = qcodec.encode(state)
    bad = {**qmap["layers"], "x": {"kind": "conv3d"}}
    with pytest.raises(ArtifactError, match=r"layer x has kind 'conv3d': expected one of conv2d, linear, matmul, site"):
        qcodec.decode(dict(tensors), bad, "here")
    with pytest.raises(ArtifactError, match=r"here: tensor conv_in.act_scale for layer conv_in is missing"):
        qcodec.decode({k: v for k, v in tensors.items() if k != "conv_in.act_scale"}, qmap["layers"], "here")
    (tmp_path / qcodec.QMAP).write_text(json.dumps({**qmap, "format_version": 2}))
    with pytest.raises(ArtifactError, match="format_version = 2 is not supported: expected 1"):
        qcodec.read(tmp_path, qcodec.STATE_TENSORS)
