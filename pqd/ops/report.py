"""``python -m pqd.ops.report``: the short results table printed after ``make run``."""

from __future__ import annotations

import sys
from pathlib import Path

from pqd.errors import command
from pqd.formats.metrics import EvaluateMetrics
from pqd.ops.result import Result, read_result


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(ev: EvaluateMetrics | None, key: str, digits: int = 3) -> str:
    """The value of ``key`` with its bootstrap interval when evaluate recorded one: '0.036 [0.031, 0.043]'."""
    if ev is None:
        return "n/a"
    ci = ev.get(f"{key}_ci")
    return _fmt(ev.get(key), digits) + (f" [{_fmt(ci.lo, digits)}, {_fmt(ci.hi, digits)}]" if ci is not None else "")


def results_table(r: Result) -> str:
    """The headline metrics of result ``r`` and each stage's wall time, as markdown."""
    m, p = r.metrics, r.params
    ev, ex = m.evaluate, m.export
    lines = [
        f"PQD results: {r.bits.upper()}, source {p.model.source}, "
        f"{ev.protocol.num_samples if ev else 'n/a'} samples, features {p.evaluate.features}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| FID FP vs reference | {_ci(ev, 'fid_fp_vs_ref')} |",
        f"| FID quantized vs reference | {_ci(ev, 'fid_quant_vs_ref')} |",
        f"| delta FID (quantized - FP) | {_ci(ev, 'delta_fid')} |",
        f"| FID quantized vs FP samples | {_ci(ev, 'fid_quant_vs_fp')} |",
        f"| noise floor (FP vs FP, disjoint seeds) | {_fmt(ev and ev.noise_floor)} |",
        f"| PSNR vs FP, same seed (mean dB) | {_ci(ev, 'psnr_mean', 2)} |",
        f"| PSNR between FP images of other seeds (mean dB) | {_fmt(ev and ev.psnr_other_seed_mean, 2)} |",
        f"| UNet size fp32 / export | {_fmt(ex and ex.size_ratio, 2)}x "
        f"({ex.fp32_unet_bytes if ex else 'n/a'} / {ex.export_unet_bytes if ex else 'n/a'} bytes) |",
    ]
    if ev is not None and ev.fid_deployed_vs_simulated is not None:
        runtime = ev.protocol.backend.split(" ", 1)[0]  # "openvino (deployed ONNX, integer kernels)" -> openvino
        lines += [f"| FID deployed ({runtime}) vs simulated | {_fmt(ev.fid_deployed_vs_simulated)} |",
                  f"| PSNR deployed vs simulated (median dB) | {_fmt(ev.psnr_deployed_vs_simulated_median, 2)} |"]
    if ex is not None and ex.onnx_rel_dev_max is not None:
        lines.append(f"| ONNX deviation / quantization error (max over time groups) | {_fmt(ex.onnx_rel_dev_max)} |")
    if ev is not None:
        lines.append(f"| weight codes | {ev.protocol.weight_codes} |")
        if ev.protocol.intervals:
            lines.append(f"| intervals [lo, hi] | {ev.protocol.intervals} |")
    if m.model is not None and m.model.digitnet_heldout_accuracy is not None:
        lines.append(f"| digit feature network held-out accuracy | {m.model.digitnet_heldout_accuracy:.4f} |")
    stages = m.present()
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {_fmt(sm.seconds, 1)} |" for s, sm in stages.items()]
    lines.append(f"| total | {_fmt(sum(sm.seconds for sm in stages.values()), 1)} |")
    return "\n".join(lines)


@command("pqd report")
def main(argv: list[str] | None = None) -> int:
    """``python -m pqd.ops.report [PROJECT]`` (default: the current folder)."""
    argv = sys.argv[1:] if argv is None else argv
    print(results_table(read_result(Path(argv[0] if argv else "."))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
