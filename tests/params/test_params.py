import subprocess
import sys

import pytest
import yaml

from pqd.params import ParamError, Params, load_params, params_from_dict

BAD = [
    ({"quant": {"weight_bits": 9}}, "quant.weight_bits = 9"),
    ({"quant": {"weight_bits": 1}}, "quant.weight_bits = 1"),
    ({"quant": {"weight_bits": 0}}, "quant.weight_bits = 0"),
    ({"quant": {"weight_bits": "8"}}, "quant.weight_bits = '8'"),
    ({"quant": {"weight_bits": 8.0}}, "quant.weight_bits = 8.0"),
    ({"quant": {"act_bits": 16}}, "quant.act_bits = 16"),
    ({"quant": {"softmax_bits": 32}}, "quant.softmax_bits = 32"),
    ({"quant": {"attention": True, "softmax_bits": 6}}, "quant.softmax_bits = 6 is not allowed with export.onnx = true"),
    ({"quant": {"attention": "yes"}}, "quant.attention = 'yes'"),
    ({"quant": {"glue": ["residual", "gelu"]}}, "quant.glue = ['residual', 'gelu']"),
    ({"quant": {"glue": ["temb", "temb"]}}, "quant.glue = ['temb', 'temb']"),
    ({"quant": {"glue": "residual"}}, "quant.glue = 'residual'"),
    ({"quant": {"glue": ["concat"]}, "calibrate": {"split_shortcut": True}},
     "quant.glue = ['concat', ...] is not allowed with calibrate.split_shortcut = true"),
    ({"select": {"sigma": 0}}, "select.sigma = 0"),
    ({"select": {"sigma": -0.1}}, "select.sigma = -0.1"),
    ({"select": {"mu": 1.5}}, "select.mu = 1.5"),
    ({"select": {"timesteps": "normal"}}, "select.timesteps = 'normal'"),
    ({"select": {"rule": "best"}}, "select.rule = 'best'"),
    ({"select": {"num_samples": 10_000}}, "select.num_samples = 10000"),
    ({"model": {"source": "not a source"}}, "model.source = 'not a source'"),
    ({"model": {"train_steps": -5}}, "model.train_steps = -5"),
    ({"model": {"channels": [30, 64]}}, "model.channels = [30, 64]"),
    ({"model": {"colour": "red"}}, "unknown key model.colour"),
    ({"quantize": {}}, "unknown key quantize"),
    ({"generate": {"steps": 1}}, "generate.steps = 1"),
    ({"generate": {"scheduler": "euler"}}, "generate.scheduler = 'euler'"),
    ({"generate": {"eval_samples": -1}}, "generate.eval_samples = -1"),
    ({"calibrate": {"weight_range": "max"}}, "calibrate.weight_range = 'max'"),
    ({"evaluate": {"features": "clip"}}, "evaluate.features = 'clip'"),
    ({"device": "tpu"}, "device = 'tpu'"),
    ({"generate": {"calib_seed_base": 990}}, "generate.calib_seed_base = 990 is not allowed: the calibration seeds "
                                              "990..1053 overlap the FP sample set a's seeds 0..999"),
    ({"generate": {"calib_seed_base": 499_999_990}}, "overlap the FP sample set b's seeds 500000000..500000999"),
    ({"generate": {"calib_seed_base": -1}}, "generate.calib_seed_base = -1"),
    ({"evaluate": {"bootstrap": 50}}, "evaluate.bootstrap = 50 is not allowed: expected 0 (no intervals) or an integer"),
    ({"evaluate": {"confidence": 1.0}}, "evaluate.confidence = 1.0"),
    ({"release": {"delta_fid_fraction": -0.1}}, "release.delta_fid_fraction = -0.1"),
    ({"quant": 8}, "quant = 8"),
]


@pytest.mark.parametrize("data,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_values_give_one_line_naming_key_and_value(data, needle):
    with pytest.raises(ParamError) as ei:
        params_from_dict(data)
    msg = str(ei.value)
    assert needle in msg
    assert "\n" not in msg
    assert "expected" in msg or "allowed keys" in msg


def test_defaults_and_overrides():
    p = params_from_dict({"quant": {"weight_bits": 4}, "model": {"channels": [16, 32]}})
    assert isinstance(p, Params)
    assert p.quant.weight_bits == 4 and p.quant.act_bits == 8
    assert p.model.channels == (16, 32)


def test_calibration_seeds_may_sit_anywhere_clear_of_the_sample_sets():
    for base in (1000, 400_000_000, 500_001_000, 1_003_000_000):
        assert params_from_dict({"generate": {"calib_seed_base": base}}).generate.calib_seed_base == base
    # fewer evaluation samples leave more room below set b
    assert params_from_dict({"generate": {"calib_seed_base": 100, "eval_samples": 100}}).generate.calib_seed_base == 100


def test_glue_kinds_and_concat_without_split():
    p = params_from_dict({"quant": {"glue": ["silu", "residual"]}})
    assert p.quant.glue == ("silu", "residual")
    p = params_from_dict({"quant": {"glue": ["concat"]}, "calibrate": {"split_shortcut": False}})
    assert p.quant.glue == ("concat",) and p.calibrate.split_shortcut is False
    assert params_from_dict({"quant": {"glue": ["concat"]}, "calibrate": {"method": "ptq4dm"}}).calibrate.split_shortcut is False
    # a preset that splits the skips (qdiffusion) with the default glue: the concatenations stay split, no error
    q = params_from_dict({"calibrate": {"method": "qdiffusion"}})
    assert q.calibrate.split_shortcut is True and "concat" in q.quant.glue


def test_repo_params_yaml_is_valid():
    load_params("params.yaml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: [1, 2\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)


def test_cli_exits_nonzero_with_one_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"select": {"sigma": -1}}))
    r = subprocess.run([sys.executable, "-m", "pqd.params", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "select.sigma = -1" in r.stderr
