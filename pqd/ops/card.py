"""The model card of a release: method, metrics with intervals, the gate's checks, protocol, lineage, parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

from pqd.ops import remote, tracking
from pqd.ops.result import Result, flat_params, lineage_tags
from pqd.params import QuantParams, as_dict

# the registry alias a user loads (pqd.ops.release moves it with `promote`)
PRODUCTION = "production"

def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def _weight_granularity(q: QuantParams) -> str:
    """How weight scales are shared: per output channel, or per group of input channels below 8 bits."""
    if not q.weight_group_size:
        return "per output channel"
    return f"per group of {q.weight_group_size} input channels (layers below 8 bits; 8-bit layers per output channel)"


def model_card(r: Result, name: str, checks: list[tuple[str, str, str]], thresholds_from: str, waived: bool,
               run: tracking.TrackedRun) -> str:
    """Markdown: method, metrics, the gate's ``checks`` (name, verdict, detail; thresholds read from
    ``thresholds_from``, ``waived``: released with --allow-uncommitted), evaluation protocol, lineage, parameters,
    how to load."""
    p, ev, ex = r.params, r.metrics.evaluate, r.metrics.export
    tags = lineage_tags(r)
    q = p.quant
    cal = r.metrics.calibrate
    method = [("bits", f"weights {q.weight_bits}-bit {_weight_granularity(q)} (symmetric), activations "
                       f"{q.act_bits}-bit per tensor (asymmetric), edge layers {q.edge_bits}-bit"),
              ("mixed precision", "off" if q.weight_bits_budget is None else
               f"budget {q.weight_bits_budget:g} average weight bits: "
               f"{cal.mixed_high_layers if cal is not None else '?'} layers moved to 8 bits by sensitivity"),
              ("rotation", "off" if q.rotate == "none" else
               f"{q.rotate}, folded into {cal.rotated_attention if cal is not None else '?'} attention modules' value "
               "and output projections (exact)"),
              ("attention matmuls", f"Q·Kᵀ and softmax·V quantized, softmax output {q.softmax_bits}-bit"
               if q.attention else "Q·Kᵀ and softmax·V in float (projections quantized)")]
    method += [(f"{sec}.{k}", v) for sec in ("select", "calibrate") for k, v in as_dict(getattr(p, sec)).items()]
    metrics = []
    if ev is not None:  # each with its bootstrap interval over the evaluation seeds, where evaluate recorded one
        metrics += [(f"evaluate.{k}", _num(getattr(ev, k)), str(ev.get(f"{k}_ci") or "-")) for k in
                    ("delta_fid", "fid_quant_vs_ref", "fid_fp_vs_ref", "fid_quant_vs_fp", "noise_floor", "psnr_mean",
                     "psnr_other_seed_mean")]
    if ex is not None:
        metrics += [(f"export.{k}", _num(getattr(ex, k)), "-")
                    for k in ("size_ratio", "weight_bits_mean", "export_unet_bytes", "fp32_unet_bytes")]
    lineage = [("git commit", f"{tags['git.commit']} (dirty: {tags['git.dirty']})"), ("MLflow run", run.run_id),
               ("result hash", run.result_hash), ("source model", tags["pqd.source_model"]),
               ("source model sha256", tags["pqd.model_sha256"])]
    lineage += [(k, v) for k, v in sorted(tags.items()) if k.startswith("dvc.lock")]
    lineage += sorted(remote.release_tags(r.root, r.lock).items())
    protocol = sorted(dataclasses.asdict(ev.protocol).items()) if ev is not None else []
    return "\n\n".join([
        f"# {name}",
        f"PQD post-training quantization of `{p.model.source}` at {r.bits.upper()}: integer "
        "weights and time-aware activation quantizers calibrated on samples from the model's own denoising "
        "trajectories. The artifact is the export folder (`export/`, hashes in `manifest.json`)."
        + ("\n\n**Released with --allow-uncommitted**: its dvc.lock is not the one committed at the recorded git "
           "commit, so that commit does not reproduce it (`pqd audit` reports lineage FAILED)." if waived else ""),
        "## Method\n\n" + _table(method, ("setting", "value")),
        "## Metrics\n\n" + (f"Intervals: {ev.protocol.intervals}.\n\n" if ev is not None and ev.protocol.intervals
                              else "") + _table(metrics, ("metric", "value", "interval")),
        f"## Quality gate (thresholds from {thresholds_from})\n\n"
        + _table(checks, ("check", "result", "detail")),
        "## Evaluation protocol\n\n" + _table(protocol, ("key", "value")),
        "## Lineage\n\n" + _table(lineage, ("what", "value")),
        "## Load\n\n```python\nfrom pqd.ops.tracking import load_sampler\n"
        f'sampler = load_sampler("models:/{name}@{PRODUCTION}")\nimages = sampler.sample([0, 1, 2, 3])  '
        "# float32 [4, C, H, W] in [0, 1]\n```",
        "## Parameters\n\n" + _table(sorted(flat_params(r).items()), ("key", "value")),
    ]) + "\n"
