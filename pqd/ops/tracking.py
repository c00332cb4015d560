"""MLflow tracking and Model Registry for PQD results (the only module in the product that imports mlflow).

``track`` makes a result (:mod:`pqd.ops.result`) one MLflow run, found again by its ``pqd.result_hash`` tag when
tracked twice; what it logs is listed in docs/operations.md. Tracking is not a DVC stage: an unreachable server
never loses a computed result; re-run ``python -m pqd.ops.tracking track`` later.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from pqd.errors import PqdError, TrackingError, command
from pqd.formats.calibset import META
from pqd.formats.export import MANIFEST
from pqd.formats.lineage import MODEL_RECORD, canonical_json, sha256_text
from pqd.ops.result import (BENCH_DIR, result_hash, flat_metrics, flat_params, lineage_tags, model_slug,
                             read_result)
from pqd.ops.serving import Sampler


DEFAULT_EXPERIMENT = "pqd"
ARTIFACTS_DIR = "mlartifacts"  # next to a default sqlite database
MODEL_ARTIFACT = "release/model"  # where a release's pyfunc model sits inside its run
RESULT_HASH_TAG = "pqd.result_hash"
# the same hash under the tag stores written before it was renamed carry: read, never written, so a result tracked or
# registered then is reused instead of tracked twice
LEGACY_HASH_TAG = "pqd.fingerprint"
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"
_BATCH = 100  # MLflow's limit on params/tags per log_batch call


# what tracking commands report in one line: the product's own errors and the tracking server's refusals
ERRORS: tuple[type[BaseException], ...] = (PqdError, MlflowException)


# ---- where runs go ---------------------------------------------------------------------------


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite database ``<root>/mlflow.db`` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when the tracking store cannot be used, instead of MLflow's long retries."""
    db = _sqlite_file(uri)
    if db is not None and not db.parent.is_dir():
        raise TrackingError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist")
    if db is None and not uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")):
        raise TrackingError(f"MLflow tracking URI {uri!r} is not allowed: expected sqlite:///<file>, "
                            "http(s)://<server> or a database URI")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
            why = str(getattr(e, "reason", e)) or type(e).__name__
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({why}); the pipeline results are intact, "
                            "re-run `make track` (python -m pqd.ops.tracking track) when it is up")


def client(root: str | Path = ".") -> MlflowClient:
    """An MlflowClient on :func:`tracking_uri` (tracking and registry in the same store)."""
    uri = tracking_uri(root)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    """Id of experiment ``name``, created when missing (artifacts next to a sqlite database), marked as
    model development so the MLflow UI opens it on its runs rather than on GenAI traces."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_file(c.tracking_uri)
        location = (db.parent / ARTIFACTS_DIR / name).resolve().as_uri() if db is not None else None
        return c.create_experiment(name, artifact_location=location, tags={_KIND_TAG: _KIND})
    if exp.tags.get(_KIND_TAG) != _KIND:
        c.set_experiment_tag(exp.experiment_id, _KIND_TAG, _KIND)
    return exp.experiment_id


# ---- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str
    result_hash: str
    created: bool  # False: an existing finished run with this result_hash was reused
    uri: str
    name: str


def _log_batches(c: MlflowClient, run_id: str, params: dict[str, str], metrics: dict[str, float],
                 tags: dict[str, str]) -> None:
    now = int(time.time() * 1000)
    ps = [Param(k, v) for k, v in sorted(params.items())]
    ts = [RunTag(k, v) for k, v in sorted(tags.items())]
    ms = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
    for i in range(0, max(len(ps), len(ts), len(ms)), _BATCH):
        c.log_batch(run_id, metrics=ms[i:i + _BATCH], params=ps[i:i + _BATCH], tags=ts[i:i + _BATCH])


def _open_run(c: MlflowClient, experiment: str, fp: str, name: str, tags: dict[str, str],
              parent_run_id: str | None, reuse_unfinished: bool = False) -> tuple[str, str, bool]:
    """(run id, experiment id, created): the finished run tagged ``fp``, or a new one. Unfinished runs
    with that tag (an interrupted tracking) are deleted, so re-tracking replaces them."""
    exp_id = experiment_id(c, experiment)
    found = [run for tag in (RESULT_HASH_TAG, LEGACY_HASH_TAG)
             for run in c.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{fp}'", max_results=50)]
    for run in found:
        if reuse_unfinished or run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            return run.info.run_id, exp_id, False
        c.delete_run(run.info.run_id)
    tags = {**tags, RESULT_HASH_TAG: fp, "mlflow.runName": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return c.create_run(exp_id, tags=tags, run_name=name).info.run_id, exp_id, True


def track(root: str | Path = ".", experiment: str = DEFAULT_EXPERIMENT, *, parent_run_id: str | None = None,
          run_name: str | None = None, extra_tags: dict[str, str] | None = None,
          store: str | Path | None = None) -> TrackedRun:
    """Log the result in ``root`` as one MLflow run, or return the run that already holds it.

    With ``parent_run_id`` the run is a child of that run (a sweep cell); the parent is part of its
    identity, so the same result tracked in two sweeps gives one child in each. ``store``: the project whose
    tracking store receives the run (default ``root``; a sweep cell's workspace tracks into its project's)."""
    r = read_result(root)
    c = client(store if store is not None else r.root)
    fp = result_hash(r)
    if parent_run_id:
        fp = sha256_text(fp + parent_run_id)
    name = run_name or f"{model_slug(r.params)}-{r.bits}-{fp[:8]}"
    tags = {**lineage_tags(r), **(extra_tags or {})}
    run_id, exp_id, created = _open_run(c, experiment, fp, name, {}, parent_run_id)
    if created:
        try:
            _log_batches(c, run_id, flat_params(r), flat_metrics(r), tags)
            for folder in sorted({f.parent for f in r.metric_files if f.parent.is_dir()}):
                c.log_artifacts(run_id, str(folder), "metrics")
            metric_dirs = {f.parent for f in r.metric_files}
            for f in r.plot_files:
                if f.parent not in metric_dirs:
                    c.log_artifact(run_id, str(f), "plots")
            if r.export_dir.is_dir():
                c.log_artifacts(run_id, str(r.export_dir), "export")
            for f in sorted((r.root / BENCH_DIR).glob("*")):  # the table files, not each row's outputs
                if f.is_file():
                    c.log_artifact(run_id, str(f), "bench")
            for f in (r.root / "params.yaml", r.root / "dvc.lock", r.path("model", "out") / MODEL_RECORD):
                if f.is_file():
                    c.log_artifact(run_id, str(f), "lineage")
        except BaseException:
            c.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))  # re-tracking replaces it
            raise
        c.set_terminated(run_id)
    return TrackedRun(run_id, exp_id, fp, created, c.tracking_uri, name)


def start_parent(root: str | Path, experiment: str, name: str, key: dict[str, Any],
                 params: dict[str, str]) -> TrackedRun:
    """Open the parent run of a sweep identified by ``key`` (its spec and baseline), or find it again:
    an interrupted sweep re-run continues under the same parent."""
    c = client(root)
    fp = sha256_text(canonical_json(key))
    run_id, exp_id, created = _open_run(c, experiment, fp, name, {"pqd.kind": "sweep"}, None, reuse_unfinished=True)
    if created:
        _log_batches(c, run_id, params, {}, {})
    return TrackedRun(run_id, exp_id, fp, created, c.tracking_uri, name)


def finish_parent(root: str | Path, run_id: str, files: list[Path]) -> None:
    """Attach the sweep's results table to its parent run and mark it finished."""
    c = client(root)
    for f in files:
        c.log_artifact(run_id, str(f))
    c.set_terminated(run_id)


# ---- registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    created: bool  # False: this result was already registered; only the alias was (re)set
    alias: str


class PqdSampler(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour of a release: seeds in (a list of ints), one image per seed out, each a float32
    array [C, H, W] in [0, 1], sampled with the evaluation's scheduler, steps and eta."""

    def load_context(self, context: Any) -> None:
        self.sampler = Sampler.from_folder(Path(context.artifacts["export"]), Path(context.artifacts["sampling"]))

    def predict(self, model_input: list[int], params: dict[str, Any] | None = None) -> list[Any]:
        return [im.numpy() for im in self.sampler.sample([int(s) for s in model_input])]


def _registered(c: MlflowClient, name: str, description: str) -> None:
    try:
        c.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        c.create_registered_model(name, description=description)


def _requirements() -> list[str]:
    """Pinned requirements of the pyfunc sampler (what `mlflow models serve` would install)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("pqd", "torch", "diffusers", "safetensors", "pandas")]


def register_version(run: TrackedRun, root: str | Path, name: str, card: str, tags: dict[str, str],
                     alias: str = "candidate") -> RegisteredVersion:
    """Register the export of ``run`` as a version of ``name`` (pyfunc sampler + card + manifest), then
    point ``alias`` at it. Re-registering the same result reuses its version."""
    r = read_result(root)
    c = client(root)
    _registered(c, name, f"PQD quantized releases of {r.params.model.source} at {r.bits.upper()}.")
    existing = [v for v in c.search_model_versions(f"name = '{name}'")
                if run.result_hash in (v.tags.get(RESULT_HASH_TAG), v.tags.get(LEGACY_HASH_TAG))]
    if existing:
        version, created = existing[0].version, False
    else:
        with tempfile.TemporaryDirectory() as td:
            card_file = Path(td) / "model_card.md"
            card_file.write_text(card, encoding="utf-8")
            artifacts = {"export": str(r.export_dir), "model_card": str(card_file),
                         "sampling": str(r.path("evaluate", "fp-samples") / META)}
            pyfunc_log, level = logging.getLogger("mlflow.pyfunc"), logging.getLogger("mlflow.pyfunc").level
            pyfunc_log.setLevel(logging.ERROR)  # its advice against cloudpickle: PqdSampler is pickled by name
            try:
                mlflow.pyfunc.save_model(path=str(Path(td) / "model"), python_model=PqdSampler(), artifacts=artifacts,
                                         pip_requirements=_requirements())
            finally:
                pyfunc_log.setLevel(level)
            c.log_artifacts(run.run_id, str(Path(td) / "model"), MODEL_ARTIFACT)
            c.log_artifact(run.run_id, str(card_file), "release")
            c.log_artifact(run.run_id, str(r.export_dir / MANIFEST), "release")
        summary = card if len(card) <= 4800 else card[:4800] + "\n\n(truncated: the full card is release/model_card.md)"
        mv = c.create_model_version(name, f"runs:/{run.run_id}/{MODEL_ARTIFACT}", run_id=run.run_id,
                                    tags={**tags, RESULT_HASH_TAG: run.result_hash}, description=summary)
        version, created = mv.version, True
    c.set_registered_model_alias(name, alias, str(version))
    return RegisteredVersion(name, str(version), run.run_id, created, alias)


def version_info(root: str | Path, name: str, alias: str | None = None, version: str | None = None) -> dict[str, Any]:
    """A version of ``name`` by alias or number: {version, tags, run_id, aliases, description}."""
    c = client(root)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, str(version))
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise TrackingError(f"registered model {name!r} has no {what}: expected a model and {what} that "
                            "`python -m pqd.ops.release register` created") from None
    return {"version": str(mv.version), "tags": dict(mv.tags), "run_id": mv.run_id,
            "aliases": list(mv.aliases), "description": mv.description}


def set_alias(root: str | Path, name: str, alias: str, version: str) -> None:
    client(root).set_registered_model_alias(name, alias, str(version))


def _version_of(c: MlflowClient, model_uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    if not model_uri.startswith("models:/"):
        raise TrackingError(f"model URI {model_uri!r} is not allowed: expected models:/<name>@<alias> or "
                            "models:/<name>/<version>")
    name, at, ref = model_uri[len("models:/"):].partition("@")
    if not at:
        name, _, ref = name.partition("/")
    return name, str(c.get_model_version_by_alias(name, ref).version if at else ref)


def fetch_release(model_uri: str, dest: Path, root: str | Path = ".") -> dict[str, Any]:
    """Download a registered version into ``dest`` without loading (unpickling) anything: its pyfunc folder
    (the export and the sampling protocol) and its run's ``lineage/`` and ``metrics/`` artifacts. Returns
    name, version, run_id, tags, run_metrics and the local paths export, sampling, lineage, metrics."""
    c = client(root)
    try:  # resolved with this store's client: MLflow's process-wide URIs are left alone
        name, version = _version_of(c, model_uri)
        mv = c.get_model_version(name, version)
        model_dir = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=c.get_model_version_download_uri(name, version), dst_path=str(dest / "model"),
            tracking_uri=c.tracking_uri))
        run = {sub: Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=sub, dst_path=str(dest / "run"),
                                                              tracking_uri=c.tracking_uri)) for sub in ("lineage", "metrics")}
        run_metrics = dict(c.get_run(mv.run_id).data.metrics)
    except MlflowException as e:
        raise TrackingError(f"model {model_uri!r} cannot be fetched: {str(e).splitlines()[0]}") from None
    arts = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))["flavors"]["python_function"]["artifacts"]
    return {"name": name, "version": version, "run_id": mv.run_id, "tags": dict(mv.tags), "run_metrics": run_metrics,
            "export": model_dir / arts["export"]["path"], "sampling": model_dir / arts["sampling"]["path"], **run}


def load_sampler(model_uri: str, root: str | Path = ".", runtime: str | None = None) -> Sampler:
    """A working quantized sampler (:class:`pqd.ops.serving.Sampler`) from ``models:/<name>@<alias>`` (or
    ``models:/<name>/<version>``): downloads the registered export, verifies every manifest hash and rebuilds
    the denoiser network from safetensors. Nothing is unpickled (``mlflow.pyfunc.load_model`` would unpickle the model).
    ``runtime``: onnxruntime | openvino | torch; None: the one the release was evaluated in."""
    with tempfile.TemporaryDirectory() as td:
        rel = fetch_release(model_uri, Path(td), root)
        return Sampler.from_folder(rel["export"], rel["sampling"], runtime=runtime)


# ---- command line ----------------------------------------------------------------------------


def quiet_mlflow() -> None:
    """No progress bars, telemetry or INFO lines from MLflow in command-line use (errors stay one line)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@command("pqd tracking", ERRORS)
def main(argv: list[str] | None = None) -> int:
    """``python -m pqd.ops.tracking track``: log the current result as one MLflow run (idempotent)."""
    ap = argparse.ArgumentParser(prog="python -m pqd.ops.tracking")
    ap.add_argument("command", choices=["track"])
    ap.add_argument("--root", default=".", help="project folder (dvc.yaml, params.yaml, data/)")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    args = ap.parse_args(argv)
    quiet_mlflow()
    run = track(args.root, args.experiment)
    state = "new run" if run.created else "already tracked, run reused"
    print(f"pqd tracking: {state} {run.run_id} ({run.name}) in experiment {args.experiment!r} at {run.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
