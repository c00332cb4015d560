"""``python -m pqd.bench.rotation``: what ``quant.rotate`` does to the weights it rotates, before any calibration.

For each model folder: the attention modules rotated, and over their value and output projections the mean
relative error of the weight on the 4-bit grid (``quant.weight_bits: 4``, nearest rounding, min-max per output
channel, the grid calibrate starts from) and the mean row crest factor (peak over rms), without and with the
rotation. A rotation spreads outliers; where a row has none, it makes the row more Gaussian and its peak larger.

``python -m pqd.bench.rotation --models <folder>,<folder> [--bits 4] [--method minmax]``
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from pqd.core.affine import weight_values
from pqd.core.quantize import quantize_weight
from pqd.core.rotate import ROTATIONS, rotate_attention
from pqd.diffusion.adapter import load_denoiser
from pqd.errors import InputError, command


def weight_stats(w: torch.Tensor, bits: int, method: str) -> tuple[float, float]:
    """(relative squared error of ``w`` on its ``bits``-bit grid, mean row peak / rms)."""
    w = w.detach().float()
    codes, scale = quantize_weight(w, bits, method)
    err = float((weight_values(codes, scale) - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
    rows = w.reshape(w.shape[0], -1)
    return err, float((rows.abs().amax(1) / rows.pow(2).mean(1).sqrt().clamp_min(1e-30)).mean())


def probe(folder: Path, kind: str, bits: int, method: str) -> dict[str, object]:
    net = load_denoiser(folder).net
    rotated = copy.deepcopy(net)
    report = rotate_attention(rotated, kind)
    names = [n for pair in report.linears.values() for n in pair]
    before = [weight_stats(net.get_submodule(n).weight, bits, method) for n in names]
    after = [weight_stats(rotated.get_submodule(n).weight, bits, method) for n in names]
    mean = lambda xs, i: sum(x[i] for x in xs) / max(1, len(xs))  # noqa: E731
    kinds = ", ".join(sorted(set(report.rotated.values())))
    return {"model": str(folder), "rotated": len(report.rotated), "kinds": kinds, "skipped": len(report.skipped),
            "err": (mean(before, 0), mean(after, 0)),
            "crest": (mean(before, 1), mean(after, 1))}


@command("pqd bench rotation")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.bench.rotation", description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated diffusers pipeline folders")
    ap.add_argument("--rotate", default="hadamard", choices=[r for r in ROTATIONS if r != "none"])
    ap.add_argument("--bits", type=int, default=4, help="weight bits of the grid (2..8)")
    ap.add_argument("--method", default="minmax", choices=["minmax", "mse"], help="weight range")
    a = ap.parse_args(argv)
    folders = [Path(m) for m in a.models.split(",") if m]
    for f in folders:
        if not (f / "model_index.json").is_file():
            raise InputError(f"--models {f}: not a diffusers pipeline folder (no model_index.json)")
    if not 2 <= a.bits <= 8:
        raise InputError(f"--bits {a.bits} is not allowed: expected an integer in [2, 8]")
    print(f"| model | attention rotated ({a.rotate}) | skipped | W{a.bits} rel. error of value / output projections, "
          f"without -> with | row peak / rms, without -> with |\n|---|---|---:|---|---|")
    for f in folders:
        r = probe(f, a.rotate, a.bits, a.method)
        print(f"| {r['model']} | {r['rotated']} ({r['kinds']}) | {r['skipped']} | {r['err'][0]:.5f} -> "
              f"{r['err'][1]:.5f} | {r['crest'][0]:.3f} -> {r['crest'][1]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
