"""export stage: qstate/ + model/ -> export/ (integer weights, qmap.json, manifest.json); see pqd.artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pqd.artifact import QWEIGHTS, git_commit, load_quantized_unet, write_export
from pqd.core import quant_layers
from pqd.diffusion.adapter import load_denoiser
from pqd.io import atomic_dir, read_json
from pqd.params import Params, as_dict
from pqd.qstate_io import load_qstate, load_time_groups


def run(params: Params, model: Path, qstate: Path, out: Path) -> dict[str, Any]:
    state = load_qstate(qstate)
    den = load_denoiser(model)
    source = read_json(model / "model.json")
    extra = {"source_model": {"source": source["source"], "model_sha256": source["model_sha256"]},
             "params": as_dict(params), "git": git_commit()}
    with atomic_dir(out) as tmp:
        info = write_export(model, den.unet, state, load_time_groups(qstate), tmp,
                            float_dtype=getattr(torch, params.export.float_dtype), manifest_extra=extra)
        # the loader must rebuild exactly these integer weights before the export is accepted
        rebuilt = quant_layers(load_quantized_unet(tmp))
        for name, lp in state.items():
            if not torch.equal(rebuilt[name].weight_int, lp.weight_int.to(torch.int8)):
                raise RuntimeError(f"export: layer {name} does not round-trip through the export format")
    fp_bytes = sum(p.stat().st_size for p in (model / "unet").glob("*.safetensors"))
    q_bytes = (out / QWEIGHTS).stat().st_size
    w4 = sum(1 for lp in state.values() if lp.weight_bits <= 4)
    return {**info, "fp32_unet_bytes": fp_bytes, "export_unet_bytes": q_bytes,
            "size_ratio": round(fp_bytes / q_bytes, 3), "packed_int4_layers": w4}


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("export", run, ["model", "qstate", "out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
