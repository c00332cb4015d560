"""Stage metrics files are typed: written from frozen dataclasses, read back equal, refused in one line when a
key is unknown or missing."""

import json

import pytest

from pqd.errors import InputError
from pqd.formats.metrics import (CalibrateMetrics, EvalProtocol, EvaluateMetrics, ExportMetrics, ModelMetrics,
                                 OnnxGroupCheck, PipelineMetrics)

PROTOCOL = EvalProtocol(8, 8, "0..7", "DDIMScheduler", 6, 0.0, "pixel", 0, None, "torchscript:f.pt", "folder r", 8,
                        "clean-fid frechet_distance", "torch (simulated integer arithmetic)",
                        "8-bit weight codes")
EVALUATE = EvaluateMetrics(seconds=1.5, fid_quant_vs_ref=3.0, fid_fp_vs_ref=2.5, delta_fid=0.5, fid_quant_vs_fp=0.25,
                           noise_floor=1.0, mse_mean=1e-4, psnr_mean=40.0, psnr_median=41.0, psnr_min=30.0,
                           protocol=PROTOCOL)


def test_round_trip_with_nested_and_optional_fields(tmp_path):
    ex = ExportMetrics(quantized_layers=3, files=9, fp32_unet_bytes=100, export_unet_bytes=30, size_ratio=3.333,
                       packed_int4_layers=0, onnx_graphs=2, onnx_rel_dev_max=0.1,
                       onnx_check=(OnnxGroupCheck(0, 749.5, 0.01, 0.1), OnnxGroupCheck(1, 249.5, 0.02, 0.05)),
                       onnx_kernels={"onnxruntime": {"int8": {"QLinearConv": 4}, "float": {}, "quantized_layers": 4, "integer_layers": 4, "fallbacks": [], "float_output": []}})
    for m in (EVALUATE, ex, ModelMetrics(unet_parameters=10, unet_fp32_bytes=40)):
        path = tmp_path / f"{type(m).__name__}.json"
        m.write(path)
        assert type(m).read(path) == m
    on_disk = json.loads((tmp_path / "EvaluateMetrics.json").read_text())
    assert "fid_deployed_vs_ref" not in on_disk  # absent, not null, when the deployed model was not evaluated
    assert on_disk["protocol"]["guidance_scale"] is None  # a protocol field is always written
    assert list(on_disk)[0] == "seconds"


def test_unknown_and_missing_keys_are_one_line_errors(tmp_path):
    path = tmp_path / "evaluate.json"
    data = EVALUATE.to_json()
    path.write_text(json.dumps({**data, "fid_typo": 1.0}))
    with pytest.raises(InputError, match=r"evaluate.json: unknown key 'fid_typo'"):
        EvaluateMetrics.read(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "noise_floor"}))
    with pytest.raises(InputError, match=r"evaluate.json: key 'noise_floor' is missing"):
        EvaluateMetrics.read(path)
    path.write_text(json.dumps({**data, "protocol": {**data["protocol"], "steps": None, "extra": 1}}))
    with pytest.raises(InputError, match=r"evaluate.json.protocol: unknown key 'extra'"):
        EvaluateMetrics.read(path)


def test_pipeline_metrics_reads_what_exists(tmp_path):
    EVALUATE.write(tmp_path / "evaluate.json")
    m = PipelineMetrics.read({"evaluate": tmp_path / "evaluate.json", "export": tmp_path / "export.json"})
    assert m.evaluate == EVALUATE and m.export is None and list(m.present()) == ["evaluate"]
    with pytest.raises(InputError, match="metrics of stage 'train'"):
        PipelineMetrics.read({"train": tmp_path / "x.json"})


# data/metrics/calibrate.json as an earlier pqd wrote it (pre-rename key unet_output_mse, now output_mse)
EARLIER_CALIBRATE = """{
  "seconds": 175.032, "method": "pqd", "layers": 60, "output_quantized_layers": 59, "attention_matmuls": 0,
  "calib_samples": 512, "glue_sites": 0, "time_groups": 4, "unet_output_mse": 0.0003369458172528539,
  "fit_seconds": 11.03, "reconstruction_seconds": 158.91, "reconstructed_units": 22, "units_improved": 19,
  "units_recorded_on_disk": 0, "weight_rel_mse_mean": 4.182842376394546e-05,
  "weight_rel_mse_max": 0.00010542890231590718, "weight_code_bits": 8, "reduce_range": false,
  "integer_codes": "auto: this CPU has avx512_vnni, avx_vnni, amx_int8"
}"""


def test_a_file_of_an_earlier_version_reads_under_the_present_names(tmp_path):
    path = tmp_path / "calibrate.json"
    path.write_text(EARLIER_CALIBRATE)
    m = PipelineMetrics.read({"calibrate": path}).calibrate
    assert m.output_mse == 0.0003369458172528539 and m.layers == 60
    m.write(tmp_path / "now.json")
    on_disk = json.loads((tmp_path / "now.json").read_text())
    assert "output_mse" in on_disk and "unet_output_mse" not in on_disk  # pre-rename key: read, never written
    assert list(on_disk) == list(json.loads(EARLIER_CALIBRATE))[:8] + ["output_mse"] + list(on_disk)[9:]
    assert CalibrateMetrics.read(tmp_path / "now.json") == m
