"""Audit a release: ``pqd audit <export dir | models:/name@alias>`` re-verifies it from its files.

Each check (listed in docs/trust.md) passes, fails, or is skipped when what it needs is not there; any failure
fails the audit. Registry access goes through :mod:`pqd.ops.tracking`; nothing is unpickled.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pqd import deploy
from pqd.errors import PqdError, TrackingError, one_line
from pqd.formats.export import FORMAT_VERSION, MANIFEST, evaluated_backend, verify_manifest
from pqd.formats.files import read_json
from pqd.formats.metrics import EvaluateMetrics
from pqd.formats.qstate import QMAP
from pqd.formats.lineage import (MODEL_RECORD, dvc_dir_md5, git_commit, git_file, lock_hash, lock_stage_hashes,
                                 lock_ties_metrics, model_digest, stage_options, weight_hashes)
from pqd.ops import remote, tracking
from pqd.ops.release import REGISTRY_METRICS

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # pass | FAIL | skip
    detail: str


def _project(root: Path | None) -> tuple[Path, dict[str, dict[str, str]]] | None:
    if root is None or not (root / "dvc.yaml").is_file():
        return None
    return root, stage_options(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {})


def check_hashes(export: Path) -> tuple[Finding, dict[str, Any]]:
    """The export's files against its manifest; returns the finding and the manifest (as read, even when
    a file fails, so the other checks still run; empty when there is none)."""
    try:
        manifest = read_json(export / MANIFEST) if (export / MANIFEST).is_file() else {}
    except PqdError as e:
        return Finding("hashes", FAIL, one_line(e)), {}
    try:
        verify_manifest(export)
        version = read_json(export / QMAP).get("format_version")
    except PqdError as e:
        return Finding("hashes", FAIL, one_line(e)), manifest
    if version != FORMAT_VERSION:
        return Finding("hashes", FAIL, f"qmap.json format_version = {version!r}: expected {FORMAT_VERSION}"), manifest
    return Finding("hashes", PASS, f"{len(manifest.get('files', {}))} files match manifest.json"), manifest


def check_source_model(manifest: dict[str, Any], recorded: dict[str, str | None], model_dir: Path | None) -> Finding:
    """``recorded``: {where: model sha256} from the release's records; ``model_dir``: a model folder to rehash."""
    claimed = (manifest.get("source_model") or {}).get("model_sha256")
    if not claimed:
        return Finding("source_model", FAIL, "manifest.json records no source model sha256")
    seen = dict(recorded)
    if model_dir is not None and (model_dir / "model_index.json").is_file():
        seen[f"{model_dir} (rehashed)"] = model_digest(weight_hashes(model_dir))
    if not seen:
        return Finding("source_model", SKIP, "no record or model folder to compare the manifest's source hash with")
    bad = {k: v for k, v in seen.items() if v != claimed}
    if bad:
        where, value = next(iter(bad.items()))
        return Finding("source_model", FAIL, f"{where} has source model sha256 {value}, the manifest {claimed}")
    return Finding("source_model", PASS, f"{claimed[:12]}... matches {', '.join(seen)}")


def check_lineage(lock: dict[str, Any] | None, root: Path, commit: str | None, export: Path, export_path: str,
                  tags: dict[str, str] | None) -> Finding:
    """The recorded dvc.lock against the commit, the registry tags and the export itself."""
    if lock is None:
        return Finding("lineage", FAIL, "no dvc.lock was recorded with this release")
    if not commit or commit == "None":
        return Finding("lineage", FAIL, "no git commit was recorded with this release")
    at_commit = git_file(root, commit, "dvc.lock")
    if at_commit is None:
        return Finding("lineage", FAIL, f"dvc.lock at commit {commit[:12]} cannot be read in {root} "
                                        "(commit missing, or dvc.lock not committed there)")
    if yaml.safe_load(at_commit) != lock:
        return Finding("lineage", FAIL, f"the recorded dvc.lock differs from dvc.lock at commit {commit[:12]}: "
                                        "the release was made from uncommitted pipeline state")
    if tags is not None:
        bad = [k for k, v in lock_stage_hashes(lock).items() if tags.get(k) != v]
        if bad:
            return Finding("lineage", FAIL, f"registry tag {bad[0]} = {tags.get(bad[0])!r} differs from the recorded dvc.lock")
    made, actual = lock_hash((lock.get("stages") or {}).get("export", {}).get("outs"), export_path), dvc_dir_md5(export)
    if made != actual:
        return Finding("lineage", FAIL, f"dvc.lock records {export_path} {made}, the export's files hash to {actual}")
    return Finding("lineage", PASS, f"dvc.lock at commit {commit[:12]} records this export ({actual})")


def check_kernels(export: Path, manifest: dict[str, Any] | None, runtime: str | None) -> Finding:
    """Compile time group 0's ONNX graph in ``runtime`` (None: the one the release was evaluated in, from the
    manifest's evaluate.backend; onnxruntime when that was torch) and check that every quantized layer runs on an
    integer kernel (pqd.deploy.kernels)."""
    graph = export / deploy.ONNX_DIR / deploy.graph_file(0)
    if not graph.is_file():
        return Finding("kernels", SKIP, "the export has no ONNX graphs (export.onnx = false)")
    if runtime is None:
        backend = evaluated_backend(manifest or {})
        runtime = backend if backend in deploy.RUNTIMES else "onnxruntime"
    a = deploy.kernel_audit(graph, deploy.check_runtime(runtime))
    return Finding("kernels", FAIL if a.fallbacks else PASS, a.line())


def check_metrics(lock: dict[str, Any] | None, options: dict[str, dict[str, str]], evaluate_json: Path,
                  registry: dict[str, tuple[str, float]] | None) -> Finding:
    """evaluate.json is tied to the export by dvc.lock, and every registry value equals it. ``registry``:
    {where the registry holds it: (evaluate.json key, value)}."""
    if lock is None:
        return Finding("metrics", FAIL, "no dvc.lock was recorded with this release")
    tied, detail = lock_ties_metrics(lock, options, evaluate_json)
    if not tied:
        return Finding("metrics", FAIL, detail)
    if registry is None:
        return Finding("metrics", PASS, f"{evaluate_json.name} is the one dvc.lock ties to this export (no registry entry)")
    try:
        ev = EvaluateMetrics.read(evaluate_json)
    except PqdError as e:
        return Finding("metrics", FAIL, one_line(e))
    for where, (key, value) in registry.items():
        have = ev.get(key)  # a dotted key for an interval's bound: delta_fid_ci.hi
        if not isinstance(have, (int, float)) or float(have) != value:
            return Finding("metrics", FAIL, f"registry {where} = {value!r} but the release's evaluate.json has "
                                            f"{key} = {have!r}")
    return Finding("metrics", PASS, f"{len(registry)} registry values equal evaluate.json, which dvc.lock ties to this export")


def audit_export(export: Path, root: Path | None = None, runtime: str | None = None) -> list[Finding]:
    """Audit an export folder; ``root`` (default: the nearest parent with dvc.yaml) is its project; ``runtime``: the
    one whose kernels are audited (None: the one the export was evaluated in)."""
    export = export.resolve()
    root = root or next((p for p in export.parents if (p / "dvc.yaml").is_file()), None)
    hashes, manifest = check_hashes(export)
    found = [hashes, check_kernels(export, manifest, runtime)]
    proj = _project(root)
    if proj is None:
        found.append(check_source_model(manifest, {}, None) if manifest else Finding("source_model", SKIP, "no manifest"))
        found += [Finding("lineage", SKIP, "not inside a DVC project"), Finding("metrics", SKIP, "not inside a DVC project")]
        return found
    root, options = proj
    model_dir = root / options["model"]["out"]
    recorded = {}
    if (model_dir / MODEL_RECORD).is_file():
        recorded[f"{options['model']['out']}/{MODEL_RECORD}"] = read_json(model_dir / MODEL_RECORD).get("model_sha256")
    found.append(check_source_model(manifest, recorded, model_dir) if manifest else Finding("source_model", FAIL, "no manifest"))
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.is_file() else None
    found.append(check_lineage(lock, root, git_commit(root).commit, export, options["export"]["out"], None))
    found.append(check_metrics(lock, options, root / options["evaluate"]["metrics"], None))
    return found


def check_remote(root: Path, tags: dict[str, str]) -> Finding:
    """Pull the release's outputs from the remote it records, at its commit, and compare their hashes."""
    url, commit = tags.get(remote.REMOTE_TAG), tags.get("git.commit")
    if not url or url == "none":
        return Finding("remote", FAIL, "the release records no DVC remote (make remote, make push, then release)")
    with tempfile.TemporaryDirectory() as td:
        try:
            pulled = remote.pull_release(root, str(commit), url, Path(td) / "clone")
        except PqdError as e:
            return Finding("remote", FAIL, one_line(e))
        ok, detail = remote.check_pulled(pulled, tags)
    return Finding("remote", PASS if ok else FAIL, detail)


def audit_release(model_uri: str, root: Path, from_remote: bool = False, runtime: str | None = None
                  ) -> tuple[list[Finding], str]:
    """Audit a registered version (``models:/name@alias`` or ``models:/name/N``) against project ``root``
    (its git history holds the recorded commit), and with ``from_remote`` against the outputs pulled from its
    DVC remote. Returns the findings and 'name version N'."""
    proj = _project(root)
    if proj is None:
        raise TrackingError(f"{root}: dvc.yaml not found: run pqd audit in the release's project (--root)")
    root, options = proj
    with tempfile.TemporaryDirectory() as td:
        rel = tracking.fetch_release(model_uri, Path(td), root)
        tags = rel["tags"]
        hashes, manifest = check_hashes(rel["export"])
        lineage_model = rel["lineage"] / MODEL_RECORD
        recorded = {"registry tag pqd.model_sha256": tags.get("pqd.model_sha256")}
        if lineage_model.is_file():
            recorded[f"lineage/{MODEL_RECORD}"] = read_json(lineage_model).get("model_sha256")
        lock_file = rel["lineage"] / "dvc.lock"
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.is_file() else None
        registry = {f"tag pqd.{k}": (k, float(tags[f"pqd.{k}"])) for k in REGISTRY_METRICS if f"pqd.{k}" in tags}
        registry.update({f"run metric {k}": (k.split(".", 1)[1], v) for k, v in rel["run_metrics"].items()
                         if k.startswith("evaluate.")})
        findings = [hashes, check_kernels(rel["export"], manifest, runtime),
                    check_source_model(manifest, recorded, None) if manifest else Finding("source_model", FAIL, "no manifest"),
                    check_lineage(lock, root, tags.get("git.commit"), rel["export"], options["export"]["out"], tags),
                    check_metrics(lock, options, rel["metrics"] / Path(options["evaluate"]["metrics"]).name, registry)]
        if from_remote:
            findings.append(check_remote(root, tags))
        return findings, f"{rel['name']} version {rel['version']}"
