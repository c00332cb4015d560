"""A PQD result on disk: what ``dvc repro`` / ``dvc exp run`` leaves in a project folder (params.yaml, dvc.lock,
the outputs and metrics dvc.yaml names), read into a :class:`Result`, with its fingerprint, flattened
params and metrics, and lineage tags. Plain files only: pqd.tracking turns a Result into an MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = "data/bench"  # the bench table of `make bench` (python -m pqd.bench's default --out)
_PARAM_MAX = 6000  # longest param value MLflow accepts


class TrackingError(RuntimeError):
    """Tracking cannot proceed (server unreachable, no result to track). The message is one line."""




def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stage_options(dvc_yaml: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per stage, the ``--option value`` pairs of its command: the paths it reads and writes."""
    out: dict[str, dict[str, str]] = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        tokens = shlex.split(str(stage.get("cmd", "")))
        out[name] = {tok[2:]: nxt for tok, nxt in zip(tokens, tokens[1:])
                     if tok.startswith("--") and not nxt.startswith("--")}
    return out


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
    params: dict[str, Any]  # params.yaml as validated by pqd.params (complete, with defaults)
    metrics: dict[str, dict[str, Any]]  # stage -> its metrics file
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


def pipeline_params(params_file: Path) -> dict[str, Any]:
    """params.yaml validated by pqd.params, as a nested dict; a ``release`` section is left to the release."""
    from pqd.params import ParamError, Params, as_dict, params_from_dict

    try:
        data = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"params: {params_file} cannot be read ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "release" in data and "release" not in {f.name for f in dataclasses.fields(Params)}:
        data = {k: v for k, v in data.items() if k != "release"}  # until pqd.params has a release section
    return as_dict(params_from_dict(data))


def read_result(root: str | Path = ".") -> Result:
    """Read the result in ``root``; one-line errors when there is none."""
    root = Path(root).resolve()
    if not (root / "dvc.yaml").is_file():
        raise TrackingError(f"{root}: dvc.yaml not found: expected a PQD project folder")
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    metrics: dict[str, dict[str, Any]] = {}
    metric_files: list[Path] = []
    plot_files: list[Path] = [root / p for p in _entry_paths(dvc_yaml.get("plots"))]
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        for p in _entry_paths(stage.get("metrics")):
            metric_files.append(root / p)
            if (root / p).is_file():
                metrics[name] = read_json(root / p)
        plot_files += [root / p for p in _entry_paths(stage.get("plots"))]
    metric_files += [root / p for p in _entry_paths(dvc_yaml.get("metrics"))]
    if not metrics:
        raise TrackingError(f"{root}: no stage metrics found: run the pipeline first (make run / dvc repro)")
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.is_file() else None
    return Result(root=root, params=pipeline_params(root / "params.yaml"), metrics=metrics,
                  metric_files=tuple(metric_files), plot_files=tuple(p for p in plot_files if p.is_file()),
                  lock=lock, options=stage_options(dvc_yaml))


def fingerprint(r: Result) -> str:
    """sha256 identifying a result: dvc.lock (every dep, param and output hash), params, metrics and the
    export manifest. Git state is left out, so committing after tracking does not make a new run."""
    manifest = r.export_dir / "manifest.json"
    files = read_json(manifest).get("files") if manifest.is_file() else None
    bench = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((r.root / BENCH_DIR).glob("*"))
             if p.is_file()}
    return _sha256(_canonical({"lock": r.lock, "params": r.params, "metrics": r.metrics, "export": files,
                               **({"bench": bench} if bench else {})}))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def flat_params(r: Result) -> dict[str, str]:
    """``section.key`` -> value as text (lists as JSON)."""
    return {k: (json.dumps(v) if isinstance(v, list) else str(v))[:_PARAM_MAX] for k, v in _flatten(r.params).items()}


def flat_metrics(r: Result) -> dict[str, float]:
    """``stage.key`` -> every finite number in the stage metrics (the evaluation protocol goes to tags)."""
    flat = _flatten({s: {k: v for k, v in m.items() if k != "protocol"} for s, m in r.metrics.items()})
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _model_json(r: Result) -> dict[str, Any]:
    f = r.path("model", "out") / "model.json"
    return read_json(f) if f.is_file() else {}


def lineage_tags(r: Result) -> dict[str, str]:
    """Tags that make a run auditable: git, dvc.lock stage hashes, source model, evaluation protocol."""
    from pqd.artifact import git_commit  # imports torch: only when tagging

    git = git_commit(r.root)
    tags = {"git.commit": str(git["commit"]), "git.dirty": str(git["dirty"]).lower(),
            "pqd.source_model": str(r.params.get("model", {}).get("source")),
            "pqd.model_sha256": str(_model_json(r).get("model_sha256")),
            "pqd.bits": bits_label(r.params),
            "pqd.protocol": _canonical(r.metrics.get("evaluate", {}).get("protocol"))}
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
    tags["mlflow.source.name"] = "dvc.yaml"  # the UI's Source column: the pipeline, whatever ran it
    tags.update(lock_stage_hashes(r.lock or {}))
    if r.lock is None:
        tags["dvc.lock"] = "absent (stages were not run by dvc)"
    return tags


def lock_stage_hashes(lock: dict[str, Any]) -> dict[str, str]:
    """``dvc.lock.<stage>``: sha256 of each stage's dvc.lock entry (its deps, params and outs hashes)."""
    return {f"dvc.lock.{s}": _sha256(_canonical(e)) for s, e in (lock.get("stages") or {}).items()}


def bits_label(params: dict[str, Any]) -> str:
    q = params.get("quant", {})
    return f"w{q.get('weight_bits')}a{q.get('act_bits')}"
