"""``python -m pqd.report``: the short results table printed after ``make run``."""

from __future__ import annotations

import sys
from pathlib import Path

from pqd.io import read_json

STAGES = ("model", "generate", "select", "calibrate", "export", "evaluate")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def results_table(metrics_dir: Path = Path("data/metrics"), params_file: Path = Path("params.yaml")) -> str:
    from pqd.params import load_params

    m = {s: read_json(metrics_dir / f"{s}.json") for s in STAGES if (metrics_dir / f"{s}.json").is_file()}
    ev, ex = m.get("evaluate", {}), m.get("export", {})
    p = load_params(params_file)
    lines = [
        f"PQD results: W{p.quant.weight_bits}A{p.quant.act_bits}, source {p.model.source}, "
        f"{ev.get('protocol', {}).get('num_samples', 'n/a')} samples, features {p.evaluate.features}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| FID FP vs reference | {_fmt(ev.get('fid_fp_vs_ref'))} |",
        f"| FID quantized vs reference | {_fmt(ev.get('fid_quant_vs_ref'))} |",
        f"| delta FID (quantized - FP) | {_fmt(ev.get('delta_fid'))} |",
        f"| FID quantized vs FP samples | {_fmt(ev.get('fid_quant_vs_fp'))} |",
        f"| noise floor (FP vs FP, disjoint seeds) | {_fmt(ev.get('noise_floor'))} |",
        f"| PSNR vs FP, same seed (mean dB) | {_fmt(ev.get('psnr_mean'), 2)} |",
        f"| UNet size fp32 / export | {_fmt(ex.get('size_ratio'), 2)}x "
        f"({ex.get('fp32_unet_bytes', 'n/a')} / {ex.get('export_unet_bytes', 'n/a')} bytes) |",
    ]
    if "digitnet_heldout_accuracy" in m.get("model", {}):
        lines.append(f"| digit feature network held-out accuracy | {m['model']['digitnet_heldout_accuracy']:.4f} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {_fmt(m[s].get('seconds'), 1)} |" for s in STAGES if s in m]
    lines.append(f"| total | {_fmt(sum(m[s].get('seconds', 0) for s in m), 1)} |")
    return "\n".join(lines)


def main() -> int:
    try:
        print(results_table())
    except (FileNotFoundError, ValueError) as e:
        print(f"pqd report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
