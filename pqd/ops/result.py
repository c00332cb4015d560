"""A PQD result on disk: what ``dvc repro`` / ``dvc exp run`` leaves in a project folder (params.yaml, dvc.lock,
the outputs and metrics dvc.yaml names), read into a typed :class:`Result`, with its hash, flattened
params and metrics, and lineage tags. Plain files only: pqd.ops.tracking turns a Result into an MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pqd.errors import TrackingError
from pqd.formats.export import MANIFEST
from pqd.formats.files import read_json
from pqd.formats.lineage import MODEL_RECORD, canonical_json, git_commit, lock_stage_hashes, sha256_text, stage_options
from pqd.formats.metrics import PipelineMetrics
from pqd.params import Params, as_dict, load_params

BENCH_DIR = "data/bench"  # the tables of `make bench` (python -m flows.bench's default --out)
_PARAM_MAX = 6000  # longest param value MLflow accepts


def _entry_paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml ``metrics``/``plots`` list (entries are strings or one-key mappings)."""
    paths = []
    for e in entries or []:
        paths.extend([e] if isinstance(e, str) else list(e))
    return paths


@dataclass(frozen=True)
class Result:
    """A finished pipeline result in project folder ``root``, as dvc.yaml and dvc.lock describe it."""

    root: Path
    params: Params  # params.yaml, validated (complete, with defaults and the method preset resolved)
    metrics: PipelineMetrics  # every stage's metrics file that exists
    metric_files: tuple[Path, ...]
    plot_files: tuple[Path, ...]
    lock: dict[str, Any] | None  # dvc.lock, parsed (None when the stages were run without DVC)
    options: dict[str, dict[str, str]]  # stage -> {cmd option: path}

    def path(self, stage: str, option: str) -> Path:
        """Path given to ``stage`` as ``--option`` in dvc.yaml."""
        try:
            return self.root / self.options[stage][option]
        except KeyError:
            raise TrackingError(f"dvc.yaml: stage {stage!r} has no --{option} path; cannot find its output") from None

    @property
    def export_dir(self) -> Path:
        return self.path("export", "out")

    @property
    def bits(self) -> str:
        """The result's bit label, from the codes its calibration really stored (W7A8 for 7-bit codes)."""
        cal = self.metrics.calibrate
        return bits_label(self.params, cal.weight_code_bits if cal is not None else None)

    def model_info(self) -> dict[str, Any]:
        """The model stage's model.json (source, weight hashes), or {} before it has run."""
        f = self.path("model", "out") / MODEL_RECORD
        return read_json(f) if f.is_file() else {}


def read_result(root: str | Path = ".") -> Result:
    """Read the result in ``root``; one-line errors when there is none."""
    root = Path(root).resolve()
    if not (root / "dvc.yaml").is_file():
        raise TrackingError(f"{root}: dvc.yaml not found: expected a PQD project folder")
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    stage_files: dict[str, Path] = {}
    metric_files: list[Path] = []
    plot_files: list[Path] = [root / p for p in _entry_paths(dvc_yaml.get("plots"))]
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        for p in _entry_paths(stage.get("metrics")):
            metric_files.append(root / p)
            stage_files[name] = root / p
        plot_files += [root / p for p in _entry_paths(stage.get("plots"))]
    metric_files += [root / p for p in _entry_paths(dvc_yaml.get("metrics"))]
    metrics = PipelineMetrics.read(stage_files)
    if not metrics.present():
        raise TrackingError(f"{root}: no stage metrics found: run the pipeline first (make run / dvc repro)")
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.is_file() else None
    return Result(root=root, params=load_params(root / "params.yaml"), metrics=metrics,
                  metric_files=tuple(metric_files), plot_files=tuple(p for p in plot_files if p.is_file()),
                  lock=lock, options=stage_options(dvc_yaml))


def result_hash(r: Result) -> str:
    """sha256 identifying a result: dvc.lock (every dep, param and output hash), params, metrics and the
    export manifest. Git state is left out, so committing after tracking does not make a new run."""
    manifest = r.export_dir / MANIFEST
    files = read_json(manifest).get("files") if manifest.is_file() else None
    bench = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((r.root / BENCH_DIR).glob("*"))
             if p.is_file()}
    return sha256_text(canonical_json({"lock": r.lock, "params": as_dict(r.params), "metrics": r.metrics.as_dict(),
                                       "export": files, **({"bench": bench} if bench else {})}))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def flat_params(r: Result) -> dict[str, str]:
    """``section.key`` -> value as text (lists as JSON)."""
    return {k: (json.dumps(v) if isinstance(v, list) else str(v))[:_PARAM_MAX]
            for k, v in _flatten(as_dict(r.params)).items()}


def flat_metrics(r: Result) -> dict[str, float]:
    """``stage.key`` -> every finite number in the stage metrics (the evaluation protocol goes to tags)."""
    flat = _flatten({s: {k: v for k, v in m.items() if k != "protocol"} for s, m in r.metrics.as_dict().items()})
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def bits_label(params: Params, weight_code_bits: int | None = None) -> str:
    """``w<W>a<A>`` with W the width of the stored weight codes when known (``weight_code_bits``: 7 for 8-bit
    weights kept as 7-bit codes by quant.reduce_range), else quant.weight_bits; e.g. w8a8, w7a8, w4a8."""
    return f"w{weight_code_bits or params.quant.weight_bits}a{params.quant.act_bits}"


def model_slug(params: Params) -> str:
    """Short lowercase name of the source model: demo:digits -> demo-digits, org/name -> name."""
    src = params.model.source
    base = src.replace(":", "-") if src.startswith("demo:") else Path(src.rstrip("/")).name
    slug = "".join(ch if ch.isalnum() else "-" for ch in base.lower()).strip("-")
    return "-".join(filter(None, slug.split("-"))) or "model"


def lineage_tags(r: Result) -> dict[str, str]:
    """Tags that make a run auditable: git, dvc.lock stage hashes, source model, evaluation protocol."""
    git = git_commit(r.root)
    ev = r.metrics.evaluate
    tags = {"git.commit": str(git.commit), "git.dirty": str(git.dirty).lower(),
            "pqd.source_model": r.params.model.source,
            "pqd.model_sha256": str(r.model_info().get("model_sha256")),
            "pqd.bits": r.bits,
            "pqd.protocol": canonical_json(ev.to_json()["protocol"] if ev is not None else None)}
    if git.commit:
        tags["mlflow.source.git.commit"] = git.commit
    tags["mlflow.source.name"] = "dvc.yaml"  # the UI's Source column: the pipeline, whatever ran it
    tags.update(lock_stage_hashes(r.lock or {}))
    if r.lock is None:
        tags["dvc.lock"] = "absent (stages were not run by dvc)"
    return tags
