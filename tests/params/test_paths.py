"""`python -m pqd.params` checks every path named in params and the device before any stage runs; params.yaml with
a key written twice is refused; quant.reduce_range resolves from the CPU's flags."""

import pytest
import torch

from pqd.errors import ParamError
from pqd.params import check_paths, load_params, params_from_dict
from pqd.params.load import check_params_file
from pqd.params.__main__ import main as params_main
from pqd.params.machine import cpu_vnni_flags, integer_codes


def test_paths_named_in_params_must_exist(tmp_path, tiny_pipeline, ts_features):
    good = params_from_dict({"model": {"source": str(tiny_pipeline)}, "evaluate": {
        "features": f"torchscript:{ts_features}", "reference": str(tmp_path)}})
    check_paths(good)
    cases = [({"model": {"source": str(tmp_path / "nope")}}, "model.source = '.*nope' is not allowed: .* does not exist"),
             ({"model": {"source": str(tmp_path)}}, "model.source = .* the folder has no model_index.json"),
             ({"evaluate": {"features": "torchscript:/no/feat.pt"}},
              r"evaluate.features = 'torchscript:/no/feat.pt' is not allowed: /no/feat.pt does not exist"),
             ({"evaluate": {"reference": "./refs-typo"}}, r"evaluate.reference = './refs-typo' is not allowed"),
             ({"evaluate": {"reference": str(ts_features)}}, "is not a folder"),
             ({"evaluate": {"reference": "stats.npz"}}, r"stats.npz does not exist")]
    for data, message in cases:
        with pytest.raises(ParamError, match=message):
            check_paths(params_from_dict(data))
    # a path a stage makes (a dvc.yaml output) is fine before it exists
    check_paths(params_from_dict({"evaluate": {"reference": "data/samples/fp/b"}}), ("data/samples/fp",))


def test_the_params_command_checks_paths_and_knows_pipeline_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths in params are relative to the project, where dvc runs the stages
    (tmp_path / "dvc.yaml").write_text("stages:\n  generate:\n    cmd: x\n    outs:\n      - data/samples/fp\n")
    f = tmp_path / "params.yaml"
    f.write_text("evaluate:\n  reference: data/samples/fp/b\n")
    assert params_main([str(f)]) == 0, capsys.readouterr().err
    f.write_text("evaluate:\n  reference: data/samples/fq/b\n")
    assert params_main([str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pqd: error: params: evaluate.reference = 'data/samples/fq/b'") and "\n" not in err


def test_a_pipeline_of_a_users_model_needs_other_features_than_the_demos(tmp_path, capsys, tiny_pipeline, ts_features):
    f = tmp_path / "params.yaml"
    f.write_text(f"model:\n  source: {tiny_pipeline}\n")
    assert params_main([str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluate.features = 'demo:digits' is not allowed with model.source = " in err and "\n" not in err
    f.write_text(f"model:\n  source: {tiny_pipeline}\nevaluate:\n  features: torchscript:{ts_features}\n")
    assert params_main([str(f)]) == 0, capsys.readouterr().err
    params_from_dict({"model": {"source": str(tiny_pipeline)}})  # one stage alone (the model stage) takes it


def test_a_key_written_twice_is_an_error(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("quant:\n  weight_bits: 4\n  act_bits: 8\n  weight_bits: 8\n")
    with pytest.raises(ParamError, match=r"key 'weight_bits' is written twice \(lines 2 and 4\)"):
        load_params(f)
    f.write_text("quant:\n  weight_bits: 4\nquant:\n  act_bits: 8\n")
    with pytest.raises(ParamError, match=r"key 'quant' is written twice"):
        load_params(f)


CPUINFO_VNNI = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n"
CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"


def test_reduce_range_auto_follows_the_cpu():
    assert cpu_vnni_flags(CPUINFO_VNNI) == ("avx512_vnni", "amx_int8") and cpu_vnni_flags(CPUINFO_AVX2) == ()
    auto = params_from_dict({})
    assert auto.quant.reduce_range == "auto"
    assert integer_codes(auto, "x86_64", CPUINFO_VNNI).reduce_range is False
    codes = integer_codes(auto, "x86_64", CPUINFO_AVX2)
    assert codes.reduce_range is True and "no VNNI" in codes.reason
    assert integer_codes(auto, "aarch64", "").reduce_range is False
    forced = params_from_dict({"quant": {"reduce_range": True}})
    assert integer_codes(forced, "x86_64", CPUINFO_VNNI).reduce_range is True
    assert integer_codes(params_from_dict({"quant": {"reduce_range": False}}), "x86_64", CPUINFO_AVX2).reduce_range is False
    with pytest.raises(ParamError, match=r"quant.reduce_range = 1 is not allowed: expected one of 'auto', True, False"):
        params_from_dict({"quant": {"reduce_range": 1}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_params_command_refuses_cuda_on_a_machine_without_it(tmp_path, capsys):
    """device: cuda fails with the other params (make run's first step), not in the generate stage."""
    f = tmp_path / "params.yaml"
    f.write_text("device: cuda\n")
    with pytest.raises(ParamError, match=r"^params: device = 'cuda' is not allowed here: torch.cuda.is_available\(\) is False"):
        check_params_file(f)
    assert params_main([str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pqd: error: params: device = 'cuda' is not allowed here: torch.cuda.is_available() is False on this "
                   "machine; expected 'cpu' or 'auto' (the GPU when there is one)")
    for device in ("cpu", "auto"):
        f.write_text(f"device: {device}\n")
        assert check_params_file(f).device == device
